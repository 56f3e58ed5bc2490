//! NVMe logic that needs no hardware: controller registers ([`regs`]), submission and
//! completion queues ([`queue`]), command builders and Identify parsers ([`cmd`]), PRP
//! construction ([`prp`]) and a synchronous controller driver ([`Controller`]) over three
//! injected traits: [`Mmio`] (the register window), [`Dma`] (device-visible memory) and
//! [`Clock`] (milliseconds, so every wait has a deadline and nothing hangs).
//!
//! Everything read from the device (registers, completion entries, Identify data) is
//! treated as untrusted: bad values become [`Error`]s, never panics.
//!
//! Host page size is 4 KiB (CC.MPS = 0); a controller whose CAP.MPSMIN is larger is
//! reported as unsupported.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod cmd;
pub mod controller;
pub mod error;
pub mod prp;
pub mod queue;
pub mod regs;

pub use controller::{Config, Controller, Namespace};
pub use error::{DeviceError, Error, Status, StatusKind, Unsupported, Wait};

/// The memory page size the driver programs (CC.MPS = 0): 4 KiB.
pub const PAGE_SIZE: usize = 4096;

/// The controller's register window (BAR0), accessed by byte offset.
///
/// The bare-metal implementation does volatile accesses on the mapped BAR; the host
/// tests implement it with a simulated controller.
pub trait Mmio {
    /// Reads the 32-bit register at byte offset `off`.
    fn read32(&self, off: usize) -> u32;
    /// Writes the 32-bit register at byte offset `off`.
    fn write32(&self, off: usize, value: u32);
    /// Reads the 64-bit register at `off` (by default two 32-bit reads, low half first).
    fn read64(&self, off: usize) -> u64 {
        let lo = self.read32(off) as u64;
        let hi = self.read32(off + 4) as u64;
        lo | (hi << 32)
    }
    /// Writes the 64-bit register at `off` (by default two 32-bit writes, low half first).
    fn write64(&self, off: usize, value: u64) {
        self.write32(off, value as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }
}

/// Device-visible (DMA) memory.
///
/// A region is zeroed on allocation, starts on a page boundary and its device addresses
/// are contiguous within each 4 KiB page; the queue memory the driver allocates (at most
/// what [`Dma::alloc`] returns for one queue) must also be contiguous as a whole (the
/// queues are created physically contiguous, PC = 1). Data buffers handed to
/// [`Controller::read`]/[`Controller::write`] may be scattered page by page.
///
/// Accesses go through the trait (no references into device memory are handed out), so
/// the bare-metal implementation can use volatile copies and the host tests a `Vec`.
pub trait Dma {
    /// One allocation; freeing it is the implementation's business (e.g. on drop).
    type Region;
    /// Allocates `len` bytes (rounded up to whole pages), zeroed, page-aligned.
    fn alloc(&self, len: usize) -> Result<Self::Region, Error>;
    /// The region's length in bytes.
    fn len(&self, region: &Self::Region) -> usize;
    /// The device address of byte `offset` of `region` (`offset < len`).
    fn iova(&self, region: &Self::Region, offset: usize) -> u64;
    /// Copies `out.len()` bytes from `region` at `offset` into `out`.
    fn read(&self, region: &Self::Region, offset: usize, out: &mut [u8]);
    /// Copies `data` into `region` at `offset`.
    fn write(&self, region: &Self::Region, offset: usize, data: &[u8]);
}

/// A monotonic millisecond clock, the base of every timeout.
pub trait Clock {
    /// Milliseconds since some fixed point.
    fn now_ms(&self) -> u64;
    /// Called on every turn of a busy-wait loop (a pause instruction, a yield).
    fn relax(&self) {}
}
