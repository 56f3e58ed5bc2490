//! PCI: the root finds the ECAM windows in the ACPI MCFG (`acpi` crate), walks the
//! buses from bus 0 through PCI-to-PCI bridges, and reads each function's header,
//! BARs and capabilities with `pci_types`. Configuration pages are taken from the
//! kernel PD into the root's window as the walk reaches them.

use alloc::vec::Vec;
use core::ptr::NonNull;

use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use nul_rt::sync::Mutex;
use nul_rt::{hc, println, sel};
use pci_types::capability::PciCapability;
use pci_types::{
    Bar, ConfigRegionAccess, EndpointHeader, HeaderType, PciAddress, PciHeader, PciPciBridgeHeader,
};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, XferFlags, PAGE_BITS};

use crate::mem::{self, WINDOW};

/// Takes physical pages `[phys, phys + len)` from the kernel PD into the root's window
/// (pages the root holds already stay as they are).
fn take(phys: u64, len: u64) {
    let first = phys >> PAGE_BITS;
    let end = (phys + len.max(1)).div_ceil(1 << PAGE_BITS);
    for p in first..end {
        let _ = hc::pd_delegate(
            peregrine_abi::sel::KERN_PD,
            sel::OWN_PD,
            Crd::mem(p, 0, MemPerm::R | MemPerm::W),
            Crd::mem(p + (WINDOW >> PAGE_BITS), 0, MemPerm::R | MemPerm::W),
            0,
            XferFlags::empty(),
        );
    }
}

/// Maps ACPI tables through the root's window, taking their pages from the kernel PD.
#[derive(Debug, Clone, Copy)]
struct WindowHandler;

impl AcpiHandler for WindowHandler {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        take(phys as u64, size as u64);
        let virt = NonNull::new(mem::virt(phys as u64) as *mut T).unwrap_or(NonNull::dangling());
        // SAFETY: the pages are in the window now (ACPI tables are in the kernel PD's
        // memory); the window mapping is never undone, so unmapping is a no-op.
        unsafe { PhysicalMapping::new(phys, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// One ECAM window: segment, buses and physical base (of bus `bus_start`).
#[derive(Debug, Clone, Copy)]
struct Ecam {
    segment: u16,
    bus_start: u8,
    bus_end: u8,
    base: u64,
}

/// Configuration access through the ECAM windows, mapped in the root's window.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a>(&'a [Ecam]);

impl Access<'_> {
    /// The physical address of a function's configuration page.
    fn page(&self, a: PciAddress) -> Option<u64> {
        self.0
            .iter()
            .find(|e| e.segment == a.segment() && (e.bus_start..=e.bus_end).contains(&a.bus()))
            .map(|e| {
                e.base
                    + ((u64::from(a.bus() - e.bus_start) << 20)
                        | (u64::from(a.device()) << 15)
                        | (u64::from(a.function()) << 12))
            })
    }
}

impl ConfigRegionAccess for Access<'_> {
    unsafe fn read(&self, address: PciAddress, offset: u16) -> u32 {
        match self.page(address) {
            Some(p) if offset < 4096 => {
                take(p, 4096);
                // SAFETY: the configuration page is in the window (uncacheable device
                // memory); `offset` is inside it and dword-aligned by the callers.
                unsafe {
                    core::ptr::read_volatile((mem::virt(p) + (offset & !3) as u64) as *const u32)
                }
            }
            _ => u32::MAX,
        }
    }

    unsafe fn write(&self, address: PciAddress, offset: u16, value: u32) {
        if let Some(p) = self.page(address).filter(|_| offset < 4096) {
            take(p, 4096);
            // SAFETY: as in `read`.
            unsafe {
                core::ptr::write_volatile((mem::virt(p) + (offset & !3) as u64) as *mut u32, value)
            }
        }
    }
}

/// A function found on the bus.
#[derive(Debug, Clone)]
pub struct Function {
    /// Its address.
    pub addr: PciAddress,
    /// Vendor and device id.
    pub id: (u16, u16),
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// Physical address of its configuration page.
    pub config: u64,
    /// BAR slots (a 64-bit BAR in its first slot).
    pub bars: [Option<Bar>; 6],
    /// The sizes of its I/O BARs (by slot; 0 for the others).
    pub io_sizes: [u32; 6],
    /// MSI-X table size, if it has the capability.
    pub msix: Option<u16>,
    /// Whether it has an MSI capability.
    pub msi: bool,
    /// Its interrupt line (the firmware's routing; 0xff: none) and pin (0: none).
    pub irq: (u8, u8),
}

impl Function {
    /// `seg:bus:dev.fn` packed as the device page's `bdf` word.
    pub fn bdf(&self) -> u64 {
        (u64::from(self.addr.segment()) << 16)
            | (u64::from(self.addr.bus()) << 8)
            | (u64::from(self.addr.device()) << 3)
            | u64::from(self.addr.function())
    }

