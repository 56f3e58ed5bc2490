//! Access to the running EC's UTCB.
//!
//! The main EC learns its UTCB address at start; a portal handler is told its own on
//! every call. Either way the UTCB is a page only this EC and the kernel touch, so a
//! `&mut Utcb` handed out by [`UtcbRef`] is exclusive as long as the EC does not hand
//! it out twice.

use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::{Utcb, Xfer};

static MAIN_UTCB: AtomicU64 = AtomicU64::new(0);

/// Records the main EC's UTCB address (called by the start-up code).
pub fn set_main(addr: u64) {
    MAIN_UTCB.store(addr, Ordering::Relaxed);
}

/// The main EC's UTCB address.
pub fn main_addr() -> u64 {
    MAIN_UTCB.load(Ordering::Relaxed)
}

/// A handle to a UTCB page.
#[derive(Debug, Clone, Copy)]
pub struct UtcbRef(u64);

impl UtcbRef {
    /// The main EC's UTCB.
    pub fn main() -> Self {
        UtcbRef(main_addr())
    }

    /// A handle for the UTCB at `addr`.
    ///
    /// # Safety
    /// `addr` must be the mapped UTCB of the EC that uses the handle.
    pub unsafe fn from_addr(addr: u64) -> Self {
        UtcbRef(addr)
    }

    /// The UTCB.
    #[allow(clippy::mut_from_ref)]
    pub fn get(&self) -> &mut Utcb {
        // SAFETY: the address is a mapped, page-aligned UTCB of the running EC (the
        // constructors guarantee it); nothing else in this EC holds a reference across
        // a call into this function by convention of the runtime (one user at a time).
        unsafe { &mut *(self.0 as *mut Utcb) }
    }

    /// Sets up a message of untyped words and no typed items.
    pub fn set_msg(&self, words: &[u64]) {
        let u = self.get();
        let n = words.len().min(u.data.len());
        u.data[..n].copy_from_slice(&words[..n]);
        u.head.set_counts(n, 0);
    }

    /// Adds typed item `x` to the message.
    pub fn push_xfer(&self, x: Xfer) -> bool {
        let u = self.get();
        let t = u.head.typed();
        let ok = u.set_xfer(t, x);
        if ok {
            let n = u.head.untyped();
            u.head.set_counts(n, t + 1);
        }
        ok
    }

    /// Untyped word `i`.
    pub fn word(&self, i: usize) -> u64 {
        self.get().data.get(i).copied().unwrap_or(0)
    }

    /// Number of untyped words received.
    pub fn untyped(&self) -> usize {
        self.get().head.untyped()
    }
}
