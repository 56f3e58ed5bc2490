//! The virtio-pci modern transport (virtio §4.1): a PCI function with vendor 0x1af4 and
//! device 0x1040 + type, whose registers live in one 64-bit memory BAR that the virtio
//! vendor capabilities (§4.1.4) point into:
//!
//! | BAR 0 offset | capability (`cfg_type`) | contents                               |
//! |--------------|-------------------------|----------------------------------------|
//! | 0x0000       | common (1)              | features, status, queue setup (§4.1.4.3) |
//! | 0x1000       | ISR (3)                 | interrupt cause, cleared on read       |
//! | 0x2000       | device (4)              | the device's configuration space       |
//! | 0x3000       | notify (2)              | queue `n` at `n * 4` (§4.1.4.4)        |
//!
//! plus the PCI configuration access capability (5), which reaches the BAR through
//! configuration space (§4.1.4.9). Interrupts are INTx# (pin A) driven by the ISR
//! (§4.1.5.3): the line is high while a cause is set and the guest did not disable
//! INTx in the command register; MSI-X is not offered (the vector registers read
//! NO_VECTOR).
//!
//! The driver's side follows §3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK
//! (refused — the bit does not stick — for features not offered or without
//! VIRTIO_F_VERSION_1), queue setup, DRIVER_OK. Status bits are only cleared by a reset.
//! A queue notification runs the device's handler at once, in the notifying vCPU's
//! exit; an error from it marks the device DEVICE_NEEDS_RESET and raises a
//! configuration-change interrupt (§2.1.2).
//!
//! The VMM maps the BAR on the MMIO bus at the address the guest programmed
//! ([`VirtioPci::bar`]), moving it when the guest does.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::{feature, status, Queue, VirtioDevice, VirtioError};
use crate::bus::{Action, BusDevice, IrqLine, IrqOut};
use crate::pci::{cfg, BarKind, ConfigSpace, PciFunction};
use crate::vcpu::GuestMemory;

/// The virtio PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x4000;
/// BAR 0 offset of the common configuration.
pub const COMMON_CFG: u64 = 0x0000;
/// BAR 0 offset of the ISR.
pub const ISR_CFG: u64 = 0x1000;
/// BAR 0 offset of the device configuration.
pub const DEVICE_CFG: u64 = 0x2000;
/// BAR 0 offset of the notification area.
pub const NOTIFY_CFG: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// ISR bits (§4.1.4.5).
pub mod isr {
    /// A queue has used buffers.
    pub const QUEUE: u8 = 1;
    /// The device configuration (or status) changed.
    pub const CONFIG: u8 = 2;
}

/// Common configuration offsets (§4.1.4.3).
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Length of the structure.
    pub const LEN: u64 = 0x38;
}

/// `cfg_type` values of the virtio PCI capabilities.
pub mod cap {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
    /// Capability ID: vendor-specific.
    pub const VENDOR: u8 = 0x09;
}

/// (offset, size) of each common configuration field.
const FIELDS: [(u64, usize); 16] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 8),
    (0x28, 8),
    (0x30, 8),
];

/// PCI status bit: the function asserts INTx#.
const STATUS_INTERRUPT: u16 = 1 << 3;
/// PCI command bit: INTx# disabled.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// A virtio device on the modern PCI transport, with the guest memory its queues live
/// in.
pub struct VirtioPci<D: VirtioDevice, M: GuestMemory + Send> {
    config: ConfigSpace,
    device: D,
    mem: M,
    irq: IrqOut,
    queues: Vec<Queue>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    isr: u8,
    config_generation: u8,
    /// Offset of the PCI configuration access capability.
    cfg_cap: u16,
    error: Option<VirtioError>,
}

