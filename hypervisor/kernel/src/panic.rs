//! Kernel panic: report on the console and leave the emulator with the failure code.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::x86::{apic, cr, idt, qemu};

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    cr::cli();
    if PANICKING.swap(true, Ordering::SeqCst) {
        // Another CPU (or a nested panic) is already reporting.
        cr::halt_forever();
    }
    // The console lock may be held by the panicking code: write without it.
    match info.location() {
        Some(l) => crate::console::print_unlocked(format_args!(
            "KERNEL PANIC: {} ({}:{})\n",
            info.message(),
            l.file(),
            l.line()
        )),
        None => crate::console::print_unlocked(format_args!("KERNEL PANIC: {}\n", info.message())),
    }
    if apic::tsc_khz() != 0 {
        apic::send_ipi_others(idt::VEC_IPI_HALT);
    }
    qemu::qemu_exit(qemu::EXIT_FAILURE)
}
