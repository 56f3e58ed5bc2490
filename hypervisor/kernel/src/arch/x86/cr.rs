//! Control registers, XCR0, and one-instruction helpers (SDM vol. 3 2.5).

use core::arch::asm;

/// CR0 bits.
pub mod cr0 {
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation (must be clear for SSE).
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Numeric error (native x87 error reporting).
    pub const NE: u64 = 1 << 5;
    /// Write protect in supervisor mode.
    pub const WP: u64 = 1 << 16;
}

/// CR4 bits.
pub mod cr4 {
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// Global pages.
    pub const PGE: u64 = 1 << 7;
    /// FXSAVE/FXRSTOR and SSE.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SIMD exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// VMX enable.
    pub const VMXE: u64 = 1 << 13;
    /// XSAVE and XCR0.
    pub const OSXSAVE: u64 = 1 << 18;
    /// Supervisor-mode execution prevention.
    pub const SMEP: u64 = 1 << 20;
    /// Supervisor-mode access prevention.
    pub const SMAP: u64 = 1 << 21;
}

macro_rules! cr_access {
    ($read:ident, $write:ident, $reg:literal) => {
        /// Reads the control register.
        #[inline]
        pub fn $read() -> u64 {
            let v: u64;
            // SAFETY: reading a control register has no side effects in ring 0.
            unsafe { asm!(concat!("mov {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }

        /// Writes the control register.
        ///
        /// # Safety
        /// The new value must keep paging, the address space and the mode consistent.
        #[inline]
        pub unsafe fn $write(v: u64) {
            // SAFETY: forwarded to the caller.
            unsafe { asm!(concat!("mov ", $reg, ", {}"), in(reg) v, options(nostack, preserves_flags)) };
        }
    };
}

cr_access!(read_cr0, write_cr0, "cr0");
cr_access!(read_cr2, write_cr2, "cr2");
cr_access!(read_cr3, write_cr3, "cr3");
cr_access!(read_cr4, write_cr4, "cr4");

/// Writes XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set and `v` a valid combination of supported components.
pub unsafe fn write_xcr0(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc has no side effects (CR4.TSD is clear in the kernel).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Spin-loop hint.
#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Halts until the next interrupt (interrupts keep their state).
#[inline]
pub fn hlt() {
    // SAFETY: hlt only waits for an interrupt.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// Enables interrupts and halts atomically (the `sti; hlt` shadow).
#[inline]
pub fn enable_and_hlt() {
    // SAFETY: the kernel is prepared to take interrupts wherever this is called.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
}

/// Opens a one-instruction interrupt window (`sti; nop; cli`): an interrupt pending at
/// the LAPIC (e.g. the cause of a VM exit) is taken by the kernel's handlers now.
#[inline]
pub fn interrupt_window() {
    // SAFETY: the kernel's IDT and stack are ready; handlers of kernel-mode interrupts
    // return here (as in the idle loop).
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Disables interrupts.
#[inline]
pub fn cli() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Enables interrupts.
///
/// # Safety
/// The IDT, the LAPIC and the current stack must be ready for interrupts.
#[inline]
pub unsafe fn sti() {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Whether RFLAGS.IF is set.
#[inline]
pub fn interrupts_enabled() -> bool {
    let f: u64;
    // SAFETY: pushfq/pop only use the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem, preserves_flags)) };
    f & (1 << 9) != 0
}

/// Runs `f` with interrupts disabled, restoring the previous state.
#[inline]
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    let was = interrupts_enabled();
    cli();
    let r = f();
    if was {
        // SAFETY: interrupts were enabled before, so the CPU was ready for them.
        unsafe { sti() };
    }
    r
}

/// Invalidates the TLB entry for `virt` on this CPU.
#[inline]
pub fn invlpg(virt: u64) {
    // SAFETY: invalidating a TLB entry cannot break memory safety.
    unsafe { asm!("invlpg [{}]", in(reg) virt, options(nostack, preserves_flags)) };
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        cli();
        hlt();
    }
}
