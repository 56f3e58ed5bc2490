//! Protection domains: an object space (capabilities), a memory space (host page table),
//! an I/O port space and a kernel-memory quota.

use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use peregrine_abi::Status;
use peregrine_core::quota::Quota;
use spin::Mutex;

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
    pub obj: crate::cap::Caps,
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
    /// What its spaces hold beyond its objects, and the quota pages charged for it.
    charges: Mutex<Charges>,
    /// The account went back to the parent (see [`Pd::release`]).
    released: bool,
}

/// Kernel memory a PD's spaces take beyond the objects it created: mapping-database
/// nodes per database, capability-space tables, the I/O permission bitmap; and the
/// quota pages charged for all of it.
#[derive(Debug, Default, Clone, Copy)]
struct Charges {
    nodes: [u64; 3],
    cap_pages: u64,
    pio_pages: u64,
    pages: u32,
}

impl Charges {
    /// Pages all of it needs.
    fn want(&self) -> u32 {
        let nodes = self.nodes.iter().sum::<u64>().div_ceil(NODES_PER_PAGE);
        u32::try_from(nodes + self.cap_pages + self.pio_pages).unwrap_or(u32::MAX)
    }
}

/// Nodes charged as one quota page (a node with its index entries takes up to ~200
/// bytes of kernel heap in the mapping database's B-trees).
pub const NODES_PER_PAGE: u64 = 16;

impl Pd {
    /// Creates a PD with quota `q` (carved out of the parent's); without the memory for
    /// its spaces, the quota comes back.
    pub fn new(parent: Option<Arc<Pd>>, q: Quota, kernel: bool, vm: bool) -> Result<Self, Quota> {
        let mem = if kernel || vm {
            SpaceMem::none()
        } else {
            match SpaceMem::new() {
                Some(m) => m,
                None => return Err(q),
            }
        };
        let guest = if vm {
            match crate::space_guest::SpaceGuest::new() {
                Some(g) => Some(g),
                None => return Err(q),
            }
        } else {
            None
        };
        Ok(Pd {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            obj: crate::cap::Caps::new(SEL_NUM),
            mem,
            guest,
            pio: SpacePio::new(),
            quota: q,
            parent,
            kernel,
            vm,
            dead: AtomicBool::new(false),
            ecs: Mutex::new(Vec::new()),
            charges: Mutex::new(Charges::default()),
            released: false,
        })
    }

    /// Changes what the PD's spaces hold (`f`) and charges or returns quota pages to
    /// match. `strict`: fail with `OutOfMemory` (changing nothing) when the quota cannot
    /// pay; otherwise charge what the quota allows (the caller only shrinks the
    /// account, or settles within what it reserved before).
    fn account(&self, f: impl FnOnce(&mut Charges), strict: bool) -> Result<(), Status> {
        if self.kernel {
            return Ok(());
        }
        let mut c = self.charges.lock();
        let mut n = *c;
        f(&mut n);
        let want = n.want();
        if want > c.pages {
            match self.quota.charge(want - c.pages) {
                Ok(()) => n.pages = want,
                Err(_) if strict => return Err(Status::OutOfMemory),
                Err(_) => {
                    n.pages = c.pages;
                    while n.pages < want && self.quota.charge(1).is_ok() {
                        n.pages += 1;
                    }
                }
            }
        } else {
            let _ = self.quota.uncharge(c.pages - want);
            n.pages = want;
        }
        *c = n;
        Ok(())
    }

    /// Records that this PD's spaces hold `count` nodes of mapping database `db`
    /// (0 memory, 1 I/O ports, 2 objects) and charges or returns quota pages to match
    /// (`strict`: see [`Pd::account`]).
    pub fn settle_nodes(&self, db: usize, count: u64, strict: bool) -> Result<(), Status> {
        if db >= 3 {
            return Err(Status::BadParameter);
        }
        self.account(|c| c.nodes[db] = count, strict)
    }

    /// Charges `extra` more nodes of database `db` ahead of a split that would create
    /// them; false when the quota cannot pay (the split must not happen). The next
    /// [`Pd::settle_nodes`] sets the exact count.
    pub fn reserve_nodes(&self, db: usize, extra: u64) -> bool {
        db < 3
            && self
                .account(|c| c.nodes[db] = c.nodes[db].saturating_add(extra), true)
                .is_ok()
    }

    /// Records that the PD's capability-space tables take `pages` (see
    /// `CapSpace::pages`) and charges or returns quota to match.
    pub fn settle_cap_tables(&self, pages: u64, strict: bool) -> Result<(), Status> {
        self.account(|c| c.cap_pages = pages, strict)
    }

    /// Charges the pages of the I/O permission bitmap (once, when it is allocated).
    pub fn charge_io_bitmap(&self, pages: u64) -> Result<(), Status> {
        self.account(|c| c.pio_pages = pages, true)
    }

    /// Whether the PD was destroyed.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
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

    /// Records a new EC of this PD, so that destroying the PD stops it; fails once the
    /// PD is destroyed (checked under the same lock [`Pd::kill`] takes after marking
    /// the PD dead, so no EC escapes).
    pub fn add_ec(&self, ec: &Arc<Ec>) -> Result<(), Status> {
        let mut ecs = self.ecs.lock();
        if self.is_dead() {
            return Err(Status::BadCapability);
        }
        ecs.try_reserve(1).map_err(|_| Status::OutOfMemory)?;
        ecs.push(Arc::downgrade(ec));
        Ok(())
    }

    /// Marks the PD destroyed and stops its ECs; false if it already was. The caller
    /// (`space::destroy`) then tears down its spaces.
    pub fn kill(&self, cpu: &mut crate::cpu::Cpu) -> bool {
        if self.dead.swap(true, Ordering::AcqRel) {
            return false;
        }
        let ecs = core::mem::take(&mut *self.ecs.lock());
        for e in ecs.iter().filter_map(|w| w.upgrade()) {
            crate::sched::kill(&e, cpu);
        }
        true
    }

    /// Returns everything the PD's account holds to its parent, which paid for it
    /// (once; the spaces are empty by now, only the page tables go with `mem`).
    fn release(&mut self) {
        if core::mem::replace(&mut self.released, true) {
            return;
        }
        let pages = self.charges.get_mut().pages;
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

impl Drop for Pd {
    fn drop(&mut self) {
        self.release();
        // A PD holds its parent: releasing the last PD of a chain releases the chain.
        // Iteratively, parent by parent, never by recursion (a chain can be deeper than
        // any kernel stack).
        let mut next = self.parent.take();
        while let Some(p) = next {
            next = match Arc::into_inner(p) {
                Some(mut pd) => {
                    pd.release();
                    pd.parent.take()
                }
                None => None,
            };
        }
    }
}
