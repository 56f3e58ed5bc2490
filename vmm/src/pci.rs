//! PCI host bridge: configuration mechanism #1 (ports 0xcf8/0xcfc) and ECAM onto bus 0.
//!
//! Facts from the PCI Local Bus Specification 3.0 §3.2.2.3.2 (CONFIG_ADDRESS: enable
//! bit 31, bus 23:16, device 15:11, function 10:8, register 7:2; only a dword access to
//! 0xcf8 is a CONFIG_ADDRESS access, so 0xcf9's reset control stays reachable), §6.1
//! (reads of a function that does not exist return all-ones), §6.2.5.1 (BAR sizing: a
//! BAR's low address bits are hardwired zero, so writing all-ones reads back the size
//! mask), §6.7 (capability list: status bit 4, pointer at 0x34), and the PCI Express
//! Base Specification §7.2.2 (ECAM: bus 27:20, device 19:15, function 14:12, register
//! 11:0 below the base).
//!
//! Functions implement [`PciFunction`]; most embed a [`ConfigSpace`], which does the
//! read-only/writable bookkeeping, the BARs and the capability list.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crate::bus::{Action, BusDevice};

/// CONFIG_ADDRESS port.
pub const CONFIG_ADDRESS: u64 = 0xcf8;
/// CONFIG_DATA ports (0xcfc–0xcff).
pub const CONFIG_DATA: u64 = 0xcfc;
/// Size of the ECAM window for one bus.
pub const ECAM_SIZE: u64 = 1 << 20;
/// Size of one function's configuration space.
pub const CONFIG_SIZE: usize = 4096;

/// Where the host bridge's resources sit in the guest-physical and port address spaces:
/// what the DSDT's `_CRS` and the MCFG describe ([`crate::acpi`]), where the VMM puts
/// the ECAM window and where BARs may go. Guest RAM below 4 GiB ends at or below
/// [`MMIO32_BASE`](Self::mmio32); the e820 map marks the ECAM window reserved (Linux
/// uses MMCONFIG only where the firmware reserved it).
///
/// | range                       | what                                      |
/// |-----------------------------|-------------------------------------------|
/// | 0xc000_0000–0xdfff_ffff     | 32-bit MMIO window (BARs)                 |
/// | 0xe000_0000–0xe00f_ffff     | ECAM, bus 0 only                          |
/// | 0xfec0_0000, 0xfed0_0000, 0xfee0_0000 | I/O APIC, HPET, local APIC (not PCI) |
/// | 0x40_0000_0000 (+64 GiB)    | 64-bit MMIO window (BARs)                 |
/// | ports 0x0000–0x0cf7, 0x0d00–0xffff | I/O windows (0xcf8–0xcff is CAM)   |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciLayout {
    /// ECAM base ([`ECAM_SIZE`] bytes: bus 0).
    pub ecam_base: u64,
    /// The 32-bit MMIO window: base and size.
    pub mmio32: (u64, u64),
    /// The 64-bit MMIO window: base and size.
    pub mmio64: (u64, u64),
}

impl PciLayout {
    /// The layout in the table above.
    pub const DEFAULT: Self = Self {
        ecam_base: 0xe000_0000,
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: (0x40_0000_0000, 0x10_0000_0000),
    };
}

impl PciLayout {
    /// The range the e820 map must mark reserved (base, size): the ECAM window.
    pub const fn e820_reserved(&self) -> (u64, u64) {
        (self.ecam_base, ECAM_SIZE)
    }

    /// Whether `[base, base + size)` lies in one of the MMIO windows (where a BAR may
    /// go).
    pub fn in_window(&self, base: u64, size: u64) -> bool {
        let Some(end) = base.checked_add(size) else {
            return false;
        };
        let inside = |(b, s): (u64, u64)| base >= b && end <= b + s;
        inside(self.mmio32) || inside(self.mmio64)
    }
}

impl Default for PciLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The first I/O APIC input PCI INTx# wires go to.
pub const INTX_GSI_BASE: u32 = 16;
/// How many I/O APIC inputs PCI INTx# wires share (16–19: the four PIRQ lines of a PC
/// chipset, without the link devices).
pub const INTX_GSIS: u32 = 4;

