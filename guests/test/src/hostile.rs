//! Mode 3, the hostile guest: from a seeded xorshift generator, forever one random
//! exit-causing action after another — random ports in and out (byte, word, dword,
//! string), random MSR reads and writes, random MMIO accesses of many instruction forms
//! at unbacked addresses, CR0/CR4 writes of random bits (of those 64-bit code may
//! change), `ud2` with and without a
//! handler, `int3`, random privileged and virtualization instructions, random byte
//! sequences executed from a page, random #GP-injection and vCPU-start requests — and,
//! rarely, a triple fault (an empty IDT and an exception), which ends the VM.
//!
//! Every action runs inside a probe ([`hostile_probe`]): any exception or interrupt gate
//! it triggers lands on the interrupt stack, and [`trap`] resumes the guest after the
//! probe, so the guest survives whatever its actions provoke (unless it corrupts its own
//! memory, page tables or descriptor tables: hostile is hostile).
//! A line `hostile: <n> actions ...` every [`PROGRESS`] actions shows progress.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_rng::Rng;

use crate::arch::{self, Frame, MAX_CPUS};
use crate::println;

/// Actions between progress lines.
pub const PROGRESS: u64 = 1000;
/// One action in this many is the triple fault.
pub const TRIPLE_FAULT_ODDS: u64 = 20_000;
/// The software interrupt that ends a random byte sequence (a trailer after it).
const VECTOR_SEQ_END: u64 = 0x31;
/// RFLAGS of random code: IF and TF (each instruction raises #DB, which counts it).
const RANDOM_RFLAGS: u64 = 0x302;
/// Single steps after which random code is ended (a loop without exits would hang the
/// vCPU otherwise, unless the code turns TF off itself).
const MAX_STEPS: u64 = 256;

/// Per-vCPU state, all reached through raw pointers (the trap handler resumes probes).
#[repr(C, align(4096))]
struct State {
    /// Page of random code: int3 filler, random bytes, nops, `int 0x31`.
    code: [u8; 4096],
    /// Stack for random code (its `rsp` at entry is the top).
    scratch: [u8; 4096],
    /// Buffer for string I/O and MMIO string moves.
    buf: [u8; 256],
    /// The probe's saved `rsp` (0: no probe running).
    recover_rsp: u64,
    /// Registers for random code: rax..r15 (rsp is replaced by the scratch top), then
    /// the scratch top.
    regs: [u64; 17],
    /// Single steps of the random code so far.
    steps: u64,
    /// The action's parameters.
    kind: u64,
    a: u64,
    b: u64,
    c: u64,
}

static mut STATES: [State; MAX_CPUS] = [const {
    State {
        code: [0; 4096],
        scratch: [0; 4096],
        buf: [0; 256],
        recover_rsp: 0,
        regs: [0; 17],
        steps: 0,
        kind: 0,
        a: 0,
        b: 0,
        c: 0,
    }
}; MAX_CPUS];

/// Exceptions and interrupts that ended probes, per vector (all vCPUs).
static VECTORS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

// `hostile_probe(action, state, slot)`: saves the callee-saved registers, stores `rsp`
// at `*slot`, calls `action(state)`. Returns 0 when the action returned, or
// `0x100 | vector` when `trap` resumed at `hostile_resume` with `rsp` = `*slot`.
// `hostile_enter(target, regs)`: loads random registers and a scratch stack and enters
// the random code with `iretq`, interrupts enabled and single-stepping on (it ends in
// `int 0x31`, an exception, or after `MAX_STEPS` instructions).
global_asm!(
    ".pushsection .text.hostile, \"ax\"",
    ".global hostile_probe",
    "hostile_probe:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "sub rsp, 8",
    "mov [rdx], rsp",
    "mov rax, rdi",
    "mov rdi, rsi",
    "call rax",
    "xor eax, eax",
    ".global hostile_resume",
    "hostile_resume:",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".global hostile_enter",
    "hostile_enter:",
    "mov rax, [rsi + 16 * 8]",
    "mov rsp, rax",
    "push {data}",
    "push rax",
    "push {rflags}",
    "push {code}",
    "push rdi",
    "mov rax, [rsi + 0 * 8]",
    "mov rbx, [rsi + 1 * 8]",
    "mov rcx, [rsi + 2 * 8]",
    "mov rdx, [rsi + 3 * 8]",
    "mov rdi, [rsi + 5 * 8]",
    "mov rbp, [rsi + 6 * 8]",
    "mov r8, [rsi + 7 * 8]",
    "mov r9, [rsi + 8 * 8]",
    "mov r10, [rsi + 9 * 8]",
    "mov r11, [rsi + 10 * 8]",
    "mov r12, [rsi + 11 * 8]",
    "mov r13, [rsi + 12 * 8]",
    "mov r14, [rsi + 13 * 8]",
    "mov r15, [rsi + 14 * 8]",
    "mov rsi, [rsi + 4 * 8]",
    "iretq",
    ".popsection",
    data = const arch::DATA_SEL,
    code = const arch::CODE_SEL,
    rflags = const RANDOM_RFLAGS,
);

