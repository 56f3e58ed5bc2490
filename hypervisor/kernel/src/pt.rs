//! Portals: entry points into a local EC, with the identifier passed to the handler and
//! the MTD that chooses what state an event transfers.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::Mtd;

use crate::ec::Ec;

/// A portal.
pub struct Pt {
    /// Its page of quota; dropped first (see `Sc`).
    _charge: crate::kmem::Charge,
    /// The handler EC.
    pub ec: Arc<Ec>,
    /// Entry instruction pointer.
    pub ip: u64,
    /// State transferred on events.
    pub mtd: Mtd,
    /// Identifier given to the handler in `rdi` (set by `pt_ctrl`).
    pub id: AtomicU64,
}

impl Pt {
    /// Creates a portal.
    pub fn new(charge: crate::kmem::Charge, ec: Arc<Ec>, ip: u64, mtd: Mtd) -> Self {
        Pt {
            ec,
            ip,
            mtd,
            id: AtomicU64::new(0),
            _charge: charge,
        }
    }

    /// The current identifier.
    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }
}
