//! I/O APIC (MMIO at 0xfec00000): 24 interrupt pins routed to local APICs through
//! programmable redirection entries.
//!
//! Facts from the Intel 82093AA I/O APIC datasheet (order no. 290566): §3.0 register
//! description (IOREGSEL at 0x00, IOWIN at 0x10, both 32-bit; IOAPICID 0x00, IOAPICVER
//! 0x01, IOAPICARB 0x02, IOREDTBL 0x10–0x3f), §3.2.4 redirection table bits, and §2.4
//! (level-triggered pins: Remote IRR set on delivery, cleared by the EOI message whose
//! vector matches; masked edges are ignored). The EOI register at offset 0x40 comes
//! with version 0x20 (Intel ICH/PCH datasheets, "EOI Register").
//!
//! | MMIO | register | | index | register                    |
//! |------|----------|-|-------|-----------------------------|
//! | 0x00 | IOREGSEL | | 0x00  | ID (bits 27:24)             |
//! | 0x10 | IOWIN    | | 0x01  | version 0x20, max entry 23  |
//! | 0x40 | EOI      | | 0x02  | arbitration ID              |
//! |      |          | | 0x10+2n, 0x11+2n | entry n low, high |
//!
//! Inputs are logical: `set_irq(pin, true)` means asserted, whatever the entry's
//! polarity bit says (the VMM writes matching ACPI tables, so the polarity the guest
//! programs is the one the wire has). Deliveries go out through [`InterruptSink`].

use alloc::sync::Arc;

use crate::bus::{Action, BusDevice};

/// Default MMIO base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// MMIO window size.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of pins.
pub const NUM_PINS: usize = 24;
/// The version register's value: version 0x20 (with EOI register), 24 entries.
const VERSION: u32 = 0x20 | ((NUM_PINS as u32 - 1) << 16);

/// Redirection entry bits.
pub mod rte {
    /// Delivery status (read-only): a delivery is pending.
    pub const DELIVERY_STATUS: u64 = 1 << 12;
    /// Interrupt input pin polarity: low active.
    pub const POLARITY_LOW: u64 = 1 << 13;
    /// Remote IRR (read-only).
    pub const REMOTE_IRR: u64 = 1 << 14;
    /// Level-triggered.
    pub const LEVEL: u64 = 1 << 15;
    /// Masked.
    pub const MASK: u64 = 1 << 16;
    /// Logical destination mode.
    pub const DEST_LOGICAL: u64 = 1 << 11;
    /// Bits the guest may write.
    pub const WRITABLE: u64 = 0xff00_0000_0001_afff;
}

/// Delivery mode (redirection entry bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Fixed vector to the destination.
    Fixed,
    /// Fixed vector to the lowest-priority CPU in the destination.
    LowestPriority,
    /// System management interrupt.
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT.
    Init,
    /// External interrupt: the vector comes from an 8259 INTA cycle.
    ExtInt,
    /// A reserved encoding (3 or 6); delivered as is for the VMM to judge.
    Reserved(u8),
}

impl DeliveryMode {
    fn from_bits(b: u8) -> Self {
        match b & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            7 => Self::ExtInt,
            r => Self::Reserved(r),
        }
    }
}

/// An interrupt message for the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptMessage {
    /// Vector.
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    /// Destination APIC ID or logical mask (bits 63:56).
    pub dest: u8,
    /// Level-triggered: the local APIC must broadcast an EOI for it.
    pub level: bool,
}

/// Where the I/O APIC sends its messages: the VMM's local APIC models.
pub trait InterruptSink: Send + Sync {
    /// Delivers one message. It must not call back into the I/O APIC.
    fn deliver(&self, msg: InterruptMessage);
}

/// The I/O APIC.
pub struct IoApic {
    id: u8,
    select: u8,
    entries: [u64; NUM_PINS],
    /// Asserted input pins.
    pins: u32,
    sink: Arc<dyn InterruptSink>,
}

impl IoApic {
    /// An I/O APIC with APIC ID `id`, all entries masked, sending to `sink`.
    pub fn new(id: u8, sink: Arc<dyn InterruptSink>) -> Self {
        Self {
            id: id & 0xf,
            select: 0,
            entries: [rte::MASK; NUM_PINS],
            pins: 0,
            sink,
        }
    }

