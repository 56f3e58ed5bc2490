//! Transport tests, with the guest driver's side of the PCI transport ([`Guest`]) that
//! the device tests reuse.

use super::*;
use crate::testutil::{Rng, SharedMem, TestIrq};
use crate::virtio::queue::tests::Driver;
use crate::virtio::QueueError;
use std::vec;

pub const BAR_ADDR: u64 = 0xfe00_0000;
pub const RAM: usize = 0x40000;

/// The guest driver's view of one transport, the way Linux's virtio_pci_modern drives
/// it.
pub struct Guest<D: VirtioDevice> {
    pub dev: VirtioPci<D, SharedMem>,
    pub mem: SharedMem,
    pub irq: Arc<TestIrq>,
}

impl<D: VirtioDevice> Guest<D> {
    pub fn new(device: D) -> Self {
        Self::with_ram(device, RAM)
    }

    /// A guest with `ram` bytes of memory (at least [`RAM`] for the drivers' rings).
    pub fn with_ram(device: D, ram: usize) -> Self {
        let mem = SharedMem::new(ram.max(RAM));
        let irq = TestIrq::new();
        let mut dev = VirtioPci::new(device, mem.clone(), irq.clone());
        dev.place_bar(BAR_ADDR);
        Self { dev, mem, irq }
    }

    pub fn w(&mut self, off: u64, v: u64, size: usize) {
        self.dev.write(BAR_ADDR, off, &v.to_le_bytes()[..size]);
    }

    pub fn r(&mut self, off: u64, size: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read(BAR_ADDR, off, &mut b[..size]);
        u64::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&mut self, s: u8) {
        self.w(common::DEVICE_STATUS, u64::from(s), 1);
    }

    pub fn device_features(&mut self) -> u64 {
        self.w(common::DEVICE_FEATURE_SELECT, 0, 4);
        let lo = self.r(common::DEVICE_FEATURE, 4);
        self.w(common::DEVICE_FEATURE_SELECT, 1, 4);
        lo | self.r(common::DEVICE_FEATURE, 4) << 32
    }

    pub fn write_driver_features(&mut self, f: u64) {
        self.w(common::DRIVER_FEATURE_SELECT, 0, 4);
        self.w(common::DRIVER_FEATURE, f & 0xffff_ffff, 4);
        self.w(common::DRIVER_FEATURE_SELECT, 1, 4);
        self.w(common::DRIVER_FEATURE, f >> 32, 4);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; the status read back.
    pub fn negotiate(&mut self, features: u64) -> u8 {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.write_driver_features(features);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status()
    }

    /// Sets queue `i` up on `d`'s rings (addresses as two 32-bit halves) and enables it.
    pub fn setup_queue(&mut self, i: u16, d: &Driver) {
        self.w(common::QUEUE_SELECT, u64::from(i), 2);
        self.w(common::QUEUE_SIZE, u64::from(d.size), 2);
        for (off, addr) in [
            (common::QUEUE_DESC, d.desc),
            (common::QUEUE_DRIVER, d.avail),
            (common::QUEUE_DEVICE, d.used),
        ] {
            self.w(off, addr & 0xffff_ffff, 4);
            self.w(off + 4, addr >> 32, 4);
        }
        self.w(common::QUEUE_ENABLE, 1, 2);
    }

    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
    }

    /// Negotiates everything offered, sets up one driver per queue at `base + 0x1000*i`.
    pub fn up(&mut self, features: u64, sizes: &[u16]) -> Vec<Driver> {
        assert_ne!(self.negotiate(features) & status::FEATURES_OK, 0);
        let drivers: Vec<Driver> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| Driver::new(s, 0x1000 + 0x1000 * i as u64))
            .collect();
        for (i, d) in drivers.iter().enumerate() {
            self.setup_queue(i as u16, d);
        }
        self.driver_ok();
        assert_eq!(self.status() & status::DRIVER_OK, status::DRIVER_OK);
        drivers
    }

    pub fn notify(&mut self, i: u16) {
        self.w(
            NOTIFY_CFG + u64::from(NOTIFY_MULTIPLIER) * u64::from(i),
            u64::from(i),
            2,
        );
    }

    pub fn isr(&mut self) -> u8 {
        self.r(ISR_CFG, 1) as u8
    }

    pub fn cfg(&mut self, off: u16, size: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_config(off, &mut b[..size]);
        u32::from_le_bytes(b)
    }
}

