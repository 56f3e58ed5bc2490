//! Object capability space: a sparse map from selector to capability.
//!
//! Design (NOVA's `space_obj`, without the hardware trick of mapping the table into
//! the kernel's address space): a three-level radix table with 128 entries per level,
//! so selectors have up to [`MAX_SEL_BITS`] = 21 bits. Only the top level is sized by the
//! configured limit; middle and leaf tables are allocated on first insert into their
//! range and freed again when their last entry goes, so an empty space costs no heap
//! and a lookup is three indexed loads.
//!
//! Invariants:
//! - every selector with a capability is `< limit` (`limit <= 2^27`);
//! - a middle or leaf table exists iff it holds at least one capability, and its `used`
//!   count equals the number of occupied entries below it;
//! - `len()` equals the number of occupied slots.
//!
//! Allocation never aborts: tables are allocated with `try_reserve_exact`, and a failure
//! comes back as [`CapError::NoMemory`]. Nothing here panics on any input.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Bits of selector resolved per table level.
/// (128 entries: a middle or leaf table fits a page, so the kernel can charge a PD's
/// space page by page.)
pub const LEVEL_BITS: u32 = 7;
/// Entries per table.
const ENTRIES: usize = 1 << LEVEL_BITS;
/// Selector width the table can represent (three levels).
pub const MAX_SEL_BITS: u32 = 3 * LEVEL_BITS;
/// Largest limit a [`CapSpace`] accepts; larger limits are clamped to it.
pub const MAX_LIMIT: u64 = 1 << MAX_SEL_BITS;

/// A capability: the object it names and the permission bits for that object type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap<T> {
    /// The object (an index, handle or reference-counted pointer).
    pub obj: T,
    /// Type-specific permission bits (see `peregrine_abi::perm`).
    pub perm: u8,
}

/// Why a capability-space operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapError {
    /// The selector (or range) lies at or above the space's limit.
    OutOfRange,
    /// The slot already holds a capability.
    Occupied,
    /// The range is not naturally aligned to its order, or the order is too large.
    BadRange,
    /// A table could not be allocated.
    NoMemory,
}

struct Leaf<T> {
    slots: Box<[Option<Cap<T>>; ENTRIES]>,
    used: u16,
}

struct Mid<T> {
    leaves: Box<[Option<Leaf<T>>; ENTRIES]>,
    used: u16,
}

/// A middle or leaf table, all empty. A fixed-size array, so that a lookup's masked
/// index needs no bounds check.
fn try_table<E>() -> Option<Box<[Option<E>; ENTRIES]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(ENTRIES).ok()?;
    v.resize_with(ENTRIES, || None);
    // Exact capacity: the conversion reuses the allocation.
    v.into_boxed_slice().try_into().ok()
}

const fn split(sel: u64) -> (usize, usize, usize) {
    let m = (ENTRIES - 1) as u64;
    (
        (sel >> (2 * LEVEL_BITS)) as usize,
        ((sel >> LEVEL_BITS) & m) as usize,
        (sel & m) as usize,
    )
}

/// A capability space.
pub struct CapSpace<T> {
    top: Vec<Option<Mid<T>>>,
    limit: u64,
    len: usize,
    tables: usize,
}

impl<T> core::fmt::Debug for CapSpace<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CapSpace")
            .field("limit", &self.limit)
            .field("len", &self.len)
            .field("tables", &self.tables)
            .finish()
    }
}

impl<T> CapSpace<T> {
    /// An empty space for selectors `0..limit` (clamped to [`MAX_LIMIT`]). Allocates
    /// nothing.
    pub const fn new(limit: u64) -> Self {
        let limit = if limit > MAX_LIMIT { MAX_LIMIT } else { limit };
        CapSpace {
            top: Vec::new(),
            limit,
            len: 0,
            tables: 0,
        }
    }

    /// The selector limit.
    pub const fn limit(&self) -> u64 {
        self.limit
    }

    /// Number of capabilities held.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the space holds no capability.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of heap tables currently allocated (top level included once it exists);
    /// lets the kernel account the space's memory against a quota.
    pub const fn tables(&self) -> usize {
        self.tables
    }

