//! Memory spaces: a PD's host page table. The user half (PML4 entries 0–255) belongs to
//! the PD; the kernel half is shared by every space (copied from the kernel's table at
//! creation; those entries never change).
//!
//! Page-table pages are charged to the PD. Tables freed by an unmap are not returned to
//! the allocator until after the TLB shootdown, so no CPU can still walk a table whose
//! memory has been reused.

use alloc::vec::Vec;

use peregrine_abi::{Status, PAGE_BITS};
use peregrine_core::pagetable::{Host, PageTable, Perm, PtError, TableMem};
use spin::Mutex;

use crate::kmem;
use crate::pd::Pd;

/// Table memory of one PD, over the kernel's direct map (host and nested tables alike).
pub(crate) struct Tables<'a> {
    /// The PD new tables are charged to (None: no allocation expected).
    pub pd: Option<&'a Pd>,
    /// Tables freed by the operation, returned to the allocator after a shootdown.
    pub freed: &'a mut Vec<u64>,
}

impl TableMem for Tables<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        match self.pd {
            Some(pd) => kmem::alloc_frame(pd).ok(),
            None => crate::mem::alloc_frame_zeroed(),
        }
    }
    fn free_table(&mut self, table: u64) {
        self.freed.push(table);
    }
    fn read(&self, table: u64, idx: usize) -> u64 {
        // SAFETY: `table` is a page-table page owned by this space, in the physmap, and
        // idx < 512 (the walker's invariant).
        unsafe { core::ptr::read_volatile((kmem::phys_to_virt(table) as *const u64).add(idx)) }
    }
    fn write(&mut self, table: u64, idx: usize, val: u64) {
        // SAFETY: as in `read`; the space's lock serializes writers.
        unsafe { core::ptr::write_volatile((kmem::phys_to_virt(table) as *mut u64).add(idx), val) }
    }
}

/// Unmaps `2^order` pages from `vpage` with `unmap(vpage, order)`. Splitting a large
/// page that lies only partly inside needs a table; when its owner cannot pay for it
/// (`NoMemory`), the unmap widens to the whole large page (2 MiB, then 1 GiB), which
/// needs none: a revocation never leaves a page mapped for want of memory, at worst it
/// takes the rest of the large page's mapping with it (the nodes stay; SECURITY.md).
pub(crate) fn unmap_widening(
    vpage: u64,
    order: u8,
    mut unmap: impl FnMut(u64, u8) -> Result<bool, PtError>,
) {
    for o in [order, order.max(9), order.max(18)] {
        if !matches!(unmap(vpage & !((1u64 << o) - 1), o), Err(PtError::NoMemory)) {
            return;
        }
    }
}

/// A PD's memory space.
pub struct SpaceMem {
    root: u64,
    lock: Mutex<()>,
}

/// The status for a page-table error.
pub(crate) fn pt_err(e: PtError) -> Status {
    match e {
        PtError::NoMemory => Status::OutOfMemory,
        _ => Status::BadParameter,
    }
}

impl SpaceMem {
    /// A new space sharing the kernel half. Its root table is charged by the caller.
    pub fn new() -> Option<Self> {
        let root = crate::mem::new_user_root()?;
        Some(SpaceMem {
            root,
            lock: Mutex::new(()),
        })
    }

    /// The kernel PD's space: no page table (its items are physical pages).
    pub const fn none() -> Self {
        SpaceMem {
            root: 0,
            lock: Mutex::new(()),
        }
    }

    fn table(&self) -> PageTable<Host> {
        PageTable::from_root(self.root)
    }

    /// Maps `2^order` pages from user page `vpage` to physical page `ppage` with memory
    /// permissions `perm` (R/W/X bits), uncacheable where they are not RAM (device
    /// memory: see [`crate::mem::is_wb`]). Fails if any page is mapped already.
    pub fn map(&self, pd: &Pd, vpage: u64, ppage: u64, order: u8, perm: u8) -> Result<(), Status> {
        if self.root == 0 {
            return Err(Status::BadCapability);
        }
        let mut p = Perm(perm & 7) | Perm::U | Perm::R;
        if !crate::mem::is_wb(ppage, order) {
            p = p | Perm::UC;
        }
        let mut freed = Vec::new();
        let r = {
            let _g = self.lock.lock();
            let mut m = Tables {
                pd: Some(pd),
                freed: &mut freed,
            };
            self.table()
                .map(&mut m, vpage << PAGE_BITS, ppage << PAGE_BITS, order, p)
        };
        if !freed.is_empty() {
            // A large page replaced tables. The caller may hold the mapping database's
            // lock, so the tables wait for the next batched shootdown.
            kmem::uncharge(pd, freed.len() as u64);
            crate::tlb::defer_free(pd.id, freed);
        }
        r.map_err(pt_err)
    }

    /// Maps one kernel-owned page (a UTCB) read-write at user address `uva`.
    pub fn map_kernel_page(&self, pd: &Pd, uva: u64, phys: u64) -> Result<(), Status> {
        self.map(pd, uva >> PAGE_BITS, phys >> PAGE_BITS, 0, 3)
    }

    /// Unmaps `2^order` pages from `vpage`. The caller shoots down TLBs afterwards; page
    /// tables emptied here are freed only after that (returned to the caller's list).
    /// A large page only partly inside is split, with a table charged to `pd` (see
    /// [`unmap_widening`]).
    pub fn unmap_deferred(&self, pd: Option<&Pd>, vpage: u64, order: u8, freed: &mut Vec<u64>) {
        if self.root == 0 {
            return;
        }
        let _g = self.lock.lock();
        let mut m = Tables { pd, freed };
        let t = self.table();
        unmap_widening(vpage, order, |v, o| t.unmap(&mut m, v << PAGE_BITS, o));
    }

    /// The physical address `uva` maps to.
    pub fn lookup(&self, uva: u64) -> Option<u64> {
        if self.root == 0 {
            return None;
        }
        let _g = self.lock.lock();
        let mut freed = Vec::new();
        let m = Tables {
            pd: None,
            freed: &mut freed,
        };
        self.table().lookup(&m, uva).map(|t| t.phys)
    }

    /// Loads this space on the running CPU.
    #[inline]
    pub fn activate(&self) {
        if self.root == 0 {
            crate::arch::load_kernel_space();
        } else {
            // SAFETY: the root came from `mem::new_user_root`, which copies the kernel
            // half; it stays allocated while a CPU runs this space (see `release`).
            unsafe { crate::arch::load_cr3(self.root) };
        }
    }
}

impl SpaceMem {
    /// Frees every table (the PD is gone), returning the pages to `quota`. No CPU has
    /// this space loaded (see `sched::clear_current`), and every CPU flushed its TLB when
    /// it switched away from it.
    pub fn release(&mut self, quota: &peregrine_core::quota::Quota) {
        if self.root == 0 {
            return;
        }
        let mut freed = Vec::new();
        {
            let mut m = Tables {
                pd: None,
                freed: &mut freed,
            };
            self.table().teardown(&mut m, 0..256);
        }
        for t in freed {
            crate::mem::free_frame(t);
            let _ = quota.uncharge(1);
        }
        // The root table was charged by create_pd as part of the PD object's pages.
        crate::mem::free_frame(self.root);
        self.root = 0;
    }
}