impl<D: VirtioDevice, M: GuestMemory + Send> VirtioPci<D, M> {
    /// The function for `device`, with its queues in `mem`, interrupting through `irq`
    /// (the INTA# wire as the VMM routes it).
    pub fn new(device: D, mem: M, irq: Arc<dyn IrqLine>) -> Self {
        let ty = device.device_type();
        let class = match ty {
            super::device_type::BLOCK => 0x01_00_00,
            super::device_type::NET => 0x02_00_00,
            _ => 0x07_80_00,
        };
        let mut config = ConfigSpace::new(VENDOR_ID, DEVICE_ID_BASE + ty as u16, class, 1);
        config.set_u16(cfg::SUBSYSTEM_VENDOR_ID, VENDOR_ID);
        config.set_u16(cfg::SUBSYSTEM_VENDOR_ID + 2, 0x40);
        config.set_interrupt_pin(1);
        // A fixed layout that always fits: no error to handle.
        let _ = config.add_bar(
            0,
            BAR_SIZE,
            BarKind::Mem64 {
                prefetchable: false,
            },
        );
        let vcap = |ty: u8, offset: u64, len: u64, extra: &[u8]| {
            let mut body = Vec::new();
            body.extend_from_slice(&[16 + extra.len() as u8, ty, 0, 0, 0, 0]);
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(len as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        let notify_len = u64::from(NOTIFY_MULTIPLIER) * device.queue_max_sizes().len() as u64;
        for body in [
            vcap(cap::COMMON, COMMON_CFG, common::LEN, &[]),
            vcap(cap::ISR, ISR_CFG, 1, &[]),
            vcap(cap::DEVICE, DEVICE_CFG, 0x1000, &[]),
            vcap(
                cap::NOTIFY,
                NOTIFY_CFG,
                notify_len.max(4),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        ] {
            let _ = config.add_capability(cap::VENDOR, &body);
        }
        let cfg_cap = config
            .add_capability(cap::VENDOR, &vcap(cap::PCI_CFG, 0, 0, &[0; 4]))
            .unwrap_or(0);
        // The driver picks bar (byte 4), offset (8..12), length (12..16) and uses the
        // data window (16..20).
        config.set_writable(cfg_cap + 4, &[0xff]);
        config.set_writable(cfg_cap + 8, &[0xff; 12]);
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s))
            .collect();
        Self {
            config,
            device,
            mem,
            irq: IrqOut::new(irq),
            queues,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            isr: 0,
            config_generation: 0,
            cfg_cap,
            error: None,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, to feed it input (then call [`process_queue`](Self::process_queue)).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Why the device needs a reset, if it does.
    pub fn error(&self) -> Option<VirtioError> {
        self.error
    }

    /// The features the device offers.
    pub fn offered_features(&self) -> u64 {
        self.device.features()
            | feature::VERSION_1
            | feature::RING_INDIRECT_DESC
            | feature::RING_EVENT_IDX
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Where BAR 0 is (guest-physical) and its size, for the VMM to map it; `None`
    /// while the guest has memory decoding off.
    pub fn bar(&self) -> Option<(u64, u64)> {
        let (_, addr, size) = self.config.bar(0)?;
        self.config.decodes(BarKind::Mem32).then_some((addr, size))
    }

    /// Programs BAR 0 at `addr` and turns memory decoding on, as firmware would.
    pub fn place_bar(&mut self, addr: u64) {
        self.config
            .write_config(cfg::BAR0, &(addr as u32).to_le_bytes());
        self.config
            .write_config(cfg::BAR0 + 4, &((addr >> 32) as u32).to_le_bytes());
        let cmd = self.config.u16(cfg::COMMAND) | 2;
        self.config.write_config(cfg::COMMAND, &cmd.to_le_bytes());
    }

    fn live(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Runs the device's handler for queue `index`: on a notification, or when the
    /// device has new input for it (or, for an asynchronous device, when requests
    /// finished). Does nothing unless the driver is up and the queue enabled. Whether
    /// it interrupted the driver (used buffers it asked to hear about, or an error that
    /// needs a reset).
    pub fn process_queue(&mut self, index: u16) -> bool {
        let i = index as usize;
        if !self.live() || !self.queues.get(i).is_some_and(|q| q.ready) {
            return false;
        }
        let r = self
            .device
            .process(index, &mut self.queues, &mut self.mem)
            .and_then(|used| {
                if !used {
                    return Ok(false);
                }
                Ok(self.queues[i].needs_notification(&mut self.mem)?)
            });
        match r {
            Ok(true) => self.raise(isr::QUEUE),
            Ok(false) => return false,
            Err(e) => self.fail(e),
        }
        true
    }

    /// The device changed its configuration space: tell the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.raise(isr::CONFIG);
        }
    }

    fn fail(&mut self, e: VirtioError) {
        self.error = Some(e);
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.raise(isr::CONFIG);
        }
    }

    fn raise(&mut self, bits: u8) {
        self.isr |= bits;
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let st = self.config.u16(cfg::STATUS) & !STATUS_INTERRUPT;
        let pending = self.isr != 0;
        self.config
            .set_u16(cfg::STATUS, st | if pending { STATUS_INTERRUPT } else { 0 });
        let disabled = self.config.u16(cfg::COMMAND) & COMMAND_INTX_DISABLE != 0;
        self.irq.set(pending && !disabled);
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.isr = 0;
        self.error = None;
        self.device.reset();
        self.update_irq();
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = (v & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & old != old {
            return; // only a reset clears bits
        }
        let added = new & !old;
        let both = status::ACKNOWLEDGE | status::DRIVER;
        if added & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            let f = self.driver_features;
            if new & both != both || f & !offered != 0 || f & feature::VERSION_1 == 0 {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if new & !old & status::DRIVER_OK != 0 {
            self.device.activate(self.driver_features);
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The common configuration as the driver reads it.
    fn common_image(&self) -> [u8; common::LEN as usize] {
        let mut b = [0u8; common::LEN as usize];
        let mut put =
            |off: u64, v: &[u8]| b[off as usize..off as usize + v.len()].copy_from_slice(v);
        let offered = self.offered_features();
        let dev_f = match self.device_feature_select {
            0 => offered as u32,
            1 => (offered >> 32) as u32,
            _ => 0,
        };
        let drv_f = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(common::DEVICE_FEATURE, &dev_f.to_le_bytes());
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(common::DRIVER_FEATURE, &drv_f.to_le_bytes());
        put(common::CONFIG_MSIX_VECTOR, &NO_VECTOR.to_le_bytes());
        put(
            common::NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(common::DEVICE_STATUS, &[self.status]);
        put(common::CONFIG_GENERATION, &[self.config_generation]);
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        put(common::QUEUE_MSIX_VECTOR, &NO_VECTOR.to_le_bytes());
        if let Some(q) = self.selected() {
            put(common::QUEUE_SIZE, &q.size.to_le_bytes());
            put(common::QUEUE_ENABLE, &u16::from(q.ready).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(common::QUEUE_DESC, &q.desc_table.to_le_bytes());
            put(common::QUEUE_DRIVER, &q.avail_ring.to_le_bytes());
            put(common::QUEUE_DEVICE, &q.used_ring.to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let image = self.common_image();
        let end = offset.saturating_add(data.len() as u64);
        for (off, size) in FIELDS {
            if off >= end || off + size as u64 <= offset {
                continue;
            }
            let mut v = [0u8; 8];
            v[..size].copy_from_slice(&image[off as usize..off as usize + size]);
            for (i, &b) in data.iter().enumerate() {
                let at = offset + i as u64;
                if (off..off + size as u64).contains(&at) {
                    v[(at - off) as usize] = b;
                }
            }
            self.set_common(off, u64::from_le_bytes(v));
        }
    }

    fn set_common(&mut self, off: u64, v: u64) {
        let features_open = self.status & status::FEATURES_OK == 0;
        match off {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            common::DRIVER_FEATURE if features_open => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            common::DEVICE_STATUS => self.set_status(v as u8),
            common::QUEUE_SELECT => self.queue_select = v as u16,
            _ => {}
        }
        let f = self.driver_features;
        let driver_ok = self.status & status::DRIVER_OK != 0;
        let Some(q) = self.queues.get_mut(self.queue_select as usize) else {
            return;
        };
        if q.ready || driver_ok {
            return; // an enabled queue's setup is fixed until reset
        }
        let mut err = None;
        match off {
            common::QUEUE_SIZE => q.size = v as u16,
            common::QUEUE_DESC => q.desc_table = v,
            common::QUEUE_DRIVER => q.avail_ring = v,
            common::QUEUE_DEVICE => q.used_ring = v,
            common::QUEUE_ENABLE if v & 1 == 1 => {
                q.event_idx = f & feature::RING_EVENT_IDX != 0;
                q.indirect = f & feature::RING_INDIRECT_DESC != 0;
                match q.check() {
                    Ok(()) => q.ready = true,
                    Err(e) => err = Some(e),
                }
            }
            _ => {}
        }
        if let Some(e) = err {
            self.fail(e.into());
        }
    }

    /// A read of BAR 0 at `offset`.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_CFG + common::LEN => {
                let image = self.common_image();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = image
                        .get((o as usize).wrapping_add(i))
                        .copied()
                        .unwrap_or(0);
                }
            }
            ISR_CFG => {
                if let Some(b) = data.first_mut() {
                    *b = core::mem::take(&mut self.isr);
                    self.update_irq();
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + 0x1000).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            _ => {}
        }
    }

    /// A write of BAR 0 at `offset`.
    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG + common::LEN => self.common_write(o, data),
            o if (DEVICE_CFG..DEVICE_CFG + 0x1000).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY_CFG..NOTIFY_CFG + 0x1000).contains(&o) => {
                let q = (o - NOTIFY_CFG) / u64::from(NOTIFY_MULTIPLIER);
                if (o - NOTIFY_CFG).is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) {
                    let _ = self.process_queue(q as u16);
                }
            }
            _ => {}
        }
    }

    /// The BAR access the PCI configuration access capability selects, if its window
    /// `[cfg_cap + 16, +4)` is what `offset` hits.
    fn cfg_window(&self, offset: u16, len: usize) -> Option<(u64, usize)> {
        let data = self.cfg_cap + 16;
        if self.cfg_cap == 0 || offset != data {
            return None;
        }
        let bar = self.config.get::<1>(self.cfg_cap + 4)[0];
        let off = u64::from(self.config.u32(self.cfg_cap + 8));
        let n = self.config.u32(self.cfg_cap + 12) as usize;
        (bar == 0 && matches!(n, 1 | 2 | 4) && n <= len && off + n as u64 <= BAR_SIZE)
            .then_some((off, n))
    }
}

impl<D: VirtioDevice, M: GuestMemory + Send> PciFunction for VirtioPci<D, M> {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        if let Some((off, n)) = self.cfg_window(offset, data.len()) {
            data.fill(0);
            self.bar_read(off, &mut data[..n]);
            return;
        }
        self.config.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        if let Some((off, n)) = self.cfg_window(offset, data.len()) {
            self.bar_write(off, &data[..n]);
            return;
        }
        self.config.write_config(offset, data);
        if (cfg::COMMAND..cfg::COMMAND + 2).contains(&offset) {
            self.update_irq();
        }
    }
}

impl<D: VirtioDevice, M: GuestMemory + Send> BusDevice for VirtioPci<D, M> {
    /// `offset` is into BAR 0 (the VMM maps the device at [`VirtioPci::bar`]).
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if self.config.decodes(BarKind::Mem32) && data.len() <= 8 {
            self.bar_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        if self.config.decodes(BarKind::Mem32) && data.len() <= 8 {
            self.bar_write(offset, data);
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests;