    /// Bytes of kernel heap the space's tables take: what the kernel charges the
    /// space's owner for (rounded up to pages).
    pub fn bytes(&self) -> usize {
        if self.top.is_empty() {
            return 0;
        }
        let mids = self.top.iter().filter(|m| m.is_some()).count();
        let leaves = self.tables - mids - 1;
        self.top.capacity() * core::mem::size_of::<Option<Mid<T>>>()
            + mids * ENTRIES * core::mem::size_of::<Option<Leaf<T>>>()
            + leaves * ENTRIES * core::mem::size_of::<Option<Cap<T>>>()
    }

    /// [`bytes`](Self::bytes) in whole pages.
    pub fn pages(&self) -> u64 {
        self.bytes().div_ceil(4096) as u64
    }

    /// The capability at `sel`, if any.
    pub fn get(&self, sel: u64) -> Option<&Cap<T>> {
        // No comparison with the limit: no selector at or above it holds a capability
        // (`insert` refuses them), and `top.get` bounds the index (the IPC path's
        // lookup: one compare less).
        let (t, m, l) = split(sel);
        self.top
            .get(t)?
            .as_ref()?
            .leaves
            .get(m)?
            .as_ref()?
            .slots
            .get(l)?
            .as_ref()
    }

    /// The capability at `sel`, mutably (to change its permissions in place).
    pub fn get_mut(&mut self, sel: u64) -> Option<&mut Cap<T>> {
        if sel >= self.limit {
            return None;
        }
        let (t, m, l) = split(sel);
        self.top
            .get_mut(t)?
            .as_mut()?
            .leaves
            .get_mut(m)?
            .as_mut()?
            .slots
            .get_mut(l)?
            .as_mut()
    }

    /// Whether `sel` holds a capability.
    pub fn contains(&self, sel: u64) -> bool {
        self.get(sel).is_some()
    }

    /// Puts `cap` at `sel`. On failure the capability comes back with the error.
    pub fn insert(&mut self, sel: u64, cap: Cap<T>) -> Result<(), (CapError, Cap<T>)> {
        if sel >= self.limit {
            return Err((CapError::OutOfRange, cap));
        }
        if self.contains(sel) {
            return Err((CapError::Occupied, cap));
        }
        let (t, m, l) = split(sel);
        if self.top.is_empty() {
            // Top level: just enough entries for the limit.
            let n = split(self.limit - 1).0 + 1;
            if self.top.try_reserve_exact(n).is_err() {
                return Err((CapError::NoMemory, cap));
            }
            self.top.resize_with(n, || None);
            self.tables += 1;
        }
        let Some(mid_slot) = self.top.get_mut(t) else {
            return Err((CapError::OutOfRange, cap));
        };
        let mut new_tables = 0;
        if mid_slot.is_none() {
            let Some(leaves) = try_table() else {
                self.drop_empty_top();
                return Err((CapError::NoMemory, cap));
            };
            *mid_slot = Some(Mid { leaves, used: 0 });
            new_tables += 1;
        }
        let Some(mid) = mid_slot.as_mut() else {
            return Err((CapError::NoMemory, cap));
        };
        let Some(leaf_slot) = mid.leaves.get_mut(m) else {
            return Err((CapError::OutOfRange, cap));
        };
        if leaf_slot.is_none() {
            let Some(slots) = try_table() else {
                if mid.used == 0 {
                    *mid_slot = None;
                }
                self.drop_empty_top();
                return Err((CapError::NoMemory, cap));
            };
            *leaf_slot = Some(Leaf { slots, used: 0 });
            mid.used += 1;
            new_tables += 1;
        }
        let Some(leaf) = leaf_slot.as_mut() else {
            return Err((CapError::NoMemory, cap));
        };
        let Some(slot) = leaf.slots.get_mut(l) else {
            return Err((CapError::OutOfRange, cap));
        };
        *slot = Some(cap);
        leaf.used += 1;
        self.tables += new_tables;
        self.len += 1;
        Ok(())
    }

