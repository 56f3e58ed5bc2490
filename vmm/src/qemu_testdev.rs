//! QEMU's devices for test kernels, as kvm-unit-tests runs them (`-device pc-testdev
//! -device isa-debug-exit,iobase=0xf4,iosize=0x4`): the port facts of QEMU's
//! `isa-debug-exit` and `pc-testdev`, on the PC's buses like every other device.
//!
//! | where               | device          | what                                       |
//! |---------------------|-----------------|--------------------------------------------|
//! | ports 0xf4–0xf7     | [`DebugExit`]   | a write of `v` ends the VM with status     |
//! |                     |                 | `(v << 1) \| 1` ([`Action::DebugExit`])    |
//! | ports 0xe0–0xe3     | [`PcTestdev`]   | a 32-bit register, any width at any offset |
//! | ports 0xe4–0xe7     | [`PcTestdev`]   | "flush page": accepted, nothing to do      |
//! | ports 0xe8–0xeb     | [`PcTestdev`]   | the same register, byte by byte            |
//! | ports 0x2000–0x2017 | [`PcTestdev`]   | byte write to 0x2000 + n: IRQ line n's     |
//! |                     |                 | level (0 low, else high)                   |
//! | MMIO 0xff000000     | [`TestdevIomem`]| 64 KiB that read back what was written     |
//!
//! Interrupt lines 0–15 are ISA IRQs (the PC drives the PIC's input and the I/O APIC's,
//! IRQ 0 on input 2); lines 16–23 drive I/O APIC inputs 16–23 (QEMU's PC takes only
//! ISA IRQs 0–15 here). The flush port's purpose on QEMU, making the host drop its
//! mapping of a guest page so the next access faults into KVM (kvm-unit-tests'
//! `eventinj` uses it to fault in the middle of an event delivery), has no counterpart
//! here: the write is accepted and does nothing.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use crate::bus::{Action, BusDevice, IrqLine};

/// isa-debug-exit's port (kvm-unit-tests' `iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// isa-debug-exit's ports (`iosize=0x4`).
pub const DEBUG_EXIT_LEN: u64 = 4;
/// pc-testdev's 32-bit register.
pub const IOPORT: u64 = 0xe0;
/// pc-testdev's flush-page port.
pub const FLUSH_PORT: u64 = 0xe4;
/// pc-testdev's register, accessed byte by byte.
pub const IOPORT_BYTE: u64 = 0xe8;
/// Ports of each of the three.
pub const IOPORT_LEN: u64 = 4;
/// pc-testdev's first interrupt-line port.
pub const IRQ_PORT: u64 = 0x2000;
/// Interrupt lines.
pub const IRQ_LINES: u64 = 24;
/// pc-testdev's memory area.
pub const IOMEM_ADDR: u64 = 0xff00_0000;
/// Its size.
pub const IOMEM_LEN: u64 = 0x1_0000;

/// The exit status of a VM the guest ended by writing `value` to isa-debug-exit.
pub fn debug_exit_status(value: u32) -> u64 {
    u64::from(value) << 1 | 1
}

/// isa-debug-exit: a write of any width at any of its ports ends the VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) -> Option<Action> {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        Some(Action::DebugExit(u32::from_le_bytes(b)))
    }
}

/// pc-testdev's ports.
pub struct PcTestdev {
    /// The register behind 0xe0 and 0xe8.
    data: u32,
    /// Interrupt line n is `irqs[n]`.
    irqs: Vec<Arc<dyn IrqLine>>,
    /// Flush-page writes seen.
    flushes: u64,
}

impl PcTestdev {
    /// A testdev whose interrupt line n drives `irqs[n]` (lines past the end do
    /// nothing).
    pub fn new(irqs: Vec<Arc<dyn IrqLine>>) -> Self {
        Self {
            data: 0,
            irqs,
            flushes: 0,
        }
    }

    /// The register's value.
    pub fn value(&self) -> u32 {
        self.data
    }

    /// How many flush-page writes the guest made.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }
}