/// The I/O APIC input (GSI) the interrupt pin `pin` (0 = INTA# … 3 = INTD#) of device
/// `dev` on bus 0 drives: the conventional swizzle `(dev + pin) mod 4` over
/// [`INTX_GSI_BASE`]..+[`INTX_GSIS`], so the INTA# of neighbouring slots lands on
/// different inputs. Level-triggered, active low as ACPI defines a `_PRT` GSI entry
/// (the I/O APIC model takes logical levels, so the wire is driven high when asserted).
/// The VMM wires each function's INTx# here and the DSDT's `_PRT` says the same.
pub const fn intx_gsi(dev: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + (dev as u32 + pin as u32) % INTX_GSIS
}

/// Standard header offsets.
pub mod cfg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const REVISION: u16 = 0x08;
    pub const CLASS: u16 = 0x09;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    pub const CAPABILITIES: u16 = 0x34;
    pub const INTERRUPT_LINE: u16 = 0x3c;
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// Status bit: the capability list exists.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Command bits a guest may write: I/O, memory, bus master, INTx disable.
    pub const COMMAND_WRITABLE: u16 = 0x0407;
}

/// A PCI function as the host bridge sees it.
///
/// The bridge splits accesses so that one never crosses a dword and `offset + len`
/// stays within [`CONFIG_SIZE`].
pub trait PciFunction: Send {
    /// Reads configuration space.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space.
    fn write_config(&mut self, offset: u16, data: &[u8]);
}

/// A function the VMM also holds (a virtio device it feeds input to, say).
impl<T: PciFunction + ?Sized> PciFunction for alloc::sync::Arc<crate::sync::SpinLock<T>> {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.lock().read_config(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.lock().write_config(offset, data);
    }
}

/// The kind of a base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space (takes two BAR slots).
    Mem64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// Why a configuration-space operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// BAR index out of range (or the upper half of a 64-bit BAR out of range).
    BadBar(usize),
    /// BAR size not a power of two of at least 16 bytes (4 for I/O).
    BadBarSize(u64),
    /// The capability does not fit below 256 bytes.
    NoCapabilitySpace,
    /// The device/function slot is taken or out of range.
    SlotTaken {
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
}

/// A type-0 configuration space with write masks: what most functions need.
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    bars: [Option<(BarKind, u64)>; 6],
    /// Where the next capability goes.
    next_cap: u16,
    /// Offset of the last capability's next pointer.
    last_cap: Option<u16>,
}

