//! Scheduling contexts: priority and time quantum of a global EC; the unit each CPU's
//! scheduler dispatches. An SC runs its EC — or, while that EC waits in a call, the
//! handler at the end of the call chain (the SC is donated along the chain).

use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::ec::Ec;

/// A scheduling context.
pub struct Sc {
    /// Its page of quota. Declared first, so dropped first: the charge goes back to
    /// the PD while `ec` still keeps the PD (and its account) alive.
    _charge: Option<crate::kmem::Charge>,
    /// The EC it belongs to.
    pub ec: Arc<Ec>,
    /// Its CPU (the EC's).
    pub cpu: usize,
    /// Priority: higher runs first.
    pub prio: u8,
    /// Quantum in TSC ticks.
    pub quantum: u64,
    /// Remaining budget of the current quantum in TSC ticks.
    pub left: AtomicU64,
    /// Consumed time in TSC ticks.
    pub time: AtomicU64,
    /// Descheduled for good (its original capability was revoked).
    pub dead: AtomicBool,
}

impl Sc {
    /// Creates an SC for `ec`.
    pub fn new(
        charge: impl Into<Option<crate::kmem::Charge>>,
        ec: Arc<Ec>,
        prio: u8,
        quantum: u64,
    ) -> Self {
        let cpu = ec.cpu;
        Sc {
            _charge: charge.into(),
            ec,
            cpu,
            prio,
            quantum,
            left: AtomicU64::new(quantum),
            time: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    /// Charges `ticks` of run time; true when the quantum is used up (it is refilled).
    pub fn charge(&self, ticks: u64) -> bool {
        self.time.fetch_add(ticks, Ordering::Relaxed);
        let left = self.left.load(Ordering::Relaxed);
        if left <= ticks {
            self.left.store(self.quantum, Ordering::Relaxed);
            true
        } else {
            self.left.store(left - ticks, Ordering::Relaxed);
            false
        }
    }

    /// The EC this SC runs now: its own, or the handler at the end of its call chain.
    pub fn head(&self, cpu: &mut crate::cpu::Cpu) -> Arc<Ec> {
        let mut ec = self.ec.clone();
        // The chain is finite: every callee link was made by a call on this CPU, and a
        // handler serves one caller at a time, so the links form a simple path.
        loop {
            // SCs are dispatched only on their own CPU, which owns the ECs' local state.
            let next = ec.local(cpu).callee.clone();
            match next {
                Some(n) => ec = n,
                None => return ec,
            }
        }
    }
}
