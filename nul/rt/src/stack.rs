//! Stacks with a guard page: the page below the stack is taken out of the component's
//! own address space (`revoke` of its own mapping), so running off the stack's end is
//! a page fault at a known address, never a silent write into whatever lies below.

use core::alloc::Layout;
use core::ops::Range;

use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, Status};

use crate::hc;

/// Bytes of a page, and of the guard.
pub const PAGE: usize = 4096;

/// A stack above an unmapped guard page, leaked for the component's lifetime.
pub struct GuardedStack {
    /// The stack's lowest byte (the guard page lies just below).
    base: u64,
    /// The stack's bytes, a whole number of pages.
    size: usize,
}

/// The CRD of the page holding `addr`.
fn page_crd(addr: u64) -> Crd {
    Crd::mem(addr / PAGE as u64, 0, MemPerm::all())
}

impl GuardedStack {
    /// `size` bytes (rounded up to whole pages) filled with `fill`, above a guard page
    /// that is no longer mapped: the allocation takes `size` + one page of the heap.
    pub fn new(size: usize, fill: u8) -> Result<Self, Status> {
        let size = size.max(1).div_ceil(PAGE) * PAGE;
        let layout =
            Layout::from_size_align(size + PAGE, PAGE).map_err(|_| Status::BadParameter)?;
        // SAFETY: the layout's size is not zero.
        let p = unsafe { alloc::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Status::OutOfMemory);
        }
        // SAFETY: the stack part (above the first page) lies inside the allocation just
        // made, which is never freed nor handed to anyone else.
        unsafe { core::ptr::write_bytes(p.add(PAGE), fill, size) };
        let s = GuardedStack {
            base: p as u64 + PAGE as u64,
            size,
        };
        // The guard page is never touched again: the allocation is leaked, so the heap
        // never hands it out after its mapping is gone.
        hc::revoke(page_crd(s.guard().start), true)?;
        if !s.is_guarded() {
            return Err(Status::BadFeature);
        }
        Ok(s)
    }

    /// The guard page's addresses.
    pub fn guard(&self) -> Range<u64> {
        self.base - PAGE as u64..self.base
    }

    /// The stack's addresses.
    pub fn range(&self) -> Range<u64> {
        self.base..self.base + self.size as u64
    }

    /// Whether the guard page is unmapped in the own space (`lookup` finds nothing).
    pub fn is_guarded(&self) -> bool {
        hc::lookup(page_crd(self.guard().start)) == Ok(Crd::NULL)
    }

    /// The initial stack pointer (≡ 8 mod 16, as after a call).
    pub fn top(&self) -> u64 {
        (self.range().end & !0xf) - 8
    }

    /// Bytes of the stack ever used: those from the top down to the lowest byte that
    /// no longer holds `fill` (what [`new`](Self::new) wrote).
    pub fn used(&self, fill: u8) -> usize {
        let base = self.base as *const u8;
        let untouched = (0..self.size)
            // SAFETY: reads within the stack part of the leaked allocation; the EC
            // running on it may write it concurrently, which only makes the estimate
            // stale (bytes, no references are formed).
            .take_while(|&i| unsafe { core::ptr::read_volatile(base.add(i)) } == fill)
            .count();
        self.size - untouched
    }
}