    /// Takes the capability at `sel` out, freeing tables that become empty.
    pub fn remove(&mut self, sel: u64) -> Option<Cap<T>> {
        if sel >= self.limit {
            return None;
        }
        let (t, m, l) = split(sel);
        let mid_slot = self.top.get_mut(t)?;
        let mid = mid_slot.as_mut()?;
        let leaf_slot = mid.leaves.get_mut(m)?;
        let leaf = leaf_slot.as_mut()?;
        let cap = leaf.slots.get_mut(l)?.take()?;
        self.len -= 1;
        leaf.used -= 1;
        if leaf.used == 0 {
            *leaf_slot = None;
            self.tables -= 1;
            mid.used -= 1;
            if mid.used == 0 {
                *mid_slot = None;
                self.tables -= 1;
            }
        }
        self.drop_empty_top();
        Some(cap)
    }

    /// Frees the top table once the space is empty.
    fn drop_empty_top(&mut self) {
        if self.len == 0 && !self.top.is_empty() {
            self.top = Vec::new();
            self.tables -= 1;
        }
    }

    /// Checks a naturally aligned range `base .. base + 2^order` against the limit and
    /// returns its last selector.
    fn check_range(&self, base: u64, order: u8) -> Result<u64, CapError> {
        if u32::from(order) > MAX_SEL_BITS {
            return Err(CapError::BadRange);
        }
        let mask = (1u64 << order) - 1;
        if base & mask != 0 {
            return Err(CapError::BadRange);
        }
        let last = base | mask;
        if last >= self.limit {
            return Err(CapError::OutOfRange);
        }
        Ok(last)
    }

    /// Iterates over the occupied selectors of the naturally aligned range
    /// `base .. base + 2^order` in ascending order, skipping absent tables.
    pub fn range(&self, base: u64, order: u8) -> Result<Range<'_, T>, CapError> {
        let last = self.check_range(base, order)?;
        Ok(Range {
            space: self,
            next: Some(base),
            last,
        })
    }

    /// Iterates over all capabilities.
    pub fn iter(&self) -> Range<'_, T> {
        Range {
            space: self,
            next: if self.limit == 0 { None } else { Some(0) },
            last: self.limit.saturating_sub(1),
        }
    }

    /// Removes every capability in the naturally aligned range, handing each to `f`.
    /// Returns how many were removed.
    pub fn remove_range(
        &mut self,
        base: u64,
        order: u8,
        mut f: impl FnMut(u64, Cap<T>),
    ) -> Result<usize, CapError> {
        let last = self.check_range(base, order)?;
        let mut n = 0;
        let mut cur = Some(base);
        while let Some(sel) = self.next_occupied(cur, last) {
            if let Some(cap) = self.remove(sel) {
                f(sel, cap);
                n += 1;
            }
            cur = sel.checked_add(1);
        }
        Ok(n)
    }

    /// Removes every capability (a PD is destroyed), handing each to `f`.
    pub fn clear(&mut self, f: impl FnMut(u64, Cap<T>)) {
        let last = self.limit.saturating_sub(1);
        if self.limit == 0 {
            return;
        }
        // Infallible: the whole space is aligned only if `limit` is a power of two, so
        // walk it directly instead of through `remove_range`.
        let mut f = f;
        let mut cur = Some(0);
        while let Some(sel) = self.next_occupied(cur, last) {
            if let Some(cap) = self.remove(sel) {
                f(sel, cap);
            }
            cur = sel.checked_add(1);
        }
    }

    /// The first occupied selector in `from ..= last`.
    fn next_occupied(&self, from: Option<u64>, last: u64) -> Option<u64> {
        let mut sel = from?;
        const LEAF_SPAN: u64 = 1 << LEVEL_BITS;
        const MID_SPAN: u64 = 1 << (2 * LEVEL_BITS);
        while sel <= last {
            let (t, m, l) = split(sel);
            let Some(Some(mid)) = self.top.get(t) else {
                sel = (sel | (MID_SPAN - 1)).checked_add(1)?;
                continue;
            };
            let Some(Some(leaf)) = mid.leaves.get(m) else {
                sel = (sel | (LEAF_SPAN - 1)).checked_add(1)?;
                continue;
            };
            if let Some(Some(_)) = leaf.slots.get(l) {
                return Some(sel);
            }
            sel = sel.checked_add(1)?;
        }
        None
    }
}

