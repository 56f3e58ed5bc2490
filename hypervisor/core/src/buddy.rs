//! Buddy allocator over page frames, orders `0..=MAX_ORDER`.
//!
//! Metadata lives in a caller-provided array of one `u64` per frame of the managed span
//! (0.2 % of the memory it describes; the kernel carves it out of boot memory, tests pass
//! a `Vec`), so the allocator needs no heap at all. Each word holds:
//!
//! | bits   | meaning                                                    |
//! |--------|------------------------------------------------------------|
//! | 0–4    | order of the block this frame heads (free or allocated)    |
//! | 5      | FREE: the frame heads a free block                         |
//! | 6      | ALLOC: the frame heads an allocated block                  |
//! | 7      | MANAGED: the frame was added with `add_region`             |
//! | 8–35   | next free block of the same order (frame index, or NIL)    |
//! | 36–63  | previous free block of the same order                      |
//!
//! so the free lists are doubly linked through the metadata and a buddy can be unlinked
//! in O(1) while coalescing. Blocks are naturally aligned in *absolute* frame numbers
//! (a 2 MiB block really is 2 MiB aligned and can back a large page). A bitmask of
//! non-empty orders finds the smallest fitting block in O(1); alloc and free are
//! O(MAX_ORDER).
//!
//! Invariants: a FREE head's buddy of the same order is never also a FREE head (blocks
//! are fully coalesced); every free block lies in managed frames and is on the list of
//! its order; `free_pages` is the sum of the free blocks' sizes. `free` accepts only the
//! exact `(pfn, order)` of an allocated block, so double frees, wrong orders and frees of
//! never-allocated frames are reported, not corrupting.
//!
//! At most 2^28 − 1 frames (1 TiB) per allocator; the kernel may use several.

/// Largest block order (2^20 frames = 4 GiB).
pub const MAX_ORDER: u8 = 20;
const ORDERS: usize = MAX_ORDER as usize + 1;

const ORDER_MASK: u64 = 0x1f;
const FREE: u64 = 1 << 5;
const ALLOC: u64 = 1 << 6;
const MANAGED: u64 = 1 << 7;
const LINK_BITS: u32 = 28;
const NIL: u32 = (1 << LINK_BITS) - 1;
const LINK_MASK: u64 = NIL as u64;
const NEXT_SHIFT: u32 = 8;
const PREV_SHIFT: u32 = NEXT_SHIFT + LINK_BITS;

/// Largest number of frames one allocator manages.
pub const MAX_FRAMES: usize = NIL as usize;

/// Why a buddy-allocator operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuddyError {
    /// Frames outside the span the metadata covers.
    OutOfRange,
    /// The frame is not aligned to the order, or the order exceeds [`MAX_ORDER`].
    BadBlock,
    /// `free` of a block that is not allocated with exactly this order (double free,
    /// wrong order, or a frame never handed out).
    NotAllocated,
    /// `add_region` of frames that are already managed.
    Overlap,
    /// The metadata array is longer than [`MAX_FRAMES`].
    TooLarge,
}

/// A buddy allocator; `M` is the metadata storage (`&'static mut [u64]`, `Vec<u64>`).
#[derive(Debug)]
pub struct Buddy<M> {
    meta: M,
    base: u64,
    heads: [u32; ORDERS],
    nonempty: u32,
    free_pages: u64,
}

impl<M: AsRef<[u64]> + AsMut<[u64]>> Buddy<M> {
    /// An allocator for frames `base_pfn .. base_pfn + meta.len()`, with nothing free yet.
    /// Clears `meta`.
    pub fn new(base_pfn: u64, mut meta: M) -> Result<Self, BuddyError> {
        let m = meta.as_mut();
        if m.len() > MAX_FRAMES {
            return Err(BuddyError::TooLarge);
        }
        if base_pfn.checked_add(m.len() as u64).is_none() {
            return Err(BuddyError::OutOfRange);
        }
        m.fill(0);
        Ok(Buddy {
            meta,
            base: base_pfn,
            heads: [NIL; ORDERS],
            nonempty: 0,
            free_pages: 0,
        })
    }

    /// Free frames.
    pub const fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Number of free blocks of `order` (walks the list; for tests and statistics).
    pub fn free_blocks(&self, order: u8) -> usize {
        let mut n = 0;
        let mut cur = self.heads.get(usize::from(order)).copied().unwrap_or(NIL);
        while cur != NIL {
            n += 1;
            cur = self
                .word(cur)
                .map_or(NIL, |w| ((w >> NEXT_SHIFT) & LINK_MASK) as u32);
        }
        n
    }

    fn index(&self, pfn: u64) -> Option<u32> {
        let i = pfn.checked_sub(self.base)?;
        (i < self.meta.as_ref().len() as u64).then_some(i as u32)
    }

    fn word(&self, i: u32) -> Option<u64> {
        self.meta.as_ref().get(i as usize).copied()
    }

