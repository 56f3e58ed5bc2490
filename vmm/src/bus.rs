//! The device bus: address ranges mapped to devices, one `Bus` per address space
//! (port I/O and MMIO are separate instances).
//!
//! The shape follows Cloud Hypervisor's `BusDevice` and rust-vmm's vm-superio: a device
//! sees `read`/`write` with the base of the range that matched and the offset into it,
//! so one device can sit at several ranges (the PIC at 0x20, 0xa0 and 0x4d0). Devices
//! raise interrupts through an injected [`IrqLine`] and ask the VMM for VM-wide
//! [`Action`]s by returning them from `write`.
//!
//! An access no device claims behaves as on a PC: reads see all-ones (a floating ISA or
//! PCI bus), writes go nowhere; the bus reports it as [`BusError::Unmapped`] so the VMM
//! can log it.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::sync::SpinLock;

/// Something a device asks of the whole VM in answer to a guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// The guest powered the machine off (ACPI S5): end the VM.
    PowerOff,
    /// The guest reset the machine (reset control register): restart the VM.
    Reset,
    /// The guest ended its run and reported this code (the test device's end port).
    Done(u32),
    /// The guest asks the VMM to start the vCPU with this index.
    StartVcpu(u32),
    /// The vCPU that made the access takes this exception before its next instruction.
    Exception {
        /// Vector (0–31).
        vector: u8,
        /// Error code, for the vectors that push one.
        error: Option<u32>,
    },
    /// The guest wrote this value to QEMU's isa-debug-exit: end the VM with the exit
    /// status `(value << 1) | 1` ([`crate::qemu_testdev`]).
    DebugExit(u32),
}

/// A device on a bus: a pure state machine driven by guest accesses.
///
/// `base` is the start of the range the access hit (as given to [`Bus::insert`]),
/// `offset` the distance from it; `data.len()` is the access size (1, 2, 4 or 8 bytes
/// from the instruction, though devices must accept any length without panicking).
/// Multi-byte values are little-endian, as on x86.
pub trait BusDevice: Send {
    /// A guest read; fill all of `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A guest write; return an [`Action`] for the VM if the write asks for one.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action>;
}

/// An interrupt request wire from a device to an interrupt controller.
///
/// The device drives the wire's level; whether the receiver samples edges or levels is
/// the receiver's business (the PIC's ELCR, the I/O APIC's trigger mode). An
/// implementation must not call back into the device that drives it (the device is
/// usually locked while it signals).
pub trait IrqLine: Send + Sync {
    /// Drives the wire to `level` (true: asserted).
    fn set_level(&self, level: bool);

    /// A rising then falling edge, for devices that signal an event rather than a state.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// A wire connected to nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIrq;

impl IrqLine for NoIrq {
    fn set_level(&self, _level: bool) {}
}

/// A wire that remembers its last level: tells a device whether it must signal a change.
pub(crate) struct IrqOut {
    line: Arc<dyn IrqLine>,
    level: bool,
}

impl IrqOut {
    pub(crate) fn new(line: Arc<dyn IrqLine>) -> Self {
        Self { line, level: false }
    }

    /// Drives the wire, telling the receiver only about changes.
    pub(crate) fn set(&mut self, level: bool) {
        if level != self.level {
            self.level = level;
            self.line.set_level(level);
        }
    }

    pub(crate) fn level(&self) -> bool {
        self.level
    }
}

/// A device as the bus holds it: shared, so the VMM can keep its own handle (to inject
/// console input, to ask the PIC for a vector).
pub type SharedDevice = Arc<SpinLock<dyn BusDevice>>;

/// Why a bus operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or runs past the end of the address space.
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    Overlap {
        /// Start of the range being inserted.
        base: u64,
        /// Start of the range it overlaps.
        existing: u64,
    },
    /// No device claims the whole access (reads saw all-ones, writes were dropped).
    Unmapped {
        /// Address of the access.
        addr: u64,
        /// Size of the access in bytes.
        len: usize,
    },
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BusError::InvalidRange { base, len } => {
                write!(f, "invalid bus range {base:#x} (+{len:#x})")
            }
            BusError::Overlap { base, existing } => {
                write!(
                    f,
                    "bus range at {base:#x} overlaps the one at {existing:#x}"
                )
            }
            BusError::Unmapped { addr, len } => {
                write!(f, "{len}-byte access to unmapped address {addr:#x}")
            }
        }
    }
}

