//! The syscall entry and the one exit to user mode.
//!
//! NOVA's model: each CPU has one kernel stack; the kernel never blocks on it. An entry
//! saves the user registers into the running EC's [`Frame`] (the syscall stub pushes
//! them straight there: the per-CPU slot `frame_top` points just past that frame), then
//! switches to the CPU's kernel stack and calls Rust, which never returns — every path
//! ends in [`ret_user`] for whichever EC runs next. Interrupts stay disabled in the
//! kernel (FMASK clears IF) except in the idle loop.

use crate::frame::{Frame, FRAME_SIZE, SYSCALL};
use crate::percpu::{OFF_FRAME_TOP, OFF_KSTACK_TOP, OFF_SCRATCH};

core::arch::global_asm!(
    ".global syscall_entry",
    ".p2align 4",
    "syscall_entry:",
    "swapgs",
    "mov gs:[{scratch}], rsp",
    "mov rsp, gs:[{frame_top}]",
    "push {uds}",
    "push qword ptr gs:[{scratch}]",
    "push r11",
    "push {ucs}",
    "push rcx",
    "push 0",
    "push {sys}",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rdi, rsp",
    "mov rsp, gs:[{kstack}]",
    "xor ebp, ebp",
    "call {handler}",
    "ud2",
    scratch = const OFF_SCRATCH,
    frame_top = const OFF_FRAME_TOP,
    kstack = const OFF_KSTACK_TOP,
    uds = const crate::arch::USER_DS as u64,
    ucs = const crate::arch::USER_CS as u64,
    sys = const SYSCALL,
    handler = sym crate::syscall::syscall_handler,
);

extern "C" {
    /// The `syscall` entry point (programmed into LSTAR).
    pub fn syscall_entry();
}

/// Returns to user mode with `frame`, which must stay valid (it belongs to the EC that
/// runs next, whose frame pointer the per-CPU `frame_top` slot must already name).
///
/// # Safety
/// `frame` must point to a user frame with user CS/SS (checked constructors in
/// [`Frame`] guarantee canonical RIP/RSP and sane RFLAGS) and the CPU must be on its own
/// kernel stack with GS holding the kernel base.
pub unsafe fn ret_user(frame: *const Frame) -> ! {
    // SAFETY: forwarded to the caller; a frame is the trap stubs' record, and their exit
    // path pops it, swaps GS for ring 3 and returns with iretq.
    unsafe { crate::arch::x86::entry::return_to(frame) }
}

/// Address just past `frame`: where the syscall stub starts pushing.
pub fn frame_top(frame: *const Frame) -> u64 {
    frame as u64 + FRAME_SIZE as u64
}
