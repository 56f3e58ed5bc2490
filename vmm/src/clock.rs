//! Time for the devices: an injected monotonic clock, so tests are deterministic.

use core::sync::atomic::{AtomicU64, Ordering};

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// A monotonic clock in nanoseconds since an arbitrary origin (the VM's start, say).
///
/// Devices that count (PIT, RTC, ACPI PM timer) read it; the VMM arms a host timer for
/// their `next_event` and calls their `update` when it fires.
pub trait Clock: Send + Sync {
    /// The current time in nanoseconds. Must never go backwards.
    fn now_ns(&self) -> u64;
}

/// A clock that moves only when told to: for tests, and for replaying a recorded run.
#[derive(Debug, Default)]
pub struct ManualClock {
    ns: AtomicU64,
}

impl ManualClock {
    /// A clock reading `ns`.
    pub const fn new(ns: u64) -> Self {
        Self {
            ns: AtomicU64::new(ns),
        }
    }

    /// Sets the time; values earlier than the current reading are ignored (monotonic).
    pub fn set(&self, ns: u64) {
        self.ns.fetch_max(ns, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ns` (saturating).
    pub fn advance(&self, ns: u64) {
        let _ = self
            .ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ns))
            });
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::SeqCst)
    }
}

/// Converts a span of `ns` nanoseconds into whole ticks of a `hz` clock (rounded down).
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    ((ns as u128 * hz as u128) / NS_PER_SEC as u128).min(u64::MAX as u128) as u64
}

/// The first nanosecond at which `ticks` ticks of a `hz` clock have elapsed (rounded
/// up, so that `ns_to_ticks(ticks_to_ns(t, hz), hz) >= t`).
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    let hz = hz.max(1) as u128;
    (ticks as u128 * NS_PER_SEC as u128)
        .div_ceil(hz)
        .min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_monotonic() {
        let c = ManualClock::new(10);
        c.set(5);
        assert_eq!(c.now_ns(), 10);
        c.advance(7);
        assert_eq!(c.now_ns(), 17);
        c.advance(u64::MAX);
        assert_eq!(c.now_ns(), u64::MAX);
    }

    #[test]
    fn tick_conversions_round_trip() {
        for hz in [1_193_182u64, 3_579_545, 32_768, 1] {
            for t in [0u64, 1, 2, 65_535, 65_536, 1 << 40] {
                let ns = ticks_to_ns(t, hz);
                if ns == u64::MAX {
                    continue; // saturated
                }
                assert!(ns_to_ticks(ns, hz) >= t);
                if ns > 0 {
                    assert!(ns_to_ticks(ns - 1, hz) < t, "hz {hz} t {t}");
                }
            }
        }
    }
}