    fn set(&mut self, i: u32, w: u64) {
        if let Some(x) = self.meta.as_mut().get_mut(i as usize) {
            *x = w;
        }
    }

    fn set_link(&mut self, i: u32, shift: u32, to: u32) {
        if let Some(w) = self.word(i) {
            self.set(i, (w & !(LINK_MASK << shift)) | (u64::from(to) << shift));
        }
    }

    fn push(&mut self, i: u32, order: u8) {
        let o = usize::from(order);
        let head = self.heads[o];
        self.set(
            i,
            MANAGED
                | FREE
                | u64::from(order)
                | (u64::from(head) << NEXT_SHIFT)
                | (LINK_MASK << PREV_SHIFT),
        );
        if head != NIL {
            self.set_link(head, PREV_SHIFT, i);
        }
        self.heads[o] = i;
        self.nonempty |= 1 << o;
        self.free_pages += 1 << order;
    }

    fn unlink(&mut self, i: u32, order: u8) {
        let o = usize::from(order);
        let w = self.word(i).unwrap_or(0);
        let next = ((w >> NEXT_SHIFT) & LINK_MASK) as u32;
        let prev = ((w >> PREV_SHIFT) & LINK_MASK) as u32;
        if prev == NIL {
            self.heads[o] = next;
        } else {
            self.set_link(prev, NEXT_SHIFT, next);
        }
        if next != NIL {
            self.set_link(next, PREV_SHIFT, prev);
        }
        if self.heads[o] == NIL {
            self.nonempty &= !(1 << o);
        }
        self.set(i, MANAGED);
        self.free_pages -= 1 << order;
    }

    fn is_free_head(&self, pfn: u64, order: u8) -> Option<u32> {
        let i = self.index(pfn)?;
        let w = self.word(i)?;
        (w & FREE != 0 && (w & ORDER_MASK) as u8 == order).then_some(i)
    }

    /// Frees a block and merges it with free buddies.
    fn release(&mut self, mut pfn: u64, mut order: u8) {
        while order < MAX_ORDER {
            let buddy = pfn ^ (1u64 << order);
            let Some(bi) = self.is_free_head(buddy, order) else {
                break;
            };
            self.unlink(bi, order);
            pfn = pfn.min(buddy);
            order += 1;
        }
        if let Some(i) = self.index(pfn) {
            self.push(i, order);
        }
    }

    /// Hands frames `pfn .. pfn + count` to the allocator.
    pub fn add_region(&mut self, pfn: u64, count: u64) -> Result<(), BuddyError> {
        if count == 0 {
            return Ok(());
        }
        let last = pfn.checked_add(count - 1).ok_or(BuddyError::OutOfRange)?;
        let (Some(first), Some(end)) = (self.index(pfn), self.index(last)) else {
            return Err(BuddyError::OutOfRange);
        };
        let meta = self.meta.as_mut();
        let Some(range) = meta.get_mut(first as usize..=end as usize) else {
            return Err(BuddyError::OutOfRange);
        };
        if range.iter().any(|&w| w != 0) {
            return Err(BuddyError::Overlap);
        }
        range.fill(MANAGED);
        let mut cur = pfn;
        let mut left = count;
        while left > 0 {
            let align = cur.trailing_zeros().min(u32::from(MAX_ORDER));
            let fit = 63 - left.leading_zeros();
            let order = align.min(fit) as u8;
            self.release(cur, order);
            cur += 1 << order;
            left -= 1 << order;
        }
        Ok(())
    }

    /// Allocates `2^order` contiguous, naturally aligned frames; returns the first.
    pub fn alloc(&mut self, order: u8) -> Option<u64> {
        if order > MAX_ORDER {
            return None;
        }
        let avail = self.nonempty & (u32::MAX << order);
        if avail == 0 {
            return None;
        }
        let mut j = avail.trailing_zeros() as u8;
        let i = self.heads[usize::from(j)];
        self.unlink(i, j);
        while j > order {
            j -= 1;
            self.push(i + (1 << j), j);
        }
        self.set(i, MANAGED | ALLOC | u64::from(order));
        Some(self.base + u64::from(i))
    }

