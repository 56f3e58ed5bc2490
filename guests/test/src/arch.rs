//! The guest's own CPU setup: per-vCPU stacks, GDT (with user segments) and TSS, one
//! shared IDT whose 256 gates all run on the TSS's interrupt stack (IST1), and the trap
//! entry that hands a [`Frame`] to [`crate::trap`].
//!
//! Every gate uses IST1 so that a handler always has a good stack, whatever `rsp` the
//! hostile mode's random code left behind. A second interrupt stack (IST2) serves the
//! exception-loop mode, which moves the #DB gate there to end a loop.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;

/// vCPUs the guest supports (the contract: 1 or 2).
pub const MAX_CPUS: usize = 2;
/// Size of each vCPU's normal stack.
pub const STACK: usize = 32 * 1024;
/// Size of each vCPU's interrupt stack (IST1).
pub const IST: usize = 16 * 1024;
/// Size of each vCPU's second interrupt stack (IST2).
pub const IST2: usize = 4096;

/// Code and data selectors of the guest's GDT.
pub const CODE_SEL: u16 = 0x08;
/// Flat data selector.
pub const DATA_SEL: u16 = 0x10;
/// The TSS selector (a 16-byte system descriptor).
const TSS_SEL: u16 = 0x18;
/// 64-bit user code selector (DPL 3, RPL 3).
pub const USER_CODE_SEL: u16 = 0x28 | 3;
/// User data selector (DPL 3, RPL 3).
pub const USER_DATA_SEL: u16 = 0x30 | 3;
/// GDT entries: null, code, data, TSS (two), user code, user data.
const GDT_ENTRIES: usize = 7;

/// Per-vCPU memory: stacks, GDT, TSS.
#[repr(C, align(4096))]
pub struct Cpu {
    stack: [u8; STACK],
    ist: [u8; IST],
    ist2: [u8; IST2],
    gdt: [u64; GDT_ENTRIES],
    tss: [u32; 26],
}

/// All vCPUs' memory, in `.bss` (the entry code computes the stack from it).
static mut CPUS: [Cpu; MAX_CPUS] = [const {
    Cpu {
        stack: [0; STACK],
        ist: [0; IST],
        ist2: [0; IST2],
        gdt: [0; GDT_ENTRIES],
        tss: [0; 26],
    }
}; MAX_CPUS];

/// One IDT gate (16 bytes).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    lo: u64,
    hi: u64,
}

/// The shared IDT, filled once by the boot vCPU.
static mut IDT: [Gate; 256] = [Gate { lo: 0, hi: 0 }; 256];

/// What the trap entry saved: the GPRs, then vector and error code (0 for vectors
/// without one), then the CPU's interrupt frame.
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<Frame>() == 22 * 8);

// The entry point: `rdi` vCPU index, `rsi` mode, `rdx` vCPU count, `rcx` seed (mode 3).
// The boot vCPU clears `.bss`; each vCPU takes its own stack; an index the guest has no
// memory for halts. (The Multiboot entry, boot.rs, comes here too: `rsi` = the
// Multiboot magic, `rcx` = the info address.)
//
// The first instruction jumps over the Multiboot v1 header, which must lie in the first
// 8 KiB of the file: flags = memory info (bit 1) and the a.out-kludge address fields
// (bit 16; QEMU loads no ELF64 kernel without them), load from 1 MiB (`__load_start`,
// file offset of .text) to `__load_end`, zero to `__image_end`, enter at `mb_entry32`.
global_asm!(
    ".pushsection .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "jmp 4f",
    ".balign 4",
    ".global mb_header",
    "mb_header:",
    ".long {mb_magic}",
    ".long {mb_flags}",
    ".long -({mb_magic} + {mb_flags})",
    ".long mb_header",
    ".long __load_start",
    ".long __load_end",
    ".long __image_end",
    ".long mb_entry32",
    "4:",
    "cli",
    "cld",
    "mov r12, rdi",
    "mov r13, rsi",
    "mov r14, rdx",
    "mov r15, rcx",
    "cmp r12, {max}",
    "jae 3f",
    "test r12, r12",
    "jnz 2f",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "xor eax, eax",
    "rep stosb",
    "2:",
    "imul rax, r12, {cpu_size}",
    "lea rsp, [rip + {cpus}]",
    "add rsp, rax",
    "add rsp, {stack}",
    "mov rdi, r12",
    "mov rsi, r13",
    "mov rdx, r14",
    "mov rcx, r15",
    "call {main}",
    "3:",
    "cli",
    "hlt",
    "jmp 3b",
    ".popsection",
    max = const MAX_CPUS,
    cpu_size = const core::mem::size_of::<Cpu>(),
    stack = const STACK,
    cpus = sym CPUS,
    main = sym crate::guest_main,
    mb_magic = const crate::boot::HEADER_MAGIC,
    mb_flags = const crate::boot::HEADER_FLAGS,
);

