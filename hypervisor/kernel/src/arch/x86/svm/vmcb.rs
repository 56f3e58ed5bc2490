//! The virtual machine control block (AMD APM vol. 2, appendix B): offsets of the
//! fields the kernel uses, and volatile access to a VMCB page through the physmap.

/// Control area: CR read (bits 0–15) and write (16–31) intercepts.
pub const INTERCEPT_CR: usize = 0x000;
/// DR read (bits 0–15) and write (16–31) intercepts.
pub const INTERCEPT_DR: usize = 0x004;
/// Exception intercepts (bit n: vector n).
pub const INTERCEPT_EXC: usize = 0x008;
/// Intercept vector 3 (see [`i3`]).
pub const INTERCEPT_3: usize = 0x00c;
/// Intercept vector 4 (see [`i4`]).
pub const INTERCEPT_4: usize = 0x010;
/// Physical address of the I/O permission map.
pub const IOPM_BASE: usize = 0x040;
/// Physical address of the MSR permission map.
pub const MSRPM_BASE: usize = 0x048;
/// TSC offset.
pub const TSC_OFFSET: usize = 0x050;
/// Guest ASID (u32).
pub const ASID: usize = 0x058;
/// TLB control (u8): 0 nothing, 1 flush all, 3 flush this ASID.
pub const TLB_CONTROL: usize = 0x05c;
/// V_TPR (bits 0–7), V_IRQ (8), V_INTR_PRIO (16–19), V_IGN_TPR (20),
/// V_INTR_MASKING (24), V_INTR_VECTOR (32–39).
pub const VINTR: usize = 0x060;
/// Interrupt shadow (bit 0).
pub const INT_SHADOW: usize = 0x068;
/// Exit code.
pub const EXITCODE: usize = 0x070;
/// Exit information 1.
pub const EXITINFO1: usize = 0x078;
/// Exit information 2.
pub const EXITINFO2: usize = 0x080;
/// Event being delivered when the exit happened.
pub const EXITINTINFO: usize = 0x088;
/// Nested paging enable (bit 0).
pub const NP_ENABLE: usize = 0x090;
/// Event injection.
pub const EVENTINJ: usize = 0x0a8;
/// Nested page table root.
pub const N_CR3: usize = 0x0b0;
/// Next RIP (with NRIP save).
pub const NRIP: usize = 0x0c8;

/// State save area: segments (16 bytes each: selector, attributes, limit, base).
pub const ES: usize = 0x400;
/// CS.
pub const CS: usize = 0x410;
/// SS.
pub const SS: usize = 0x420;
/// DS.
pub const DS: usize = 0x430;
/// FS.
pub const FS: usize = 0x440;
/// GS.
pub const GS: usize = 0x450;
/// GDTR.
pub const GDTR: usize = 0x460;
/// LDTR.
pub const LDTR: usize = 0x470;
/// IDTR.
pub const IDTR: usize = 0x480;
/// TR.
pub const TR: usize = 0x490;
/// CPL (u8).
pub const CPL: usize = 0x4cb;
/// EFER.
pub const EFER: usize = 0x4d0;
/// CR4.
pub const CR4: usize = 0x548;
/// CR3.
pub const CR3: usize = 0x550;
/// CR0.
pub const CR0: usize = 0x558;
/// DR7.
pub const DR7: usize = 0x560;
/// DR6.
pub const DR6: usize = 0x568;
/// RFLAGS.
pub const RFLAGS: usize = 0x570;
/// RIP.
pub const RIP: usize = 0x578;
/// RSP.
pub const RSP: usize = 0x5d8;
/// RAX.
pub const RAX: usize = 0x5f8;
/// STAR.
pub const STAR: usize = 0x600;
/// LSTAR.
pub const LSTAR: usize = 0x608;
/// CSTAR.
pub const CSTAR: usize = 0x610;
/// SFMASK.
pub const SFMASK: usize = 0x618;
/// KERNEL_GS_BASE.
pub const KERNEL_GS_BASE: usize = 0x620;
/// SYSENTER_CS.
pub const SYSENTER_CS: usize = 0x628;
/// SYSENTER_ESP.
pub const SYSENTER_ESP: usize = 0x630;
/// SYSENTER_EIP.
pub const SYSENTER_EIP: usize = 0x638;
/// CR2.
pub const CR2: usize = 0x640;
/// Guest PAT.
pub const G_PAT: usize = 0x668;

