//! Leaving the emulator: QEMU's isa-debug-exit and the Bochs shutdown port.

use super::io::{outb, outl};

/// Exit code for success (QEMU exits with status 33).
pub const EXIT_SUCCESS: u8 = 0x10;
/// Exit code for failure (QEMU exits with status 35).
pub const EXIT_FAILURE: u8 = 0x11;

/// Ends the emulator: QEMU (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`) exits
/// with status `(code << 1) | 1`; then Bochs' shutdown port gets "Shutdown". On real
/// hardware nothing happens and the CPU halts.
pub fn qemu_exit(code: u8) -> ! {
    // SAFETY: port 0xf4 is QEMU's debug-exit device (unassigned elsewhere); 0x8900 is
    // Bochs' shutdown port. Neither write touches memory.
    unsafe {
        outl(0xf4, u32::from(code));
        for b in b"Shutdown" {
            outb(0x8900, *b);
        }
    }
    super::cr::halt_forever()
}
