//! Mode 4, exception loops: the exceptions a VMM must see whether it asked for them or
//! not (#AC and #DB: the host intercepts them, reflects them into the guest, and so
//! never lets an exception that re-raises itself during its own delivery hold a
//! physical CPU), first one at a time, then as loops.
//!
//! Checks on vCPU 0, each printing `check <name> ok` or `check <name> FAIL …`:
//! - `ac`: a misaligned load at CPL 3 with CR0.AM and RFLAGS.AC raises #AC (error code
//!   0, the load's RIP, the user code segment); a CPU that checks no alignment (QEMU's
//!   software emulation) completes the load: `check ac skipped …`, and so is `ac_loop`;
//! - `db_step`: single-stepping (RFLAGS.TF) raises #DB with DR6.BS set;
//! - `db_data`: a write to a data breakpoint (DR0, DR7) raises #DB with DR6.B0 set;
//! - `ac_loop` (vCPU 1, with two vCPUs): an #AC whose handler returns to the faulting
//!   load, again and again, until vCPU 0 tells the handler to stop;
//! - `db_loop` (vCPU 1): a data breakpoint on the slot of vCPU 1's #DB frame on its
//!   interrupt stack: each delivery of the #DB writes the frame and so raises the next
//!   #DB before the handler's first instruction (on real hardware without the host's
//!   intercept, a loop inside the processor that nothing interrupts); vCPU 0 ends it by
//!   moving the #DB gate to the second interrupt stack, after which the handler runs
//!   and clears the breakpoint. (An emulator that checks no data breakpoint on the
//!   delivery's own writes runs the handler at once; QEMU's software emulation loses
//!   the #DB: `check db_loop skipped …`.)
//!
//! With [`NO_DB_LOOP`] in the mode's flags (`rcx`), `db_loop` is not run: QEMU's nested
//! SVM (7.2, software emulation) mishandles it — when the delivery of the #DB its VMM
//! reflects (an event VMRUN injects) hits the breakpoint, QEMU unwinds to the host's
//! VMRUN instruction and the #VMEXIT saves the host's RIP as the guest's (the guest then
//! runs at a kernel address). The loop proves nothing there anyway: QEMU loses the #DB.
//!
//! The end code is the number of the first failing check (1-based, in the order above),
//! 0 when all passed.

use core::arch::{asm, global_asm};
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{self, Frame, MAX_CPUS};
use crate::{println, CURRENT_CHECK};

/// Mode flag (`rcx`): leave out `db_loop` (see the module documentation).
pub const NO_DB_LOOP: u64 = 1;
/// The mode's flags.
static FLAGS: AtomicU64 = AtomicU64::new(0);

/// Vector of the alignment check.
const AC: u64 = 17;
/// Vector of the debug exception.
const DB: u64 = 1;
/// CR0.AM.
const CR0_AM: u64 = 1 << 18;
/// RFLAGS of the user code: AC (and the reserved bit 1).
const USER_RFLAGS: u64 = (1 << 18) | 2;
/// RFLAGS.TF.
const TF: u64 = 1 << 8;
/// DR6 with no condition recorded (its reserved bits set).
const DR6_CLEAR: u64 = 0xffff_0ff0;
/// DR6.B0 and DR6.BS.
const DR6_B0: u64 = 1;
const DR6_BS: u64 = 1 << 14;
/// DR7 with nothing enabled.
const DR7_OFF: u64 = 0x400;
/// DR7: breakpoint 0 enabled (L0) on data writes (R/W0 = 01) of 8 bytes (LEN0 = 10).
const DR7_WRITE8: u64 = DR7_OFF | 1 | (1 << 16) | (2 << 18);
/// TSC ticks the #AC loop runs before vCPU 0 ends it.
const AC_LOOP_TICKS: u64 = 20_000_000;
/// TSC ticks the #DB loop runs before vCPU 0 ends it (Bochs: about 1.5 s, the time the
/// loop holds vCPU 1's physical CPU where nothing intercepts #DB).
const DB_LOOP_TICKS: u64 = 60_000_000;
/// TSC ticks vCPU 0 waits for vCPU 1 at most.
const WAIT_TICKS: u64 = 20_000_000_000;

/// What the trap handler does with #AC and #DB now.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Phase {
    None,
    Ac,
    Step,
    Data,
    AcLoop,
    DbLoop,
}