/// Iterator over the occupied selectors of a range; see [`CapSpace::range`].
pub struct Range<'a, T> {
    space: &'a CapSpace<T>,
    next: Option<u64>,
    last: u64,
}

impl<T> core::fmt::Debug for Range<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Range")
            .field("next", &self.next)
            .field("last", &self.last)
            .finish()
    }
}

impl<'a, T> Iterator for Range<'a, T> {
    type Item = (u64, &'a Cap<T>);

    fn next(&mut self) -> Option<Self::Item> {
        let sel = self.space.next_occupied(self.next, self.last)?;
        self.next = sel.checked_add(1);
        self.space.get(sel).map(|c| (sel, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use peregrine_rng::Rng;

    fn cap(obj: u32, perm: u8) -> Cap<u32> {
        Cap { obj, perm }
    }

    #[test]
    fn empty_space_allocates_nothing() {
        let s: CapSpace<u32> = CapSpace::new(1 << 20);
        assert_eq!(s.tables(), 0);
        assert!(s.is_empty());
        assert!(s.get(0).is_none());
        assert!(s.get(u64::MAX).is_none());
        assert_eq!(s.iter().count(), 0);
    }

    #[test]
    fn insert_get_remove() {
        let mut s = CapSpace::new(1 << 20);
        s.insert(5, cap(50, 3)).unwrap();
        assert_eq!(s.get(5), Some(&cap(50, 3)));
        assert_eq!(s.tables(), 3);
        let (e, c) = s.insert(5, cap(51, 1)).unwrap_err();
        assert_eq!(e, CapError::Occupied);
        assert_eq!(c, cap(51, 1));
        s.get_mut(5).unwrap().perm = 1;
        assert_eq!(s.get(5).unwrap().perm, 1);
        assert_eq!(s.remove(5), Some(cap(50, 1)));
        assert_eq!(s.remove(5), None);
        assert_eq!(s.tables(), 0);
        assert!(s.is_empty());
    }

    #[test]
    fn pages_follow_the_tables() {
        // Option<Cap<u64>>: 24 bytes, so a leaf is 3 KiB; a middle table's entries (a
        // boxed leaf and its count) are 16 bytes, 2 KiB; the top table for a 2^18 limit
        // has 16 entries of 16 bytes (256 bytes).
        let mut s: CapSpace<u64> = CapSpace::new(1 << 18);
        assert_eq!((s.bytes(), s.pages()), (0, 0));
        s.insert(0, Cap { obj: 1, perm: 1 }).unwrap();
        assert_eq!((s.bytes(), s.pages()), (256 + 2048 + 3072, 2));
        s.insert(127, Cap { obj: 1, perm: 1 }).unwrap();
        assert_eq!(s.pages(), 2);
        s.insert(128, Cap { obj: 1, perm: 1 }).unwrap();
        assert_eq!((s.bytes(), s.pages()), (256 + 2048 + 6144, 3));
        s.insert(1 << 14, Cap { obj: 1, perm: 1 }).unwrap();
        assert_eq!(s.bytes(), 256 + 4096 + 9216);
        s.remove(0);
        s.remove(127);
        s.remove(1 << 14);
        assert_eq!(s.pages(), 2);
        s.remove(128);
        assert_eq!(s.pages(), 0);
    }

    #[test]
    fn limit_is_enforced() {
        let mut s = CapSpace::new(1000);
        assert_eq!(
            s.insert(1000, cap(1, 1)).unwrap_err().0,
            CapError::OutOfRange
        );
        assert_eq!(
            s.insert(u64::MAX, cap(1, 1)).unwrap_err().0,
            CapError::OutOfRange
        );
        s.insert(999, cap(1, 1)).unwrap();
        assert_eq!(s.range(0, 10).unwrap_err(), CapError::OutOfRange);
        assert_eq!(s.range(512, 9).unwrap_err(), CapError::OutOfRange);
        assert_eq!(s.range(512, 8).unwrap().count(), 0);
        assert_eq!(s.range(992, 3).unwrap().count(), 1);
        let big: CapSpace<u32> = CapSpace::new(u64::MAX);
        assert_eq!(big.limit(), MAX_LIMIT);
        let mut zero: CapSpace<u32> = CapSpace::new(0);
        assert_eq!(
            zero.insert(0, cap(0, 0)).unwrap_err().0,
            CapError::OutOfRange
        );
        assert_eq!(zero.iter().count(), 0);
        zero.clear(|_, _| panic!());
    }

    #[test]
    fn ranges_must_be_aligned() {
        let s: CapSpace<u32> = CapSpace::new(1 << 20);
        assert_eq!(s.range(3, 1).unwrap_err(), CapError::BadRange);
        assert_eq!(s.range(0, 64).unwrap_err(), CapError::BadRange);
        assert_eq!(s.range(0, 28).unwrap_err(), CapError::BadRange);
        assert!(s.range(0, 20).is_ok());
    }

    #[test]
    fn range_iteration_skips_holes() {
        let mut s = CapSpace::new(MAX_LIMIT);
        let sels = [0u64, 1, 511, 512, 1 << 18, (1 << 18) + 7, MAX_LIMIT - 1];
        for (i, &sel) in sels.iter().enumerate() {
            s.insert(sel, cap(i as u32, 1)).unwrap();
        }
        let all: Vec<u64> = s.iter().map(|(sel, _)| sel).collect();
        assert_eq!(all, sels);
        let r: Vec<u64> = s.range(1 << 18, 18).unwrap().map(|(sel, _)| sel).collect();
        assert_eq!(r, [1 << 18, (1 << 18) + 7]);
        let r: Vec<u64> = s.range(0, 9).unwrap().map(|(sel, _)| sel).collect();
        assert_eq!(r, [0, 1, 511]);
        let mut removed = Vec::new();
        assert_eq!(
            s.remove_range(0, 10, |sel, c| removed.push((sel, c.obj)))
                .unwrap(),
            4
        );
        assert_eq!(removed, [(0, 0), (1, 1), (511, 2), (512, 3)]);
        let mut n = 0;
        s.clear(|_, _| n += 1);
        assert_eq!(n, 3);
        assert!(s.is_empty());
        assert_eq!(s.tables(), 0);
    }

    #[test]
    fn random_against_btreemap() {
        let mut rng = Rng::from_state(0x1234_5678_9abc_def1);
        let limit = 1u64 << 20;
        let mut s = CapSpace::new(limit);
        let mut model: BTreeMap<u64, Cap<u32>> = BTreeMap::new();
        for step in 0..20_000u32 {
            // Cluster selectors so tables fill and empty again.
            let sel = if rng.below(4) == 0 {
                rng.below(limit + 100)
            } else {
                rng.below(2048)
            };
            match rng.below(5) {
                0 | 1 => {
                    let c = cap(step, (step % 32) as u8);
                    let r = s.insert(sel, c.clone());
                    if sel >= limit {
                        assert_eq!(r.unwrap_err().0, CapError::OutOfRange);
                    } else {
                        match model.entry(sel) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                assert_eq!(r.unwrap_err().0, CapError::Occupied)
                            }
                            std::collections::btree_map::Entry::Vacant(e) => {
                                r.unwrap();
                                e.insert(c);
                            }
                        }
                    }
                }
                2 => assert_eq!(s.remove(sel), model.remove(&sel)),
                3 => assert_eq!(s.get(sel), model.get(&sel)),
                _ => {
                    let order = rng.below(12) as u8;
                    let base = sel & !((1 << order) - 1);
                    let got: Vec<(u64, u32)> = match s.range(base, order) {
                        Ok(it) => it.map(|(k, c)| (k, c.obj)).collect(),
                        Err(e) => {
                            assert_eq!(e, CapError::OutOfRange);
                            continue;
                        }
                    };
                    let want: Vec<(u64, u32)> = model
                        .range(base..base + (1 << order))
                        .map(|(&k, c)| (k, c.obj))
                        .collect();
                    assert_eq!(got, want);
                }
            }
            assert_eq!(s.len(), model.len());
        }
        let got: Vec<u64> = s.iter().map(|(k, _)| k).collect();
        let want: Vec<u64> = model.keys().copied().collect();
        assert_eq!(got, want);
    }
}