struct Mapping {
    /// Last address of the range (inclusive, so a range may end at `u64::MAX`).
    last: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges mapped to devices; lookup is O(log n).
///
/// A vector sorted by base, searched by bisection, rather than a `BTreeMap`: a bus
/// holds tens of ranges, changes only when the guest moves a BAR, and is searched at
/// every MMIO and port exit, where the map's node walk cost several times the bisection.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<(u64, Mapping)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let last = len
            .checked_sub(1)
            .and_then(|l| base.checked_add(l))
            .ok_or(BusError::InvalidRange { base, len })?;
        // The ranges starting at or below `last`; the last of them is the only one that
        // can overlap (the ranges below it end before it starts).
        let i = self.ranges.partition_point(|&(b, _)| b <= last);
        if let Some((b, m)) = i.checked_sub(1).map(|j| &self.ranges[j]) {
            if m.last >= base {
                return Err(BusError::Overlap { base, existing: *b });
            }
        }
        self.ranges.insert(i, (base, Mapping { last, device }));
        Ok(())
    }

    /// Unmaps the range starting at `base`, returning its device.
    pub fn remove(&mut self, base: u64) -> Option<SharedDevice> {
        let i = self.ranges.binary_search_by_key(&base, |&(b, _)| b).ok()?;
        Some(self.ranges.remove(i).1.device)
    }

    /// Number of mapped ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether no range is mapped.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The device whose range holds all of `[addr, addr + len)`, with the range's base.
    pub fn resolve(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let i = self.ranges.partition_point(|&(b, _)| b <= addr);
        let (base, m) = self.ranges.get(i.checked_sub(1)?)?;
        let base = *base;
        let end = addr.checked_add((len as u64).saturating_sub(1))?;
        (end <= m.last).then_some((base, &m.device))
    }

    /// A guest read of `data.len()` bytes at `addr`.
    ///
    /// Unmapped (or straddling the end of a range): `data` is all-ones and the error
    /// says so.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        match self.resolve(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock().read(base, addr - base, data);
                Ok(())
            }
            None => {
                data.fill(0xff);
                Err(BusError::Unmapped {
                    addr,
                    len: data.len(),
                })
            }
        }
    }

    /// A guest write of `data` at `addr`; the device's [`Action`], if any.
    ///
    /// Unmapped (or straddling the end of a range): the write is dropped and the error
    /// says so.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<Action>, BusError> {
        match self.resolve(addr, data.len()) {
            Some((base, dev)) => Ok(dev.lock().write(base, addr - base, data)),
            None => Err(BusError::Unmapped {
                addr,
                len: data.len(),
            }),
        }
    }
}

/// Serves a read byte by byte from a byte-register reader, as the ISA bus splits a wide
/// access to an 8-bit device into consecutive byte cycles.
pub fn read_bytes(offset: u64, data: &mut [u8], mut reg: impl FnMut(u64) -> u8) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = reg(offset.wrapping_add(i as u64));
    }
}