impl BusDevice for PcTestdev {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match base {
            IOPORT | IOPORT_BYTE => {
                let v = self.data.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = offset
                        .checked_add(i as u64)
                        .and_then(|o| v.get(o as usize))
                        .copied()
                        .unwrap_or(0);
                }
            }
            // Write-only.
            _ => data.fill(0),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        match base {
            IOPORT | IOPORT_BYTE => {
                let mut v = self.data.to_le_bytes();
                for (i, &b) in data.iter().enumerate() {
                    if let Some(slot) = offset
                        .checked_add(i as u64)
                        .and_then(|o| v.get_mut(o as usize))
                    {
                        *slot = b;
                    }
                }
                self.data = u32::from_le_bytes(v);
            }
            FLUSH_PORT if data.len() == 4 => self.flushes += 1,
            IRQ_PORT => {
                // Byte writes only, as on QEMU.
                if let ([level], Some(line)) = (data, self.irqs.get(offset as usize)) {
                    line.set_level(*level != 0);
                }
            }
            _ => {}
        }
        None
    }
}

/// pc-testdev's memory area: plain bytes, little-endian at any width.
pub struct TestdevIomem {
    bytes: Vec<u8>,
}

impl Default for TestdevIomem {
    fn default() -> Self {
        Self {
            bytes: vec![0; IOMEM_LEN as usize],
        }
    }
}

