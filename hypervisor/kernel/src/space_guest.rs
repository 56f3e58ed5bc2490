//! The guest-physical memory space of a VM PD: a nested page table in the format of the
//! running backend (AMD NPT, or Intel EPT with write-back leaves and the largest leaves
//! the processor's EPT supports), filled by delegations with the `GUEST` flag and
//! emptied by revocation.
//!
//! Guest mappings are recorded in the memory mapping database under their own space id
//! ([`sid`]: the PD id with bit 63 set), so that a PD's host and guest spaces never
//! collide. Removing a mapping bumps the space's flush generation; every vCPU of the VM
//! compares it before entering its guest and flushes its guest TLB when it changed (SVM:
//! by ASID, or fully where QEMU has no flush-by-ASID; VMX: INVEPT single-context for the
//! VM's EPT pointer). The revoker's TLB shootdown IPI makes running vCPUs exit first, so
//! every CPU that may cache the VM's translations flushes them before its next entry.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::{Status, PAGE_BITS};
use peregrine_core::mdb::SpaceId;
use peregrine_core::pagetable::{Ept, EptUpTo, Npt, PageTable, Perm};
use spin::Mutex;

use crate::kmem;
use crate::pd::Pd;
use crate::space_mem::{pt_err, Tables};
use crate::vcpu::GuestFormat;

/// Runs `$body` with `$t` bound to the space's page table in its format.
macro_rules! with_table {
    ($s:expr, $t:ident => $body:expr) => {
        match $s.fmt {
            GuestFormat::Npt => {
                let $t = PageTable::<Npt>::from_root($s.root);
                $body
            }
            GuestFormat::Ept => {
                let $t = PageTable::<Ept>::from_root($s.root);
                $body
            }
            GuestFormat::Ept2M => {
                let $t = PageTable::<EptUpTo<1>>::from_root($s.root);
                $body
            }
            GuestFormat::Ept4K => {
                let $t = PageTable::<EptUpTo<0>>::from_root($s.root);
                $body
            }
        }
    };
}

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
    fmt: GuestFormat,
    lock: Mutex<()>,
    /// Bumped whenever a mapping is removed (vCPUs flush their guest TLB on change).
    pub flush_gen: AtomicU64,
}

impl SpaceGuest {
    /// A new, empty space (its root table is charged by `create_pd` as the PD's table).
    pub fn new() -> Option<Self> {
        Some(SpaceGuest {
            root: crate::mem::alloc_frame_zeroed()?,
            fmt: crate::vcpu::guest_format(),
            lock: Mutex::new(()),
            flush_gen: AtomicU64::new(0),
        })
    }

    /// Physical address of the root table (nCR3, or the EPT PML4).
    pub fn root(&self) -> u64 {
        self.root
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
            with_table!(self, t => t.map(&mut m, gpage << PAGE_BITS, ppage << PAGE_BITS, order, p))
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
    /// A large page only partly inside is split with a table charged to `pd`, or
    /// unmapped whole (`space_mem::unmap_widening`).
    pub fn unmap_deferred(&self, pd: Option<&Pd>, gpage: u64, order: u8, freed: &mut Vec<u64>) {
        {
            let _g = self.lock.lock();
            let mut m = Tables { pd, freed };
            crate::space_mem::unmap_widening(
                gpage,
                order,
                |g, o| with_table!(self, t => t.unmap(&mut m, g << PAGE_BITS, o)),
            );
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
            with_table!(self, t => t.teardown(&mut m, 0..512));
        }
        for t in freed {
            crate::mem::free_frame(t);
            let _ = quota.uncharge(1);
        }
        crate::mem::free_frame(self.root);
        self.root = 0;
    }
}
