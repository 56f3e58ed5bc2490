//! The lock for data that threads of different priorities share.
//!
//! A plain spin lock is only safe between threads that cannot keep each other off a
//! CPU. In a NUL component they can: a portal handler runs on its caller's SC, at the
//! caller's priority, and a component's own threads may have priorities of their own.
//! When a thread wants a lock that a thread of lower priority on the same CPU holds,
//! spinning keeps the holder from running, for good: the root hung this way when a
//! console call of the disk component (`prio=20`) met the root's main thread (10)
//! holding the component table.
//!
//! [`Mutex`] spins briefly and then sleeps: a down with a short deadline on a
//! semaphore nobody ups ([`sel::LOCK_SLEEP`], made at start-up), which lets any
//! thread of the CPU run, the holder too. Uncontended, it costs what a spin lock costs.
//! (seL4 and NOVA user-level code avoid the problem the same way, by blocking in the
//! kernel rather than spinning; a semaphore per lock with a wake-up protocol would
//! wake the waiter sooner, but contention here is rare and a lock must work before
//! any semaphore exists.)

use core::sync::atomic::{AtomicBool, Ordering};

use crate::{hc, sel};

pub use spin::MutexGuard;

/// Spins (`pause`) before the first sleep.
const SPINS: u32 = 256;
/// TSC ticks of one sleep (20 µs at 2.5 GHz).
const SLEEP_TICKS: u64 = 50_000;

/// The sleep semaphore exists (without it, waiters only spin).
static SLEEP_READY: AtomicBool = AtomicBool::new(false);

/// Makes the sleep semaphore: the start-up code, before the component's main, so that
/// what a component costs the kernel does not depend on whether its locks ever met
/// contention (and before any second thread could contend).
pub fn init() {
    let ok = hc::create_sm(sel::LOCK_SLEEP, sel::OWN_PD, 0).is_ok();
    SLEEP_READY.store(ok, Ordering::Release);
}

/// Gives the CPU away for a moment: sleeps [`SLEEP_TICKS`] on the sleep semaphore, or
/// only pauses if there is none.
#[cold]
fn sleep_briefly() {
    if SLEEP_READY.load(Ordering::Acquire) {
        // Err(Timeout) is the expected end; any other error (someone took the selector
        // away) makes this a short spin, as before.
        let _ = hc::sm_down(sel::LOCK_SLEEP, false, hc::rdtsc() + SLEEP_TICKS);
    } else {
        core::hint::spin_loop();
    }
}

/// Mutual exclusion that spins briefly, then sleeps (see the module docs).
pub struct Mutex<T: ?Sized> {
    inner: spin::Mutex<T>,
}

impl<T> Mutex<T> {
    /// An unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        Self {
            inner: spin::Mutex::new(value),
        }
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Waits until the lock is free and holds it until the guard is dropped.
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, T> {
        match self.inner.try_lock() {
            Some(g) => g,
            None => self.lock_contended(),
        }
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) -> MutexGuard<'_, T> {
        let mut spins = 0u32;
        loop {
            if !self.inner.is_locked() {
                if let Some(g) = self.inner.try_lock() {
                    return g;
                }
            }
            if spins < SPINS {
                spins += 1;
                core::hint::spin_loop();
            } else {
                sleep_briefly();
            }
        }
    }
}
