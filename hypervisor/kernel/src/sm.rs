//! Semaphores: counting, with FIFO waiters, optional deadlines, and the delivery of
//! interrupts (a GSI semaphore is signalled by its interrupt).

use alloc::collections::VecDeque;
use alloc::sync::Arc;

use peregrine_abi::Status;
use spin::Mutex;

use crate::ec::Ec;
use crate::sched;

/// Interrupt routing of a GSI semaphore.
#[derive(Debug, Clone, Copy)]
pub struct Gsi {
    /// The GSI number.
    pub gsi: u32,
    /// Level-triggered: masked on delivery until the next down.
    pub level: bool,
}

struct Inner {
    count: u64,
    waiters: VecDeque<Arc<Ec>>,
    gsi: Option<Gsi>,
}

/// A semaphore.
pub struct Sm {
    inner: Mutex<Inner>,
    _charge: Option<crate::kmem::Charge>,
}

/// What a down did.
pub enum Down {
    /// The count was positive: done.
    Acquired,
    /// The EC was queued and must block.
    Blocked,
}

impl Sm {
    /// A semaphore with an initial count (charged to its PD, except the kernel's).
    pub fn new(charge: Option<crate::kmem::Charge>, count: u64) -> Self {
        Sm {
            inner: Mutex::new(Inner {
                count,
                waiters: VecDeque::new(),
                gsi: None,
            }),
            _charge: charge,
        }
    }

    /// A GSI semaphore.
    pub fn new_gsi(gsi: u32) -> Self {
        let s = Self::new(None, 0);
        s.inner.lock().gsi = Some(Gsi { gsi, level: false });
        s
    }

    /// The GSI this semaphore delivers, if any.
    pub fn gsi(&self) -> Option<Gsi> {
        self.inner.lock().gsi
    }

    /// Sets the trigger mode of a GSI semaphore.
    pub fn set_level(&self, level: bool) {
        if let Some(g) = self.inner.lock().gsi.as_mut() {
            g.level = level;
        }
    }

    /// Up: wakes the first living waiter or counts. Dead waiters met on the way are
    /// woken too (their CPU then lets go of them) but do not take the up.
    pub fn up(&self, cpu: &mut crate::cpu::Cpu) {
        loop {
            let w = {
                let mut i = self.inner.lock();
                match i.waiters.pop_front() {
                    Some(w) => w,
                    None => {
                        i.count = i.count.saturating_add(1);
                        return;
                    }
                }
            };
            if !w.is_dead() {
                sched::wake(w, Status::Success, cpu);
                return;
            }
            sched::wake(w, Status::Aborted, cpu);
        }
    }

    /// Down by `ec`: takes one (or, with `zero`, all) or queues `ec`.
    pub fn down(&self, ec: &Arc<Ec>, zero: bool) -> Result<Down, Status> {
        let mut i = self.inner.lock();
        if let Some(g) = i.gsi {
            if g.level {
                crate::irq::unmask_gsi(g.gsi);
            }
        }
        if i.count > 0 {
            if zero {
                i.count = 0;
            } else {
                i.count -= 1;
            }
            Ok(Down::Acquired)
        } else {
            i.waiters.try_reserve(1).map_err(|_| Status::OutOfMemory)?;
            i.waiters.push_back(ec.clone());
            Ok(Down::Blocked)
        }
    }

    /// Down without waiting: true if the count was positive.
    pub fn down_nowait(&self, zero: bool) -> bool {
        let mut i = self.inner.lock();
        if i.count > 0 {
            i.count = if zero { 0 } else { i.count - 1 };
            true
        } else {
            false
        }
    }

    /// Removes `ec` from the waiters (timeout, or the EC is being destroyed); true if it
    /// was there (then the caller owns waking it).
    pub fn dequeue(&self, ec: &Arc<Ec>) -> bool {
        let mut i = self.inner.lock();
        match i.waiters.iter().position(|w| Arc::ptr_eq(w, ec)) {
            Some(p) => {
                i.waiters.remove(p);
                true
            }
            None => false,
        }
    }
}