extern "C" {
    fn hostile_probe(action: extern "C" fn(*mut State), state: *mut State, slot: *mut u64) -> u64;
    fn hostile_enter(target: u64, regs: *const u64) -> !;
    static hostile_resume: u8;
}

/// The kinds of action, chosen uniformly.
#[derive(Clone, Copy)]
#[repr(u64)]
enum Kind {
    PortOut,
    PortIn,
    PortString,
    MsrRead,
    MsrWrite,
    Mmio,
    Cr0,
    Cr4,
    Ud2Handled,
    Ud2NoHandler,
    Int3,
    RandomCode,
    Cpuid,
    Hypercall,
    Hlt,
    Privileged,
    InjectGp,
    StartCpu,
}

const KINDS: [Kind; 18] = [
    Kind::PortOut,
    Kind::PortIn,
    Kind::PortString,
    Kind::MsrRead,
    Kind::MsrWrite,
    Kind::Mmio,
    Kind::Cr0,
    Kind::Cr4,
    Kind::Ud2Handled,
    Kind::Ud2NoHandler,
    Kind::Int3,
    Kind::RandomCode,
    Kind::Cpuid,
    Kind::Hypercall,
    Kind::Hlt,
    Kind::Privileged,
    Kind::InjectGp,
    Kind::StartCpu,
];

/// A random port, never the console nor the end-of-run port.
fn port(rng: &mut Rng) -> u64 {
    loop {
        let p = if rng.below(2) == 0 {
            rng.below(0x100)
        } else {
            rng.below(0x1_0000)
        };
        if p != u64::from(crate::PORT_CONSOLE) && p != u64::from(crate::PORT_EXIT) {
            return p;
        }
    }
}

/// A random MSR index: mostly from the ranges where MSRs live.
fn msr_index(rng: &mut Rng) -> u64 {
    match rng.below(5) {
        0 => rng.below(0x1000),
        1 => 0xc000_0000 + rng.below(0x200),
        2 => 0xc001_0000 + rng.below(0x200),
        3 => u64::from(crate::MSR_SYNTH) + rng.below(4),
        _ => rng.next_u64() & 0xffff_ffff,
    }
}

/// A random unbacked guest-physical address (identity-mapped below 4 GiB).
fn mmio_address(rng: &mut Rng) -> u64 {
    match rng.below(3) {
        0 => crate::MMIO_REG + rng.below(0x1000),
        1 => crate::MMIO_REG - 8 + rng.below(16),
        _ => 0xc000_0000 + rng.below(0x4000_0000 - 8),
    }
}

/// CR0 bits the guest flips: those 64-bit code may change without #GP (not PE or PG,
/// and NW only with CD: see [`cr0_flip`]). A processor answers other writes with #GP,
/// but QEMU's software SVM takes some (clearing PG in 64-bit mode, NW without CD) and
/// then refuses the next VMRUN, or ends the VM (VMEXIT_INVALID) for a reserved bit:
/// the VM would end, not the guest survive.
const CR0_FLIP: u64 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 16) | (1 << 18) | CR0_NW | CR0_CD;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;

/// CR4 bits the guest flips where CPUID reports their feature: VME, PVI, TSD, DE, PSE,
/// MCE, PGE, PCE, OSFXSR, OSXMMEXCPT, UMIP, FSGSBASE, OSXSAVE. Not PAE (#GP in long
/// mode), PCIDE, LA57, VMXE, SMXE, PKE, CET (reserved or mode-bound: see [`CR0_FLIP`]),
/// nor SMEP/SMAP (the host's page tables may mark pages user-accessible).
fn cr4_flip_mask() -> u64 {
    let (_, _, c1, d1) = arch::cpuid(1, 0);
    let (max, ..) = arch::cpuid(0, 0);
    let (_, b7, c7, _) = if max >= 7 {
        arch::cpuid(7, 0)
    } else {
        (0, 0, 0, 0)
    };
    let has = |r: u32, bit: u32| r & (1 << bit) != 0;
    [
        (0, has(d1, 1)),
        (1, has(d1, 1)),
        (2, has(d1, 4)),
        (3, has(d1, 2)),
        (4, has(d1, 3)),
        (6, has(d1, 7)),
        (7, has(d1, 13)),
        (8, true),
        (9, has(d1, 24)),
        (10, has(d1, 25)),
        (11, has(c7, 2)),
        (16, has(b7, 0)),
        (18, has(c1, 26)),
    ]
    .iter()
    .filter(|&&(_, on)| on)
    .fold(0, |m, &(bit, _)| m | 1 << bit)
}