/// One queue: copies each chain's readable bytes, reversed, into its writable part.
pub struct Echo {
    sizes: [u16; 2],
    pub activated: Option<u64>,
    pub resets: u32,
    pub config: [u8; 8],
}

impl Echo {
    pub fn new() -> Self {
        Self {
            sizes: [8, 4],
            activated: None,
            resets: 0,
            config: *b"echocfg!",
        }
    }
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        0x1f
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            self.config[0] = data[0];
        }
    }
    fn activate(&mut self, features: u64) {
        self.activated = Some(features);
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated = None;
    }
    fn process(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError> {
        let q = &mut queues[index as usize];
        let mut used = false;
        while let Some(c) = q.pop(mem)? {
            let mut buf = vec![0u8; c.readable_len().min(4096) as usize];
            let n = c.reader().read(mem, &mut buf)?;
            buf.truncate(n);
            buf.reverse();
            let mut w = c.writer();
            w.write(mem, &buf)?;
            q.add_used(mem, c.head, w.written())?;
            used = true;
        }
        Ok(used)
    }
}

fn guest() -> Guest<Echo> {
    Guest::new(Echo::new())
}

const ALL: u64 =
    feature::VERSION_1 | feature::RING_EVENT_IDX | feature::RING_INDIRECT_DESC | 1 << 3;

#[test]
fn pci_identity_and_capabilities() {
    let mut g = guest();
    assert_eq!(g.cfg(0, 4), ((0x1040 + 0x1f) << 16) | 0x1af4);
    assert_eq!(g.cfg(0x2c, 4), 0x0040_1af4);
    assert_eq!(g.cfg(0x08, 1), 1, "revision 1: non-transitional");
    assert_eq!(g.cfg(cfg::INTERRUPT_PIN, 1), 1);
    // Walk the capability list like a driver.
    let mut found = Vec::new();
    let mut p = g.cfg(0x34, 1) as u16;
    while p != 0 {
        assert_eq!(g.cfg(p, 1), u32::from(cap::VENDOR));
        let ty = g.cfg(p + 3, 1) as u8;
        let bar = g.cfg(p + 4, 1);
        let off = g.cfg(p + 8, 4);
        let len = g.cfg(p + 12, 4);
        let cap_len = g.cfg(p + 2, 1);
        found.push((ty, bar, off, len, cap_len));
        if ty == cap::NOTIFY {
            assert_eq!(g.cfg(p + 16, 4), NOTIFY_MULTIPLIER);
        }
        p = g.cfg(p + 1, 1) as u16;
    }
    assert_eq!(
        found,
        [
            (cap::COMMON, 0, 0, 0x38, 16),
            (cap::ISR, 0, 0x1000, 1, 16),
            (cap::DEVICE, 0, 0x2000, 0x1000, 16),
            (cap::NOTIFY, 0, 0x3000, 8, 20),
            (cap::PCI_CFG, 0, 0, 0, 20),
        ]
    );
    // BAR 0: 64-bit memory, sized 16 KiB, programmed by place_bar.
    assert_eq!(g.dev.bar(), Some((BAR_ADDR, BAR_SIZE)));
    g.dev.write_config(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(g.cfg(0x10, 4), 0xffff_c004);
}

#[test]
fn features_need_version_1_and_must_be_offered() {
    let mut g = guest();
    assert_eq!(g.device_features(), ALL);
    assert_eq!(g.r(common::NUM_QUEUES, 2), 2);
    // Legacy driver (no VERSION_1): FEATURES_OK does not stick.
    assert_eq!(g.negotiate(1 << 3) & status::FEATURES_OK, 0);
    // A feature the device did not offer.
    assert_eq!(
        g.negotiate(feature::VERSION_1 | 1 << 4) & status::FEATURES_OK,
        0
    );
    // A good set sticks, and reads back.
    assert_ne!(
        g.negotiate(feature::VERSION_1 | 1 << 3) & status::FEATURES_OK,
        0
    );
    g.w(common::DRIVER_FEATURE_SELECT, 1, 4);
    assert_eq!(g.r(common::DRIVER_FEATURE, 4), 1);
    // Frozen after FEATURES_OK.
    g.write_driver_features(ALL);
    assert_eq!(g.dev.driver_features(), feature::VERSION_1 | 1 << 3);
    // FEATURES_OK without ACKNOWLEDGE | DRIVER is refused too.
    g.set_status(0);
    g.write_driver_features(feature::VERSION_1);
    g.set_status(status::FEATURES_OK);
    assert_eq!(g.status(), 0);
    // Feature words past 1 read zero.
    g.w(common::DEVICE_FEATURE_SELECT, 2, 4);
    assert_eq!(g.r(common::DEVICE_FEATURE, 4), 0);
}

#[test]
fn status_state_machine() {
    let mut g = guest();
    // DRIVER_OK before FEATURES_OK is refused.
    g.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(g.dev.device().activated, None);
    // Clearing bits is not a thing; only reset does.
    g.set_status(status::ACKNOWLEDGE);
    assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
    // The driver cannot set DEVICE_NEEDS_RESET.
    g.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET);
    assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
    g.up(ALL, &[8, 4]);
    assert_eq!(g.dev.device().activated, Some(ALL));
    let s = g.status();
    g.set_status(s | status::FAILED);
    assert_ne!(g.status() & status::FAILED, 0);
    let resets = g.dev.device().resets;
    g.set_status(0);
    assert_eq!(g.status(), 0);
    assert_eq!(g.dev.device().resets, resets + 1);
    g.w(common::QUEUE_SELECT, 0, 2);
    assert_eq!(g.r(common::QUEUE_ENABLE, 2), 0);
    assert_eq!(g.r(common::QUEUE_DESC, 8), 0);
    assert_eq!(g.dev.driver_features(), 0);
}

