//! Kernel memory charged to protection domains.
//!
//! Every page the kernel allocates on behalf of a PD — page tables, UTCBs, object
//! memory — is charged to that PD's quota first, so no component can exhaust the
//! kernel: the answer is `OutOfMemory` for that PD only.

use alloc::sync::Arc;

use peregrine_abi::Status;

use crate::pd::Pd;

/// Converts a physical address into its direct-map (physmap) address.
pub fn phys_to_virt(phys: u64) -> *mut u8 {
    crate::mem::phys_to_virt(phys)
}

/// Allocates one zeroed page charged to `pd`.
pub fn alloc_frame(pd: &Pd) -> Result<u64, Status> {
    pd.quota.charge(1).map_err(|_| Status::OutOfMemory)?;
    match crate::mem::alloc_frame_zeroed() {
        Some(p) => Ok(p),
        None => {
            let _ = pd.quota.uncharge(1);
            Err(Status::OutOfMemory)
        }
    }
}

/// The layout `Arc::new` asks for: `Arc`'s heap block is a `#[repr(C)]` record of the
/// strong and weak counts and the value. (Should it ever be another, the block parked
/// for it goes back unused and the `Arc` is allocated as usual, infallibly: the boot
/// self-check counts such misses.)
fn arc_layout<T>() -> Option<core::alloc::Layout> {
    core::alloc::Layout::new::<[usize; 2]>()
        .extend(core::alloc::Layout::new::<T>())
        .ok()
        .map(|(l, _)| l.pad_to_align())
}

/// `Arc::new(v)`, or `OutOfMemory` when the heap has no room (never an abort): the
/// block is allocated first, fallibly, and handed to `Arc::new`.
pub fn try_arc<T>(v: T) -> Result<Arc<T>, Status> {
    with_block(arc_layout::<T>(), || Arc::new(v))
}

/// `Box::new(v)`, or `OutOfMemory` (see [`try_arc`]).
pub fn try_box<T>(v: T) -> Result<alloc::boxed::Box<T>, Status> {
    with_block(Some(core::alloc::Layout::new::<T>()), || {
        alloc::boxed::Box::new(v)
    })
}

/// Runs `make`, whose one allocation has `layout`, with a block of that layout parked
/// for it on this CPU; `OutOfMemory` when no block can be had.
fn with_block<R>(
    layout: Option<core::alloc::Layout>,
    make: impl FnOnce() -> R,
) -> Result<R, Status> {
    let layout = layout.ok_or(Status::OutOfMemory)?;
    crate::arch::x86::cr::without_interrupts(|| {
        if !crate::mem::heap::park(layout) {
            return Err(Status::OutOfMemory);
        }
        let r = make();
        crate::mem::heap::unpark();
        Ok(r)
    })
}

/// Frees a page charged to `pd`.
pub fn free_frame(pd: &Pd, phys: u64) {
    crate::mem::free_frame(phys);
    let _ = pd.quota.uncharge(1);
}

/// Charges `pages` of object memory to `pd` (kernel objects live on the kernel heap; a
/// PD pays a page for each object it creates, which bounds its share of the heap).
pub fn charge(pd: &Pd, pages: u64) -> Result<(), Status> {
    let n = u32::try_from(pages).map_err(|_| Status::OutOfMemory)?;
    pd.quota.charge(n).map_err(|_| Status::OutOfMemory)
}

/// Returns a charge.
pub fn uncharge(pd: &Pd, pages: u64) {
    let _ = pd.quota.uncharge(pages as u32);
}

/// Pages charged to a PD for the lifetime of an object: returned when the object goes.
///
/// The charge keeps the PD's account (the `Pd`, not its spaces, which its destruction
/// empties) alive: an object can outlive its PD's destruction (a semaphore whose
/// capability another PD holds, an SC still queued), and its pages must come back to
/// that account, which then goes back to the parent. No cycle stays: a PD's objects are
/// reached only through its capability space, which destruction empties.
pub struct Charge {
    pd: Arc<Pd>,
    pages: u32,
}

impl Charge {
    /// Charges `pages` to `pd`.
    pub fn new(pd: &Arc<Pd>, pages: u32) -> Result<Self, Status> {
        pd.quota.charge(pages).map_err(|_| Status::OutOfMemory)?;
        Ok(Charge {
            pd: pd.clone(),
            pages,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let _ = self.pd.quota.uncharge(self.pages);
    }
}
