//! Test helpers: a seeded PRNG for fuzz-style tests and a recording interrupt wire.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::bus::IrqLine;

pub use peregrine_rng::Rng;

/// An interrupt wire that records its level and counts rising edges.
#[derive(Default)]
pub struct TestIrq {
    level: AtomicBool,
    rises: AtomicU32,
}

impl TestIrq {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }

    /// Rising edges since the last call.
    pub fn take_rises(&self) -> u32 {
        self.rises.swap(0, Ordering::SeqCst)
    }
}

impl IrqLine for TestIrq {
    fn set_level(&self, level: bool) {
        if level && !self.level.swap(true, Ordering::SeqCst) {
            self.rises.fetch_add(1, Ordering::SeqCst);
        }
        if !level {
            self.level.store(false, Ordering::SeqCst);
        }
    }
}

/// A vCPU on a byte vector of RAM from guest-physical 0: the tests' [`Platform`].
pub struct MockVcpu {
    pub mem: std::vec::Vec<u8>,
    pub regs: crate::vcpu::ArchState,
    pub timer: Option<u64>,
    pub now: u64,
}

impl MockVcpu {
    pub fn new(ram: usize) -> Self {
        Self {
            mem: std::vec![0; ram],
            regs: Default::default(),
            timer: None,
            now: 0,
        }
    }

    pub fn put(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
    }

    pub fn put_u64(&mut self, gpa: u64, v: u64) {
        self.put(gpa, &v.to_le_bytes());
    }

    pub fn put_u32(&mut self, gpa: u64, v: u32) {
        self.put(gpa, &v.to_le_bytes());
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, crate::vcpu::Unbacked> {
        let end = gpa
            .checked_add(len as u64)
            .filter(|&e| e <= self.mem.len() as u64);
        match end {
            Some(e) => Ok(gpa as usize..e as usize),
            None => Err(crate::vcpu::Unbacked {
                gpa: gpa.max(self.mem.len() as u64),
            }),
        }
    }
}

impl crate::vcpu::GuestMemory for MockVcpu {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), crate::vcpu::Unbacked> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.mem[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), crate::vcpu::Unbacked> {
        let r = self.range(gpa, buf.len())?;
        self.mem[r].copy_from_slice(buf);
        Ok(())
    }
}

impl crate::vcpu::Platform for MockVcpu {
    fn regs(&self) -> &crate::vcpu::ArchState {
        &self.regs
    }
    fn regs_mut(&mut self) -> &mut crate::vcpu::ArchState {
        &mut self.regs
    }
    fn now_ns(&self) -> u64 {
        self.now
    }
    fn set_timer(&mut self, deadline_ns: Option<u64>) {
        self.timer = deadline_ns;
    }
}

/// Guest RAM from guest-physical 0 that a test and a device can both hold.
#[derive(Clone)]
pub struct SharedMem(pub Arc<crate::sync::SpinLock<std::vec::Vec<u8>>>);

impl SharedMem {
    pub fn new(ram: usize) -> Self {
        Self(Arc::new(crate::sync::SpinLock::new(std::vec![0; ram])))
    }

    pub fn bytes(&self, gpa: u64, len: usize) -> std::vec::Vec<u8> {
        self.0.lock()[gpa as usize..gpa as usize + len].to_vec()
    }
}

impl crate::vcpu::GuestMemory for SharedMem {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), crate::vcpu::Unbacked> {
        let m = self.0.lock();
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= m.len() as u64);
        let Some(end) = end else {
            return Err(crate::vcpu::Unbacked {
                gpa: gpa.max(m.len() as u64),
            });
        };
        buf.copy_from_slice(&m[gpa as usize..end as usize]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), crate::vcpu::Unbacked> {
        let mut m = self.0.lock();
        let end = gpa
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= m.len() as u64);
        let Some(end) = end else {
            return Err(crate::vcpu::Unbacked {
                gpa: gpa.max(m.len() as u64),
            });
        };
        m[gpa as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
}

/// Runs one exit's handler on `v` as a binding does (the MTD cleared first, read
/// after) and checks that the record names every group whose state changed: what the
/// reply writes back covers every change. A STARTUP handler writes the state afresh, so
/// there every group that is not all zero must be recorded.
pub fn checked_exit<R>(
    v: &mut MockVcpu,
    startup: bool,
    handle: impl FnOnce(&mut MockVcpu) -> R,
) -> R {
    use crate::vcpu::{changed_groups, ArchState, Mtd};
    v.regs.mtd = Mtd::empty();
    let before = if startup {
        ArchState::default()
    } else {
        v.regs
    };
    let out = handle(v);
    let changed = changed_groups(&before, &v.regs);
    assert!(
        v.regs.mtd.contains(changed),
        "changed {:?} but recorded only {:?}",
        changed,
        v.regs.mtd
    );
    out
}

/// The exits the random-exit tests pick from: every one a guest can cause at will.
pub const RANDOM_EXITS: [u64; 15] = {
    use peregrine_abi::event::vcpu as ev;
    [
        ev::CPUID,
        ev::IO,
        ev::NPT_FAULT,
        ev::HLT,
        ev::VMCALL,
        ev::RDMSR,
        ev::WRMSR,
        ev::XSETBV,
        ev::OTHER,
        ev::INVD,
        ev::EXCEPTION,
        ev::CR_ACCESS,
        ev::IO_STRING,
        ev::PAUSE,
        ev::INTR_WINDOW,
    ]
};

/// A 4-level identity map of the first 2 MiB (one 2 MiB page) at 0x1000.
pub fn long_mode(v: &mut MockVcpu) {
    v.put_u64(0x1000, 0x2000 | 3);
    v.put_u64(0x2000, 0x3000 | 3);
    v.put_u64(0x3000, 0x83);
    let r = &mut v.regs;
    r.cr0 = 0x8000_0011;
    r.cr3 = 0x1000;
    r.cr4 = 0x20;
    r.efer = 0x500;
}

/// The state of the failure seen under QEMU 7.2: a kernel-mode fetch #PF in
/// delivery, CR2 at the #DF gate, everything mapped.
pub fn lost_translations(v: &mut MockVcpu) {
    long_mode(v);
    v.put(0x10_0000, &[0x90]);
    for (vec, target) in [(8u64, 0x10_0100u64), (14, 0x10_0200)] {
        let lo = (target & 0xffff) | (0x10 << 16) | (0x8e << 40) | ((target >> 16) << 48);
        v.put_u64(0x9000 + vec * 16, lo);
    }
    let r = &mut v.regs;
    r.rip = 0x10_0000;
    r.cs.sel = 0x10;
    r.idtr.base = 0x9000;
    r.idtr.limit = 0xfff;
    r.cr2 = 0x9080;
    r.inj_info = 0x8000_0b0e;
    r.inj_error = 0x10;
}
