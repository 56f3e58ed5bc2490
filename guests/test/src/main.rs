//! The bare-metal test and benchmark guest. Its contract with whoever runs it (our VMM
//! or the KVM runner) is `guests/README.md`: entered in 64-bit mode at 1 MiB with `rdi`
//! = vCPU index, `rsi` = mode (1 check list, 2 exit benchmark, 3 hostile, 4 exception
//! loops), `rdx` = vCPU count, `rcx` = seed (mode 3). It talks to the host through
//! ports, one MMIO register, one MSR, the hypercall, HLT and an injected #GP.
//!
//! The same image is a Multiboot v1 kernel (boot.rs): entered that way it takes its mode
//! from the command line (`mode=pc` and the rest); mode `pc` (pc.rs) runs a check list on
//! a standard PC, QEMU's or our VMM's, without any device of the contract.

#![no_std]
#![no_main]

mod arch;
mod bench;
mod boot;
mod checks;
mod console;
mod hostile;
mod loops;
mod pc;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arch::Frame;

pub use guest_contract::{
    HYPERCALL_NR, MAGIC_IN, MMIO_INIT, MMIO_REG, MODE_BENCH, MODE_CHECK, MODE_EXIT, MODE_HOSTILE,
    MODE_LOOPS, MODE_PC, MODE_TRIPLE, MSR_SYNTH, PORT_CONSOLE, PORT_ECHO, PORT_EXIT,
    PORT_INJECT_GP, PORT_MAGIC, PORT_NOP, PORT_START_CPU, VECTOR_WAKE,
};

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
    let (mode, cpus, seed) = if index == 0 && mode == boot::LOADER_MAGIC {
        // The Multiboot entry: `seed` holds the info address.
        let args = boot::args(seed);
        if matches!(args.mode, MODE_PC | MODE_EXIT | MODE_TRIPLE) {
            console::use_com1();
        }
        (args.mode, args.cpus.max(1), args.seed)
    } else {
        (mode, cpus, seed)
    };
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
        (MODE_PC, 0) => exit(pc::run()),
        (MODE_EXIT, 0) => {
            println!("guest: isa-debug-exit with {:#x}", seed);
            exit(seed as u32)
        }
        (MODE_TRIPLE, 0) => {
            println!("guest: triple fault");
            arch::triple_fault()
        }
        (MODE_PC, _) => pc::secondary(index),
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
    if frame.vector == u64::from(VECTOR_WAKE) {
        WAKEUPS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if MODE.load(Ordering::Relaxed) == MODE_HOSTILE && hostile::trap(frame) {
        return;
    }
    if MODE.load(Ordering::Relaxed) == MODE_PC && pc::trap(frame) {
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
