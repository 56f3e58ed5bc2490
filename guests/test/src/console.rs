//! The console: port 0xE9, one character per `out`, one line at a time across vCPUs;
//! on a PC (mode `pc`) COM1 instead.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

static LOCK: AtomicBool = AtomicBool::new(false);
/// Whether the console is COM1 (set once by [`use_com1`]).
static COM1: AtomicBool = AtomicBool::new(false);

/// COM1's I/O base.
const COM1_BASE: u16 = 0x3f8;

/// Switches the console to COM1: 115200 8N1, FIFOs on, no interrupts.
pub fn use_com1() {
    use crate::arch::outb;
    outb(COM1_BASE + 1, 0); // IER: no interrupts
    outb(COM1_BASE + 3, 0x80); // LCR: DLAB
    outb(COM1_BASE, 1); // divisor 1: 115200
    outb(COM1_BASE + 1, 0);
    outb(COM1_BASE + 3, 0x03); // 8N1
    outb(COM1_BASE + 2, 0xc7); // FIFO on, cleared
    outb(COM1_BASE + 4, 0x03); // DTR, RTS (OUT2 off: no IRQ)
    COM1.store(true, Ordering::SeqCst);
}

/// One byte to COM1 once its line status says the transmitter holding register is
/// empty (a bounded wait: a UART that never says so still gets the byte).
fn com1_byte(b: u8) {
    for _ in 0..100_000 {
        if crate::arch::inb(COM1_BASE + 5) & 0x20 != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    crate::arch::outb(COM1_BASE, b);
}

/// Writes to port 0xE9 (or COM1).
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let com1 = COM1.load(Ordering::Relaxed);
        for b in s.bytes() {
            if com1 {
                com1_byte(b);
            } else {
                crate::arch::outb(crate::PORT_CONSOLE, b);
            }
        }
        Ok(())
    }
}

/// Prints one formatted line under the console lock.
pub fn print_line(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Console.write_fmt(args);
    let _ = Console.write_str("\n");
    LOCK.store(false, Ordering::Release);
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print_line(format_args!($($arg)*))
    };
}