/// Per vCPU: the phase.
static PHASE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per vCPU: `rsp` of the running user-mode probe (0: none).
static SLOT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The #AC of the `ac` check: error code, code segment, RIP.
static AC_SEEN: [AtomicU64; 3] = [const { AtomicU64::new(u64::MAX) }; 3];
/// DR6 in the #DB handler of `db_step` and `db_data`.
static STEP_DR6: AtomicU64 = AtomicU64::new(0);
static DATA_DR6: AtomicU64 = AtomicU64::new(0);
/// #AC handler runs of the loop; set to end it; the loop ended.
static AC_LOOPS: AtomicU64 = AtomicU64::new(0);
static AC_STOP: AtomicU64 = AtomicU64::new(0);
static AC_DONE: AtomicU64 = AtomicU64::new(0);
/// The #DB loop is armed; #DB handler runs in it and their DR6 bits; it ended.
static DB_ARMED: AtomicU64 = AtomicU64::new(0);
static DB_RUNS: AtomicU64 = AtomicU64::new(0);
static DB_DR6: AtomicU64 = AtomicU64::new(0);
static DB_DONE: AtomicU64 = AtomicU64::new(0);
/// The word the data breakpoint of `db_data` watches.
static WATCHED: AtomicU64 = AtomicU64::new(0);
/// The CPU raises #AC (set by `ac` before vCPU 1 starts).
static AC_WORKS: AtomicU64 = AtomicU64::new(0);

