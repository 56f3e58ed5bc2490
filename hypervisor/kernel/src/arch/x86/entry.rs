//! Every entry from user mode and the common return path: the interrupt/exception
//! stubs, the `syscall` stub, and the IPC fast path's way into a portal handler.
//!
//! `trap_stubs` holds 256 stubs, 16 bytes apart; stub `n` pushes a zero error code
//! (unless the CPU pushed one), pushes `n` and jumps to `trap_common`, which swaps GS
//! when coming from ring 3, pushes the GPRs to complete a [`Regs`] frame and calls
//! `trap_handler(&mut Regs)` (from ring 3 on the CPU's kernel stack if the hardware
//! frame was pushed elsewhere, i.e. TSS.RSP0 was pointed at an EC's frame). When the
//! handler returns, `trap_exit` pops the frame and `iretq`s; [`return_to`] enters it
//! with any frame (e.g. to start a user thread). NMI, #DF and #MC (on their IST stacks)
//! enter through `paranoid_common` instead, which decides about the GS base from the
//! GS_BASE MSR itself when they interrupted ring 0. `syscall_entry` pushes the same
//! frame straight into the running EC (see `crate::entry`).

use super::regs::{Regs, REGS_CS, REGS_VECTOR};
use crate::frame::SYSCALL;
use crate::platform::percpu::{OFF_FRAME_TOP, OFF_KSTACK_TOP, OFF_SCRATCH};

/// Size of every CPU's kernel stack (`stack.rs`): a user trap whose frame lies within
/// this distance below `kstack_top` is already on the kernel stack.
pub const KSTACK_MAX: usize = 0x10000;

/// Bytes between consecutive stubs.
pub const STUB_SIZE: usize = 16;

core::arch::global_asm!(
    ".macro STUB_NOERR count",
    ".rept \\count",
    ".balign 16",
    "push 0",
    "push stub_vec",
    "jmp trap_common",
    ".set stub_vec, stub_vec + 1",
    ".endr",
    ".endm",
    ".macro STUB_ERR count",
    ".rept \\count",
    ".balign 16",
    "push stub_vec",
    "jmp trap_common",
    ".set stub_vec, stub_vec + 1",
    ".endr",
    ".endm",
    ".macro PARANOID_NOERR",
    ".balign 16",
    "push 0",
    "push stub_vec",
    "jmp paranoid_common",
    ".set stub_vec, stub_vec + 1",
    ".endm",
    ".macro PARANOID_ERR",
    ".balign 16",
    "push stub_vec",
    "jmp paranoid_common",
    ".set stub_vec, stub_vec + 1",
    ".endm",
    "",
    ".section .text.trap, \"ax\"",
    ".balign 16",
    ".global trap_stubs",
    "trap_stubs:",
    ".set stub_vec, 0",
    "STUB_NOERR 2",   // 0-1
    "PARANOID_NOERR", // 2 NMI
    "STUB_NOERR 5",   // 3-7
    "PARANOID_ERR",   // 8 #DF
    "STUB_NOERR 1",   // 9
    "STUB_ERR 5",     // 10-14 #TS #NP #SS #GP #PF
    "STUB_NOERR 2",   // 15-16
    "STUB_ERR 1",     // 17 #AC
    "PARANOID_NOERR", // 18 #MC
    "STUB_NOERR 2",   // 19-20
    "STUB_ERR 1",     // 21 #CP
    "STUB_NOERR 7",   // 22-28
    "STUB_ERR 2",     // 29 #VC, 30 #SX
    "STUB_NOERR 225", // 31-255
    "",
    ".balign 16",
    "trap_common:",
    "test byte ptr [rsp + {cs_off}], 3",
    "jz 1f",
    "swapgs",
    // Ring 3 may have set RFLAGS.AC, which turns SMAP off: clear it (SYSCALL's FMASK
    // does so on the other path). `clac` exists only with SMAP.
    "cmp byte ptr [rip + {smap_on}], 0",
    "je 1f",
    "clac",
    "1:",
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
    "cld",
    "mov rbx, rsp",
    // From ring 3 with RSP0 outside this CPU's kernel stack (e.g. RSP0 = the top of the
    // current EC's saved frame): run the handler on the kernel stack.
    "test byte ptr [rsp + {cs_off_full}], 3",
    "jz 3f",
    "mov rax, gs:[{kstack}]",
    "sub rax, rsp",
    "cmp rax, {kstack_max}",
    "jbe 3f",
    "mov rsp, gs:[{kstack}]",
    "3:",
    "xor ebp, ebp",
    "mov rdi, rbx",
    "call {handler}",
    "mov rsp, rbx",
    ".macro POP_GPRS",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    ".endm",
    ".global trap_exit",
    "trap_exit:",
    "test byte ptr [rsp + {cs_off_full}], 3",
    "jz 4f",
    // To ring 3 (`return_to_user` enters here: its frame is a user frame).
    ".global user_exit",
    "user_exit:",
    "POP_GPRS",
    "swapgs",
    // MDS: clear the CPU buffers last thing before user mode (VERW with a memory
    // operand, on CPUs whose `spec` choice says so).
    "cmp byte ptr [rip + {verw_on}], 0",
    "je 2f",
    "verw word ptr [rip + {verw_sel}]",
    "2:",
    "add rsp, 16",
    "iretq",
    // To ring 0.
    "4:",
    "POP_GPRS",
    "add rsp, 16",
    "iretq",
    "",
    // NMI, #DF and #MC can arrive anywhere, also between SYSCALL and its SWAPGS or
    // between the exit's SWAPGS and IRETQ: from ring 0 the saved CS says nothing about
    // the GS base. Like Linux's paranoid entry: from ring 3 the ordinary path swaps; from
    // ring 0 read GS_BASE, load this CPU's per-CPU address (the word above this IST
    // stack's top, `stack.rs`) if it differs, and put the interrupted value back before
    // returning.
    ".balign 16",
    "paranoid_common:",
    "test byte ptr [rsp + {cs_off}], 3",
    "jnz trap_common",
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
    "cld",
    "mov rbx, rsp",
    "mov r12, [rsp + {regs_size}]",
    "mov ecx, {gs_base}",
    "rdmsr",
    "shl rdx, 32",
    "or rax, rdx",
    "mov r13, rax",
    "cmp rax, r12",
    "je 4f",
    "mov rax, r12",
    "mov rdx, r12",
    "shr rdx, 32",
    "wrmsr",
    "4:",
    "xor ebp, ebp",
    "mov rdi, rbx",
    "call {handler}",
    "cmp r13, r12",
    "je 5f",
    "mov ecx, {gs_base}",
    "mov rax, r13",
    "mov rdx, r13",
    "shr rdx, 32",
    "wrmsr",
    "5:",
    "mov rsp, rbx",
    "jmp trap_exit",
    cs_off = const REGS_CS - REGS_VECTOR,
        cs_off_full = const REGS_CS,
    kstack = const crate::platform::percpu::PERCPU_KSTACK_TOP,
    kstack_max = const KSTACK_MAX,
    handler = sym super::trap::trap_handler,
    smap_on = sym super::spec::SMAP_ON,
    verw_on = sym super::spec::VERW_ON,
    verw_sel = sym super::spec::VERW_SEL,
    regs_size = const super::regs::REGS_SIZE,
    gs_base = const super::msr::Msr::GsBase as u32,
);