/// Serves a write byte by byte; the last [`Action`] any byte produced.
pub fn write_bytes(
    offset: u64,
    data: &[u8],
    mut reg: impl FnMut(u64, u8) -> Option<Action>,
) -> Option<Action> {
    let mut action = None;
    for (i, &b) in data.iter().enumerate() {
        if let Some(a) = reg(offset.wrapping_add(i as u64), b) {
            action = Some(a);
        }
    }
    action
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;
    use std::vec::Vec;

    /// Remembers accesses; reads return the offset.
    #[derive(Default)]
    struct Probe {
        log: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
            self.log.push((base, offset, data.to_vec()));
            (data == [0xff]).then_some(Action::Reset)
        }
    }

    fn probe() -> (Arc<SpinLock<Probe>>, SharedDevice) {
        let p = Arc::new(SpinLock::new(Probe::default()));
        let d: SharedDevice = p.clone();
        (p, d)
    }

    #[test]
    fn routes_to_the_right_device_with_offset() {
        let mut bus = Bus::new();
        let (a, da) = probe();
        let (b, db) = probe();
        bus.insert(0x3f8, 8, da).unwrap();
        bus.insert(0x400, 4, db).unwrap();
        let mut v = [0u8; 1];
        bus.read(0x3fd, &mut v).unwrap();
        assert_eq!(v, [5]);
        assert_eq!(bus.write(0x402, &[1, 2]), Ok(None));
        assert_eq!(bus.write(0x3f8, &[0xff]), Ok(Some(Action::Reset)));
        assert_eq!(b.lock().log, [(0x400, 2, std::vec![1, 2])]);
        assert_eq!(a.lock().log, [(0x3f8, 0, std::vec![0xff])]);
    }

    #[test]
    fn unmapped_reads_all_ones_and_reports() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, probe().1).unwrap();
        let mut v = [0u8; 4];
        assert_eq!(
            bus.read(0x20, &mut v),
            Err(BusError::Unmapped { addr: 0x20, len: 4 })
        );
        assert_eq!(v, [0xff; 4]);
        // Straddles the end of the range.
        assert!(bus.read(0x12, &mut v).is_err());
        assert_eq!(v, [0xff; 4]);
        assert!(bus.write(0x0f, &[0]).is_err());
        assert!(bus.write(0x14, &[0]).is_err());
        assert!(Bus::new().read(0, &mut v).is_err());
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, probe().1).unwrap();
        for (b, l) in [
            (0x100, 1),
            (0xf8, 0x9),
            (0x10f, 1),
            (0x0, 0x1000),
            (0x105, 2),
        ] {
            assert_eq!(
                bus.insert(b, l, probe().1),
                Err(BusError::Overlap {
                    base: b,
                    existing: 0x100
                })
            );
        }
        assert!(bus.insert(0xf0, 0x10, probe().1).is_ok());
        assert!(bus.insert(0x110, 0x10, probe().1).is_ok());
        assert_eq!(
            bus.insert(5, 0, probe().1),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );
        assert!(bus.insert(u64::MAX, 2, probe().1).is_err());
        assert!(bus.insert(u64::MAX - 0xf, 0x10, probe().1).is_ok());
        let mut v = [0u8; 2];
        bus.read(u64::MAX - 1, &mut v).unwrap();
        assert!(bus.read(u64::MAX, &mut v).is_err());
        assert_eq!(bus.len(), 4);
        assert!(bus.remove(0x100).is_some());
        assert!(bus.remove(0x100).is_none());
        assert!(bus.insert(0x100, 0x10, probe().1).is_ok());
    }

    #[test]
    fn one_device_at_several_ranges_sees_each_base() {
        let mut bus = Bus::new();
        let (p, d) = probe();
        bus.insert(0x20, 2, d.clone()).unwrap();
        bus.insert(0xa0, 2, d).unwrap();
        bus.write(0x21, &[1]).unwrap();
        bus.write(0xa1, &[2]).unwrap();
        assert_eq!(p.lock().log[0].0, 0x20);
        assert_eq!(p.lock().log[1].0, 0xa0);
    }

    #[test]
    fn random_ranges_match_a_reference_model() {
        let mut rng = Rng::new(1);
        let mut bus = Bus::new();
        let mut model: Vec<(u64, u64)> = Vec::new();
        for _ in 0..2000 {
            let base = rng.below(0x1000);
            let len = rng.below(0x40);
            let r = bus.insert(base, len, probe().1);
            let overlaps = model.iter().any(|&(b, l)| base < b + l && b < base + len);
            assert_eq!(r.is_ok(), len > 0 && !overlaps, "{base:#x}+{len:#x}");
            if r.is_ok() {
                model.push((base, len));
            }
        }
        let check = |bus: &Bus, model: &[(u64, u64)]| {
            for addr in 0..0x1040u64 {
                let want = model
                    .iter()
                    .find(|&&(b, l)| addr >= b && addr < b + l)
                    .map(|m| m.0);
                assert_eq!(bus.resolve(addr, 1).map(|r| r.0), want);
            }
        };
        check(&bus, &model);
        // Removing: a mapped base goes, any other address removes nothing.
        for _ in 0..200 {
            let base = if rng.chance(2) && !model.is_empty() {
                model[rng.below(model.len() as u64) as usize].0
            } else {
                rng.below(0x1000)
            };
            let mapped = model.iter().position(|m| m.0 == base);
            assert_eq!(bus.remove(base).is_some(), mapped.is_some(), "{base:#x}");
            if let Some(i) = mapped {
                model.remove(i);
            }
            assert_eq!(bus.len(), model.len());
        }
        check(&bus, &model);
    }

    #[test]
    fn byte_helpers_split_wide_accesses() {
        let mut v = [0u8; 4];
        read_bytes(2, &mut v, |o| o as u8 * 3);
        assert_eq!(v, [6, 9, 12, 15]);
        let mut seen = Vec::new();
        let a = write_bytes(1, &[7, 8], |o, b| {
            seen.push((o, b));
            (b == 7).then_some(Action::PowerOff)
        });
        assert_eq!(a, Some(Action::PowerOff));
        assert_eq!(seen, [(1, 7), (2, 8)]);
    }
}