    /// Whether `sel` (a `pci=` argument) names it: a class name (`nvme`, `ahci`), a
    /// `class:subclass[:interface]` in hex, or `bus:dev.fn` in hex.
    pub fn matches(&self, sel: &str) -> bool {
        let (c, s, i) = self.class;
        match sel {
            "nvme" => (c, s, i) == (1, 8, 2),
            "ahci" => (c, s, i) == (1, 6, 1),
            _ => {
                if let Some((bus, df)) = sel.split_once(':').filter(|(_, r)| r.contains('.')) {
                    let (d, f) = df.split_once('.').unwrap_or(("", ""));
                    let n = |x: &str| u8::from_str_radix(x, 16).ok();
                    return (n(bus), n(d), n(f))
                        == (
                            Some(self.addr.bus()),
                            Some(self.addr.device()),
                            Some(self.addr.function()),
                        );
                }
                let parts: Vec<Option<u8>> = sel
                    .split(':')
                    .map(|x| u8::from_str_radix(x, 16).ok())
                    .collect();
                match parts.as_slice() {
                    [Some(a), Some(b)] => (*a, *b) == (c, s),
                    [Some(a), Some(b), Some(d)] => (*a, *b, *d) == (c, s, i),
                    _ => false,
                }
            }
        }
    }
}

static ECAMS: Mutex<Vec<Ecam>> = Mutex::new(Vec::new());
static FUNCTIONS: Mutex<Vec<Function>> = Mutex::new(Vec::new());
/// Functions already given to a driver (by `bdf`).
static GIVEN: Mutex<Vec<u64>> = Mutex::new(Vec::new());

static RSDP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static WALKED: spin::Once<usize> = spin::Once::new();

/// Records where the ACPI tables start (boot); the walk waits for the first driver.
pub fn set_rsdp(rsdp: u64) {
    RSDP.store(rsdp, core::sync::atomic::Ordering::Relaxed);
}

/// Reads the MCFG and walks the buses (once, when the first driver asks). Returns the
/// number of functions.
fn init() -> usize {
    let rsdp = RSDP.load(core::sync::atomic::Ordering::Relaxed);
    if rsdp == 0 {
        println!("PCI: no ACPI RSDP");
        return 0;
    }
    // SAFETY: the RSDP address comes from the kernel, which found and checked it; the
    // handler maps what the tables name.
    let tables = match unsafe { AcpiTables::from_rsdp(WindowHandler, rsdp as usize) } {
        Ok(t) => t,
        Err(e) => {
            println!("PCI: ACPI tables unreadable: {:?}", e);
            return 0;
        }
    };
    let ecams: Vec<Ecam> = match tables.find_table::<Mcfg>() {
        Ok(m) => m
            .entries()
            .iter()
            .map(|e| Ecam {
                segment: e.pci_segment_group,
                bus_start: e.bus_number_start,
                bus_end: e.bus_number_end,
                base: e.base_address,
            })
            .collect(),
        Err(_) => {
            println!("PCI: no MCFG (no ECAM); no PCI devices for drivers");
            return 0;
        }
    };
    *ECAMS.lock() = ecams.clone();
    let mut found = Vec::new();
    let acc = Access(&ecams);
    for e in &ecams {
        if e.bus_start == 0 {
            scan_bus(acc, e.segment, 0, &mut found, 0);
        }
    }
    for f in &found {
        println!(
            "PCI {:02x}:{:02x}.{} {:04x}:{:04x} class {:02x}{:02x}{:02x}{}{} pin {} line {}",
            f.addr.bus(),
            f.addr.device(),
            f.addr.function(),
            f.id.0,
            f.id.1,
            f.class.0,
            f.class.1,
            f.class.2,
            f.msix
                .map_or(alloc::string::String::new(), |n| alloc::format!(
                    " MSI-X({})",
                    n
                )),
            if f.msi { " MSI" } else { "" },
            f.irq.1,
            f.irq.0
        );
    }
    let n = found.len();
    *FUNCTIONS.lock() = found;
    n
}

/// Walks bus `bus` (and the buses behind its bridges, at most 8 deep).
fn scan_bus(acc: Access<'_>, seg: u16, bus: u8, out: &mut Vec<Function>, depth: u32) {
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let addr = PciAddress::new(seg, bus, dev, func);
            let h = PciHeader::new(addr);
            let (vendor, device) = h.id(acc);
            if vendor == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            let (_, class, sub, pi) = h.revision_and_class(acc);
            let multi = h.has_multiple_functions(acc);
            match h.header_type(acc) {
                HeaderType::Endpoint => {
                    if let Some(f) = endpoint(acc, h, (vendor, device), (class, sub, pi)) {
                        out.push(f);
                    }
                }
                HeaderType::PciPciBridge if depth < 8 => {
                    if let Some(b) = PciPciBridgeHeader::from_header(h, acc) {
                        let next = b.secondary_bus_number(acc);
                        if next > bus {
                            scan_bus(acc, seg, next, out, depth + 1);
                        }
                    }
                }
                _ => {}
            }
            if func == 0 && !multi {
                break;
            }
        }
    }
}