impl ConfigSpace {
    /// A type-0 header: vendor and device ID, class code (base class, subclass,
    /// programming interface, as `0xBBSSPP`) and revision.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = Self {
            bytes: vec![0; CONFIG_SIZE],
            wmask: vec![0; CONFIG_SIZE],
            bars: [None; 6],
            next_cap: 0x40,
            last_cap: None,
        };
        c.set_u16(cfg::VENDOR_ID, vendor);
        c.set_u16(cfg::DEVICE_ID, device);
        c.set_u32(cfg::REVISION, (class << 8) | u32::from(revision));
        c.set_writable(cfg::COMMAND, &cfg::COMMAND_WRITABLE.to_le_bytes());
        c.set_writable(cfg::INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Reads a little-endian value of `N` bytes.
    pub fn get<const N: usize>(&self, offset: u16) -> [u8; N] {
        let o = offset as usize;
        self.bytes[o..o + N].try_into().unwrap_or([0; N])
    }

    /// A 16-bit register.
    pub fn u16(&self, offset: u16) -> u16 {
        u16::from_le_bytes(self.get(offset))
    }

    /// A 32-bit register.
    pub fn u32(&self, offset: u16) -> u32 {
        u32::from_le_bytes(self.get(offset))
    }

    /// Sets bytes (device side, ignoring write masks).
    pub fn set(&mut self, offset: u16, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
    }

    /// Sets a 16-bit register (device side).
    pub fn set_u16(&mut self, offset: u16, v: u16) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Sets a 32-bit register (device side).
    pub fn set_u32(&mut self, offset: u16, v: u32) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Marks which bits of the bytes at `offset` the guest may write.
    pub fn set_writable(&mut self, offset: u16, mask: &[u8]) {
        let o = offset as usize;
        self.wmask[o..o + mask.len()].copy_from_slice(mask);
    }

    /// Sets the interrupt pin (1 = INTA#).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set(cfg::INTERRUPT_PIN, &[pin]);
    }

    /// Declares BAR `index` of `size` bytes (a power of two).
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), PciError> {
        let slots = if matches!(kind, BarKind::Mem64 { .. }) {
            2
        } else {
            1
        };
        if index + slots > 6 {
            return Err(PciError::BadBar(index));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        if !size.is_power_of_two() || size < min || (slots == 1 && size > 1 << 31) {
            return Err(PciError::BadBarSize(size));
        }
        let off = cfg::BAR0 + 4 * index as u16;
        let mask = !(size - 1);
        let flags: u32 = match kind {
            BarKind::Io => 1,
            BarKind::Mem32 => 0,
            BarKind::Mem64 { prefetchable } => 0x4 | if prefetchable { 0x8 } else { 0 },
        };
        self.set_u32(off, flags);
        let flag_bits = if kind == BarKind::Io { 0x3 } else { 0xf };
        self.set_writable(off, &(mask as u32 & !flag_bits).to_le_bytes());
        if slots == 2 {
            self.set_u32(off + 4, 0);
            self.set_writable(off + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some((kind, size));
        Ok(())
    }

    /// The address BAR `index` holds (as the guest programmed it) and its size.
    pub fn bar(&self, index: usize) -> Option<(BarKind, u64, u64)> {
        let (kind, size) = self.bars.get(index).copied().flatten()?;
        let off = cfg::BAR0 + 4 * index as u16;
        let lo = u64::from(self.u32(off));
        let addr = match kind {
            BarKind::Io => lo & !0x3,
            BarKind::Mem32 => lo & !0xf,
            BarKind::Mem64 { .. } => (lo & !0xf) | u64::from(self.u32(off + 4)) << 32,
        };
        Some((kind, addr, size))
    }

    /// Whether the guest enabled decoding for a BAR of `kind` (command register).
    pub fn decodes(&self, kind: BarKind) -> bool {
        let cmd = self.u16(cfg::COMMAND);
        match kind {
            BarKind::Io => cmd & 1 != 0,
            _ => cmd & 2 != 0,
        }
    }

    /// Appends a capability with ID `id` and `body` (the bytes after the ID and next
    /// pointer); its offset. The guest cannot write it unless
    /// [`set_writable`](Self::set_writable) says so.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16, PciError> {
        let at = self.next_cap;
        let len = (2 + body.len() as u16 + 3) & !3;
        if at + len > 0x100 {
            return Err(PciError::NoCapabilitySpace);
        }
        self.set(at, &[id, 0]);
        self.set(at + 2, body);
        match self.last_cap {
            Some(p) => self.set(p, &[at as u8]),
            None => {
                self.set(cfg::CAPABILITIES, &[at as u8]);
                let st = self.u16(cfg::STATUS) | cfg::STATUS_CAP_LIST;
                self.set_u16(cfg::STATUS, st);
            }
        }
        self.last_cap = Some(at + 1);
        self.next_cap = at + len;
        Ok(at)
    }

    /// The capabilities as (ID, offset), walking the list the way a guest does.
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        if self.u16(cfg::STATUS) & cfg::STATUS_CAP_LIST == 0 {
            return out;
        }
        let mut p = self.bytes[cfg::CAPABILITIES as usize] & !3;
        while p >= 0x40 && out.len() < 48 {
            out.push((self.bytes[p as usize], u16::from(p)));
            p = self.bytes[p as usize + 1] & !3;
        }
        out
    }
}

impl PciFunction for ConfigSpace {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let o = offset as usize;
        data.copy_from_slice(&self.bytes[o..o + data.len()]);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let o = offset as usize + i;
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
    }
}

/// The host bridge and bus 0.
pub struct PciHost {
    address: u32,
    ecam_base: u64,
    functions: BTreeMap<(u8, u8), Box<dyn PciFunction>>,
}

