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
    // A plain `reply` (no flags, selector 0) by a local EC saves nothing: a portal
    // handler starts every call afresh from its portal's entry and is never resumed
    // after a reply (see `fastpath::local_reply`).
    "cmp rdi, {reply}",
    "je 3f",
    "1:",
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
    "3:",
    "cmp byte ptr gs:[{local_ec}], 0",
    "je 1b",
    "mov rsp, gs:[{kstack}]",
    "xor ebp, ebp",
    "call {local_reply}",
    "ud2",
    reply = const peregrine_abi::hypercall::Hypercall::Reply as u64,
    local_ec = const crate::percpu::PERCPU_LOCAL_EC,
    local_reply = sym crate::fastpath::local_reply,
    scratch = const OFF_SCRATCH,
    frame_top = const OFF_FRAME_TOP,
    kstack = const OFF_KSTACK_TOP,
    uds = const crate::arch::USER_DS as u64,
    ucs = const crate::arch::USER_CS as u64,
    sys = const SYSCALL,
    handler = sym crate::syscall::syscall_handler,
);

// The IPC fast path's way into a portal handler: a handler starts every call with its
// entry state (RDI = portal id, RSI = UTCB address, RSP = its stack, RIP = the portal's
// entry, RFLAGS = IF, every other register zero), so nothing needs to go through its
// frame. Arguments: RDI = id, RSI = UTCB, RDX = RIP, RCX = RSP. The stack is not used
// again: the user RSP goes into RSP before SWAPGS (NMI, #MC and #DF run on IST stacks and
// decide about GS by the GS base MSR, see the trap stubs). SYSRET would fault in ring 0
// on a non-canonical RIP; portal entries are checked user addresses.
core::arch::global_asm!(
    ".global enter_handler",
    ".p2align 4",
    "enter_handler:",
    "mov rsp, rcx",
    "mov rcx, rdx",
    "mov r11d, {rflags}",
    "xor eax, eax",
    "xor edx, edx",
    "xor ebx, ebx",
    "xor ebp, ebp",
    "xor r8d, r8d",
    "xor r9d, r9d",
    "xor r10d, r10d",
    "xor r12d, r12d",
    "xor r13d, r13d",
    "xor r14d, r14d",
    "xor r15d, r15d",
    "swapgs",
    // MDS: clear the CPU buffers last thing before user mode (as in `trap_exit`).
    "cmp byte ptr [rip + {verw_on}], 0",
    "je 2f",
    "verw word ptr [rip + {verw_sel}]",
    "2:",
    "sysretq",
    rflags = const crate::frame::RFLAGS_IF | 2,
    verw_on = sym crate::arch::x86::spec::VERW_ON,
    verw_sel = sym crate::arch::x86::spec::VERW_SEL,
);

extern "C" {
    /// The `syscall` entry point (programmed into LSTAR).
    pub fn syscall_entry();
    /// Enters a portal handler: see the assembly above.
    pub fn enter_handler(id: u64, utcb: u64, rip: u64, rsp: u64) -> !;
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
    unsafe { crate::arch::x86::entry::return_to_user(frame) }
}

/// Address just past `frame`: where the syscall stub starts pushing.
pub fn frame_top(frame: *const Frame) -> u64 {
    frame as u64 + FRAME_SIZE as u64
}