/// What a check found: `Skip` when the CPU lacks what it needs.
enum Outcome {
    Ok,
    Skip(&'static str),
}

/// Per vCPU: the user-mode stack and the buffer of the misaligned load.
#[repr(C, align(4096))]
struct User {
    stack: [u8; 4096],
    buf: [u64; 2],
}

static mut USER: [User; MAX_CPUS] = [const {
    User {
        stack: [0; 4096],
        buf: [0; 2],
    }
}; MAX_CPUS];

// `loops_user(entry, arg, user_rsp, slot)`: saves the callee-saved registers, stores
// `rsp` at `*slot` and enters `entry` at CPL 3 (user segments, RFLAGS.AC) with `rdi` =
// `arg` and `rsp` = `user_rsp`. Returns (at `loops_resume`) the value the trap handler
// leaves in `rax`. `loops_probe(action, arg, slot)`: the same at CPL 0, calling
// `action(arg)`; returns 0 when the action returned. `loops_ac_user`: the misaligned
// load at `rdi + 1`, then `ud2`.
global_asm!(
    ".pushsection .text.loops, \"ax\"",
    ".global loops_probe",
    "loops_probe:",
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
    "jmp loops_resume",
    ".global loops_user",
    "loops_user:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "sub rsp, 8",
    "mov [rcx], rsp",
    "push {uds}",
    "push rdx",
    "push {rflags}",
    "push {ucs}",
    "push rdi",
    "mov rdi, rsi",
    "iretq",
    ".global loops_resume",
    "loops_resume:",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".global loops_ac_user",
    "loops_ac_user:",
    "mov eax, dword ptr [rdi + 1]",
    "ud2",
    ".popsection",
    uds = const arch::USER_DATA_SEL,
    ucs = const arch::USER_CODE_SEL,
    rflags = const USER_RFLAGS,
);

extern "C" {
    fn loops_probe(action: extern "C" fn(u64), arg: u64, slot: *mut u64) -> u64;
    fn loops_user(entry: u64, arg: u64, user_rsp: u64, slot: *mut u64) -> u64;
    static loops_resume: u8;
    static loops_ac_user: u8;
}

fn set_phase(index: usize, p: Phase) {
    PHASE[index].store(p as u64, Ordering::SeqCst);
}

fn phase(index: usize) -> Phase {
    match PHASE[index].load(Ordering::SeqCst) {
        1 => Phase::Ac,
        2 => Phase::Step,
        3 => Phase::Data,
        4 => Phase::AcLoop,
        5 => Phase::DbLoop,
        _ => Phase::None,
    }
}

fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reads DR6 at CPL 0; no memory is touched.
    unsafe { asm!("mov {}, dr6", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes DR6 and DR7 (DR7 last).
fn write_dr67(dr6: u64, dr7: u64) {
    // SAFETY: CPL 0; the values are valid (DR6 with its reserved bits set, DR7 with at
    // most breakpoint 0 enabled on a word of the guest's own memory).
    unsafe {
        asm!("mov dr6, {}", "mov dr7, {}", in(reg) dr6, in(reg) dr7,
             options(nomem, nostack, preserves_flags))
    };
}

fn write_dr0(v: u64) {
    // SAFETY: CPL 0; DR0 takes any linear address (nothing happens until DR7 enables it).
    unsafe { asm!("mov dr0, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// Sets CR0.AM on this vCPU.
fn enable_alignment_checks() {
    // SAFETY: CR0.AM only makes user-mode accesses with RFLAGS.AC alignment-checked.
    unsafe {
        asm!("mov {t}, cr0", "or {t}, {am}", "mov cr0, {t}", t = out(reg) _, am = in(reg) CR0_AM,
             options(nomem, nostack, preserves_flags))
    };
}

/// Makes the identity map user-accessible (the U bit at every level from CR3), so that
/// user code can run the guest's own text and touch its data. SMEP and SMAP stay off.
fn user_mappings() {
    let cr3: u64;
    // SAFETY: reads CR3.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let table = |a: u64| a as *mut u64;
    // SAFETY: the host's identity-mapped page tables (guest RAM, the first 4 GiB):
    // setting the U bit of present entries changes nothing else.
    unsafe {
        let pml4 = table(cr3 & ADDR);
        for i in 0..512 {
            let e = pml4.add(i).read_volatile();
            if e & 1 == 0 {
                continue;
            }
            pml4.add(i).write_volatile(e | 4);
            let pdpt = table(e & ADDR);
            for j in 0..512 {
                let e = pdpt.add(j).read_volatile();
                if e & 1 == 0 {
                    continue;
                }
                pdpt.add(j).write_volatile(e | 4);
                if e & 0x80 != 0 {
                    continue;
                }
                let pd = table(e & ADDR);
                for k in 0..512 {
                    let e = pd.add(k).read_volatile();
                    if e & 1 != 0 {
                        pd.add(k).write_volatile(e | 4);
                    }
                }
            }
        }
        asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags));
    }
}

/// Runs the misaligned load at CPL 3 on vCPU `index`; returns what the trap handler
/// resumed with (`0x100 | vector`).
fn user_ac(index: usize) -> u64 {
    // SAFETY: `USER[index]` is this vCPU's own; only addresses are taken.
    let (rsp, buf) = unsafe {
        let u = addr_of_mut!(USER[index]);
        (
            addr_of_mut!((*u).stack) as u64 + 4096,
            addr_of_mut!((*u).buf) as u64,
        )
    };
    let slot = SLOT[index].as_ptr();
    // SAFETY: the user code is the guest's own (`loops_ac_user`), mapped for user mode
    // by `user_mappings`; it ends in an exception whose handler (`trap`) resumes at
    // `loops_resume` on the stack saved in `slot`.
    let r = unsafe { loops_user(core::ptr::addr_of!(loops_ac_user) as u64, buf, rsp, slot) };
    SLOT[index].store(0, Ordering::SeqCst);
    r
}

/// A check's verdict: the detail of a failure.
type Verdict = Result<Outcome, (&'static str, u64)>;

fn ac() -> Verdict {
    set_phase(0, Phase::Ac);
    let r = user_ac(0);
    set_phase(0, Phase::None);
    if r == 0x100 | 6 {
        // The load completed and `ud2` ended the probe.
        return Ok(Outcome::Skip(
            "the CPU raises no #AC (no alignment checking)",
        ));
    }
    if r != 0x100 | AC {
        return Err(("resumed by vector (0x100 | v)", r));
    }
    let err = AC_SEEN[0].load(Ordering::SeqCst);
    let cs = AC_SEEN[1].load(Ordering::SeqCst);
    let rip = AC_SEEN[2].load(Ordering::SeqCst);
    if err != 0 {
        return Err(("#AC error code", err));
    }
    if cs != u64::from(arch::USER_CODE_SEL) {
        return Err(("#AC code segment", cs));
    }
    if rip != core::ptr::addr_of!(loops_ac_user) as u64 {
        return Err(("#AC rip", rip));
    }
    AC_WORKS.store(1, Ordering::SeqCst);
    Ok(Outcome::Ok)
}

fn db_step() -> Verdict {
    write_dr67(DR6_CLEAR, DR7_OFF);
    STEP_DR6.store(0, Ordering::SeqCst);
    set_phase(0, Phase::Step);
    // SAFETY: TF traps after the instruction following the `popfq`; the #DB handler
    // (`trap`) records DR6 and clears TF in the frame.
    unsafe { asm!("pushfq", "or qword ptr [rsp], {tf}", "popfq", "nop", "nop", tf = const TF) };
    set_phase(0, Phase::None);
    let d = STEP_DR6.load(Ordering::SeqCst);
    if d & DR6_BS == 0 {
        return Err(("DR6 (BS missing)", d));
    }
    Ok(Outcome::Ok)
}

fn db_data() -> Verdict {
    DATA_DR6.store(0, Ordering::SeqCst);
    set_phase(0, Phase::Data);
    write_dr0(WATCHED.as_ptr() as u64);
    write_dr67(DR6_CLEAR, DR7_WRITE8);
    WATCHED.store(1, Ordering::SeqCst);
    write_dr67(DR6_CLEAR, DR7_OFF);
    set_phase(0, Phase::None);
    let d = DATA_DR6.load(Ordering::SeqCst);
    if d & DR6_B0 == 0 {
        return Err(("DR6 (B0 missing)", d));
    }
    Ok(Outcome::Ok)
}

/// Waits until `flag` is non-zero (at most [`WAIT_TICKS`]).
fn wait(flag: &AtomicU64) -> bool {
    let start = arch::rdtsc();
    while flag.load(Ordering::SeqCst) == 0 {
        if arch::rdtsc() - start > WAIT_TICKS {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Lets a loop run for `ticks`.
fn let_run(ticks: u64) {
    let start = arch::rdtsc();
    while arch::rdtsc() - start < ticks {
        core::hint::spin_loop();
    }
}

fn ac_loop() -> Verdict {
    if AC_WORKS.load(Ordering::SeqCst) == 0 {
        return Ok(Outcome::Skip("the CPU raises no #AC"));
    }
    if !wait(&AC_LOOPS) {
        return Err(("the loop never started (#AC runs)", 0));
    }
    let_run(AC_LOOP_TICKS);
    AC_STOP.store(1, Ordering::SeqCst);
    if !wait(&AC_DONE) {
        return Err((
            "the loop did not end (#AC runs)",
            AC_LOOPS.load(Ordering::SeqCst),
        ));
    }
    println!(
        "loops: #AC loop: {} handler runs",
        AC_LOOPS.load(Ordering::SeqCst)
    );
    Ok(Outcome::Ok)
}

fn db_loop() -> Verdict {
    if FLAGS.load(Ordering::SeqCst) & NO_DB_LOOP != 0 {
        return Ok(Outcome::Skip(
            "not run (mode flag: the emulator mishandles it)",
        ));
    }
    if !wait(&DB_ARMED) {
        return Err(("vCPU 1 did not arm the breakpoint", 0));
    }
    let_run(DB_LOOP_TICKS);
    // The next delivery writes its frame elsewhere: the handler runs.
    arch::set_gate_ist(DB as usize, 2);
    let done = wait(&DB_DONE);
    arch::set_gate_ist(DB as usize, 1);
    let runs = DB_RUNS.load(Ordering::SeqCst);
    let dr6 = DB_DR6.load(Ordering::SeqCst);
    println!(
        "loops: #DB loop: {} handler runs, DR6 bits {:#x}",
        runs, dr6
    );
    if !done {
        return Err(("the loop did not end (handler runs)", runs));
    }
    if runs == 0 {
        // QEMU's software emulation abandons a delivery whose own write hits a data
        // breakpoint, and with it the #DB.
        return Ok(Outcome::Skip("the CPU lost the #DB (no handler ran)"));
    }
    if dr6 & DR6_B0 == 0 {
        return Err(("DR6 (B0 missing)", dr6));
    }
    Ok(Outcome::Ok)
}

/// A check's name and function.
type Check = (&'static str, fn() -> Verdict);

const CHECKS: &[Check] = &[
    ("ac", ac),
    ("db_step", db_step),
    ("db_data", db_data),
    ("ac_loop", ac_loop),
    ("db_loop", db_loop),
];

/// vCPU 0: the checks, and with `cpus` ≥ 2 the loops on vCPU 1; returns the end code.
pub fn run(cpus: u64, flags: u64) -> u32 {
    FLAGS.store(flags, Ordering::SeqCst);
    user_mappings();
    enable_alignment_checks();
    let mut first_fail = 0;
    for (i, (name, check)) in CHECKS.iter().enumerate() {
        let number = i as u32 + 1;
        if name.ends_with("_loop") && cpus < 2 {
            continue;
        }
        if *name == "ac_loop" {
            arch::outl(crate::PORT_START_CPU, 1);
        }
        CURRENT_CHECK.store(number, Ordering::Relaxed);
        match check() {
            Ok(Outcome::Ok) => println!("check {} ok", name),
            Ok(Outcome::Skip(why)) => println!("check {} skipped: {}", name, why),
            Err((what, got)) => {
                println!("check {} FAIL {}: got {:#x}", name, what, got);
                if first_fail == 0 {
                    first_fail = number;
                }
            }
        }
    }
    CURRENT_CHECK.store(0, Ordering::Relaxed);
    println!("guest: done {}", first_fail);
    first_fail
}

/// vCPU 1: the #AC loop, then the #DB loop; then it halts.
pub fn secondary(flags: u64) -> ! {
    enable_alignment_checks();
    if AC_WORKS.load(Ordering::SeqCst) != 0 {
        set_phase(1, Phase::AcLoop);
        let _ = user_ac(1);
        set_phase(1, Phase::None);
    }
    AC_DONE.store(1, Ordering::SeqCst);
    if flags & NO_DB_LOOP != 0 {
        arch::park()
    }

    // The SS slot of the frame a #DB delivery on IST1 pushes.
    let slot = arch::ist_top(1) - 8;
    set_phase(1, Phase::DbLoop);
    write_dr0(slot);
    write_dr67(DR6_CLEAR, DR7_WRITE8);
    DB_ARMED.store(1, Ordering::SeqCst);
    // In a probe: each delivery of the loop overwrites the frame of the first #DB with
    // one that returns into the handler itself, so the handler that finally runs
    // resumes the probe instead of returning.
    // SAFETY: the action writes the slot, in this vCPU's own interrupt stack and unused
    // while no exception is delivered (the write raises the #DB that starts the loop);
    // the #DB handler (`trap`) resumes at `loops_resume` on the stack saved in `SLOT`.
    unsafe { loops_probe(write_slot, slot, SLOT[1].as_ptr()) };
    SLOT[1].store(0, Ordering::SeqCst);
    set_phase(1, Phase::None);
    DB_DONE.store(1, Ordering::SeqCst);
    arch::park()
}

/// The write that starts the #DB loop.
extern "C" fn write_slot(slot: u64) {
    // SAFETY: see `secondary`.
    unsafe { (slot as *mut u64).write_volatile(0) };
}

/// #AC and #DB of this mode; false for anything else.
pub fn trap(frame: &mut Frame) -> bool {
    let index = arch::cpu_of_frame(frame);
    match (frame.vector, phase(index)) {
        (AC, Phase::Ac) => {
            AC_SEEN[0].store(frame.error, Ordering::SeqCst);
            AC_SEEN[1].store(frame.cs, Ordering::SeqCst);
            AC_SEEN[2].store(frame.rip, Ordering::SeqCst);
            resume(index, frame)
        }
        (AC, Phase::AcLoop) => {
            AC_LOOPS.fetch_add(1, Ordering::SeqCst);
            if AC_STOP.load(Ordering::SeqCst) != 0 {
                return resume(index, frame);
            }
            // Back to the faulting load, which faults again.
            true
        }
        (DB, Phase::Step) => {
            STEP_DR6.store(read_dr6(), Ordering::SeqCst);
            write_dr67(DR6_CLEAR, DR7_OFF);
            frame.rflags &= !TF;
            true
        }
        (DB, Phase::Data) => {
            DATA_DR6.store(read_dr6(), Ordering::SeqCst);
            write_dr67(DR6_CLEAR, DR7_OFF);
            true
        }
        (DB, Phase::DbLoop) => {
            DB_RUNS.fetch_add(1, Ordering::SeqCst);
            DB_DR6.fetch_or(read_dr6() & 0xf, Ordering::SeqCst);
            write_dr67(DR6_CLEAR, DR7_OFF);
            resume(index, frame)
        }
        // Anything else ends a user-mode probe (`ud2` after a load that did not fault).
        (v, _) if SLOT[index].load(Ordering::SeqCst) != 0 => {
            let _ = v;
            resume(index, frame)
        }
        _ => false,
    }
}

/// Resumes the running user-mode probe of vCPU `index` at `loops_resume` with `rax` =
/// `0x100 | vector`.
fn resume(index: usize, frame: &mut Frame) -> bool {
    let slot = SLOT[index].load(Ordering::SeqCst);
    if slot == 0 {
        return false;
    }
    frame.rip = core::ptr::addr_of!(loops_resume) as u64;
    frame.rsp = slot;
    frame.rflags = 2;
    frame.cs = u64::from(arch::CODE_SEL);
    frame.ss = u64::from(arch::DATA_SEL);
    frame.rax = 0x100 | frame.vector;
    true
}