// 256 trap stubs of 16 bytes each (stub `v` at `trap_stubs + 16 * v`): push a zero error
// code where the CPU pushes none, push the vector, join the common entry.
global_asm!(
    ".pushsection .text.traps, \"ax\"",
    ".balign 16",
    ".global trap_stubs",
    "trap_stubs:",
    ".set vec, 0",
    ".rept 256",
    ".balign 16",
    ".if (vec == 8) | (vec == 10) | (vec == 11) | (vec == 12) | (vec == 13) | (vec == 14) | (vec == 17) | (vec == 21) | (vec == 29) | (vec == 30)",
    ".else",
    "push 0",
    ".endif",
    "push vec",
    "jmp trap_common",
    ".set vec, vec + 1",
    ".endr",
    "trap_common:",
    "push r15",
    "push r14",
    "push r13",
    "push r12",
    "push r11",
    "push r10",
    "push r9",
    "push r8",
    "push rbp",
    "push rdi",
    "push rsi",
    "push rdx",
    "push rcx",
    "push rbx",
    "push rax",
    "cld",
    "mov rdi, rsp",
    "call {trap}",
    "pop rax",
    "pop rbx",
    "pop rcx",
    "pop rdx",
    "pop rsi",
    "pop rdi",
    "pop rbp",
    "pop r8",
    "pop r9",
    "pop r10",
    "pop r11",
    "pop r12",
    "pop r13",
    "pop r14",
    "pop r15",
    "add rsp, 16",
    "iretq",
    ".popsection",
    trap = sym crate::trap,
);

extern "C" {
    static trap_stubs: u8;
}

/// An interrupt gate to `handler` on interrupt stack `ist` (1 or 2), present or not.
fn gate(handler: u64, present: bool, ist: u64) -> Gate {
    let attr: u64 = if present { 0x8e } else { 0x0e };
    Gate {
        lo: (handler & 0xffff)
            | (u64::from(CODE_SEL) << 16)
            | (ist << 32)
            | (attr << 40)
            | ((handler >> 16) & 0xffff) << 48,
        hi: handler >> 32,
    }
}

fn stub(vector: usize) -> u64 {
    core::ptr::addr_of!(trap_stubs) as u64 + 16 * vector as u64
}

/// Fills the shared IDT (the boot vCPU, before it starts another).
pub fn init_idt() {
    for v in 0..256 {
        set_gate_present(v, true);
    }
}

/// Marks gate `vector` present or not present (hostile mode: an exception without a
/// handler).
pub fn set_gate_present(vector: usize, present: bool) {
    // SAFETY: a volatile write of one in-bounds gate; a concurrent delivery sees the old
    // or the new gate, both valid.
    unsafe { addr_of_mut!(IDT[vector]).write_volatile(gate(stub(vector), present, 1)) };
}

/// Moves the (present) gate `vector` to interrupt stack `ist` (1 or 2): every vCPU's
/// next delivery of that vector runs on that stack.
pub fn set_gate_ist(vector: usize, ist: u64) {
    // SAFETY: as for `set_gate_present`: one in-bounds gate, valid before and after.
    unsafe { addr_of_mut!(IDT[vector]).write_volatile(gate(stub(vector), true, ist)) };
}

/// The top of vCPU `index`'s first interrupt stack (where a delivery on IST1 pushes
/// its frame, just below).
pub fn ist_top(index: usize) -> u64 {
    // SAFETY: only the address of the field is taken.
    unsafe { addr_of_mut!((*cpu(index)).ist) as u64 + IST as u64 }
}

/// A descriptor-table pointer for `lgdt`/`lidt`.
#[repr(C, packed)]
struct TablePtr {
    limit: u16,
    base: u64,
}

