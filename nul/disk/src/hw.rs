//! The hardware the NVMe driver runs on, as `peregrine-nvme`'s traits: BAR 0 as
//! [`Mmio`], the root's DMA region as [`Dma`] and the TSC as [`Clock`] (whose busy-wait
//! turn sleeps on the interrupt semaphore); and the PCI set-up (bus mastering, MSI-X).

use core::sync::atomic::{AtomicUsize, Ordering};

use nul_rt::device::{bar_kind, DeviceInfo};
use nul_rt::hc;
use peregrine_abi::hypercall::{msi_address, msi_data};
use peregrine_nvme::{Clock, Dma, Error, Mmio};

/// BAR 0, mapped uncacheable by the root.
#[derive(Debug)]
pub struct Bar0 {
    base: u64,
    size: usize,
}

impl Bar0 {
    /// BAR 0 of `dev`, if it is a mapped memory BAR.
    pub fn new(dev: &DeviceInfo) -> Option<Bar0> {
        let b = dev.bars[0];
        (b.kind == bar_kind::MEM && b.size >= 0x1000).then_some(Bar0 {
            base: b.addr,
            size: b.size as usize,
        })
    }
}

impl Mmio for Bar0 {
    fn read32(&self, off: usize) -> u32 {
        if off + 4 > self.size {
            return u32::MAX;
        }
        // SAFETY: BAR 0 is mapped at `base` for `size` bytes for the component's life;
        // the register read is inside it and dword-aligned (the driver's offsets).
        unsafe { core::ptr::read_volatile((self.base + off as u64) as *const u32) }
    }

    fn write32(&self, off: usize, value: u32) {
        if off + 4 > self.size {
            return;
        }
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile((self.base + off as u64) as *mut u32, value) }
    }
}

/// The DMA region, handed out front to back (the driver keeps what it allocates for
/// the controller's life; nothing is freed).
#[derive(Debug)]
pub struct DmaPool {
    base: u64,
    phys: u64,
    size: usize,
    next: AtomicUsize,
}

/// An allocation: offset and length in the region.
#[derive(Debug)]
pub struct Region {
    off: usize,
    len: usize,
}

impl DmaPool {
    /// The DMA region of `dev`.
    pub fn new(dev: &DeviceInfo) -> DmaPool {
        DmaPool {
            base: dev.dma,
            phys: dev.dma_phys,
            size: dev.dma_size as usize,
            next: AtomicUsize::new(0),
        }
    }

    fn ptr(&self, r: &Region, offset: usize, len: usize) -> *mut u8 {
        debug_assert!(offset + len <= r.len);
        (self.base + (r.off + offset) as u64) as *mut u8
    }
}

impl Dma for DmaPool {
    type Region = Region;

    fn alloc(&self, len: usize) -> Result<Region, Error> {
        let len = len.div_ceil(4096).max(1) * 4096;
        let off = self
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n + len <= self.size).then_some(n + len)
            })
            .map_err(|_| Error::NoMemory)?;
        let r = Region { off, len };
        // SAFETY: `[off, off + len)` lies inside the mapped DMA region and was never
        // handed out before; zeroing it is the allocation's contract.
        unsafe { core::ptr::write_bytes(self.ptr(&r, 0, len), 0, len) };
        Ok(r)
    }

    fn len(&self, region: &Region) -> usize {
        region.len
    }

    fn iova(&self, region: &Region, offset: usize) -> u64 {
        // The region is physically contiguous: the root allocated it so.
        self.phys + (region.off + offset) as u64
    }

    fn read(&self, region: &Region, offset: usize, out: &mut [u8]) {
        if offset + out.len() > region.len {
            return;
        }
        let p = self.ptr(region, offset, out.len());
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside the region (checked above); volatile, since the device
            // writes this memory behind the compiler's back.
            *b = unsafe { core::ptr::read_volatile(p.add(i)) };
        }
    }

    fn write(&self, region: &Region, offset: usize, data: &[u8]) {
        if offset + data.len() > region.len {
            return;
        }
        let p = self.ptr(region, offset, data.len());
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile(p.add(i), *b) };
        }
    }
}