/// A CR0 flip from `r`: within [`CR0_FLIP`], NW only together with CD.
fn cr0_flip(r: u64) -> u64 {
    let a = CR0_FLIP & r;
    if a & CR0_NW != 0 {
        a | CR0_CD
    } else {
        a
    }
}

/// Prepares the parameters of one action in `s`.
fn choose(rng: &mut Rng, s: &mut State, cr4_flip: u64) {
    let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
    s.kind = kind as u64;
    s.steps = 0;
    s.a = rng.next_u64();
    s.b = rng.next_u64();
    s.c = rng.next_u64();
    match kind {
        Kind::PortOut | Kind::PortIn | Kind::PortString => s.a = port(rng),
        Kind::MsrRead | Kind::MsrWrite => s.a = msr_index(rng),
        Kind::Mmio => s.a = mmio_address(rng),
        Kind::Cr0 => {
            s.a = cr0_flip(if rng.below(2) == 0 {
                1 << rng.below(64)
            } else {
                rng.next_u64()
            })
        }
        Kind::Cr4 => {
            s.a = cr4_flip
                & if rng.below(2) == 0 {
                    1 << rng.below(64)
                } else {
                    rng.next_u64()
                }
        }
        Kind::RandomCode => {
            let len = 1 + rng.below(24) as usize;
            s.code.fill(0xcc);
            let at = 0x800;
            for b in &mut s.code[at..at + len] {
                *b = rng.next_u64() as u8;
            }
            // 16 nops resynchronise an instruction the random bytes started, then
            // `int 0x31` ends the sequence.
            s.code[at + len..at + len + 16].fill(0x90);
            s.code[at + len + 16] = 0xcd;
            s.code[at + len + 17] = VECTOR_SEQ_END as u8;
            for r in &mut s.regs[..16] {
                *r = match rng.below(4) {
                    0 => rng.below(0x1_0000),
                    1 => mmio_address(rng),
                    _ => rng.next_u64(),
                };
            }
            s.regs[16] = s.scratch.as_ptr() as u64 + s.scratch.len() as u64;
        }
        Kind::StartCpu => s.a = rng.below(4),
        _ => {}
    }
}

/// One MMIO access of form `b % 16` at `a` (value `c`).
fn mmio_access(a: u64, b: u64, c: u64, buf: *mut u8) {
    // SAFETY: `a` is an unbacked identity-mapped address: every access exits to the
    // host (or faults, which the probe catches); `buf` is this vCPU's 256-byte buffer
    // and the string forms move at most 8 elements of 8 bytes.
    unsafe {
        match b % 16 {
            0 => asm!("mov {v:l}, byte ptr [{a}]", a = in(reg) a, v = out(reg) _),
            1 => asm!("mov {v:x}, word ptr [{a}]", a = in(reg) a, v = out(reg) _),
            2 => asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) a, v = out(reg) _),
            3 => asm!("mov {v}, qword ptr [{a}]", a = in(reg) a, v = out(reg) _),
            4 => asm!("mov byte ptr [{a}], {v:l}", a = in(reg) a, v = in(reg) c),
            5 => asm!("mov word ptr [{a}], {v:x}", a = in(reg) a, v = in(reg) c),
            6 => asm!("mov dword ptr [{a}], {v:e}", a = in(reg) a, v = in(reg) c),
            7 => asm!("mov qword ptr [{a}], {v}", a = in(reg) a, v = in(reg) c),
            8 => asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) a, v = out(reg) _),
            9 => asm!("movsx {v}, byte ptr [{a}]", a = in(reg) a, v = out(reg) _),
            10 => asm!("add dword ptr [{a}], {v:e}", a = in(reg) a, v = in(reg) c),
            11 => asm!("or qword ptr [{a}], {v}", a = in(reg) a, v = in(reg) c),
            12 => asm!("xchg dword ptr [{a}], {v:e}", a = in(reg) a, v = inout(reg) c => _),
            13 => asm!("lock cmpxchg qword ptr [{a}], {v}", a = in(reg) a, v = in(reg) c,
                       inout("rax") c => _),
            14 => asm!("rep movsb", inout("rsi") a => _, inout("rdi") buf => _,
                       inout("rcx") c % 9 => _),
            _ => asm!("rep stosq", inout("rdi") a => _, in("rax") c, inout("rcx") c % 9 => _),
        }
    }
}

