//! Mode 2, the exit benchmark: for each figure the minimum over [`ITER`] round trips of
//! the rdtsc difference around one exit (the rdtsc pair's own cost, `vmexit_none`,
//! included in every figure), printed as `BENCH <figure> <ticks> tsc-ticks`.

use core::arch::asm;
use core::sync::atomic::Ordering;

use crate::println;

/// Round trips per figure.
pub const ITER: u32 = 200;

/// One timed exit: `rdtsc`, the exit instruction(s), `rdtsc`; returns the difference.
macro_rules! timed {
    ($($op:literal),* ; $($operands:tt)*) => {{
        let (t0, t1): (u64, u64);
        // SAFETY: each timed instruction exits to the host, which emulates it per the
        // contract; only the named registers change.
        unsafe {
            asm!(
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                "mov {t0}, rax",
                $($op,)*
                "rdtsc",
                "shl rdx, 32",
                "or rax, rdx",
                t0 = out(reg) t0,
                out("rax") t1,
                out("rdx") _,
                $($operands)*
            );
        }
        t1.wrapping_sub(t0)
    }};
}

fn none() -> u64 {
    timed!(; )
}

fn cpuid() -> u64 {
    timed!("xor eax, eax", "mov {b}, rbx", "cpuid", "mov rbx, {b}"; b = out(reg) _, out("rcx") _)
}

fn pio_out() -> u64 {
    timed!("out 0x80, al";)
}

fn mmio() -> u64 {
    timed!("mov {v}, qword ptr [{a}]"; a = in(reg) crate::MMIO_REG, v = out(reg) _)
}

fn hypercall() -> u64 {
    if crate::INTEL.load(Ordering::Relaxed) {
        timed!("mov {b}, rbx", "xor ebx, ebx", "mov eax, {nr}", "vmcall", "mov rbx, {b}";
               b = out(reg) _, nr = const crate::HYPERCALL_NR, out("rcx") _, out("rsi") _)
    } else {
        timed!("mov {b}, rbx", "xor ebx, ebx", "mov eax, {nr}", "vmmcall", "mov rbx, {b}";
               b = out(reg) _, nr = const crate::HYPERCALL_NR, out("rcx") _, out("rsi") _)
    }
}

fn hlt() -> u64 {
    timed!("sti", "hlt", "cli";)
}

/// A figure's name and its one timed round trip.
type Figure = (&'static str, fn() -> u64);

/// The figures in print order.
const FIGURES: &[Figure] = &[
    ("vmexit_none", none),
    ("vmexit_cpuid", cpuid),
    ("vmexit_pio_out", pio_out),
    ("vmexit_mmio", mmio),
    ("vmexit_hypercall", hypercall),
    ("vmexit_hlt", hlt),
];

/// Measures and prints every figure.
pub fn run() {
    for (name, f) in FIGURES {
        let min = (0..ITER).map(|_| f()).min().unwrap_or(0);
        println!("BENCH {} {} tsc-ticks", name, min);
    }
}