impl PciHost {
    /// A host bridge answering ECAM at `ecam_base` (one bus, [`ECAM_SIZE`] bytes), with
    /// itself as device 0:0.0.
    pub fn new(ecam_base: u64) -> Self {
        let mut h = Self {
            address: 0,
            ecam_base,
            functions: BTreeMap::new(),
        };
        // Red Hat, Inc. "QEMU PCIe Host bridge": a bridge no guest driver fusses over.
        let bridge = ConfigSpace::new(0x1b36, 0x0008, 0x06_00_00, 0);
        h.functions.insert((0, 0), Box::new(bridge));
        h
    }

    /// Puts `f` at device `dev` (1–31), function `func` (0–7) of bus 0.
    pub fn add(&mut self, dev: u8, func: u8, f: Box<dyn PciFunction>) -> Result<(), PciError> {
        if dev > 31 || func > 7 || self.functions.contains_key(&(dev, func)) {
            return Err(PciError::SlotTaken { dev, func });
        }
        self.functions.insert((dev, func), f);
        Ok(())
    }

    /// The function at `dev`.`func`, for the VMM (to read its BARs, say).
    pub fn function(&mut self, dev: u8, func: u8) -> Option<&mut (dyn PciFunction + 'static)> {
        self.functions.get_mut(&(dev, func)).map(|b| &mut **b)
    }

    /// A configuration read; all-ones where no function answers.
    pub fn config_read(&mut self, bus: u8, dev: u8, func: u8, offset: u16, data: &mut [u8]) {
        let multi = self.functions.range((dev, 1)..=(dev, 7)).next().is_some();
        let f = (bus == 0)
            .then(|| self.functions.get_mut(&(dev, func)))
            .flatten();
        data.fill(0xff);
        let Some(f) = f else {
            return;
        };
        split(offset, data.len(), |o, range| {
            f.read_config(o, &mut data[range.clone()]);
            // Function 0 of a multi-function device says so in its header type.
            let ht = cfg::HEADER_TYPE;
            if multi && func == 0 && (o..o + range.len() as u16).contains(&ht) {
                data[range.start + (ht - o) as usize] |= 0x80;
            }
        });
    }

    /// A configuration write; dropped where no function answers.
    pub fn config_write(&mut self, bus: u8, dev: u8, func: u8, offset: u16, data: &[u8]) {
        if bus != 0 {
            return;
        }
        if let Some(f) = self.functions.get_mut(&(dev, func)) {
            split(offset, data.len(), |o, r| f.write_config(o, &data[r]));
        }
    }

    /// Decodes CONFIG_ADDRESS for a data-port access at byte `port_off` (0–3).
    fn cam_target(&self, port_off: u64) -> Option<(u8, u8, u8, u16)> {
        let a = self.address;
        (a & (1 << 31) != 0).then(|| {
            let bus = (a >> 16) as u8;
            let dev = ((a >> 11) & 0x1f) as u8;
            let func = ((a >> 8) & 7) as u8;
            (bus, dev, func, (a & 0xfc) as u16 + port_off as u16)
        })
    }

    fn ecam_target(offset: u64) -> (u8, u8, u8, u16) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            (offset & 0xfff) as u16,
        )
    }
}

/// Splits an access into pieces that stay within one dword and the config space.
fn split(offset: u16, len: usize, mut f: impl FnMut(u16, core::ops::Range<usize>)) {
    let mut done = 0;
    while done < len {
        let o = offset as usize + done;
        if o >= CONFIG_SIZE {
            return;
        }
        let n = (4 - (o & 3)).min(len - done);
        f(o as u16, done..done + n);
        done += n;
    }
}

