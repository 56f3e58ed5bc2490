//! The arithmetic of the benchmark figures, free of hypercalls so that the host tests
//! it (`tests/tests/bench_calc.rs` includes this file).

/// Minimum, median and 99th percentile of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The smallest sample.
    pub min: u64,
    /// The sample at index `n / 2` of the sorted samples (the upper median).
    pub median: u64,
    /// The nearest-rank 99th percentile: the sample at rank ⌈0.99·n⌉.
    pub p99: u64,
    /// The number of samples.
    pub n: usize,
}

/// Sorts `samples` and summarizes them; `None` when there are none.
pub fn summarize(samples: &mut [u64]) -> Option<Summary> {
    samples.sort_unstable();
    let n = samples.len();
    let min = *samples.first()?;
    // Nearest rank: ⌈99·n/100⌉, 1-based.
    let rank = (n * 99).div_ceil(100).max(1);
    Some(Summary {
        min,
        median: samples[n / 2],
        p99: samples[rank - 1],
        n,
    })
}

/// The PIT's input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Nanoseconds until a PIT channel loaded with `count` in mode 0 (interrupt on terminal
/// count) raises its output, as QEMU's i8254 model computes it: `count` periods of
/// [`PIT_HZ`], rounded down to a nanosecond. Under `-icount shift=0` QEMU's virtual
/// clock, which drives the PIT, is the TSC: one nanosecond per instruction.
pub fn pit_ns(count: u16) -> u64 {
    (u128::from(count) * 1_000_000_000 / u128::from(PIT_HZ)) as u64
}

/// Latency from a PIT interrupt to the thread it woke: `woken` (the woken thread's TSC)
/// minus the TSC at which the PIT fired, `loaded` (the TSC when the count's last byte
/// was written) plus [`pit_ns`]. `None` when the thread ran before that (the timing
/// model does not hold, e.g. another interrupt woke it).
pub fn irq_latency(loaded: u64, count: u16, woken: u64) -> Option<u64> {
    woken.checked_sub(loaded.checked_add(pit_ns(count))?)
}

/// Kernel-memory pages an object cost: the creator's free quota went from `before` to
/// `after`, of which `passed_on` pages are quota the new object holds itself (a PD's
/// quota, still free for its own use) and so no cost.
pub fn pages_charged(before: u64, after: u64, passed_on: u64) -> Option<u64> {
    before.checked_sub(after)?.checked_sub(passed_on)
}

/// One sample of a timed call to a stamping handler: the client's TSC `t0` before the
/// call and `t1` after it, the handler's TSC `t_in` when it started and `t_out` before
/// its reply. `(call one-way, reply one-way)`, or `None` when the stamps are out of
/// order (not a reply from the stamping handler).
pub fn one_way(t0: u64, t_in: u64, t_out: u64, t1: u64) -> Option<(u64, u64)> {
    if t0 <= t_in && t_in <= t_out && t_out <= t1 {
        Some((t_in - t0, t1 - t_out))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_constant_and_varying_samples() {
        assert_eq!(summarize(&mut []), None);
        let mut one = [7];
        assert_eq!(
            summarize(&mut one),
            Some(Summary {
                min: 7,
                median: 7,
                p99: 7,
                n: 1
            })
        );
        // 1..=1000 shuffled: min 1, median the 501st, p99 the 990th.
        let mut v: std::vec::Vec<u64> = (1..=1000).map(|i| (i * 389) % 1000 + 1).collect();
        let s = summarize(&mut v).unwrap();
        assert_eq!((s.min, s.median, s.p99, s.n), (1, 501, 990, 1000));
        // 100 samples with one outlier: the p99 is the 99th, not the outlier.
        let mut w = [10u64; 100];
        w[3] = 5000;
        let s = summarize(&mut w).unwrap();
        assert_eq!((s.min, s.median, s.p99), (10, 10, 10));
        w[4] = 6000;
        assert_eq!(summarize(&mut w).unwrap().p99, 5000);
    }

    #[test]
    fn pit_time_matches_qemu() {
        // QEMU: muldiv64(count, NANOSECONDS_PER_SECOND, PIT_FREQ).
        assert_eq!(pit_ns(0), 0);
        assert_eq!(pit_ns(1), 838);
        assert_eq!(pit_ns(100), 83_809);
        assert_eq!(pit_ns(11932), 10_000_150);
        assert_eq!(pit_ns(u16::MAX), 54_924_563);
    }

    #[test]
    fn irq_latency_from_the_pit_model() {
        assert_eq!(irq_latency(1_000, 100, 1_000 + 83_809 + 1_234), Some(1_234));
        assert_eq!(irq_latency(1_000, 100, 1_000 + 83_809), Some(0));
        assert_eq!(irq_latency(1_000, 100, 50_000), None);
        assert_eq!(irq_latency(u64::MAX, 100, u64::MAX), None);
    }

    #[test]
    fn quota_pages() {
        assert_eq!(pages_charged(100, 97, 0), Some(3));
        assert_eq!(pages_charged(100, 90, 8), Some(2));
        assert_eq!(pages_charged(100, 101, 0), None);
        assert_eq!(pages_charged(100, 95, 8), None);
    }

    #[test]
    fn one_way_split() {
        assert_eq!(one_way(100, 300, 320, 500), Some((200, 180)));
        assert_eq!(one_way(100, 100, 100, 100), Some((0, 0)));
        assert_eq!(one_way(100, 50, 320, 500), None);
        assert_eq!(one_way(100, 300, 320, 310), None);
    }
}