    /// Returns a block that [`alloc`](Self::alloc) handed out, with the same order.
    pub fn free(&mut self, pfn: u64, order: u8) -> Result<(), BuddyError> {
        if order > MAX_ORDER || pfn & ((1 << order) - 1) != 0 {
            return Err(BuddyError::BadBlock);
        }
        let i = self.index(pfn).ok_or(BuddyError::OutOfRange)?;
        if self.word(i) != Some(MANAGED | ALLOC | u64::from(order)) {
            return Err(BuddyError::NotAllocated);
        }
        self.set(i, MANAGED);
        self.release(pfn, order);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use peregrine_rng::Rng;

    #[test]
    fn simple_alloc_free_coalesce() {
        let mut b = Buddy::new(0x100, vec![0u64; 1024]).unwrap();
        b.add_region(0x100, 1024).unwrap();
        assert_eq!(b.free_pages(), 1024);
        // 0x100..0x500: blocks at 0x100 (order 8), 0x200 (order 9), 0x400 (order 8).
        assert_eq!((b.free_blocks(8), b.free_blocks(9)), (2, 1));
        let p = b.alloc(0).unwrap();
        assert!((0x100..0x500).contains(&p));
        assert_eq!(b.free_pages(), 1023);
        let q = b.alloc(3).unwrap();
        assert_eq!(q % 8, 0);
        assert_eq!(b.free(p, 1), Err(BuddyError::NotAllocated));
        assert_eq!(b.free(q + 1, 0), Err(BuddyError::NotAllocated));
        b.free(p, 0).unwrap();
        assert_eq!(b.free(p, 0), Err(BuddyError::NotAllocated));
        b.free(q, 3).unwrap();
        assert_eq!(b.free_pages(), 1024);
        assert_eq!((b.free_blocks(8), b.free_blocks(9)), (2, 1));
        assert_eq!(b.free_blocks(0), 0);
    }

    #[test]
    fn bad_inputs() {
        let mut b = Buddy::new(0, vec![0u64; 64]).unwrap();
        assert_eq!(b.add_region(60, 5), Err(BuddyError::OutOfRange));
        assert_eq!(b.add_region(u64::MAX, 2), Err(BuddyError::OutOfRange));
        b.add_region(0, 10).unwrap();
        assert_eq!(b.add_region(9, 2), Err(BuddyError::Overlap));
        assert_eq!(b.free(3, 1), Err(BuddyError::BadBlock));
        assert_eq!(b.free(0, 21), Err(BuddyError::BadBlock));
        assert_eq!(b.free(64, 0), Err(BuddyError::OutOfRange));
        assert_eq!(b.free(20, 0), Err(BuddyError::NotAllocated));
        assert_eq!(b.alloc(21), None);
        assert_eq!(b.alloc(4), None);
        assert_eq!(b.alloc(3), Some(0));
        assert_eq!(b.alloc(1), Some(8));
        assert_eq!(b.alloc(0), None);
        assert!(Buddy::new(u64::MAX, vec![0u64; 2]).is_err());
    }

    #[test]
    fn unaligned_regions_give_aligned_blocks() {
        let mut b = Buddy::new(1000, vec![0u64; 5000]).unwrap();
        b.add_region(1001, 3000).unwrap();
        b.add_region(4500, 300).unwrap();
        assert_eq!(b.free_pages(), 3300);
        while let Some(p) = b.alloc(9) {
            assert_eq!(p % 512, 0);
            assert!((1001..4001).contains(&p) && p + 512 <= 4001);
        }
    }

    #[test]
    fn random_against_model() {
        let mut rng = Rng::from_state(4242);
        let n = 1 << 14;
        let base = 0x7_0003;
        let mut b = Buddy::new(base, vec![0u64; n]).unwrap();
        // A few regions with holes between them.
        let regions = [(base, 3000u64), (base + 3100, 5000), (base + 9000, 7000)];
        for &(p, c) in &regions {
            b.add_region(p, c).unwrap();
        }
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let initial: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_blocks(o)).collect();
        let mut live: BTreeMap<u64, u8> = BTreeMap::new();
        let mut used = 0u64;
        for _ in 0..40_000 {
            if rng.below(2) == 0 {
                let order = rng.below(8) as u8;
                if let Some(p) = b.alloc(order) {
                    assert_eq!(p % (1 << order), 0);
                    assert!(regions
                        .iter()
                        .any(|&(rb, rc)| p >= rb && p + (1 << order) <= rb + rc));
                    // No overlap with a live block.
                    if let Some((&q, &qo)) = live.range(..=p).next_back() {
                        assert!(q + (1 << qo) <= p);
                    }
                    if let Some((&q, _)) = live.range(p..).next() {
                        assert!(p + (1 << order) <= q);
                    }
                    live.insert(p, order);
                    used += 1 << order;
                }
            } else if !live.is_empty() {
                let k = rng.below(live.len() as u64) as usize;
                let (&p, &o) = live.iter().nth(k).unwrap();
                if rng.below(8) == 0 {
                    assert_eq!(
                        b.free(p, o + 1),
                        Err(if p % (2 << o) == 0 {
                            BuddyError::NotAllocated
                        } else {
                            BuddyError::BadBlock
                        })
                    );
                }
                b.free(p, o).unwrap();
                assert_eq!(b.free(p, o), Err(BuddyError::NotAllocated));
                live.remove(&p);
                used -= 1 << o;
            }
            assert_eq!(b.free_pages() + used, total);
        }
        for (p, o) in live {
            b.free(p, o).unwrap();
        }
        let after: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_blocks(o)).collect();
        assert_eq!(after, initial, "fully coalesced again");
    }
}
