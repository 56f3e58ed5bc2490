//! The kernel console: serial output under one lock, so lines never interleave.

use core::fmt::{self, Write};

use crate::arch::x86::{cr, serial};

static LOCK: spin::Mutex<()> = spin::Mutex::new(());

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial::puts(s);
        Ok(())
    }
}

/// Prints formatted text atomically (interrupts off while the lock is held).
pub fn print(args: fmt::Arguments<'_>) {
    cr::without_interrupts(|| {
        let _g = LOCK.lock();
        let _ = Serial.write_fmt(args);
    });
}

/// Prints without taking the lock (panic path: the lock holder may be the one panicking).
pub fn print_unlocked(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
}

/// Prints to the kernel console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the kernel console; the whole line is written under the lock.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
