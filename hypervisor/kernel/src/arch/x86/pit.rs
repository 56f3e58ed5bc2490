//! The 8254 PIT, used once to calibrate the TSC and the LAPIC timer.

use super::io::{inb, outb};

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Busy-waits `ms` milliseconds (<= 50) on PIT channel 2 and calls `before`/`after`
/// around the wait. Returns false if the PIT never counted down (no PIT).
pub fn measure(ms: u64, before: impl FnOnce(), after: impl FnOnce()) -> bool {
    let count = (PIT_HZ * ms / 1000).min(0xffff) as u16;
    // SAFETY: ports 0x42/0x43/0x61 are the PIT channel 2 and its gate; programming them
    // has no memory effects.
    unsafe {
        let gate = inb(0x61);
        outb(0x61, (gate & !0x02) & !0x01); // speaker off, gate low
        outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, count as u8);
        outb(0x42, (count >> 8) as u8);
        before();
        outb(0x61, (gate & !0x02) | 0x01); // gate high: count starts
        let mut spins: u64 = 0;
        while inb(0x61) & 0x20 == 0 {
            spins += 1;
            if spins > 500_000_000 {
                return false;
            }
        }
        after();
        outb(0x61, gate & !0x03);
    }
    true
}