#[test]
fn queue_registers() {
    let mut g = guest();
    g.negotiate(ALL);
    g.w(common::QUEUE_SELECT, 1, 2);
    assert_eq!(g.r(common::QUEUE_SIZE, 2), 4);
    assert_eq!(g.r(common::QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(g.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(g.r(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    g.w(common::QUEUE_DESC, 0x1234_5678_9abc_def0, 8);
    assert_eq!(g.r(common::QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
    assert_eq!(g.r(common::QUEUE_DESC + 4, 4), 0x1234_5678);
    // A queue that does not exist reads size 0 and ignores setup.
    g.w(common::QUEUE_SELECT, 7, 2);
    assert_eq!(g.r(common::QUEUE_SIZE, 2), 0);
    g.w(common::QUEUE_ENABLE, 1, 2);
    assert_eq!(g.r(common::QUEUE_ENABLE, 2), 0);
    // A size that is not a power of two fails the device at enable.
    g.w(common::QUEUE_SELECT, 0, 2);
    g.w(common::QUEUE_SIZE, 6, 2);
    g.w(common::QUEUE_ENABLE, 1, 2);
    assert_eq!(g.r(common::QUEUE_ENABLE, 2), 0);
    assert_ne!(g.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        g.dev.error(),
        Some(VirtioError::Queue(QueueError::BadSize(6)))
    );
    // Reset clears it.
    g.set_status(0);
    assert_eq!((g.status(), g.dev.error()), (0, None));
}

#[test]
fn notify_runs_the_queue_and_interrupts_through_intx() {
    let mut g = guest();
    // Without EVENT_IDX: every used buffer interrupts.
    let mut d = g.up(ALL & !feature::RING_EVENT_IDX, &[8, 4]);
    let mem = &mut g.mem.clone();
    crate::virtio::queue::tests::put(mem, 0x8000, b"abc");
    let head = d[0].add_chain(mem, &[(0x8000, 3, false), (0x9000, 3, true)]);
    assert!(!g.irq.level());
    g.notify(0);
    assert_eq!(d[0].take_used(mem), [(u32::from(head), 3)]);
    assert_eq!(g.mem.bytes(0x9000, 3), b"cba");
    assert!(g.irq.level());
    assert_ne!(g.cfg(cfg::STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    // The ISR read says why and lowers the line.
    assert_eq!(g.isr(), isr::QUEUE);
    assert!(!g.irq.level());
    assert_eq!(g.isr(), 0);
    assert_eq!(g.cfg(cfg::STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    // INTx disable masks the line but not the ISR.
    g.dev
        .write_config(cfg::COMMAND, &(2u16 | COMMAND_INTX_DISABLE).to_le_bytes());
    d[0].add_chain(mem, &[(0x8000, 3, false), (0x9000, 3, true)]);
    g.notify(0);
    assert!(!g.irq.level());
    g.dev.write_config(cfg::COMMAND, &2u16.to_le_bytes());
    assert!(g.irq.level());
    assert_eq!(g.isr(), isr::QUEUE);
    assert_eq!(d[0].take_used(mem).len(), 1);
    // A notification at an unaligned offset, or for a missing queue, does nothing.
    d[0].add_chain(mem, &[(0x8000, 3, false), (0x9000, 3, true)]);
    g.w(NOTIFY_CFG + 2, 0, 2);
    g.w(NOTIFY_CFG + 0x40, 0, 2);
    assert!(d[0].take_used(mem).is_empty());
    g.notify(0);
    assert_eq!(d[0].take_used(mem).len(), 1);
}

#[test]
fn event_idx_through_the_transport() {
    let mut g = guest();
    let mut d = g.up(ALL, &[8, 4]);
    let mem = &mut g.mem.clone();
    // The driver asks for an interrupt after the second buffer only.
    d[0].set_used_event(mem, 1);
    for want in [false, true, false] {
        d[0].add_chain(mem, &[(0x9000, 1, true)]);
        g.notify(0);
        assert_eq!(g.isr() != 0, want);
    }
}

#[test]
fn a_broken_queue_marks_the_device_for_reset() {
    let mut g = guest();
    let mut d = g.up(ALL, &[8, 4]);
    let mem = &mut g.mem.clone();
    d[1].publish(mem, 9); // head out of range
    g.notify(1);
    assert_ne!(g.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        g.dev.error(),
        Some(VirtioError::Queue(QueueError::BadIndex(9)))
    );
    assert_eq!(g.isr(), isr::CONFIG);
    // Nothing runs until the driver resets.
    d[0].add_chain(mem, &[(0x9000, 1, true)]);
    g.notify(0);
    assert!(d[0].take_used(mem).is_empty());
    let mut d = g.up(ALL, &[8, 4]);
    d[0].add_chain(mem, &[(0x9000, 1, true)]);
    g.notify(0);
    assert_eq!(d[0].take_used(mem).len(), 1);
    // Rings outside RAM.
    g.negotiate(ALL);
    g.setup_queue(0, &Driver::new(8, 0x4000_0000));
    g.driver_ok();
    g.notify(0);
    assert!(matches!(
        g.dev.error(),
        Some(VirtioError::Queue(QueueError::Unbacked(_)))
    ));
}

#[test]
fn queue_setup_is_fixed_once_enabled() {
    let mut g = guest();
    g.up(ALL, &[8, 4]);
    g.w(common::QUEUE_SELECT, 0, 2);
    g.w(common::QUEUE_DESC, 0x7777_0000, 8);
    g.w(common::QUEUE_SIZE, 2, 2);
    assert_eq!(g.r(common::QUEUE_DESC, 8), 0x1000);
    assert_eq!(g.r(common::QUEUE_SIZE, 2), 8);
}

#[test]
fn device_config_and_generation() {
    let mut g = guest();
    assert_eq!(g.r(DEVICE_CFG, 4), u64::from(u32::from_le_bytes(*b"echo")));
    assert_eq!(
        g.r(DEVICE_CFG + 6, 2),
        u64::from(u16::from_le_bytes(*b"g!"))
    );
    g.w(DEVICE_CFG, u64::from(b'E'), 1);
    assert_eq!(g.r(DEVICE_CFG, 1), u64::from(b'E'));
    assert_eq!(g.r(common::CONFIG_GENERATION, 1), 0);
    g.up(ALL, &[8, 4]);
    g.dev.config_changed();
    assert_eq!(g.r(common::CONFIG_GENERATION, 1), 1);
    assert_eq!(g.isr(), isr::CONFIG);
}

#[test]
fn pci_cfg_access_capability_reaches_the_bar() {
    let mut g = guest();
    let cap_at = g
        .dev
        .config
        .capabilities()
        .iter()
        .find(|&&(_, off)| g.dev.config.get::<1>(off + 3)[0] == cap::PCI_CFG)
        .unwrap()
        .1;
    let set = |g: &mut Guest<Echo>, off: u32, len: u32| {
        g.dev.write_config(cap_at + 4, &[0]);
        g.dev.write_config(cap_at + 8, &off.to_le_bytes());
        g.dev.write_config(cap_at + 12, &len.to_le_bytes());
    };
    set(&mut g, common::DEVICE_FEATURE as u32, 4);
    assert_eq!(g.cfg(cap_at + 16, 4), ALL as u32);
    set(&mut g, common::DEVICE_STATUS as u32, 1);
    g.dev
        .write_config(cap_at + 16, &[status::ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(g.status(), status::ACKNOWLEDGE);
    // A bad length or BAR: plain config space.
    set(&mut g, 0, 3);
    assert_eq!(g.cfg(cap_at + 16, 4), 0);
}

#[test]
fn decoding_off_hides_the_bar() {
    let mut g = guest();
    g.dev.write_config(cfg::COMMAND, &[0, 0]);
    assert_eq!(g.dev.bar(), None);
    assert_eq!(g.r(common::NUM_QUEUES, 2), 0xffff);
    g.set_status(status::ACKNOWLEDGE);
    g.dev.write_config(cfg::COMMAND, &[2, 0]);
    assert_eq!(g.status(), 0);
}

#[test]
fn shared_through_the_pci_host_and_mmio_bus() {
    use crate::bus::{Bus, SharedDevice};
    use crate::pci::PciHost;
    use crate::sync::SpinLock;
    let mem = SharedMem::new(RAM);
    let dev = Arc::new(SpinLock::new(VirtioPci::new(
        Echo::new(),
        mem,
        TestIrq::new(),
    )));
    let mut host = PciHost::new(0xb000_0000);
    host.add(2, 0, Box::new(dev.clone())).unwrap();
    let mut id = [0u8; 4];
    host.config_read(0, 2, 0, 0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x105f_1af4);
    host.config_write(0, 2, 0, 0x10, &0xfe00_0000u32.to_le_bytes());
    host.config_write(0, 2, 0, 0x04, &[2, 0]);
    let (addr, size) = dev.lock().bar().unwrap();
    let mut mmio = Bus::new();
    let d: SharedDevice = dev.clone();
    mmio.insert(addr, size, d).unwrap();
    let mut b = [0u8; 2];
    mmio.read(addr + common::NUM_QUEUES, &mut b).unwrap();
    assert_eq!(u16::from_le_bytes(b), 2);
}

#[test]
fn random_accesses_never_panic() {
    let mut rng = Rng::new(11);
    let mut g = guest();
    for _ in 0..20_000 {
        let off = if rng.chance(2) {
            rng.below(0x40)
        } else {
            rng.below(0x5000)
        };
        let n = if rng.chance(8) {
            rng.below(12) as usize
        } else {
            rng.size()
        };
        let mut b = vec![0u8; n];
        match rng.below(4) {
            0 => g.dev.read(BAR_ADDR, off, &mut b),
            1 => {
                b.iter_mut().for_each(|x| *x = rng.byte());
                let _ = g.dev.write(BAR_ADDR, off, &b);
            }
            2 => {
                let off = rng.below(0x100) as u16;
                let n = n.min(4 - (off as usize & 3));
                g.dev.read_config(off, &mut b[..n]);
            }
            _ => {
                let off = rng.below(0x100) as u16;
                let n = n.min(4 - (off as usize & 3));
                b.iter_mut().for_each(|x| *x = rng.byte());
                g.dev.write_config(off, &b[..n]);
            }
        }
    }
}
