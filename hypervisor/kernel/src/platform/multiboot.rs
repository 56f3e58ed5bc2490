//! Multiboot v1 boot information, copied into kernel memory at boot.
//!
//! Parsed by hand rather than with the `multiboot` crate: that crate wants a
//! memory-management trait object for every pointer it follows and hides the raw
//! command-line strings; the few fields we need are simpler to read directly (spec:
//! "Multiboot Specification version 0.6.96", section 3.3).
//!
//! Command lines are kept raw: QEMU puts the file name first (the kernel's, a module's),
//! GRUB passes what the config says. Everything is copied, so the loader's info pages may
//! be reused once [`parse`] has run.

use crate::mem::layout::phys_to_ptr;

/// The magic value in EAX at entry.
pub const BOOT_MAGIC: u32 = 0x2bad_b002;
/// Maximum memory-map entries kept.
pub const MAX_MMAP: usize = 64;
/// Maximum modules kept.
pub const MAX_MODULES: usize = 32;
const POOL: usize = 8192;

/// One firmware memory-map entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct MmapEntry {
    /// Physical start.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Firmware type (1 = available, 3 = ACPI, 4 = NVS, else reserved).
    pub kind: u32,
}

/// One boot module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Module {
    /// Physical start.
    pub start: u64,
    /// Physical end (exclusive).
    pub end: u64,
    cmd: (u16, u16),
}

/// Everything the kernel keeps from the boot loader.
#[derive(Debug)]
pub struct BootInfo {
    /// Physical address of the Multiboot info structure.
    pub info_phys: u64,
    /// Firmware memory map.
    pub mmap: [MmapEntry; MAX_MMAP],
    /// Number of valid `mmap` entries.
    pub mmap_len: usize,
    /// Boot modules.
    pub modules: [Module; MAX_MODULES],
    /// Number of valid `modules`.
    pub modules_len: usize,
    /// Physical ranges of the loader's info (structure, strings, tables): reserved.
    pub info_ranges: [(u64, u64); 4 + MAX_MODULES],
    /// Number of valid `info_ranges`.
    pub info_ranges_len: usize,
    cmdline: (u16, u16),
    pool: [u8; POOL],
    pool_len: usize,
}

impl BootInfo {
    const fn empty() -> Self {
        Self {
            info_phys: 0,
            mmap: [MmapEntry {
                addr: 0,
                len: 0,
                kind: 0,
            }; MAX_MMAP],
            mmap_len: 0,
            modules: [Module {
                start: 0,
                end: 0,
                cmd: (0, 0),
            }; MAX_MODULES],
            modules_len: 0,
            info_ranges: [(0, 0); 4 + MAX_MODULES],
            info_ranges_len: 0,
            cmdline: (0, 0),
            pool: [0; POOL],
            pool_len: 0,
        }
    }

    /// The memory map.
    pub fn mmap(&self) -> &[MmapEntry] {
        &self.mmap[..self.mmap_len]
    }

    /// The modules, in loader order (the first is the root task).
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.modules_len]
    }

    /// The kernel command line, raw.
    pub fn cmdline(&self) -> &str {
        self.str_at(self.cmdline)
    }

    /// A module's command line, raw (QEMU: file name first, then arguments).
    pub fn module_cmdline(&self, m: &Module) -> &str {
        self.str_at(m.cmd)
    }

    /// Whether the kernel command line contains the word `w`.
    pub fn has_arg(&self, w: &str) -> bool {
        self.cmdline().split_ascii_whitespace().any(|a| a == w)
    }

    /// Total bytes of available RAM in the memory map.
    pub fn ram_bytes(&self) -> u64 {
        self.mmap()
            .iter()
            .filter(|e| e.kind == 1)
            .map(|e| e.len)
            .sum()
    }

    fn str_at(&self, (off, len): (u16, u16)) -> &str {
        let b = &self.pool[usize::from(off)..usize::from(off) + usize::from(len)];
        core::str::from_utf8(b).unwrap_or("<non-utf8>")
    }

    fn push_info_range(&mut self, start: u64, len: u64) {
        if self.info_ranges_len < self.info_ranges.len() && len > 0 {
            self.info_ranges[self.info_ranges_len] = (start, start + len);
            self.info_ranges_len += 1;
        }
    }

    /// Copies the NUL-terminated string at `phys` into the pool.
    ///
    /// # Safety
    /// `phys` must point at a NUL-terminated string in mapped memory.
    unsafe fn copy_str(&mut self, phys: u64) -> (u16, u16) {
        let start = self.pool_len;
        let p = phys_to_ptr::<u8>(phys);
        let mut i = 0;
        loop {
            // SAFETY: the caller guarantees a NUL-terminated string at `phys`.
            let c = unsafe { p.add(i).read() };
            if c == 0 || self.pool_len >= POOL || i >= 4096 {
                break;
            }
            self.pool[self.pool_len] = c;
            self.pool_len += 1;
            i += 1;
        }
        self.push_info_range(phys, i as u64 + 1);
        (start as u16, (self.pool_len - start) as u16)
    }
}