/// Intercept vector 3 bits.
pub mod i3 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const INIT: u32 = 1 << 3;
    pub const VINTR: u32 = 1 << 4;
    pub const RDTSC: u32 = 1 << 14;
    pub const RDPMC: u32 = 1 << 15;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const PAUSE: u32 = 1 << 23;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPG: u32 = 1 << 25;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO: u32 = 1 << 27;
    pub const MSR: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept vector 4 bits.
pub mod i4 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const RDTSCP: u32 = 1 << 7;
    pub const WBINVD: u32 = 1 << 9;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const MWAIT_COND: u32 = 1 << 12;
    pub const XSETBV: u32 = 1 << 13;
}

/// Exit codes.
pub mod exit {
    pub const CR0_READ: u64 = 0x00;
    pub const CR15_WRITE: u64 = 0x1f;
    pub const DR0_READ: u64 = 0x20;
    pub const DR15_WRITE: u64 = 0x3f;
    pub const EXC_BASE: u64 = 0x40;
    /// Exception 18, machine check.
    pub const EXC_MC: u64 = 0x52;
    pub const EXC_LAST: u64 = 0x5f;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const INIT: u64 = 0x63;
    pub const VINTR: u64 = 0x64;
    pub const RDTSC: u64 = 0x6e;
    pub const CPUID: u64 = 0x72;
    pub const INVD: u64 = 0x76;
    pub const PAUSE: u64 = 0x77;
    pub const HLT: u64 = 0x78;
    pub const INVLPG: u64 = 0x79;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const TASK_SWITCH: u64 = 0x7d;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMMCALL: u64 = 0x81;
    pub const RDTSCP: u64 = 0x87;
    pub const WBINVD: u64 = 0x89;
    pub const MONITOR: u64 = 0x8a;
    pub const MWAIT: u64 = 0x8b;
    pub const MWAIT_COND: u64 = 0x8c;
    pub const XSETBV: u64 = 0x8d;
    pub const NPF: u64 = 0x400;
    pub const INVALID: u64 = u64::MAX;
}

/// A VMCB page, reached through the physmap.
#[derive(Clone, Copy)]
pub struct Vmcb(*mut u8);

impl Vmcb {
    /// The VMCB at physical address `pa` (a page the caller owns).
    pub fn at(pa: u64) -> Self {
        Vmcb(crate::mem::phys_to_virt(pa))
    }

    /// Reads the u64 at `off`.
    #[inline]
    pub fn r64(self, off: usize) -> u64 {
        debug_assert!(off + 8 <= 4096);
        // SAFETY: `off` is one of the constants above (inside the page, 8-aligned for
        // u64 fields); the page is a VMCB owned by the vCPU, mapped in the physmap.
        unsafe { core::ptr::read_volatile(self.0.add(off) as *const u64) }
    }
    /// Writes the u64 at `off`.
    #[inline]
    pub fn w64(self, off: usize, v: u64) {
        debug_assert!(off + 8 <= 4096);
        // SAFETY: as in `r64`; only this CPU touches the VMCB (the vCPU is bound here).
        unsafe { core::ptr::write_volatile(self.0.add(off) as *mut u64, v) }
    }
    /// Reads the u32 at `off`.
    #[inline]
    pub fn r32(self, off: usize) -> u32 {
        // SAFETY: as in `r64`.
        unsafe { core::ptr::read_volatile(self.0.add(off) as *const u32) }
    }
    /// Writes the u32 at `off`.
    #[inline]
    pub fn w32(self, off: usize, v: u32) {
        // SAFETY: as in `w64`.
        unsafe { core::ptr::write_volatile(self.0.add(off) as *mut u32, v) }
    }
    /// Writes the u8 at `off`.
    #[inline]
    pub fn w8(self, off: usize, v: u8) {
        // SAFETY: as in `w64`.
        unsafe { core::ptr::write_volatile(self.0.add(off), v) }
    }
    /// Reads the segment at `off` (same layout as the ABI's `Segment`).
    pub fn seg(self, off: usize) -> peregrine_abi::utcb::Segment {
        peregrine_abi::utcb::Segment {
            sel: self.r32(off) as u16,
            ar: (self.r32(off) >> 16) as u16,
            limit: self.r32(off + 4),
            base: self.r64(off + 8),
        }
    }
    /// Writes the segment at `off`.
    pub fn set_seg(self, off: usize, s: &peregrine_abi::utcb::Segment) {
        self.w32(off, u32::from(s.sel) | (u32::from(s.ar) << 16));
        self.w32(off + 4, s.limit);
        self.w64(off + 8, s.base);
    }
}
