//! Protection domains: an object space (capabilities), a memory space (host page table),
//! an I/O port space and a kernel-memory quota.

use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use peregrine_abi::Status;
use peregrine_core::capspace::CapSpace;
use peregrine_core::quota::Quota;
use spin::Mutex;

use crate::cap::KObj;
use crate::ec::Ec;
use crate::space_mem::SpaceMem;
use crate::space_pio::SpacePio;

/// Selectors in every object space.
pub const SEL_NUM: u64 = 1 << 18;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A protection domain.
pub struct Pd {
    /// Unique id (the mapping database's space id is derived from it).
    pub id: u64,
    /// Capabilities.
    pub obj: Mutex<CapSpace<KObj>>,
    /// Memory.
    pub mem: SpaceMem,
    /// Guest-physical memory (VM PDs only; their host space `mem` is empty).
    pub guest: Option<crate::space_guest::SpaceGuest>,
    /// I/O ports.
    pub pio: SpacePio,
    /// Kernel-memory quota in pages.
    pub quota: Quota,
    /// The PD that created this one (None for the kernel and root PDs).
    pub parent: Option<Arc<Pd>>,
    /// The kernel's own PD (source of all resources).
    pub kernel: bool,
    /// A virtual machine.
    pub vm: bool,
    dead: AtomicBool,
    /// ECs living in this PD (to stop them when it is destroyed).
    pub ecs: Mutex<Vec<Weak<Ec>>>,
    /// Its mapping-database nodes and the quota pages they are charged.
    nodes: Mutex<NodeCharge>,
}

/// Mapping-database nodes a PD's spaces hold, per database, and the pages charged.
#[derive(Debug, Default)]
struct NodeCharge {
    count: [u64; 3],
    pages: u32,
}

/// Nodes charged as one quota page (a node with its index entries is ~100 bytes of
/// kernel heap).
pub const NODES_PER_PAGE: u64 = 32;

impl Pd {
    /// Creates a PD with quota `q` (carved out of the parent's).
    pub fn new(parent: Option<Arc<Pd>>, q: Quota, kernel: bool, vm: bool) -> Option<Self> {
        let mem = if kernel || vm {
            SpaceMem::none()
        } else {
            SpaceMem::new()?
        };
        let guest = if vm {
            Some(crate::space_guest::SpaceGuest::new()?)
        } else {
            None
        };
        Some(Pd {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            obj: Mutex::new(CapSpace::new(SEL_NUM)),
            mem,
            guest,
            pio: SpacePio::new(),
            quota: q,
            parent,
            kernel,
            vm,
            dead: AtomicBool::new(false),
            ecs: Mutex::new(Vec::new()),
            nodes: Mutex::new(NodeCharge::default()),
        })
    }

    /// Records that this PD's spaces hold `count` nodes of mapping database `db`
    /// (0 memory, 1 I/O ports, 2 objects) and charges or returns quota pages to match.
    /// `strict`: fail with `OutOfMemory` (recording nothing) when the quota cannot pay
    /// (delegation, which then undoes itself); otherwise charge what the quota allows
    /// (revocation splits never fail) and settle the rest later.
    pub fn settle_nodes(&self, db: usize, count: u64, strict: bool) -> Result<(), Status> {
        if self.kernel {
            return Ok(());
        }
        let mut n = self.nodes.lock();
        let Some(slot) = n.count.get(db).copied() else {
            return Err(Status::BadParameter);
        };
        let total = n.count.iter().sum::<u64>() - slot + count;
        let want = u32::try_from(total.div_ceil(NODES_PER_PAGE)).unwrap_or(u32::MAX);
        if want > n.pages {
            match self.quota.charge(want - n.pages) {
                Ok(()) => n.pages = want,
                Err(_) if strict => return Err(Status::OutOfMemory),
                Err(_) => {
                    // Charge page by page what is left.
                    while n.pages < want && self.quota.charge(1).is_ok() {
                        n.pages += 1;
                    }
                }
            }
        } else if want < n.pages {
            let _ = self.quota.uncharge(n.pages - want);
            n.pages = want;
        }
        n.count[db] = count;
        Ok(())
    }

    /// Whether the PD was destroyed.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Whether `self` is `other` or was created (transitively) by it.
    pub fn is_within(&self, other: &Pd) -> bool {
        let mut p: Option<&Pd> = Some(self);
        let mut depth = 0;
        while let Some(x) = p {
            if core::ptr::eq(x, other) {
                return true;
            }
            depth += 1;
            if depth > 1024 {
                return false;
            }
            p = x.parent.as_deref();
        }
        false
    }

    /// Looks up a capability.
    pub fn cap(&self, sel: u64) -> Option<crate::cap::Cap> {
        self.obj.lock().get(sel).cloned()
    }

    /// Marks the PD destroyed and stops its ECs; false if it already was. The caller
    /// (`space::destroy`) then tears down its spaces.
    pub fn kill(&self) -> bool {
        if self.dead.swap(true, Ordering::AcqRel) {
            return false;
        }
        let ecs = core::mem::take(&mut *self.ecs.lock());
        for e in ecs.iter().filter_map(|w| w.upgrade()) {
            e.dead.store(true, Ordering::Release);
            crate::sched::kill_remote(&e);
        }
        true
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // Everything it held is freed by now (its page tables go with `mem` after this):
        // hand the account back to the parent, which paid for it.
        let pages = self.nodes.lock().pages;
        let _ = self.quota.uncharge(pages);
        self.mem.release(&self.quota);
        if let Some(g) = &mut self.guest {
            g.release(&self.quota);
        }
        if let Some(p) = &self.parent {
            let _ = self.quota.merge_into(&p.quota);
            // The object and its root table, charged by create_pd.
            let _ = p.quota.uncharge(2);
        }
    }
}
