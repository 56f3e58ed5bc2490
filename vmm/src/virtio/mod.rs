//! virtio 1.x devices (OASIS "Virtual I/O Device (VIRTIO) Version 1.2", cited as
//! "virtio §n" below): split virtqueues in guest memory ([`queue`]), the modern PCI
//! transport ([`pci`]), and the devices behind it ([`console`], [`block`]; the block
//! device for a backend that finishes later, [`async_block`], and that backend on a
//! disk-service session, [`session`]).
//!
//! A device is a [`VirtioDevice`]: it names its type, queues, features and
//! configuration space, and handles a queue when the transport tells it the driver
//! added buffers. Everything the driver wrote into guest memory is checked; a driver
//! that breaks the rules gets its device marked DEVICE_NEEDS_RESET (virtio §2.1.2),
//! never a panic or an endless loop in the VMM.

pub mod async_block;
pub mod block;
pub mod console;
pub mod pci;
pub mod queue;
pub mod session;

use core::fmt;

use crate::vcpu::{GuestMemory, Unbacked};
pub use queue::{Descriptor, DescriptorChain, Queue, QueueError};

/// Device status bits (virtio §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Device-independent feature bits (virtio §6).
pub mod feature {
    /// Indirect descriptors (virtio §2.7.5.3).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression (virtio §2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// The modern (1.x) interface; a driver that does not accept it is refused.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device type IDs (virtio §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
}

/// Why a device stopped: the driver broke a rule, or guest memory is not where it said.
/// The doc comment of each variant is its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioError {
    /// The virtqueue in guest memory is malformed.
    Queue(QueueError),
    /// A request's buffers do not have the shape the device type requires.
    BadRequest(&'static str),
}

impl From<QueueError> for VirtioError {
    fn from(e: QueueError) -> Self {
        VirtioError::Queue(e)
    }
}

impl From<Unbacked> for VirtioError {
    fn from(e: Unbacked) -> Self {
        VirtioError::Queue(QueueError::Unbacked(e.gpa))
    }
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtioError::Queue(e) => write!(f, "virtqueue: {e}"),
            VirtioError::BadRequest(what) => write!(f, "malformed request: {what}"),
        }
    }
}

/// A virtio device model, independent of the transport.
///
/// The transport owns the queues and guest memory and calls [`process`](Self::process)
/// when the driver notifies a queue (or the VMM says the device has new input); the
/// device pops chains, does the work and pushes them to the used ring. An `Err` marks
/// the device DEVICE_NEEDS_RESET until the driver resets it.
pub trait VirtioDevice: Send {
    /// The device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; their count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific features offered (the transport adds [`feature::VERSION_1`] and
    /// the ring features it implements).
    fn features(&self) -> u64;
    /// Reads the device configuration space (any offset, any length: out of range
    /// reads zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most fields are read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK having accepted `features`.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device: forget per-driver state.
    fn reset(&mut self) {}
    /// Handles queue `index` of `queues`; returns whether buffers were used (the
    /// transport then decides whether to interrupt the driver).
    fn process(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError>;
}

/// A boxed device model (the PC's disk slot takes any block device this way).
impl<D: VirtioDevice + ?Sized> VirtioDevice for alloc::boxed::Box<D> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&mut self, features: u64) {
        (**self).activate(features)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn process(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError> {
        (**self).process(index, queues, mem)
    }
}
