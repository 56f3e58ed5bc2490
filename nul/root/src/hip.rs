//! Reading the hypervisor information page.

use peregrine_abi::hip::{mem_kind, CpuDesc, Hip, MemDesc, HIP_SIGNATURE};

/// A view of the HIP mapped at the address the kernel passed.
#[derive(Clone, Copy)]
pub struct HipView(pub &'static Hip);

impl HipView {
    /// Checks the signature and returns the view.
    ///
    /// # Safety
    /// `addr` must be the address of the HIP page the kernel mapped (read-only, for the
    /// lifetime of the root).
    pub unsafe fn new(addr: u64) -> Option<Self> {
        // SAFETY: the caller guarantees `addr` is the mapped HIP.
        let h = unsafe { &*(addr as *const Hip) };
        (h.signature == HIP_SIGNATURE).then_some(HipView(h))
    }

    fn base(&self) -> *const u8 {
        self.0 as *const Hip as *const u8
    }

    /// CPU descriptors.
    pub fn cpus(&self) -> &'static [CpuDesc] {
        let n = (self.0.num_cpus as usize).min(peregrine_abi::hip::MAX_CPUS);
        // SAFETY: the kernel lays out `num_cpus` descriptors at `cpu_offset` inside the
        // HIP page (checked against the page size here), aligned to 8.
        unsafe {
            assert!(self.0.cpu_offset as usize + n * 8 <= 4096);
            core::slice::from_raw_parts(self.base().add(self.0.cpu_offset as usize).cast(), n)
        }
    }

    /// Memory descriptors.
    pub fn mems(&self) -> &'static [MemDesc] {
        let n = (self.0.num_mem as usize).min(peregrine_abi::hip::MAX_MEM_DESC);
        // SAFETY: as for `cpus`, with 24-byte descriptors.
        unsafe {
            assert!(self.0.mem_offset as usize + n * 24 <= 4096);
            core::slice::from_raw_parts(self.base().add(self.0.mem_offset as usize).cast(), n)
        }
    }

    /// The command line of a module descriptor.
    pub fn cmdline(&self, m: &MemDesc) -> &'static str {
        if m.kind != mem_kind::MODULE || m.aux as usize >= 4096 {
            return "";
        }
        // SAFETY: `aux` is an offset inside the HIP page (checked above); the string
        // is NUL-terminated within the page (the scan stops at the page end).
        let bytes = unsafe {
            let p = self.base().add(m.aux as usize);
            let max = 4096 - m.aux as usize;
            let mut n = 0;
            while n < max && *p.add(n) != 0 {
                n += 1;
            }
            core::slice::from_raw_parts(p, n)
        };
        core::str::from_utf8(bytes).unwrap_or("")
    }

    /// Boot modules in order (the first is the root).
    pub fn modules(&self) -> impl Iterator<Item = &'static MemDesc> {
        self.mems().iter().filter(|m| m.kind == mem_kind::MODULE)
    }

    /// Online CPU numbers.
    pub fn online_cpus(&self) -> impl Iterator<Item = u64> {
        self.cpus()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.online != 0)
            .map(|(i, _)| i as u64)
    }
}

/// Splits a module command line into the file name and the arguments. QEMU puts the
/// file name first; GRUB passes what the configuration says, which by our convention
/// also starts with the file name.
pub fn split_cmdline(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.find(' ') {
        Some(i) => (&s[..i], s[i + 1..].trim()),
        None => (s, ""),
    }
}

pub use nul_rt::start_info::{arg, flag};