static INFO: spin::Once<BootInfo> = spin::Once::new();
static mut SCRATCH: BootInfo = BootInfo::empty();

fn rd32(phys: u64) -> u32 {
    // SAFETY: callers only read inside the loader's info structures, which the boot page
    // tables map (Multiboot v1 addresses are below 4 GiB).
    unsafe { phys_to_ptr::<u32>(phys).read_unaligned() }
}

fn rd64(phys: u64) -> u64 {
    // SAFETY: as for rd32.
    unsafe { phys_to_ptr::<u64>(phys).read_unaligned() }
}

/// Parses the loader's information at `info_phys` and keeps a copy.
///
/// # Safety
/// Call once, on the boot CPU, with the address the loader passed, while the physical
/// memory below 4 GiB is mapped at the physmap base.
pub unsafe fn parse(info_phys: u64) -> &'static BootInfo {
    // SAFETY: single-threaded boot; SCRATCH is only used here, before INFO is set.
    let bi = unsafe { &mut *core::ptr::addr_of_mut!(SCRATCH) };
    bi.info_phys = info_phys;
    bi.push_info_range(info_phys, 120);
    let flags = rd32(info_phys);
    if flags & (1 << 2) != 0 {
        // SAFETY: flag 2 says `cmdline` points at a string.
        bi.cmdline = unsafe { bi.copy_str(u64::from(rd32(info_phys + 16))) };
    }
    if flags & (1 << 3) != 0 {
        let count = rd32(info_phys + 20) as usize;
        let addr = u64::from(rd32(info_phys + 24));
        bi.push_info_range(addr, 16 * count as u64);
        for i in 0..count.min(MAX_MODULES) {
            let e = addr + 16 * i as u64;
            let start = u64::from(rd32(e));
            let end = u64::from(rd32(e + 4));
            let s = u64::from(rd32(e + 8));
            let cmd = if s != 0 {
                // SAFETY: a non-zero module string field points at a NUL-terminated string.
                unsafe { bi.copy_str(s) }
            } else {
                (0, 0)
            };
            bi.modules[i] = Module { start, end, cmd };
            bi.modules_len = i + 1;
        }
    }
    if flags & (1 << 6) != 0 {
        let len = u64::from(rd32(info_phys + 44));
        let addr = u64::from(rd32(info_phys + 48));
        bi.push_info_range(addr, len);
        let mut p = addr;
        while p < addr + len && bi.mmap_len < MAX_MMAP {
            let size = u64::from(rd32(p));
            let e = MmapEntry {
                addr: rd64(p + 4),
                len: rd64(p + 12),
                kind: rd32(p + 20),
            };
            if e.len > 0 {
                bi.mmap[bi.mmap_len] = e;
                bi.mmap_len += 1;
            }
            p += size + 4;
        }
    } else if flags & 1 != 0 {
        // No map: synthesize one from mem_lower/mem_upper (KiB).
        let lower = u64::from(rd32(info_phys + 4)) * 1024;
        let upper = u64::from(rd32(info_phys + 8)) * 1024;
        bi.mmap[0] = MmapEntry {
            addr: 0,
            len: lower,
            kind: 1,
        };
        bi.mmap[1] = MmapEntry {
            addr: 0x10_0000,
            len: upper,
            kind: 1,
        };
        bi.mmap_len = 2;
    }
    // SAFETY: SCRATCH is never written again; hand out a shared reference for good.
    INFO.call_once(|| unsafe { core::ptr::addr_of!(SCRATCH).read() })
}

/// The boot information (after [`parse`]).
pub fn info() -> &'static BootInfo {
    INFO.get().expect("multiboot info not parsed")
}