/// The action prepared in `*s`, run inside the probe.
extern "C" fn action(s: *mut State) {
    // SAFETY: `s` is this vCPU's state; the fields are plain data.
    let (kind, a, b, c) = unsafe { ((*s).kind, (*s).a, (*s).b, (*s).c) };
    // SAFETY: in every arm the instruction is the point of the exercise: it exits to
    // the host or raises an exception that `trap` turns into a return from the probe.
    // None writes guest memory except `buf` (string input) and the MMIO forms.
    unsafe {
        match KINDS[kind as usize] {
            Kind::PortOut => match b % 3 {
                0 => asm!("out dx, al", in("dx") a as u16, in("al") c as u8),
                1 => asm!("out dx, ax", in("dx") a as u16, in("ax") c as u16),
                _ => asm!("out dx, eax", in("dx") a as u16, in("eax") c as u32),
            },
            Kind::PortIn => match b % 3 {
                0 => asm!("in al, dx", in("dx") a as u16, out("al") _),
                1 => asm!("in ax, dx", in("dx") a as u16, out("ax") _),
                _ => asm!("in eax, dx", in("dx") a as u16, out("eax") _),
            },
            Kind::PortString => {
                let buf = addr_of_mut!((*s).buf) as *mut u8;
                let n = c % 9;
                match b % 4 {
                    0 => asm!("rep outsb", in("dx") a as u16, inout("rsi") buf => _,
                              inout("rcx") n => _),
                    1 => asm!("rep outsd", in("dx") a as u16, inout("rsi") buf => _,
                              inout("rcx") n => _),
                    2 => asm!("rep insb", in("dx") a as u16, inout("rdi") buf => _,
                              inout("rcx") n => _),
                    _ => asm!("rep insw", in("dx") a as u16, inout("rdi") buf => _,
                              inout("rcx") n => _),
                }
            }
            Kind::MsrRead => asm!("rdmsr", in("ecx") a as u32, out("eax") _, out("edx") _),
            Kind::MsrWrite => asm!("wrmsr", in("ecx") a as u32, in("eax") b as u32,
                                   in("edx") (b >> 32) as u32),
            Kind::Mmio => mmio_access(a, b, c, addr_of_mut!((*s).buf) as *mut u8),
            Kind::Cr0 => asm!("mov {old}, cr0", "mov {new}, {old}", "xor {new}, {flip}",
                              "mov cr0, {new}", "mov cr0, {old}", old = out(reg) _,
                              new = out(reg) _, flip = in(reg) a),
            Kind::Cr4 => asm!("mov {old}, cr4", "mov {new}, {old}", "xor {new}, {flip}",
                              "mov cr4, {new}", "mov cr4, {old}", old = out(reg) _,
                              new = out(reg) _, flip = in(reg) a),
            Kind::Ud2Handled => asm!("ud2"),
            Kind::Ud2NoHandler => {
                arch::set_gate_present(6, false);
                // The not-present gate raises #NP, which ends the probe: the gate is
                // restored after the probe.
                asm!("ud2");
            }
            Kind::Int3 => asm!("int3"),
            Kind::RandomCode => hostile_enter(
                addr_of_mut!((*s).code) as u64 + 0x800,
                addr_of_mut!((*s).regs) as *const u64,
            ),
            Kind::Cpuid => {
                asm!("mov {t}, rbx", "cpuid", "mov rbx, {t}", t = out(reg) _,
                     inout("eax") a as u32 => _, inout("ecx") b as u32 => _, out("edx") _)
            }
            Kind::Hypercall => {
                let nr = if a & 1 == 0 {
                    crate::HYPERCALL_NR
                } else {
                    a % 16
                };
                arch::hypercall(crate::INTEL.load(Ordering::Relaxed), nr, b);
            }
            Kind::Hlt => arch::halt_once(),
            Kind::Privileged => match a % 12 {
                0 => asm!("invlpg [{}]", in(reg) b),
                1 => asm!("wbinvd"),
                2 => asm!("rdpmc", in("ecx") b as u32, out("eax") _, out("edx") _),
                3 => asm!("xsetbv", in("ecx") b as u32 & 3, in("eax") c as u32, in("edx") 0),
                4 => asm!("mov dr7, {}", in(reg) b & 0xffff_0000_0000_07ff),
                5 => asm!("vmrun", in("rax") b & 0xffff_f000),
                6 => asm!("vmload", in("rax") b & 0xffff_f000),
                7 => asm!("stgi"),
                8 => asm!("clgi", "stgi"),
                9 => asm!("monitor", in("rax") b, in("ecx") 0, in("edx") 0),
                10 => asm!("rdtscp", out("eax") _, out("edx") _, out("ecx") _),
                _ => asm!("invd"),
            },
            Kind::InjectGp => arch::outl(crate::PORT_INJECT_GP, b as u32),
            Kind::StartCpu => arch::outl(crate::PORT_START_CPU, a as u32),
        }
    }
}

