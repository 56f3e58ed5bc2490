//! Giving a driver component its PCI function (module argument `pci=`, with `msi=N`
//! message-signalled interrupts and `dma=KiB` of DMA memory): what it gets is
//! described in `nul_rt::device`, and nothing else of the machine's devices.

use core::sync::atomic::{AtomicU64, Ordering};

use nul_rt::device::{self, bar_kind, DeviceInfo};
use nul_rt::{hc, sel};
use pci_types::Bar;
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::{Crd, Status, XferFlags, PAGE_BITS};

use crate::component::{give_page, map_range, StartError};
use crate::mem::{self, aligned_pieces, WINDOW};
use crate::pci::Function;

/// What the boot configuration grants a driver.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The function.
    pub func: Function,
    /// Message-signalled GSIs to give.
    pub msi: u64,
    /// Pages of DMA memory.
    pub dma_pages: u64,
}

/// The next message-signalled GSI no driver has (from the HIP's `msi_gsi_base`).
static NEXT_MSI: AtomicU64 = AtomicU64::new(0);
/// One past the last message-signalled GSI.
static END_MSI: AtomicU64 = AtomicU64::new(0);

/// Records the message-signalled GSIs (boot).
pub fn init(msi_base: u64, num_gsi: u64) {
    NEXT_MSI.store(msi_base, Ordering::Relaxed);
    END_MSI.store(num_gsi, Ordering::Relaxed);
}

/// Takes device memory `[phys, phys + pages pages)` from the kernel PD into the window.
fn take_device(phys_page: u64, pages: u64) -> Result<(), Status> {
    for (p, order) in aligned_pieces(phys_page, pages) {
        let r = hc::pd_delegate(
            peregrine_abi::sel::KERN_PD,
            sel::OWN_PD,
            Crd::mem(p, order, MemPerm::R | MemPerm::W),
            Crd::mem(p + (WINDOW >> PAGE_BITS), order, MemPerm::R | MemPerm::W),
            0,
            XferFlags::empty(),
        );
        // Already in the window (taken before) is fine; the lookup below decides.
        let _ = r;
        if hc::lookup_phys(Crd::mem(p + (WINDOW >> PAGE_BITS), 0, MemPerm::R)) != Ok(p << PAGE_BITS)
        {
            return Err(Status::BadDevice);
        }
    }
    Ok(())
}

