//! 16550 UART on COM1 (0x3f8), 115200 8N1, polled output.

use super::io::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = 0; // transmit holding (DLAB=0) / divisor low (DLAB=1)
const IER: u16 = 1; // interrupt enable / divisor high
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_THRE: u8 = 1 << 5;

/// Programs COM1 for 115200 8N1 with FIFOs, interrupts off.
pub fn init() {
    // SAFETY: COM1 is a plain UART; programming it has no memory side effects.
    unsafe {
        outb(COM1 + IER, 0x00);
        outb(COM1 + LCR, 0x80); // DLAB
        outb(COM1 + THR, 0x01); // divisor 1 = 115200
        outb(COM1 + IER, 0x00);
        outb(COM1 + LCR, 0x03); // 8N1
        outb(COM1 + FCR, 0xc7); // enable and clear FIFOs
        outb(COM1 + MCR, 0x03); // DTR, RTS (OUT2 off: no IRQ)
    }
}

/// Sends one byte, waiting for room.
pub fn putb(b: u8) {
    // SAFETY: polling LSR and writing THR of COM1 only affects the UART.
    unsafe {
        let mut spins = 0u32;
        while inb(COM1 + LSR) & LSR_THRE == 0 && spins < 1_000_000 {
            spins += 1;
            core::hint::spin_loop();
        }
        outb(COM1 + THR, b);
    }
}

/// Sends a string, turning `\n` into `\r\n`.
pub fn puts(s: &str) {
    for b in s.bytes() {
        if b == b'\n' {
            putb(b'\r');
        }
        putb(b);
    }
}