impl BusDevice for TestdevIomem {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.bytes.get(o as usize))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = offset
                .checked_add(i as u64)
                .and_then(|o| self.bytes.get_mut(o as usize))
            {
                *slot = b;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::sync::SpinLock;
    use std::sync::Mutex;

    #[test]
    fn debug_exit_ends_with_the_value_written() {
        let mut bus = Bus::new();
        bus.insert(
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_LEN,
            Arc::new(SpinLock::new(DebugExit)),
        )
        .unwrap();
        // kvm-unit-tests' exit(code): `outl(code, 0xf4)`; realmode's `outb`.
        assert_eq!(
            bus.write(DEBUG_EXIT_PORT, &0x1234_5678u32.to_le_bytes()),
            Ok(Some(Action::DebugExit(0x1234_5678)))
        );
        assert_eq!(
            bus.write(DEBUG_EXIT_PORT, &[1]),
            Ok(Some(Action::DebugExit(1)))
        );
        assert_eq!(
            bus.write(DEBUG_EXIT_PORT + 2, &[0, 1]),
            Ok(Some(Action::DebugExit(0x100)))
        );
        assert_eq!(debug_exit_status(0), 1);
        assert_eq!(debug_exit_status(1), 3);
        assert_eq!(debug_exit_status(u32::MAX), 0x1_ffff_ffff);
        let mut d = [0xaa; 4];
        bus.read(DEBUG_EXIT_PORT, &mut d).unwrap();
        assert_eq!(d, [0; 4]);
        assert!(
            bus.write(DEBUG_EXIT_PORT + 2, &[0; 4]).is_err(),
            "past 0xf7"
        );
    }

    /// Levels driven, per line.
    #[derive(Default)]
    struct Levels(Mutex<Vec<bool>>);

    impl IrqLine for Levels {
        fn set_level(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    fn testdev() -> (Bus, Arc<SpinLock<PcTestdev>>, Vec<Arc<Levels>>) {
        let lines: Vec<Arc<Levels>> = (0..IRQ_LINES).map(|_| Arc::default()).collect();
        let t = Arc::new(SpinLock::new(PcTestdev::new(
            lines
                .iter()
                .map(|l| l.clone() as Arc<dyn IrqLine>)
                .collect(),
        )));
        let mut bus = Bus::new();
        for base in [IOPORT, FLUSH_PORT, IOPORT_BYTE] {
            bus.insert(base, IOPORT_LEN, t.clone()).unwrap();
        }
        bus.insert(IRQ_PORT, IRQ_LINES, t.clone()).unwrap();
        (bus, t, lines)
    }

    #[test]
    fn the_register_reads_back_at_every_width_and_offset() {
        let (bus, t, _) = testdev();
        let rd = |port: u64, n: usize| {
            let mut b = vec![0xaa; n];
            bus.read(port, &mut b).unwrap();
            b
        };
        // emulator.c: out/in of each width at 0xe0.
        bus.write(IOPORT, &[0x47]).unwrap();
        assert_eq!(rd(IOPORT, 1), [0x47]);
        bus.write(IOPORT, &0x9999u16.to_le_bytes()).unwrap();
        assert_eq!(rd(IOPORT, 2), [0x99, 0x99]);
        bus.write(IOPORT, &0xdead_beefu32.to_le_bytes()).unwrap();
        assert_eq!(rd(IOPORT, 4), 0xdead_beefu32.to_le_bytes());
        // A word at 0xe2 is the high half; a byte at 0xe1 one byte.
        bus.write(IOPORT + 2, &0x1122u16.to_le_bytes()).unwrap();
        assert_eq!(t.lock().value(), 0x1122_beef);
        assert_eq!(rd(IOPORT + 1, 1), [0xbe]);
        // 0xe8 is the same register.
        assert_eq!(rd(IOPORT_BYTE, 4), 0x1122_beefu32.to_le_bytes());
        bus.write(IOPORT_BYTE + 3, &[0x77]).unwrap();
        assert_eq!(rd(IOPORT, 4), 0x7722_beefu32.to_le_bytes());
        // A dword at 0xe2 runs into the flush port: not the register's.
        assert!(bus.read(IOPORT + 2, &mut [0; 4]).is_err());
        // Flush: dword writes counted, others ignored, reads 0.
        bus.write(FLUSH_PORT, &0x1000u32.to_le_bytes()).unwrap();
        bus.write(FLUSH_PORT, &[1]).unwrap();
        assert_eq!(t.lock().flushes(), 1);
        assert_eq!(rd(FLUSH_PORT, 4), [0; 4]);
        assert_eq!(t.lock().value(), 0x7722_beef);
    }

    #[test]
    fn irq_ports_drive_their_lines() {
        let (bus, _, lines) = testdev();
        // ioapic.c's set_irq_line(0x0e, 1), then 0; a value other than 1 is high too.
        bus.write(IRQ_PORT + 0x0e, &[1]).unwrap();
        bus.write(IRQ_PORT + 0x0e, &[0]).unwrap();
        bus.write(IRQ_PORT + 0x0e, &[0x80]).unwrap();
        bus.write(IRQ_PORT + 23, &[1]).unwrap();
        // Wider writes are not the device's protocol: ignored.
        bus.write(IRQ_PORT + 4, &[1, 1]).unwrap();
        assert!(bus.write(IRQ_PORT + 24, &[1]).is_err());
        for (n, l) in lines.iter().enumerate() {
            let want: &[bool] = match n {
                0x0e => &[true, false, true],
                23 => &[true],
                _ => &[],
            };
            assert_eq!(*l.0.lock().unwrap(), want, "line {n}");
        }
        let mut b = [0xaa];
        bus.read(IRQ_PORT, &mut b).unwrap();
        assert_eq!(b, [0]);
        // Fewer wires than ports: the others do nothing.
        let mut t = PcTestdev::new(Vec::new());
        assert_eq!(t.write(IRQ_PORT, 3, &[1]), None);
    }

    #[test]
    fn iomem_reads_back_what_was_written() {
        let mut m = TestdevIomem::default();
        m.write(IOMEM_ADDR, 0x10, &0x0123_4567_89ab_cdefu64.to_le_bytes());
        let mut q = [0u8; 8];
        m.read(IOMEM_ADDR, 0x10, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0123_4567_89ab_cdef);
        let mut b = [0u8; 2];
        m.read(IOMEM_ADDR, 0x12, &mut b);
        assert_eq!(b, [0xab, 0x89]);
        m.write(IOMEM_ADDR, IOMEM_LEN - 1, &[1, 2]);
        let mut e = [0u8; 2];
        m.read(IOMEM_ADDR, IOMEM_LEN - 1, &mut e);
        assert_eq!(e, [1, 0xff]);
    }
}
