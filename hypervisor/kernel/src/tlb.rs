//! TLB shootdown: after mappings were removed, every CPU that may still cache them
//! flushes its non-global TLB entries before the removing hypercall returns.
//!
//! Targeting. Each CPU publishes in [`LOADED`] the id of the PD whose host page table it
//! has loaded (0: the kernel's). User mappings are never global and the kernel uses no
//! PCIDs, so a CPU that switched away from a PD flushed that PD's entries with its CR3
//! write: only the CPUs that have the PD loaded *now* need the IPI. The switcher stores
//! its `LOADED` entry before writing CR3, the initiator removes the entries before it
//! reads `LOADED` (both sequentially consistent): either the initiator sees the switch,
//! or the switcher's page walks see the removal. Guest-physical spaces and I/O bitmaps
//! are flushed on every CPU (a running vCPU must exit; see `space_guest`).
//!
//! Protocol. The initiator bumps a global generation and sends the IPI to its targets;
//! each CPU acknowledges by storing the generation it has flushed for. While waiting,
//! the initiator serves requests of others, so concurrent shootdowns cannot deadlock.
//! The kernel never calls [`shootdown`] while holding a lock another CPU may spin on.
//!
//! Deferred frees. Dropping an EC unmaps its UTCB wherever the last reference goes,
//! possibly under a lock: the page and emptied tables wait in [`PENDING`] and are freed
//! after one shootdown for the whole batch, done at hypercall entry ([`reclaim`]).

use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

use peregrine_abi::hip::MAX_CPUS;
use spin::Mutex;

static GEN: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static ACK: [AtomicU64; MAX_CPUS] = [ZERO; MAX_CPUS];
/// The PD whose host page table each CPU has loaded (0: the kernel's own).
static LOADED: [AtomicU64; MAX_CPUS] = [ZERO; MAX_CPUS];
static ONE: Mutex<()> = Mutex::new(());

/// Pages waiting for a shootdown before they can be reused: (physical page, PD id
/// whose host table mapped it, or [`EVERY_CPU`]).
static PENDING: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
/// `PENDING.len()`, readable without the lock.
static PENDING_LEN: AtomicUsize = AtomicUsize::new(0);
/// Batch size at which [`reclaim`] frees the pending pages.
const RECLAIM_BATCH: usize = 32;

/// [`defer_free`] for pages of a guest-physical space: flushed on every CPU.
pub const EVERY_CPU: u64 = u64::MAX;

/// Which CPUs a shootdown must reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets<'a> {
    /// Every CPU (guest-physical spaces, I/O bitmaps).
    All,
    /// The CPUs that have one of these PDs' host page tables loaded.
    Pds(&'a [u64]),
}

/// Records that this CPU is about to load PD `id`'s page table (0: the kernel's).
/// Called before the CR3 write.
pub fn loading(id: u64) {
    loading_on(crate::platform::percpu::cpu_id(), id);
}

/// [`loading`] on CPU `cpu`, the running one.
#[inline(always)]
pub fn loading_on(cpu: usize, id: u64) {
    LOADED[cpu].store(id, Ordering::SeqCst);
}

/// Flushes this CPU's TLB for the latest generation (IPI handler and polling).
pub fn serve() {
    let g = GEN.load(Ordering::Acquire);
    let me = crate::platform::percpu::cpu_id();
    if ACK[me].load(Ordering::Relaxed) != g {
        crate::arch::flush_tlb();
        ACK[me].store(g, Ordering::Release);
    }
}

/// Flushes the TLBs of every CPU.
pub fn shootdown() {
    shootdown_to(Targets::All);
}

/// Flushes the TLBs of the CPUs `t` names (always this one).
pub fn shootdown_to(t: Targets<'_>) {
    // The removals the caller made must be visible before we read LOADED.
    fence(Ordering::SeqCst);
    let me = crate::platform::percpu::cpu_id();
    let mine = LOADED[me].load(Ordering::Relaxed);
    let local = match t {
        Targets::All => true,
        Targets::Pds(ids) => mine != 0 && ids.contains(&mine),
    };
    let mut mask = 0u64;
    let n = crate::arch::online_cpus().min(MAX_CPUS);
    for (c, loaded) in LOADED.iter().enumerate().take(n) {
        if c == me || !crate::arch::cpu_online(c as u64) {
            continue;
        }
        let hit = match t {
            Targets::All => true,
            Targets::Pds(ids) => {
                let l = loaded.load(Ordering::SeqCst);
                l != 0 && ids.contains(&l)
            }
        };
        if hit {
            mask |= 1 << c;
        }
    }
    if mask == 0 {
        if local {
            crate::arch::flush_tlb();
        }
        return;
    }
    // Serve others while waiting for the initiator's lock: they may wait for us.
    let _one = loop {
        if let Some(g) = ONE.try_lock() {
            break g;
        }
        serve();
        core::hint::spin_loop();
    };
    let g = GEN.fetch_add(1, Ordering::AcqRel) + 1;
    serve();
    if t == Targets::All {
        crate::arch::send_tlb_ipi_all_but_self();
    } else {
        for c in 0..MAX_CPUS {
            if mask & (1 << c) != 0 {
                crate::arch::send_tlb_ipi(c);
            }
        }
    }
    for (c, ack) in ACK.iter().enumerate() {
        if mask & (1 << c) == 0 {
            continue;
        }
        while ack.load(Ordering::Acquire) < g {
            serve();
            core::hint::spin_loop();
        }
    }
}

/// Queues pages unmapped from PD `pd`'s host table ([`EVERY_CPU`]: from a guest
/// space) to be freed after a shootdown (their quota was returned by the caller).
pub fn defer_free(pd: u64, pages: impl IntoIterator<Item = u64>) {
    let mut p = PENDING.lock();
    p.extend(pages.into_iter().map(|a| (a, pd)));
    PENDING_LEN.store(p.len(), Ordering::Release);
}

/// Frees the deferred pages once a batch has gathered; called where the kernel holds
/// no lock (hypercall entry). One load when there is nothing to do.
#[inline]
pub fn reclaim() {
    if PENDING_LEN.load(Ordering::Relaxed) >= RECLAIM_BATCH {
        reclaim_now();
    }
}

/// Frees every deferred page after one shootdown for all of them.
#[cold]
pub fn reclaim_now() {
    let batch = {
        let mut p = PENDING.lock();
        PENDING_LEN.store(0, Ordering::Release);
        core::mem::take(&mut *p)
    };
    if batch.is_empty() {
        return;
    }
    let mut ids: Vec<u64> = batch.iter().map(|&(_, pd)| pd).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.last() == Some(&EVERY_CPU) {
        shootdown_to(Targets::All);
    } else {
        shootdown_to(Targets::Pds(&ids));
    }
    for (page, _) in batch {
        crate::mem::free_frame(page);
    }
}