/// Runs hostile actions forever on vCPU `index`.
pub fn run(index: usize, seed: u64) -> ! {
    let mut rng = Rng::splitmix(seed ^ (index as u64).wrapping_mul(0x1000_0000_01b3));
    // SAFETY: an in-bounds element pointer (index < MAX_CPUS, checked at entry).
    let s = unsafe { addr_of_mut!(STATES[index]) };
    println!("hostile: vCPU {} seed {:#x}", index, seed);
    let cr4_flip = cr4_flip_mask();
    let mut n: u64 = 0;
    let mut faults: u64 = 0;
    loop {
        if rng.below(TRIPLE_FAULT_ODDS) == 0 {
            println!("hostile: vCPU {} triple fault after {} actions", index, n);
            arch::triple_fault();
        }
        // SAFETY: `s` is this vCPU's own state.
        choose(&mut rng, unsafe { &mut *s }, cr4_flip);
        // SAFETY: the probe saves what it must and resumes after any exception of the
        // action (see `trap`); `recover_rsp` is this vCPU's slot.
        let r = unsafe { hostile_probe(action, s, addr_of_mut!((*s).recover_rsp)) };
        // SAFETY: as above.
        unsafe { (*s).recover_rsp = 0 };
        arch::set_gate_present(6, true);
        if r != 0 {
            faults += 1;
        }
        n += 1;
        if n.is_multiple_of(PROGRESS) {
            println!(
                "hostile: vCPU {} {} actions, {} ended by exceptions (#DB {}, #GP {}, #UD {}, #PF {})",
                index,
                n,
                faults,
                VECTORS[1].load(Ordering::Relaxed),
                VECTORS[13].load(Ordering::Relaxed),
                VECTORS[6].load(Ordering::Relaxed),
                VECTORS[14].load(Ordering::Relaxed)
            );
        }
    }
}

/// Ends a running probe on the vCPU of `frame`: resumes at `hostile_resume` on the
/// probe's stack with `rax` = `0x100 | vector`. A `ud2` of the handled kind is skipped
/// instead. Returns false when no probe runs (an exception in the guest itself).
pub fn trap(frame: &mut Frame) -> bool {
    let index = arch::cpu_of_frame(frame);
    // SAFETY: an in-bounds element pointer; the slot is this vCPU's.
    let s = unsafe { addr_of_mut!(STATES[index]) };
    // SAFETY: as above.
    let (slot, kind) = unsafe { ((*s).recover_rsp, (*s).kind) };
    if slot == 0 {
        return false;
    }
    if frame.vector == 1 && kind == Kind::RandomCode as u64 {
        // SAFETY: this vCPU's own state.
        let steps = unsafe {
            (*s).steps += 1;
            (*s).steps
        };
        if steps < MAX_STEPS {
            return true;
        }
    }
    VECTORS[frame.vector as usize & 0xff].fetch_add(1, Ordering::Relaxed);
    if frame.vector == 6 && kind == Kind::Ud2Handled as u64 {
        // SAFETY: rip points at the faulting instruction in the guest's own text.
        let bytes = unsafe { (frame.rip as *const [u8; 2]).read_unaligned() };
        if bytes == [0x0f, 0x0b] {
            frame.rip += 2;
            return true;
        }
    }
    frame.rip = core::ptr::addr_of!(hostile_resume) as u64;
    frame.rsp = slot;
    frame.rflags = 2;
    frame.cs = u64::from(arch::CODE_SEL);
    frame.ss = u64::from(arch::DATA_SEL);
    frame.rax = 0x100 | frame.vector;
    true
}
