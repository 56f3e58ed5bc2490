//! The vmm library's [`Platform`] on the hypervisor: guest RAM through the VMM's own
//! mapping of it, the register file in the exit portal's UTCB.

use peregrine_abi::utcb::ArchState;
use peregrine_vmm::vcpu::{GuestMemory, Platform, Unbacked};

/// Guest RAM: guest-physical `[0, size)`, mapped in the VMM at `base`.
#[derive(Clone, Copy, Debug)]
pub struct GuestRam {
    base: u64,
    size: u64,
}

impl GuestRam {
    /// RAM of `size` bytes mapped read-write at `base`.
    ///
    /// # Safety
    /// `[base, base + size)` must stay mapped read-write in this PD for as long as the
    /// value (and its copies) are used, and be used by nothing else than guest RAM.
    pub unsafe fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The VMM address of `[gpa, gpa + len)`, if all of it is RAM.
    fn at(&self, gpa: u64, len: usize) -> Result<*mut u8, Unbacked> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok((self.base + gpa) as *mut u8),
            _ => Err(Unbacked {
                gpa: gpa.max(self.size),
            }),
        }
    }
}

impl GuestMemory for GuestRam {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        let src = self.at(gpa, buf.len())?;
        let n = buf.len();
        if (8..=16).contains(&n) {
            // An instruction fetch (15 bytes) or an operand: two overlapping 8-byte
            // loads, not a call to memcpy.
            // SAFETY: as below; both loads lie in `[src, src + n)` (8 ≤ n), unaligned
            // reads of plain bytes.
            let (a, b) = unsafe {
                (
                    (src as *const u64).read_unaligned(),
                    (src.add(n - 8) as *const u64).read_unaligned(),
                )
            };
            buf[..8].copy_from_slice(&a.to_ne_bytes());
            buf[n - 8..].copy_from_slice(&b.to_ne_bytes());
            return Ok(());
        }
        // SAFETY: `at` checked that the range lies in guest RAM, which `new`'s contract
        // keeps mapped; the guest may change it concurrently (other vCPUs), which only
        // makes the copied bytes stale, never invalid (plain bytes); `buf` is ours.
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        let dst = self.at(gpa, buf.len())?;
        // SAFETY: as in `read`; guest RAM is no Rust object, so writing it aliases
        // nothing the VMM holds a reference to.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
        Ok(())
    }

    fn read_entry(&mut self, gpa: u64, size: usize) -> Result<u64, Unbacked> {
        let src = self.at(gpa, size)?;
        if size == 8 && (src as usize).is_multiple_of(8) {
            // SAFETY: as in `read`, for 8 bytes; aligned (checked); one volatile load,
            // since the guest may change the entry at any time.
            return Ok(unsafe { (src as *const u64).read_volatile() });
        }
        if size == 4 && (src as usize).is_multiple_of(4) {
            // SAFETY: as above, for 4 aligned bytes.
            return Ok(u64::from(unsafe { (src as *const u32).read_volatile() }));
        }
        let mut b = [0u8; 8];
        self.read(gpa, &mut b[..size.min(8)])?;
        Ok(u64::from_le_bytes(b))
    }
}

/// One vCPU at an exit: its state in the handler's UTCB, and guest RAM.
pub struct HvVcpu<'a> {
    /// The state the portal delivered; the reply takes back what its `mtd` names.
    pub regs: &'a mut ArchState,
    /// Guest RAM.
    pub ram: GuestRam,
    /// TSC frequency (kHz), for the clock.
    pub tsc_khz: u64,
}

impl GuestMemory for HvVcpu<'_> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Unbacked> {
        self.ram.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Unbacked> {
        self.ram.write(gpa, buf)
    }

    fn read_entry(&mut self, gpa: u64, size: usize) -> Result<u64, Unbacked> {
        self.ram.read_entry(gpa, size)
    }
}

impl Platform for HvVcpu<'_> {
    fn regs(&self) -> &ArchState {
        self.regs
    }

    fn regs_mut(&mut self) -> &mut ArchState {
        self.regs
    }

    fn now_ns(&self) -> u64 {
        let khz = self.tsc_khz.max(1);
        (u128::from(nul_rt::hc::rdtsc()) * 1_000_000 / u128::from(khz)) as u64
    }

    fn set_timer(&mut self, _deadline_ns: Option<u64>) {
        // The test guest's machine has no timer device.
    }
}
