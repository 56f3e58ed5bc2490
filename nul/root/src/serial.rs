//! The root's serial console: COM1, polled, one lock so lines never interleave.

use nul_rt::sync::Mutex;

const COM1: u16 = 0x3f8;

static LOCK: Mutex<()> = Mutex::new(());

fn outb(port: u16, v: u8) {
    // SAFETY: the root holds every I/O port (delegated from the kernel PD before the
    // console is used); writing the UART's registers has no memory effects.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`; reading a UART register has no memory effects.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

/// Writes a 16-bit value to an I/O port (used for the emulator exit ports).
#[allow(dead_code)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as in `outb`.
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}

fn putc(b: u8) {
    let mut spins = 0u32;
    while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
        spins += 1;
    }
    outb(COM1, b);
}

/// Writes one line (already ending in a newline) tagged with its source.
pub fn write_tagged(tag: &str, bytes: &[u8]) {
    let _g = LOCK.lock();
    putc(b'[');
    for &b in tag.as_bytes() {
        putc(b);
    }
    putc(b']');
    putc(b' ');
    for &b in bytes {
        if b == b'\n' {
            putc(b'\r');
        }
        putc(b);
    }
}

/// Writes bytes untagged (a guest's interactive console).
pub fn write_raw(bytes: &[u8]) {
    let _g = LOCK.lock();
    for &b in bytes {
        if b == b'\n' {
            putc(b'\r');
        }
        putc(b);
    }
}

/// Reads what the serial port received, up to `buf.len()` bytes (polled).
pub fn read(buf: &mut [u8]) -> usize {
    let _g = LOCK.lock();
    let mut n = 0;
    while n < buf.len() && inb(COM1 + 5) & 1 != 0 {
        buf[n] = inb(COM1);
        n += 1;
    }
    n
}

/// The root's own console sink.
pub fn root_sink(bytes: &[u8]) {
    write_tagged("root", bytes);
}

/// Ends the machine: QEMU's isa-debug-exit (0x10 success, 0x11 failure) and, for Bochs,
/// the "Shutdown" string on port 0x8900.
pub fn exit(success: bool) -> ! {
    let code = if success { 0x10 } else { 0x11 };
    outb(0xf4, code);
    for &b in b"Shutdown" {
        outb(0x8900u16, b);
    }
    loop {
        core::hint::spin_loop();
    }
}
