//! The legacy 8259 PICs: remapped away from the exception vectors and fully masked.

use super::io::outb;

/// Remaps both PICs to vectors 0x20..0x2f and masks every line.
pub fn disable() {
    // SAFETY: standard 8259 initialization sequence on ports 0x20/0x21/0xa0/0xa1.
    unsafe {
        outb(0x20, 0x11);
        outb(0xa0, 0x11);
        outb(0x21, 0x20);
        outb(0xa1, 0x28);
        outb(0x21, 0x04);
        outb(0xa1, 0x02);
        outb(0x21, 0x01);
        outb(0xa1, 0x01);
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}