extern "C" {
    /// The first of 256 entry stubs, [`STUB_SIZE`] bytes apart.
    pub fn trap_stubs();
    fn trap_exit();
    fn user_exit();
}

/// Address of the entry stub for `vector`.
pub fn stub_addr(vector: u8) -> u64 {
    trap_stubs as *const () as u64 + vector as u64 * STUB_SIZE as u64
}

/// Loads the frame `regs` and returns through `iretq` (to ring 3 when `regs.cs` says so,
/// swapping GS). The stack pointer is set to `regs`, so the frame is consumed in place.
///
/// # Safety
/// `regs` must be a complete, valid frame on the current kernel stack (everything above
/// it is discarded); for ring 3, cs/ss must be user selectors and GS base the kernel's.
pub unsafe fn return_to(regs: *const Regs) -> ! {
    // SAFETY: the caller guarantees a valid frame; trap_exit pops it and irets.
    unsafe {
        core::arch::asm!("mov rsp, {}", "jmp {exit}", in(reg) regs, exit = sym trap_exit, options(noreturn))
    }
}

/// [`return_to`] for a frame known to return to ring 3 (one test less).
///
/// # Safety
/// As for [`return_to`], and `regs.cs` is a user selector.
pub unsafe fn return_to_user(regs: *const Regs) -> ! {
    // SAFETY: the caller guarantees a valid user frame; user_exit pops it and irets.
    unsafe {
        core::arch::asm!("mov rsp, {}", "jmp {exit}", in(reg) regs, exit = sym user_exit, options(noreturn))
    }
}

// The syscall entry: saves the user registers into the running EC's frame (see
// `crate::entry`) and calls `syscall::syscall_handler` on this CPU's kernel stack.
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
    local_ec = const crate::platform::percpu::PERCPU_LOCAL_EC,
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
