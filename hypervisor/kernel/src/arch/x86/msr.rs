//! Model-specific registers (Intel SDM vol. 4; AMD APM vol. 2 appendix A).

/// MSR numbers the kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Msr {
    /// IA32_APIC_BASE (SDM 10.4.4).
    ApicBase = 0x1b,
    /// IA32_FEATURE_CONTROL.
    FeatureControl = 0x3a,
    /// IA32_VMX_BASIC.
    VmxBasic = 0x480,
    /// IA32_VMX_PROCBASED_CTLS.
    VmxProcbasedCtls = 0x482,
    /// IA32_VMX_PROCBASED_CTLS2.
    VmxProcbasedCtls2 = 0x48b,
    /// IA32_TSC_DEADLINE (SDM 10.5.4.1).
    TscDeadline = 0x6e0,
    /// IA32_EFER.
    Efer = 0xc000_0080,
    /// IA32_STAR: SYSCALL/SYSRET segment selectors.
    Star = 0xc000_0081,
    /// IA32_LSTAR: SYSCALL entry point in 64-bit mode.
    Lstar = 0xc000_0082,
    /// IA32_CSTAR: SYSCALL entry from compatibility mode.
    Cstar = 0xc000_0083,
    /// IA32_FMASK: RFLAGS bits cleared by SYSCALL.
    Fmask = 0xc000_0084,
    /// IA32_FS_BASE.
    FsBase = 0xc000_0100,
    /// IA32_GS_BASE.
    GsBase = 0xc000_0101,
    /// IA32_KERNEL_GS_BASE (swapped in by SWAPGS).
    KernelGsBase = 0xc000_0102,
    /// x2APIC register base (SDM 10.12.1.2): x2APIC register `r` is MSR `0x800 + r/16`.
    X2ApicBase = 0x800,
}

/// EFER bits.
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
    /// SVM enable (AMD).
    pub const SVME: u64 = 1 << 12;
}

/// Reads MSR `msr` (raw number).
///
/// # Safety
/// The MSR must exist on this CPU (else #GP).
#[inline]
pub unsafe fn rdmsr_raw(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; rdmsr touches no memory.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes MSR `msr` (raw number).
///
/// # Safety
/// The MSR must exist and the value must not break the kernel's invariants.
#[inline]
pub unsafe fn wrmsr_raw(msr: u32, val: u64) {
    // SAFETY: the caller guarantees the MSR exists and the value is sound.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") val as u32, in("edx") (val >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Reads `msr`.
///
/// # Safety
/// As for [`rdmsr_raw`].
#[inline]
pub unsafe fn rdmsr(msr: Msr) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { rdmsr_raw(msr as u32) }
}

/// Writes `msr`.
///
/// # Safety
/// As for [`wrmsr_raw`].
#[inline]
pub unsafe fn wrmsr(msr: Msr, val: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { wrmsr_raw(msr as u32, val) }
}
