//! Which RAM the kernel takes for its frame pool, and the ranges it records for it.
//!
//! At boot the kernel takes pages of RAM for its pool and tells the root task, in the
//! HIP, which physical ranges are the hypervisor's; the root treats all other RAM as
//! free. The recorded ranges and the pages taken must therefore agree exactly: a page
//! in the pool that no recorded range covers would be handed to the root as well.
//! [`select`] takes pages in ascending order and records them in a [`PoolRanges`] of
//! fixed capacity (the HIP has room for a bounded number of descriptors).

/// Bytes of a page.
pub const PAGE: u64 = 4096;

/// Up to `N` recorded ranges `[start, end)` of page addresses, in ascending order.
#[derive(Debug, Clone)]
pub struct PoolRanges<const N: usize> {
    ranges: [(u64, u64); N],
    len: usize,
}

impl<const N: usize> Default for PoolRanges<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> PoolRanges<N> {
    /// No ranges.
    pub const fn new() -> Self {
        Self {
            ranges: [(0, 0); N],
            len: 0,
        }
    }

    /// Records the page at `addr` (page-aligned, above every page recorded so far): it
    /// extends the last range when it follows it directly, else it starts a new range.
    /// False when that would need more than `N` ranges: the page is not recorded.
    pub fn record(&mut self, addr: u64) -> bool {
        if self.len > 0 && self.ranges[self.len - 1].1 == addr {
            self.ranges[self.len - 1].1 = addr + PAGE;
            true
        } else if self.len < N {
            self.ranges[self.len] = (addr, addr + PAGE);
            self.len += 1;
            true
        } else {
            false
        }
    }

    /// Whether a recorded range covers `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.as_slice().iter().any(|&(s, e)| addr >= s && addr < e)
    }

    /// The recorded ranges.
    pub fn as_slice(&self) -> &[(u64, u64)] {
        &self.ranges[..self.len]
    }
}

/// Takes up to `want` pages for the pool from `ram` (page-aligned ranges `[start, end)`
/// in ascending order), skipping pages that overlap a `reserved` range, recording each
/// page in `ranges` and calling `take` with its address. A page is taken only once it is
/// recorded: when the ranges are full, the pool ends there. Returns the number of pages
/// taken.
pub fn select<const N: usize>(
    ram: impl IntoIterator<Item = (u64, u64)>,
    reserved: &[(u64, u64)],
    want: usize,
    ranges: &mut PoolRanges<N>,
    mut take: impl FnMut(u64),
) -> usize {
    let busy = |a: u64| reserved.iter().any(|&(s, e)| a + PAGE > s && a < e);
    let mut taken = 0;
    for (s, end) in ram {
        let mut a = s;
        while a < end && taken < want {
            if !busy(a) {
                // A page no range can record stays out of the pool: it remains the
                // root's. Once one fails, no later (higher, not adjacent) page can
                // extend the last range either.
                if !ranges.record(a) {
                    return taken;
                }
                take(a);
                taken += 1;
            }
            a += PAGE;
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ranges = Vec<(u64, u64)>;

    /// 40 one-page holes in 41 MiB of RAM: 41 fragments, more than 32 ranges can hold.
    fn fragmented() -> (Ranges, Ranges) {
        let ram = vec![(0x10_0000, 0x10_0000 + (41 << 20))];
        let reserved = (1..=40u64)
            .map(|i| {
                let a = 0x10_0000 + (i << 20);
                (a, a + PAGE)
            })
            .collect();
        (ram, reserved)
    }

    #[test]
    fn every_page_taken_is_recorded_with_a_fragmented_map() {
        let (ram, reserved) = fragmented();
        let mut ranges = PoolRanges::<32>::new();
        let mut taken = Vec::new();
        let n = select(ram, &reserved, usize::MAX, &mut ranges, |a| taken.push(a));
        assert_eq!(n, taken.len());
        let unrecorded: Vec<u64> = taken
            .iter()
            .copied()
            .filter(|&a| !ranges.contains(a))
            .collect();
        assert!(
            unrecorded.is_empty(),
            "{} pages taken into the pool but not recorded (first {:#x}): the root would \
             get them as free RAM",
            unrecorded.len(),
            unrecorded[0]
        );
        assert_eq!(ranges.as_slice().len(), 32);
    }

    #[test]
    fn reserved_pages_are_never_taken_and_contiguous_pages_share_a_range() {
        let ram = [(0x10_0000, 0x20_0000), (0x30_0000, 0x30_3000)];
        let reserved = [(0x14_0000, 0x15_0000)];
        let mut ranges = PoolRanges::<4>::new();
        let mut taken = Vec::new();
        select(ram, &reserved, usize::MAX, &mut ranges, |a| taken.push(a));
        assert!(taken.iter().all(|&a| !(0x14_0000..0x15_0000).contains(&a)));
        assert_eq!(
            ranges.as_slice(),
            &[
                (0x10_0000, 0x14_0000),
                (0x15_0000, 0x20_0000),
                (0x30_0000, 0x30_3000)
            ]
        );
        assert_eq!(taken.len(), 0x40 + 0xb0 + 3);
    }

    #[test]
    fn want_limits_the_pages_taken() {
        let mut ranges = PoolRanges::<2>::new();
        let mut taken = 0;
        let n = select([(0, 0x10_0000)], &[], 5, &mut ranges, |_| taken += 1);
        assert_eq!((n, taken), (5, 5));
        assert_eq!(ranges.as_slice(), &[(0, 5 * PAGE)]);
    }
}
