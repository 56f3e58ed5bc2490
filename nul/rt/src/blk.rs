//! Disk sessions as the root sets them up between a VMM (`blk=BINDING`) and the disk
//! component (`role=disk`): the wire protocol is `peregrine-blkproto`'s; this module
//! holds where each side finds its end.
//!
//! For each session the root
//! - allocates the **ring region** and maps it read-write into both: in the VMM at
//!   [`VMM_RING_ADDR`], in the disk component at [`SERVICE_RING_ADDR`]` + i *
//!   `[`RING_STRIDE`];
//! - maps the VMM's guest-RAM pool (the session's **data area**: a descriptor's buffer
//!   offset is a guest-physical address) read-write into the disk component at
//!   [`SERVICE_DATA_ADDR`]` + i * `[`DATA_STRIDE`], so the NVMe controller moves data
//!   straight into guest memory;
//! - gives the VMM the disk component's **wake** semaphore with the UP permission only
//!   at [`VMM_DOORBELL_SEL`] (the doorbell; the same semaphore carries the disk's
//!   interrupts, so one wait serves both), and a fresh **completion** semaphore at
//!   [`VMM_COMPLETION_SEL`] (DOWN) and in the disk component at
//!   [`SessionSlot::completion_sel`] (UP);
//! - fills slot `i` of the disk component's read-only **sessions page** at
//!   [`SESSIONS_ADDR`] (last of all its `state`), then ups the wake semaphore.
//!
//! The binding comes from the root's configuration, never from the VMM.

use core::sync::atomic::{AtomicU64, Ordering};

/// The disk component's sessions page (read-only).
pub const SESSIONS_ADDR: u64 = 0x7fff_ffff_8000;
/// Where the disk component finds session `i`'s ring region: `+ i * RING_STRIDE`.
pub const SERVICE_RING_ADDR: u64 = 0x3a00_0000_0000;
/// Address space per ring region.
pub const RING_STRIDE: u64 = 0x100_0000;
/// Where the disk component finds session `i`'s data area: `+ i * DATA_STRIDE`.
pub const SERVICE_DATA_ADDR: u64 = 0x4000_0000_0000;
/// Address space per data area.
pub const DATA_STRIDE: u64 = 0x10_0000_0000;
/// Where a VMM finds its session's ring region.
pub const VMM_RING_ADDR: u64 = 0x3a00_0000_0000;
/// A VMM's doorbell (the disk component's wake semaphore, UP only).
pub const VMM_DOORBELL_SEL: u64 = 0x7f0;
/// A VMM's completion semaphore (DOWN).
pub const VMM_COMPLETION_SEL: u64 = 0x7f1;
/// Sessions the disk component serves at most.
pub const MAX_SESSIONS: usize = 16;
/// Slots per ring.
pub const RING_ENTRIES: u32 = 128;
/// Bytes of a binding string.
pub const BINDING_MAX: usize = 120;

/// [`SessionSlot::state`]: unused.
pub const SLOT_EMPTY: u64 = 0;
/// [`SessionSlot::state`]: set up by the root, to be opened by the service.
pub const SLOT_READY: u64 = 1;
/// [`SessionSlot::state`] written by the root: close the session (the VMM is gone).
pub const SLOT_CLOSING: u64 = 2;
/// [`SessionSlot::state`] written by the service: closed, nothing in flight; the root
/// may take the memory back.
pub const SLOT_CLOSED: u64 = 3;

/// One session as the disk component sees it.
#[repr(C)]
#[derive(Debug)]
pub struct SessionSlot {
    /// [`SLOT_EMPTY`] or [`SLOT_READY`]; the root stores it (release) after the rest.
    pub state: AtomicU64,
    /// Where the ring region is mapped.
    pub ring: u64,
    /// Its size in bytes.
    pub ring_bytes: u64,
    /// Slots per ring.
    pub entries: u64,
    /// Where the data area is mapped.
    pub data: u64,
    /// Its size in bytes.
    pub data_len: u64,
    /// The completion semaphore (UP).
    pub completion_sel: u64,
    /// Which VMM (the root's component id, for messages).
    pub client: u64,
    /// Length of the binding string.
    pub binding_len: u64,
    /// The binding (`peregrine_blkproto::Binding` syntax, one word: `part=2`,
    /// `part=name:NAME`, `range=FIRST+COUNT`).
    pub binding: [u8; BINDING_MAX],
}

const _: () = assert!(core::mem::size_of::<SessionSlot>() * MAX_SESSIONS <= 4096);

impl SessionSlot {
    /// The binding string.
    pub fn binding(&self) -> &str {
        let n = (self.binding_len as usize).min(BINDING_MAX);
        core::str::from_utf8(&self.binding[..n]).unwrap_or("")
    }

    /// Whether the root has set it up.
    pub fn ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == SLOT_READY
    }
}

/// The sessions page.
///
/// # Safety
/// Only in the disk component, whose root maps the page at [`SESSIONS_ADDR`] (with
/// `role=disk` in its arguments) for its lifetime.
pub unsafe fn sessions() -> &'static [SessionSlot; MAX_SESSIONS] {
    // SAFETY: the caller's contract; the slots are plain integers and atomics.
    unsafe { &*(SESSIONS_ADDR as *const [SessionSlot; MAX_SESSIONS]) }
}
