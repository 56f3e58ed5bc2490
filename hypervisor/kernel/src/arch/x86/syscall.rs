//! SYSCALL setup (EFER.SCE is set in cpu.rs) and the entry stub.
//!
//! The entry stub itself is `super::entry::syscall_entry`, beside the trap stubs. On
//! entry RCX = user RIP, R11 = user RFLAGS, RSP = user RSP, GS = user; `swapgs` gives the
//! per-CPU record (`gs:[PERCPU_SCRATCH]` for the user RSP, `gs:[PERCPU_KSTACK_TOP]` for
//! the stack).

use super::gdt::{KERNEL_CS, USER_CS32};
use super::msr::{wrmsr, Msr};

/// RFLAGS bits cleared on SYSCALL: TF, IF, DF, IOPL, NT, AC.
pub const FMASK: u64 = 0x0004_7700;

use super::entry::syscall_entry;

/// Programs STAR/LSTAR/FMASK on this CPU.
///
/// # Safety
/// The GDT must have the layout of [`super::gdt`].
pub unsafe fn init_cpu() {
    let star = (u64::from(USER_CS32 & !3) << 48) | (u64::from(KERNEL_CS) << 32);
    // SAFETY: these MSRs exist on every x86_64 CPU; the selectors match the GDT.
    unsafe {
        wrmsr(Msr::Star, star);
        wrmsr(Msr::Lstar, syscall_entry as *const () as u64);
        wrmsr(Msr::Cstar, 0);
        wrmsr(Msr::Fmask, FMASK);
    }
}