/// Milliseconds from the TSC; a wait's turn sleeps on the interrupt semaphore (at most
/// a millisecond, so a lost interrupt costs latency, never a hang).
#[derive(Debug)]
pub struct TscClock {
    khz: u64,
    irq: Option<u64>,
    /// Sleeps an interrupt ended.
    pub woken: core::sync::atomic::AtomicU64,
    /// Sleeps that ran to their deadline.
    pub timed_out: core::sync::atomic::AtomicU64,
}

impl TscClock {
    /// A clock at `khz` that sleeps on semaphore `irq` between polls.
    pub fn new(khz: u64, irq: Option<u64>) -> TscClock {
        TscClock {
            khz: khz.max(1),
            irq,
            woken: core::sync::atomic::AtomicU64::new(0),
            timed_out: core::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Clock for TscClock {
    fn now_ms(&self) -> u64 {
        hc::rdtsc() / self.khz
    }

    fn relax(&self) {
        match self.irq {
            Some(sm) => {
                let n = match hc::sm_down(sm, false, hc::rdtsc() + self.khz) {
                    Ok(()) => &self.woken,
                    Err(_) => &self.timed_out,
                };
                n.fetch_add(1, Ordering::Relaxed);
            }
            None => core::hint::spin_loop(),
        }
    }
}

/// Reads a dword of the configuration page.
fn cfg_read(dev: &DeviceInfo, off: u64) -> u32 {
    // SAFETY: the root maps the function's 4 KiB configuration page at `config`;
    // `off` is a dword offset below 4096.
    unsafe { core::ptr::read_volatile((dev.config + (off & 0xffc)) as *const u32) }
}

/// Writes a dword of the configuration page.
fn cfg_write(dev: &DeviceInfo, off: u64, v: u32) {
    // SAFETY: as in `cfg_read`.
    unsafe { core::ptr::write_volatile((dev.config + (off & 0xffc)) as *mut u32, v) }
}

/// Turns on memory decoding and bus mastering (PCI command register bits 1 and 2).
pub fn enable_bus_master(dev: &DeviceInfo) {
    let v = cfg_read(dev, 4);
    cfg_write(dev, 4, (v & 0xffff) | 0x6);
}

/// Routes the first GSI semaphore to `cpu` and programs MSI-X table entry 0 with the
/// message the kernel answers; returns the semaphore.
pub fn enable_msix(dev: &DeviceInfo, cpu: u64) -> Result<u64, &'static str> {
    if dev.gsi_count == 0 {
        return Err("no interrupt semaphore");
    }
    // Walk the capability list for MSI-X (id 0x11), at most 48 entries.
    let mut ptr = (cfg_read(dev, 0x34) & 0xfc) as u64;
    let mut cap = None;
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let w = cfg_read(dev, ptr);
        if w & 0xff == 0x11 {
            cap = Some(ptr);
            break;
        }
        ptr = ((w >> 8) & 0xfc) as u64;
    }
    let cap = cap.ok_or("no MSI-X capability")?;
    let table = cfg_read(dev, cap + 4);
    let bar = dev.bars.get((table & 7) as usize).ok_or("bad MSI-X BAR")?;
    let off = (table & !7) as u64;
    if bar.kind != bar_kind::MEM || off + 16 > bar.size {
        return Err("the MSI-X table is not in a mapped BAR");
    }
    let r = hc::assign_gsi(dev.gsi_sel, cpu, 0).map_err(|_| "assign_gsi failed")?;
    let entry = bar.addr + off;
    // SAFETY: entry 0 of the MSI-X table, inside the BAR the root mapped (checked
    // above): message address low/high, data, vector control (0: unmasked).
    unsafe {
        core::ptr::write_volatile(entry as *mut u32, msi_address(r));
        core::ptr::write_volatile((entry + 4) as *mut u32, 0);
        core::ptr::write_volatile((entry + 8) as *mut u32, msi_data(r));
        core::ptr::write_volatile((entry + 12) as *mut u32, 0);
    }
    // Message control (upper half of the first dword): enable (bit 15), function mask
    // off (bit 14).
    let w = cfg_read(dev, cap);
    cfg_write(dev, cap, (w & !(1 << 30)) | (1 << 31));
    Ok(dev.gsi_sel)
}
