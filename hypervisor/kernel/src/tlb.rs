//! TLB shootdown: after a revocation removed mappings, every CPU flushes its non-global
//! TLB entries before the revoking hypercall returns.
//!
//! The initiator bumps a global generation and sends an IPI to all other CPUs; each CPU
//! acknowledges by storing the generation it has flushed for. While waiting, the
//! initiator serves requests of others, so concurrent shootdowns cannot deadlock. The
//! kernel never calls [`shootdown`] while holding a lock another CPU may spin on.

use core::sync::atomic::{AtomicU64, Ordering};

use peregrine_abi::hip::MAX_CPUS;
use spin::Mutex;

static GEN: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ACK_INIT: AtomicU64 = AtomicU64::new(0);
static ACK: [AtomicU64; MAX_CPUS] = [ACK_INIT; MAX_CPUS];
static ONE: Mutex<()> = Mutex::new(());

/// Flushes this CPU's TLB for the latest generation (IPI handler and polling).
pub fn serve() {
    let g = GEN.load(Ordering::Acquire);
    let me = crate::percpu::cpu_id();
    if ACK[me].load(Ordering::Relaxed) != g {
        crate::arch::flush_tlb();
        ACK[me].store(g, Ordering::Release);
    }
}

/// Flushes the TLBs of all CPUs.
pub fn shootdown() {
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
    if crate::arch::online_cpus() > 1 {
        crate::arch::send_tlb_ipi_all_but_self();
        for (c, ack) in ACK.iter().enumerate() {
            if !crate::arch::cpu_online(c as u64) {
                continue;
            }
            while ack.load(Ordering::Acquire) < g {
                core::hint::spin_loop();
            }
        }
    }
}
