//! The one exit to user mode.
//!
//! NOVA's model: each CPU has one kernel stack; the kernel never blocks on it. An entry
//! saves the user registers into the running EC's [`Frame`] (the syscall stub in
//! `arch::x86::entry` pushes them straight there: the per-CPU slot `frame_top` points
//! just past that frame), then switches to the CPU's kernel stack and calls Rust, which
//! never returns — every path ends in [`ret_user`] for whichever EC runs next (or, for a
//! portal handler's fresh call, in `arch::x86::entry::enter_handler`). Interrupts stay
//! disabled in the kernel (FMASK clears IF) except in the idle loop.

use crate::frame::{Frame, FRAME_SIZE};

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
    unsafe { crate::arch::x86::entry::return_to_user(frame) }
}

/// Address just past `frame`: where the syscall stub starts pushing.
pub fn frame_top(frame: *const Frame) -> u64 {
    frame as u64 + FRAME_SIZE as u64
}
