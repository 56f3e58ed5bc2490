//! The guest-physical memory space of a VM PD: a nested page table (AMD NPT; the
//! VMX backend will use the EPT format the same way), filled by delegations with the
//! `GUEST` flag and emptied by revocation.
//!
//! Guest mappings are recorded in the memory mapping database under their own space id
//! ([`sid`]: the PD id with bit 63 set), so that a PD's host and guest spaces never
//! collide. Removing a mapping bumps the space's flush generation; every vCPU of the VM
//! compares it before VMRUN and flushes its guest TLB when it changed (QEMU's SVM has no
//! flush-by-ASID, so this is a full flush there). The revoker's TLB shootdown IPI makes
//! running vCPUs exit first.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::{Status, PAGE_BITS};
use peregrine_core::mdb::SpaceId;
use peregrine_core::pagetable::{Npt, PageTable, Perm};
use spin::Mutex;

use crate::kmem;
use crate::pd::Pd;
use crate::space_mem::{pt_err, Tables};

/// Bit 63 of a mapping-database space id marks a PD's guest-physical space.
pub const GUEST_SPACE_BIT: u64 = 1 << 63;
/// Guest-physical pages a VM can have mapped (48-bit guest-physical addresses).
pub const GUEST_PAGES: u64 = 1 << 36;

/// The mapping-database space id of `pd`'s guest memory.
pub fn sid(pd: &Pd) -> SpaceId {
    SpaceId(pd.id | GUEST_SPACE_BIT)
}

/// A VM's guest-physical space.
pub struct SpaceGuest {
    root: u64,
    lock: Mutex<()>,
    /// Bumped whenever a mapping is removed (vCPUs flush their guest TLB on change).
    pub flush_gen: AtomicU64,
}

impl SpaceGuest {
    /// A new, empty space (its root table is charged by `create_pd` as the PD's table).
    pub fn new() -> Option<Self> {
        Some(SpaceGuest {
            root: crate::mem::alloc_frame_zeroed()?,
            lock: Mutex::new(()),
            flush_gen: AtomicU64::new(0),
        })
    }

    /// Physical address of the root table (nCR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    fn table(&self) -> PageTable<Npt> {
        PageTable::from_root(self.root)
    }

    /// Maps `2^order` guest pages from `gpage` to host frames from `ppage`.
    pub fn map(&self, pd: &Pd, gpage: u64, ppage: u64, order: u8, perm: u8) -> Result<(), Status> {
        let p = Perm(perm & 7) | Perm::R;
        let mut freed = Vec::new();
        let r = {
            let _g = self.lock.lock();
            let mut m = Tables {
                pd: Some(pd),
                freed: &mut freed,
            };
            self.table()
                .map(&mut m, gpage << PAGE_BITS, ppage << PAGE_BITS, order, p)
        };
        if !freed.is_empty() {
            // The caller may hold the mapping database's lock: the tables wait for the
            // next batched shootdown, which reaches every CPU.
            self.flush_gen.fetch_add(1, Ordering::AcqRel);
            kmem::uncharge(pd, freed.len() as u64);
            crate::tlb::defer_free(crate::tlb::EVERY_CPU, freed);
        }
        r.map_err(pt_err)
    }

    /// Unmaps `2^order` guest pages from `gpage`; emptied tables go to `freed` (the
    /// caller frees them after the TLB shootdown it must do).
    pub fn unmap_deferred(&self, gpage: u64, order: u8, freed: &mut Vec<u64>) {
        {
            let _g = self.lock.lock();
            let mut m = Tables { pd: None, freed };
            let _ = self.table().unmap(&mut m, gpage << PAGE_BITS, order);
        }
        self.flush_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Frees every table (the PD is gone; no vCPU of it can run any more).
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
            self.table().teardown(&mut m, 0..512);
        }
        for t in freed {
            crate::mem::free_frame(t);
            let _ = quota.uncharge(1);
        }
        crate::mem::free_frame(self.root);
        self.root = 0;
    }
}