/// Maps the function's configuration page, BARs, GSIs and DMA memory into `pd` and
/// fills its device page. Root memory it allocates goes into `ranges`. Returns the
/// root's copy of the driver's wake semaphore (at `GSI_SEL` in the driver): the first
/// MSI's, or without MSIs a plain semaphore.
pub fn grant(
    pd: u64,
    g: &Grant,
    ranges: &mut alloc::vec::Vec<(u64, u64)>,
) -> Result<u64, StartError> {
    let f = &g.func;
    let page = give_page(pd, device::DEVICE_INFO_ADDR, MemPerm::R, ranges)?;
    let mut info = DeviceInfo {
        magic: device::MAGIC,
        bdf: f.bdf(),
        id: u32::from(f.id.0) | u32::from(f.id.1) << 16,
        class: u32::from(f.class.0) << 16 | u32::from(f.class.1) << 8 | u32::from(f.class.2),
        config: device::CONFIG_ADDR,
        bars: [device::Bar::default(); 6],
        gsi_sel: device::GSI_SEL,
        gsi_count: 0,
        gsi_base: 0,
        pin_sel: 0,
        dma: 0,
        dma_phys: 0,
        dma_size: 0,
    };
    take_device(f.config >> PAGE_BITS, 1)?;
    map_range(
        pd,
        device::CONFIG_ADDR,
        f.config,
        1,
        MemPerm::R | MemPerm::W,
    )?;
    for (i, b) in f.bars.iter().enumerate() {
        let (phys, size, pf) = match *b {
            Some(Bar::Memory32 {
                address,
                size,
                prefetchable,
            }) => (u64::from(address), u64::from(size), prefetchable),
            Some(Bar::Memory64 {
                address,
                size,
                prefetchable,
            }) => (address, size, prefetchable),
            Some(Bar::Io { port }) => {
                // Its ports, delegated at their own numbers (the root holds them all).
                let size = u64::from(f.io_sizes[i]);
                if port == 0 || size == 0 || u64::from(port) + size > 0x1_0000 {
                    continue;
                }
                for (p, order) in aligned_pieces(u64::from(port), size) {
                    hc::pd_delegate(
                        sel::OWN_PD,
                        pd,
                        Crd::pio(p, order),
                        Crd::pio(p, order),
                        0,
                        XferFlags::empty(),
                    )?;
                }
                info.bars[i] = device::Bar {
                    addr: u64::from(port),
                    phys: u64::from(port),
                    size,
                    kind: bar_kind::IO,
                    prefetchable: 0,
                };
                continue;
            }
            None => continue,
        };
        if phys == 0 || size == 0 {
            continue;
        }
        // A BAR smaller than a page shares its page with whatever else decodes there.
        let first = phys >> PAGE_BITS;
        let pages = (phys + size).div_ceil(1 << PAGE_BITS) - first;
        take_device(first, pages)?;
        let at = device::BAR_ADDR + i as u64 * device::BAR_STRIDE;
        map_range(pd, at, first << PAGE_BITS, pages, MemPerm::R | MemPerm::W)?;
        info.bars[i] = device::Bar {
            addr: at + (phys & ((1 << PAGE_BITS) - 1)),
            phys,
            size,
            kind: bar_kind::MEM,
            prefetchable: pf as u32,
        };
    }
    let mut wake = 0;
    if g.msi > 0 {
        let base = NEXT_MSI.fetch_add(g.msi, Ordering::Relaxed);
        if base + g.msi > END_MSI.load(Ordering::Relaxed) {
            return Err(StartError::Kernel(Status::BadDevice));
        }
        for i in 0..g.msi {
            let s = sel::alloc();
            hc::pd_delegate(
                peregrine_abi::sel::KERN_PD,
                sel::OWN_PD,
                Crd::obj(peregrine_abi::sel::GSI_SM_BASE + base + i, 0, perm::ALL),
                Crd::obj(s, 0, perm::ALL),
                0,
                XferFlags::empty(),
            )?;
            if i == 0 {
                wake = s;
            }
            hc::pd_delegate(
                sel::OWN_PD,
                pd,
                Crd::obj(s, 0, perm::ALL),
                Crd::obj(device::GSI_SEL + i, 0, perm::ALL),
                0,
                XferFlags::empty(),
            )?;
        }
        info.gsi_count = g.msi;
        info.gsi_base = base;
    } else {
        wake = sel::alloc();
        hc::create_sm(wake, sel::OWN_PD, 0)?;
        hc::pd_delegate(
            sel::OWN_PD,
            pd,
            Crd::obj(wake, 0, perm::ALL),
            Crd::obj(device::GSI_SEL, 0, perm::ALL),
            0,
            XferFlags::empty(),
        )?;
    }
    if g.dma_pages > 0 {
        let phys = mem::alloc(g.dma_pages).ok_or(StartError::NoMemory)?;
        ranges.push((phys, g.dma_pages));
        // SAFETY: fresh pages of the root's window, ours until delegated below.
        unsafe {
            core::ptr::write_bytes(
                mem::virt(phys) as *mut u8,
                0,
                (g.dma_pages << PAGE_BITS) as usize,
            )
        };
        map_range(
            pd,
            device::DMA_ADDR,
            phys,
            g.dma_pages,
            MemPerm::R | MemPerm::W,
        )?;
        info.dma = device::DMA_ADDR;
        info.dma_phys = phys;
        info.dma_size = g.dma_pages << PAGE_BITS;
    }
    // SAFETY: `page` is the fresh page of the root's window given above; DeviceInfo is
    // plain integers and fits in it.
    unsafe { core::ptr::write(mem::virt(page) as *mut DeviceInfo, info) };
    Ok(wake)
}
