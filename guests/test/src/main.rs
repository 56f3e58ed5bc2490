//! The bare-metal test and benchmark guest. Its contract with whoever runs it (our VMM
//! or the KVM runner) is `guests/README.md`: entered in 64-bit mode at 1 MiB with `rdi`
//! = vCPU index, `rsi` = mode (1 check list, 2 exit benchmark, 3 hostile, 4 exception
//! loops), `rdx` = vCPU count, `rcx` = seed (mode 3). It talks to the host through
//! ports, one MMIO register, one MSR, the hypercall, HLT and an injected #GP.

#![no_std]
#![no_main]

mod arch;
mod bench;
mod checks;
mod console;
mod hostile;
mod loops;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arch::Frame;

/// Console port (one character per `out`).
pub const PORT_CONSOLE: u16 = 0xe9;
/// No-op exit.
pub const PORT_NOP: u16 = 0x80;
/// The host answers `MAGIC_IN`.
pub const PORT_MAGIC: u16 = 0x81;
/// The host stores what is written and returns it on `in`.
pub const PORT_ECHO: u16 = 0x82;
/// The host injects #GP with the written error code.
pub const PORT_INJECT_GP: u16 = 0x83;
/// The host starts the vCPU of the written number.
pub const PORT_START_CPU: u16 = 0xf1;
/// End of run with the written code.
pub const PORT_EXIT: u16 = 0xf4;
/// What port 0x81 reads.
pub const MAGIC_IN: u32 = 0x5a5a_a5a5;
/// The emulated MMIO register.
pub const MMIO_REG: u64 = 0xd000_0000;
/// Its initial value.
pub const MMIO_INIT: u64 = 0x1122_3344_5566_7788;
/// The synthetic MSR the host intercepts.
pub const MSR_SYNTH: u32 = 0x4000_0200;
/// `rax` of the contract's hypercall ("PERE").
pub const HYPERCALL_NR: u64 = 0x5045_5245;
/// The vector the host injects to end a `hlt`.
pub const VECTOR_WAKE: u64 = 0x30;

/// Modes (`rsi`).
pub const MODE_CHECK: u64 = 1;
/// The exit benchmark.
pub const MODE_BENCH: u64 = 2;
/// The hostile guest.
pub const MODE_HOSTILE: u64 = 3;
/// Exception loops (#AC, #DB).
pub const MODE_LOOPS: u64 = 4;

/// Whether the CPU vendor is Intel (`vmcall`) rather than AMD (`vmmcall`).
pub static INTEL: AtomicBool = AtomicBool::new(false);
/// Injected vector 0x30 interrupts seen.
pub static WAKEUPS: AtomicU64 = AtomicU64::new(0);
/// The check running now (its number), for the end code of an unexpected exception.
pub static CURRENT_CHECK: AtomicU32 = AtomicU32::new(0);
/// The mode the boot vCPU runs.
static MODE: AtomicU64 = AtomicU64::new(0);

/// Ends the run with `code` (port 0xF4) and halts should the host go on.
pub fn exit(code: u32) -> ! {
    arch::outl(PORT_EXIT, code);
    arch::park()
}

/// Rust entry from `_start`, on vCPU `index`'s own stack.
#[no_mangle]
extern "C" fn guest_main(index: u64, mode: u64, cpus: u64, seed: u64) -> ! {
    let index = index as usize;
    if index == 0 {
        arch::init_idt();
        MODE.store(mode, Ordering::Relaxed);
        let (_, b, c, d) = arch::cpuid(0, 0);
        INTEL.store(
            (b, d, c) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e),
            Ordering::Relaxed,
        );
    }
    arch::init_cpu(index);
    match (mode, index) {
        (MODE_CHECK, 0) => exit(checks::run(cpus)),
        (MODE_CHECK, _) => checks::secondary(),
        (MODE_BENCH, 0) => {
            bench::run();
            println!("guest: done 0");
            exit(0)
        }
        (MODE_HOSTILE, _) => hostile::run(index, seed),
        (MODE_LOOPS, 0) => exit(loops::run(cpus, seed)),
        (MODE_LOOPS, _) => loops::secondary(seed),
        _ => {
            if index == 0 {
                println!("guest: unknown mode {}", mode);
                exit(0xff);
            }
            arch::park()
        }
    }
}

/// Called by the trap entry for every vector, on the vCPU's interrupt stack.
#[no_mangle]
extern "C" fn trap(frame: &mut Frame) {
    if frame.vector == VECTOR_WAKE {
        WAKEUPS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if MODE.load(Ordering::Relaxed) == MODE_HOSTILE && hostile::trap(frame) {
        return;
    }
    if MODE.load(Ordering::Relaxed) == MODE_LOOPS && loops::trap(frame) {
        return;
    }
    if checks::trap(frame) {
        return;
    }
    println!(
        "guest: unexpected vector {} error {:#x} at {:#x}",
        frame.vector, frame.error, frame.rip
    );
    let check = CURRENT_CHECK.load(Ordering::Relaxed);
    exit(if check == 0 { 0xfe } else { check })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest: panic: {}", info);
    exit(0xfd)
}
