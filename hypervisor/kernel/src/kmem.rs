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