/// Reads an endpoint's BARs and capabilities.
fn endpoint(
    acc: Access<'_>,
    h: PciHeader,
    id: (u16, u16),
    class: (u8, u8, u8),
) -> Option<Function> {
    let addr = h.address();
    let config = acc.page(addr)?;
    let mut e = EndpointHeader::from_header(h, acc)?;
    // Sizing a BAR writes it: decoding is off meanwhile (the firmware assigned the
    // addresses; they are written back unchanged).
    let cmd = e.command(acc);
    e.update_command(acc, |c| {
        c - (pci_types::CommandRegister::MEMORY_ENABLE | pci_types::CommandRegister::IO_ENABLE)
    });
    let mut bars = [None; 6];
    let mut io_sizes = [0u32; 6];
    let mut slot = 0u8;
    while slot < 6 {
        let b = e.bar(slot, acc);
        bars[slot as usize] = b;
        if matches!(b, Some(Bar::Io { .. })) {
            // `pci_types` gives an I/O BAR's port but not its size: all ones written,
            // the size is what stays zero (bits 0-1 are flags), then the port back.
            let off = 0x10 + 4 * u16::from(slot);
            // SAFETY: configuration accesses to this function's own BAR, with
            // decoding off; the original value goes back at once.
            let probe = unsafe {
                let orig = acc.read(addr, off);
                acc.write(addr, off, u32::MAX);
                let v = acc.read(addr, off);
                acc.write(addr, off, orig);
                v
            };
            io_sizes[slot as usize] = (!(probe & 0xffff_fffc)).wrapping_add(1) & 0xffff;
        }
        slot += if matches!(b, Some(Bar::Memory64 { .. })) {
            2
        } else {
            1
        };
    }
    e.update_command(acc, |_| cmd);
    let mut msix = None;
    let mut msi = false;
    for c in e.capabilities(acc) {
        match c {
            PciCapability::MsiX(m) => msix = Some(m.table_size()),
            PciCapability::Msi(_) => msi = true,
            _ => {}
        }
    }
    let (pin, line) = e.interrupt(acc);
    Some(Function {
        addr,
        id,
        class,
        config,
        bars,
        io_sizes,
        msix,
        msi,
        irq: (line, pin),
    })
}

/// The first function `sel` names that no driver has yet; marks it given.
pub fn claim(sel: &str) -> Option<Function> {
    WALKED.call_once(init);
    let fns = FUNCTIONS.lock();
    let mut given = GIVEN.lock();
    let f = fns
        .iter()
        .find(|f| f.matches(sel) && !given.contains(&f.bdf()))?
        .clone();
    given.push(f.bdf());
    Some(f)
}
