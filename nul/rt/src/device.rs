//! What the root gives a driver component: one PCI function (module argument `pci=`),
//! described by the read-only device page at [`DEVICE_INFO_ADDR`].
//!
//! - its **configuration space**: the function's 4 KiB ECAM page, mapped read-write at
//!   [`DeviceInfo::config`] (uncacheable); the driver enables memory decoding and bus
//!   mastering and programs its MSI or MSI-X capability itself;
//! - its **memory BARs**, each mapped read-write (uncacheable) at
//!   [`DeviceInfo::bars`]`[slot].addr`; I/O BARs as I/O ports;
//! - its **interrupts**: `msi=N` message-signalled GSI semaphores at selectors
//!   [`DeviceInfo::gsi_sel`]` + i` (with the DOWN permission `assign_gsi` needs; routing
//!   one answers the MSI address and data for the device's MSI-X table or MSI
//!   capability), and its pin's GSI semaphore when the firmware routed one;
//! - **DMA memory**: `dma=KiB` of RAM at [`DeviceInfo::dma`], physically contiguous,
//!   whose device address (physical address: there is no IOMMU yet) is
//!   [`DeviceInfo::dma_phys`]; `lookup` with PHYS answers the same for any page the
//!   driver holds.

/// Where the root maps a driver's device page (read-only).
pub const DEVICE_INFO_ADDR: u64 = 0x7fff_ffff_9000;
/// Where the root maps a driver's configuration page.
pub const CONFIG_ADDR: u64 = 0x3000_0000_0000;
/// Where the root maps BAR `i`: `BAR_ADDR + i * BAR_STRIDE`.
pub const BAR_ADDR: u64 = 0x3100_0000_0000;
/// Address space set aside per BAR.
pub const BAR_STRIDE: u64 = 0x10_0000_0000;
/// Where the root maps a driver's DMA memory.
pub const DMA_ADDR: u64 = 0x3800_0000_0000;
/// The first selector of a driver's GSI semaphores; a driver without MSIs has a plain
/// semaphore there (its wake semaphore either way: disk sessions' doorbells up it).
pub const GSI_SEL: u64 = 0x800;
/// "NULDEVIC" little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"NULDEVIC");

/// Kinds of [`Bar`].
pub mod bar_kind {
    /// Absent.
    pub const NONE: u32 = 0;
    /// Memory (mapped at [`super::Bar::addr`]).
    pub const MEM: u32 = 1;
    /// I/O ports (delegated at their port numbers, [`super::Bar::addr`] is the first).
    pub const IO: u32 = 2;
}

/// One BAR as the driver sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bar {
    /// Where it is mapped in the driver (memory) or its first port (I/O).
    pub addr: u64,
    /// Its bus address (what the device decodes).
    pub phys: u64,
    /// Its size in bytes.
    pub size: u64,
    /// One of [`bar_kind`].
    pub kind: u32,
    /// 1 when prefetchable.
    pub prefetchable: u32,
}

/// The device page.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    /// [`MAGIC`].
    pub magic: u64,
    /// PCI segment, bus, device and function: `seg << 16 | bus << 8 | dev << 3 | fn`.
    pub bdf: u64,
    /// Vendor id (bits 0–15) and device id (bits 16–31).
    pub id: u32,
    /// Class code (bits 16–23), subclass (8–15), programming interface (0–7).
    pub class: u32,
    /// Where the configuration page is mapped.
    pub config: u64,
    /// BAR slots 0–5 (a 64-bit BAR fills its first slot; the second stays NONE).
    pub bars: [Bar; 6],
    /// Selector of the first message-signalled GSI semaphore.
    pub gsi_sel: u64,
    /// Number of message-signalled GSI semaphores.
    pub gsi_count: u64,
    /// The first of their GSI numbers (consecutive).
    pub gsi_base: u64,
    /// Selector of the pin's GSI semaphore (0: none).
    pub pin_sel: u64,
    /// Where the DMA memory is mapped (0: none).
    pub dma: u64,
    /// Its physical (device) address.
    pub dma_phys: u64,
    /// Its size in bytes.
    pub dma_size: u64,
}

impl DeviceInfo {
    /// The device page of the component whose start-info page is `si`, if the root
    /// mapped one: it does exactly when the arguments name `pci=`.
    pub fn get(si: &crate::start_info::StartInfo) -> Option<&'static DeviceInfo> {
        crate::start_info::arg(si.args(), "pci")?;
        // SAFETY: with `pci=` in its arguments, the root mapped the (read-only) device
        // page at DEVICE_INFO_ADDR for the component's lifetime before starting it;
        // DeviceInfo is plain integers.
        let d = unsafe { &*(DEVICE_INFO_ADDR as *const DeviceInfo) };
        (d.magic == MAGIC).then_some(d)
    }
}

const _: () = assert!(core::mem::size_of::<DeviceInfo>() <= 4096);