    /// A redirection entry.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    /// Drives input `pin` (others are ignored) to asserted (`true`) or not.
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        if pin >= NUM_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.pins & bit != 0;
        if level {
            self.pins |= bit;
        } else {
            self.pins &= !bit;
        }
        let e = self.entries[pin];
        if e & rte::LEVEL != 0 {
            if level {
                self.service(pin);
            }
        } else if level && !was {
            self.service(pin);
        }
    }

    /// The local APIC's EOI broadcast for a level-triggered `vector`: clears Remote IRR
    /// of the entries with that vector, and redelivers those whose pin is still high.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let e = self.entries[pin];
            if e as u8 == vector && e & rte::REMOTE_IRR != 0 {
                self.entries[pin] &= !rte::REMOTE_IRR;
                if self.pins & (1 << pin) != 0 {
                    self.service(pin);
                }
            }
        }
    }

    /// Sends `pin`'s interrupt if its entry lets it.
    fn service(&mut self, pin: usize) {
        let e = self.entries[pin];
        let level = e & rte::LEVEL != 0;
        if e & rte::MASK != 0 || (level && e & rte::REMOTE_IRR != 0) {
            return;
        }
        if level {
            self.entries[pin] |= rte::REMOTE_IRR;
        }
        self.sink.deliver(InterruptMessage {
            vector: e as u8,
            mode: DeliveryMode::from_bits((e >> 8) as u8),
            logical: e & rte::DEST_LOGICAL != 0,
            dest: (e >> 56) as u8,
            level,
        });
    }

    fn read_window(&self) -> u32 {
        match self.select {
            0x00 => u32::from(self.id) << 24,
            0x01 => VERSION,
            0x02 => u32::from(self.id) << 24,
            i @ 0x10..=0x3f => {
                let e = self.entries[usize::from(i - 0x10) / 2];
                if i & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_window(&mut self, v: u32) {
        match self.select {
            0x00 => self.id = ((v >> 24) & 0xf) as u8,
            i @ 0x10..=0x3f => {
                let pin = usize::from(i - 0x10) / 2;
                let old = self.entries[pin];
                let new = if i & 1 == 0 {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | u64::from(v) << 32
                };
                let mut e = (new & rte::WRITABLE) | (old & rte::REMOTE_IRR);
                if e & rte::LEVEL == 0 {
                    e &= !rte::REMOTE_IRR; // edge entries have no Remote IRR
                }
                self.entries[pin] = e;
                // An unmasked level pin that is still asserted interrupts now.
                if e & rte::LEVEL != 0 && self.pins & (1 << pin) != 0 {
                    self.service(pin);
                }
            }
            _ => {} // version and arbitration are read-only
        }
    }

    /// The 32-bit register at a dword-aligned MMIO offset.
    fn read_dword(&self, offset: u64) -> u32 {
        match offset {
            0x00 => u32::from(self.select),
            0x10 => self.read_window(),
            _ => 0,
        }
    }

    fn write_dword(&mut self, offset: u64, v: u32) {
        match offset {
            0x00 => self.select = v as u8,
            0x10 => self.write_window(v),
            0x40 => self.end_of_interrupt(v as u8),
            _ => {}
        }
    }
}

impl BusDevice for IoApic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.wrapping_add(i as u64);
            *b = self.read_dword(o & !3).to_le_bytes()[(o & 3) as usize];
        }
    }

    /// Registers are 32-bit; a narrower write merges into the current value, a wider
    /// one writes each dword it covers.
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        let mut i = 0;
        while i < data.len() {
            let o = offset.wrapping_add(i as u64);
            let dword = o & !3;
            let mut bytes = self.read_dword(dword).to_le_bytes();
            while i < data.len() {
                let o = offset.wrapping_add(i as u64);
                if o & !3 != dword {
                    break;
                }
                bytes[(o & 3) as usize] = data[i];
                i += 1;
            }
            self.write_dword(dword, u32::from_le_bytes(bytes));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::SpinLock;
    use crate::testutil::Rng;
    use std::vec::Vec;

    #[derive(Default)]
    struct Lapics(SpinLock<Vec<InterruptMessage>>);

    impl InterruptSink for Lapics {
        fn deliver(&self, msg: InterruptMessage) {
            self.0.lock().push(msg);
        }
    }

    impl Lapics {
        fn take(&self) -> Vec<InterruptMessage> {
            core::mem::take(&mut *self.0.lock())
        }
    }

    fn ioapic() -> (IoApic, Arc<Lapics>) {
        let l = Arc::new(Lapics::default());
        (IoApic::new(0, l.clone()), l)
    }

    fn w32(io: &mut IoApic, off: u64, v: u32) {
        io.write(IOAPIC_BASE, off, &v.to_le_bytes());
    }

    fn r32(io: &mut IoApic, off: u64) -> u32 {
        let mut v = [0u8; 4];
        io.read(IOAPIC_BASE, off, &mut v);
        u32::from_le_bytes(v)
    }

    fn set_entry(io: &mut IoApic, pin: u8, v: u64) {
        w32(io, 0, 0x11 + 2 * u32::from(pin));
        w32(io, 0x10, (v >> 32) as u32);
        w32(io, 0, 0x10 + 2 * u32::from(pin));
        w32(io, 0x10, v as u32);
    }

    fn get_reg(io: &mut IoApic, index: u32) -> u32 {
        w32(io, 0, index);
        r32(io, 0x10)
    }

    #[test]
    fn identification_registers() {
        let (mut io, _) = ioapic();
        assert_eq!(get_reg(&mut io, 1), 0x0017_0020);
        w32(&mut io, 0, 0);
        w32(&mut io, 0x10, 0x0500_0000);
        assert_eq!(get_reg(&mut io, 0), 0x0500_0000);
        assert_eq!(get_reg(&mut io, 2), 0x0500_0000);
        assert_eq!(get_reg(&mut io, 0x10), rte::MASK as u32, "reset: masked");
        assert_eq!(r32(&mut io, 0), 0x10, "IOREGSEL reads back");
        assert_eq!(get_reg(&mut io, 0x40), 0);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edges_only() {
        let (mut io, l) = ioapic();
        set_entry(&mut io, 2, 0x0300_0000_0000_0830); // dest 3, logical, vector 0x30
        io.set_irq(2, true);
        io.set_irq(2, true);
        let msgs = l.take();
        assert_eq!(
            msgs,
            [InterruptMessage {
                vector: 0x30,
                mode: DeliveryMode::Fixed,
                logical: true,
                dest: 3,
                level: false
            }]
        );
        io.set_irq(2, false);
        io.set_irq(2, true);
        assert_eq!(l.take().len(), 1);
    }

    #[test]
    fn masked_edges_are_lost() {
        let (mut io, l) = ioapic();
        set_entry(&mut io, 4, rte::MASK | 0x24);
        io.set_irq(4, true);
        io.set_irq(4, false);
        set_entry(&mut io, 4, 0x24);
        assert!(l.take().is_empty());
    }

    #[test]
    fn level_pin_waits_for_eoi_and_redelivers_while_high() {
        let (mut io, l) = ioapic();
        set_entry(&mut io, 10, rte::LEVEL | 0x41);
        io.set_irq(10, true);
        assert_eq!(l.take().len(), 1);
        assert_ne!(get_reg(&mut io, 0x10 + 20) as u64 & rte::REMOTE_IRR, 0);
        io.set_irq(10, true);
        assert!(l.take().is_empty(), "Remote IRR blocks");
        io.end_of_interrupt(0x41);
        let m = l.take();
        assert_eq!(m.len(), 1, "still asserted: again");
        assert!(m[0].level);
        io.set_irq(10, false);
        w32(&mut io, 0x40, 0x41); // EOI register
        assert_eq!(get_reg(&mut io, 0x10 + 20) as u64 & rte::REMOTE_IRR, 0);
        assert!(l.take().is_empty());
        io.end_of_interrupt(0x99); // no match: nothing
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let (mut io, l) = ioapic();
        set_entry(&mut io, 9, rte::LEVEL | rte::MASK | 0x29);
        io.set_irq(9, true);
        assert!(l.take().is_empty());
        set_entry(&mut io, 9, rte::LEVEL | 0x29);
        assert_eq!(l.take().len(), 1);
    }

    #[test]
    fn read_only_bits_ignore_writes() {
        let (mut io, _) = ioapic();
        set_entry(&mut io, 0, 0xffff_ffff_ffff_ffff);
        let lo = get_reg(&mut io, 0x10) as u64;
        let hi = get_reg(&mut io, 0x11) as u64;
        assert_eq!(hi << 32 | lo, rte::WRITABLE);
        assert_eq!(DeliveryMode::from_bits(7), DeliveryMode::ExtInt);
        assert_eq!(DeliveryMode::from_bits(3), DeliveryMode::Reserved(3));
    }

    #[test]
    fn narrow_and_wide_accesses() {
        let (mut io, _) = ioapic();
        io.write(IOAPIC_BASE, 0, &[0x01]);
        let mut b = [0u8; 2];
        io.read(IOAPIC_BASE, 0x12, &mut b);
        assert_eq!(b, [0x17, 0x00]);
        let mut q = [0u8; 8];
        io.read(IOAPIC_BASE, 0x10, &mut q);
        assert_eq!(q, [0x20, 0, 0x17, 0, 0, 0, 0, 0]);
        io.write(IOAPIC_BASE, 0xffe, &q);
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut io, l) = ioapic();
        let mut rng = Rng::new(82093);
        for _ in 0..200_000 {
            match rng.below(5) {
                0 => w32(&mut io, 0, rng.below(0x48) as u32),
                1 => {
                    let mut v = [0u8; 8];
                    v.iter_mut().for_each(|b| *b = rng.byte());
                    let n = rng.size();
                    io.write(IOAPIC_BASE, rng.below(0x50), &v[..n]);
                }
                2 => {
                    let mut v = [0u8; 8];
                    let n = rng.size();
                    io.read(IOAPIC_BASE, rng.below(0x1000), &mut v[..n]);
                }
                3 => io.set_irq(rng.below(30) as usize, rng.chance(2)),
                _ => io.end_of_interrupt(rng.byte()),
            }
            for m in l.take() {
                assert!(
                    !m.level || {
                        let pin = io.entries.iter().position(|&e| e as u8 == m.vector);
                        pin.is_some()
                    }
                );
            }
        }
    }
}