impl BusDevice for PciHost {
    /// Ports: `base` is [`CONFIG_ADDRESS`] (4 bytes) or [`CONFIG_DATA`] (4 bytes); MMIO:
    /// `base` is the ECAM base.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match base {
            CONFIG_ADDRESS if offset == 0 && data.len() == 4 => {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            CONFIG_DATA => match self.cam_target(offset) {
                Some((b, d, f, o)) => {
                    let n = data.len().min(4 - offset as usize);
                    data[n..].fill(0xff);
                    self.config_read(b, d, f, o, &mut data[..n]);
                }
                None => data.fill(0xff),
            },
            b if b == self.ecam_base => {
                let (bus, d, f, o) = Self::ecam_target(offset);
                self.config_read(bus, d, f, o, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        match base {
            CONFIG_ADDRESS if offset == 0 && data.len() == 4 => {
                self.address =
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
            }
            CONFIG_DATA => {
                if let Some((b, d, f, o)) = self.cam_target(offset) {
                    let n = data.len().min(4 - offset as usize);
                    self.config_write(b, d, f, o, &data[..n]);
                }
            }
            b if b == self.ecam_base => {
                let (bus, d, f, o) = Self::ecam_target(offset);
                self.config_write(bus, d, f, o, data);
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, SharedDevice};
    use crate::sync::SpinLock;
    use alloc::sync::Arc;

    const ECAM: u64 = 0xb000_0000;

    #[test]
    fn default_layout_windows() {
        let l = PciLayout::DEFAULT;
        assert_eq!(l.e820_reserved(), (0xe000_0000, ECAM_SIZE));
        assert!(l.in_window(0xc000_0000, 0x4000));
        assert!(l.in_window(0x40_0000_0000, 0x4000));
        assert!(
            !l.in_window(0xdfff_f000, 0x2000),
            "runs into the ECAM window"
        );
        assert!(!l.in_window(0xe000_0000, 0x1000));
        assert!(!l.in_window(u64::MAX, 2));
        // Neither window overlaps the ECAM window or the APICs and HPET.
        for (b, s) in [l.mmio32, l.mmio64] {
            assert!(b + s <= l.ecam_base || b >= l.ecam_base + ECAM_SIZE);
            assert!(b + s <= 0xfec0_0000 || b >= 1 << 32);
        }
        assert_eq!(intx_gsi(1, 0), 17);
        assert_eq!(intx_gsi(3, 1), 16);
    }

    fn setup() -> (Bus, Bus, Arc<SpinLock<PciHost>>) {
        let host = Arc::new(SpinLock::new(PciHost::new(ECAM)));
        let d: SharedDevice = host.clone();
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        pio.insert(CONFIG_ADDRESS, 4, d.clone()).unwrap();
        pio.insert(CONFIG_DATA, 4, d.clone()).unwrap();
        mmio.insert(ECAM, ECAM_SIZE, d).unwrap();
        (pio, mmio, host)
    }

    fn cam_read(pio: &Bus, bus: u8, dev: u8, func: u8, reg: u8, size: usize) -> u32 {
        let a = 0x8000_0000
            | u32::from(bus) << 16
            | u32::from(dev) << 11
            | u32::from(func) << 8
            | u32::from(reg & 0xfc);
        pio.write(CONFIG_ADDRESS, &a.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        pio.read(CONFIG_DATA + u64::from(reg & 3), &mut b[..size])
            .unwrap();
        u32::from_le_bytes(b)
    }

    fn cam_write(pio: &Bus, dev: u8, reg: u8, v: u32) {
        let a = 0x8000_0000 | u32::from(dev) << 11 | u32::from(reg);
        pio.write(CONFIG_ADDRESS, &a.to_le_bytes()).unwrap();
        pio.write(CONFIG_DATA, &v.to_le_bytes()).unwrap();
    }

    fn ecam(dev: u8, func: u8, reg: u64) -> u64 {
        ECAM | u64::from(dev) << 15 | u64::from(func) << 12 | reg
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let (pio, mmio, _) = setup();
        assert_eq!(cam_read(&pio, 0, 0, 0, 0, 4), 0x0008_1b36);
        assert_eq!(cam_read(&pio, 0, 0, 0, 0x08, 4) >> 8, 0x06_00_00);
        assert_eq!(cam_read(&pio, 0, 0, 0, 0x02, 2), 0x0008);
        assert_eq!(cam_read(&pio, 0, 3, 0, 0, 4), u32::MAX);
        assert_eq!(cam_read(&pio, 1, 0, 0, 0, 4), u32::MAX);
        let mut b = [0u8; 4];
        mmio.read(ecam(0, 0, 0), &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        mmio.read(ecam(5, 2, 0x100), &mut b).unwrap();
        assert_eq!(b, [0xff; 4]);
        // Disabled CONFIG_ADDRESS: all-ones.
        pio.write(CONFIG_ADDRESS, &0u32.to_le_bytes()).unwrap();
        pio.read(CONFIG_DATA, &mut b).unwrap();
        assert_eq!(b, [0xff; 4]);
        // CONFIG_ADDRESS reads back (reserved low bits clear).
        pio.write(CONFIG_ADDRESS, &0x8000_08ffu32.to_le_bytes())
            .unwrap();
        pio.read(CONFIG_ADDRESS, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x8000_08fc);
        // A byte write to 0xcf8 is not a CONFIG_ADDRESS write.
        pio.write(CONFIG_ADDRESS, &[0]).unwrap();
        pio.read(CONFIG_ADDRESS, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x8000_08fc);
    }

    #[test]
    fn bar_sizing_and_programming() {
        let (pio, mmio, host) = setup();
        let mut f = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 1);
        f.add_bar(0, 0x1000, BarKind::Mem32).unwrap();
        f.add_bar(1, 0x20, BarKind::Io).unwrap();
        f.add_bar(2, 0x4000, BarKind::Mem64 { prefetchable: true })
            .unwrap();
        assert_eq!(
            f.add_bar(
                5,
                0x1000,
                BarKind::Mem64 {
                    prefetchable: false
                }
            ),
            Err(PciError::BadBar(5))
        );
        assert_eq!(
            f.add_bar(4, 0x1001, BarKind::Mem32),
            Err(PciError::BadBarSize(0x1001))
        );
        f.set_interrupt_pin(1);
        host.lock().add(3, 0, Box::new(f)).unwrap();

        // Size probing: write all-ones, read the mask with the flag bits.
        for (reg, want) in [
            (0x10, 0xffff_f000),
            (0x14, 0xffff_ffe1),
            (0x18, 0xffff_c00c),
            (0x1c, u32::MAX),
        ] {
            cam_write(&pio, 3, reg, u32::MAX);
            assert_eq!(cam_read(&pio, 0, 3, 0, reg, 4), want, "BAR at {reg:#x}");
        }
        // Unused BAR slots read zero and ignore writes.
        cam_write(&pio, 3, 0x24, u32::MAX);
        assert_eq!(cam_read(&pio, 0, 3, 0, 0x24, 4), 0);
        // Program addresses through ECAM; the VMM reads them back.
        mmio.write(ecam(3, 0, 0x10), &0xfebf_1234u32.to_le_bytes())
            .unwrap();
        mmio.write(ecam(3, 0, 0x18), &0x0000_0000u32.to_le_bytes())
            .unwrap();
        mmio.write(ecam(3, 0, 0x1c), &0x0000_0001u32.to_le_bytes())
            .unwrap();
        cam_write(&pio, 3, 0x14, 0xc040);
        cam_write(&pio, 3, 0x04, 0xffff);
        let mut h = host.lock();
        let f = h.function(3, 0).unwrap();
        let mut cmd = [0u8; 2];
        f.read_config(cfg::COMMAND, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd), cfg::COMMAND_WRITABLE);
        drop(h);
        assert_eq!(cam_read(&pio, 0, 3, 0, 0x10, 4), 0xfebf_1000);
        assert_eq!(cam_read(&pio, 0, 3, 0, 0x3d, 1), 1);
        // Read-only IDs.
        cam_write(&pio, 3, 0x00, 0);
        assert_eq!(cam_read(&pio, 0, 3, 0, 0, 4), 0x1042_1af4);
    }

    #[test]
    fn bar_accessors() {
        let mut f = ConfigSpace::new(1, 2, 0, 0);
        f.add_bar(
            0,
            0x4000,
            BarKind::Mem64 {
                prefetchable: false,
            },
        )
        .unwrap();
        f.add_bar(2, 0x100, BarKind::Io).unwrap();
        f.write_config(0x10, &0xfe00_0000u32.to_le_bytes());
        f.write_config(0x14, &0x1u32.to_le_bytes());
        f.write_config(0x18, &0xc001u32.to_le_bytes());
        assert_eq!(
            f.bar(0),
            Some((
                BarKind::Mem64 {
                    prefetchable: false
                },
                0x1_fe00_0000,
                0x4000
            ))
        );
        assert_eq!(f.bar(2), Some((BarKind::Io, 0xc000, 0x100)));
        assert_eq!(f.bar(1), None);
        assert!(!f.decodes(BarKind::Io));
        f.write_config(cfg::COMMAND, &[3, 0]);
        assert!(f.decodes(BarKind::Io) && f.decodes(BarKind::Mem32));
    }

    #[test]
    fn capability_list() {
        let mut f = ConfigSpace::new(1, 2, 0, 0);
        assert!(f.capabilities().is_empty());
        let a = f
            .add_capability(0x09, &[0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
            .unwrap();
        let b = f.add_capability(0x11, &[0; 10]).unwrap();
        assert_eq!((a, b), (0x40, 0x50));
        assert_eq!(f.capabilities(), [(0x09, 0x40), (0x11, 0x50)]);
        assert_ne!(f.u16(cfg::STATUS) & cfg::STATUS_CAP_LIST, 0);
        assert_eq!(f.get::<1>(cfg::CAPABILITIES), [0x40]);
        // Capabilities are read-only unless marked.
        f.write_config(0x52, &[0xff]);
        assert_eq!(f.get::<1>(0x52), [0]);
        f.set_writable(0x52, &[0x0f]);
        f.write_config(0x52, &[0xff]);
        assert_eq!(f.get::<1>(0x52), [0x0f]);
        while f.add_capability(0x05, &[0; 30]).is_ok() {}
        assert_eq!(
            f.add_capability(0x05, &[0; 30]),
            Err(PciError::NoCapabilitySpace)
        );
        assert!(f.capabilities().len() > 3);
    }

    #[test]
    fn multifunction_header_and_slot_rules() {
        let (pio, _, host) = setup();
        let mut h = host.lock();
        h.add(4, 0, Box::new(ConfigSpace::new(1, 2, 0, 0))).unwrap();
        assert_eq!(
            h.add(4, 0, Box::new(ConfigSpace::new(1, 2, 0, 0))),
            Err(PciError::SlotTaken { dev: 4, func: 0 })
        );
        assert!(h
            .add(32, 0, Box::new(ConfigSpace::new(1, 2, 0, 0)))
            .is_err());
        drop(h);
        assert_eq!(cam_read(&pio, 0, 4, 0, 0x0e, 1), 0);
        host.lock()
            .add(4, 3, Box::new(ConfigSpace::new(1, 3, 0, 0)))
            .unwrap();
        assert_eq!(cam_read(&pio, 0, 4, 0, 0x0e, 1), 0x80);
        assert_eq!(cam_read(&pio, 0, 4, 0, 0x0c, 4) >> 16, 0x80);
        assert_eq!(cam_read(&pio, 0, 4, 3, 0x00, 4), 0x0003_0001);
    }

    #[test]
    fn wide_and_odd_accesses_split_at_dwords() {
        let (_, mmio, _) = setup();
        // An 8-byte ECAM read of the host bridge's first two dwords.
        let mut b = [0u8; 8];
        mmio.read(ecam(0, 0, 0), &mut b).unwrap();
        assert_eq!(&b[..4], &0x0008_1b36u32.to_le_bytes());
        // A read at the very end of config space.
        let mut b = [0u8; 4];
        mmio.read(ecam(0, 0, 0xffc), &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        // Random accesses never panic.
        let mut rng = crate::testutil::Rng::new(3);
        for _ in 0..5000 {
            let off = rng.below(ECAM_SIZE);
            let mut d = [0u8; 8];
            let n = rng.size();
            if n as u64 + off > ECAM_SIZE {
                continue;
            }
            if rng.chance(2) {
                let _ = mmio.read(ECAM + off, &mut d[..n]);
            } else {
                let _ = mmio.write(ECAM + off, &d[..n]);
            }
        }
    }
}