/// Sets up vCPU `index`'s GDT and TSS, loads them, reloads the segment registers and
/// loads the shared IDT.
pub fn init_cpu(index: usize) {
    let cpu = cpu(index);
    // SAFETY: `cpu` is this vCPU's own memory (the index is below MAX_CPUS, checked at
    // entry), touched by no other vCPU.
    unsafe {
        let ist_top = addr_of_mut!((*cpu).ist) as u64 + IST as u64;
        let ist2_top = addr_of_mut!((*cpu).ist2) as u64 + IST2 as u64;
        let tss = addr_of_mut!((*cpu).tss);
        (*tss)[9] = ist_top as u32; // IST1 at offset 0x24
        (*tss)[10] = (ist_top >> 32) as u32;
        (*tss)[11] = ist2_top as u32; // IST2 at offset 0x2c
        (*tss)[12] = (ist2_top >> 32) as u32;
        (*tss)[25] = 104 << 16; // I/O map base beyond the limit: no I/O bitmap
        let base = tss as u64;
        let gdt = addr_of_mut!((*cpu).gdt);
        (*gdt)[0] = 0;
        (*gdt)[1] = 0x00af_9a00_0000_ffff; // 64-bit code, DPL 0
        (*gdt)[2] = 0x00cf_9200_0000_ffff; // flat data
        (*gdt)[3] = 103 | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((base >> 24) & 0xff) << 56);
        (*gdt)[4] = base >> 32;
        (*gdt)[5] = 0x00af_fa00_0000_ffff; // 64-bit code, DPL 3
        (*gdt)[6] = 0x00cf_f200_0000_ffff; // flat data, DPL 3
        let gdtr = TablePtr {
            limit: (GDT_ENTRIES * 8 - 1) as u16,
            base: gdt as u64,
        };
        let idtr = TablePtr {
            limit: 256 * 16 - 1,
            base: addr_of_mut!(IDT) as u64,
        };
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "mov fs, {ds:e}",
            "mov gs, {ds:e}",
            "ltr {tss:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = const CODE_SEL as u64,
            ds = in(reg) u32::from(DATA_SEL),
            tss = in(reg) TSS_SEL,
            tmp = out(reg) _,
        );
    }
}

fn cpu(index: usize) -> *mut Cpu {
    assert!(index < MAX_CPUS);
    // SAFETY: an in-bounds element pointer; no reference is formed.
    unsafe { addr_of_mut!(CPUS[index]) }
}

/// The vCPU whose interrupt stack (IST1 or IST2) `frame` lies on.
pub fn cpu_of_frame(frame: &Frame) -> usize {
    let at = frame as *const Frame as u64;
    (0..MAX_CPUS)
        .find(|&i| {
            // SAFETY: only the addresses of the fields are taken.
            let (ist, ist2) = unsafe {
                (
                    addr_of_mut!((*cpu(i)).ist) as u64,
                    addr_of_mut!((*cpu(i)).ist2) as u64,
                )
            };
            (ist..ist + IST as u64).contains(&at) || (ist2..ist2 + IST2 as u64).contains(&at)
        })
        .unwrap_or(0)
}

/// Loads an empty IDT and raises an exception: the CPU cannot deliver it, nor the #GP,
/// nor the double fault: a triple fault (shutdown). Does not return.
pub fn triple_fault() -> ! {
    let idtr = TablePtr { limit: 0, base: 0 };
    // SAFETY: deliberately ends the VM; nothing after it runs.
    unsafe {
        asm!("lidt [{}]", "int3", "2:", "hlt", "jmp 2b", in(reg) &idtr, options(noreturn));
    }
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O exits to the host; the guest's memory is not touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack)) };
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

/// `rdmsr`.
pub fn rdmsr(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an MSR the host intercepts; a #GP would reach the trap handler.
    unsafe {
        asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// `wrmsr`.
pub fn wrmsr(index: u32, value: u64) {
    // SAFETY: writes an MSR the host intercepts (the synthetic register of the contract).
    unsafe {
        asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack));
    }
}

/// `rdtsc` as one 64-bit value.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// `cpuid` leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// `sti; hlt; cli`: waits for the host's injected interrupt.
pub fn halt_once() {
    // SAFETY: enables interrupts for the one `hlt` (the STI shadow covers it); the vector
    // 0x30 handler returns with `iretq`.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Halts this vCPU for good (interrupts off).
pub fn park() -> ! {
    loop {
        // SAFETY: halts with interrupts disabled; nothing is touched.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// The hypercall of the contract with `rbx` = `arg`: `vmcall` (Intel) or `vmmcall`.
pub fn hypercall(intel: bool, nr: u64, arg: u64) -> u64 {
    let ret: u64;
    // SAFETY: the host answers in rax (KVM: its own hypercall ABI, which also reads rbx,
    // rcx, rdx, rsi and writes only rax); rbx is saved around the call.
    unsafe {
        if intel {
            asm!("xchg {b}, rbx", "vmcall", "xchg {b}, rbx", b = inout(reg) arg => _,
                 inout("rax") nr => ret, inout("rcx") 0u64 => _, inout("rdx") 0u64 => _,
                 inout("rsi") 0u64 => _, options(nostack));
        } else {
            asm!("xchg {b}, rbx", "vmmcall", "xchg {b}, rbx", b = inout(reg) arg => _,
                 inout("rax") nr => ret, inout("rcx") 0u64 => _, inout("rdx") 0u64 => _,
                 inout("rsi") 0u64 => _, options(nostack));
        }
    }
    ret
}
