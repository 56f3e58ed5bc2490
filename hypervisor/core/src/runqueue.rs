//! Per-CPU scheduler run queue: 256 priorities, round robin within one.
//!
//! Design (NOVA's `Sc::ready_enqueue`/`ready_dequeue`): one circular doubly linked list
//! per priority and a 256-bit bitmap of non-empty priorities, so enqueue, dequeue, the
//! highest-priority lookup and removal of any element are O(1). The lists are intrusive
//! in a slab owned by the queue: enqueueing hands back a [`Ticket`] (slot index and
//! generation), which the kernel keeps in the SC to remove it again when its EC blocks or
//! dies; a stale ticket is detected by its generation and does nothing.
//!
//! Invariants: bit `p` of the bitmap is set iff `heads[p]` is `Some`; every linked slot
//! is occupied and on exactly one list; `len` counts the linked slots.
//!
//! The slab grows with `try_reserve`, so enqueue reports allocation failure instead of
//! aborting; [`RunQueue::with_capacity`] pre-allocates for a kernel that wants no
//! allocation on the scheduling path. [`Budget`] does the quantum accounting.

use alloc::vec::Vec;

/// Number of priorities; higher numbers run first.
pub const PRIORITIES: usize = 256;

/// Names an enqueued element; see [`RunQueue::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    idx: u32,
    gen: u32,
}

/// Enqueueing needed memory that could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory;

#[derive(Debug)]
struct Slot<H> {
    item: Option<H>,
    gen: u32,
    prio: u8,
    prev: u32,
    next: u32,
}

/// A run queue of handles `H` (e.g. SC pointers or indices).
#[derive(Debug)]
pub struct RunQueue<H> {
    bitmap: [u64; 4],
    heads: [Option<u32>; PRIORITIES],
    slots: Vec<Slot<H>>,
    free: Vec<u32>,
    len: usize,
}

impl<H> Default for RunQueue<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> RunQueue<H> {
    /// An empty queue; allocates nothing.
    pub const fn new() -> Self {
        RunQueue {
            bitmap: [0; 4],
            heads: [None; PRIORITIES],
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// An empty queue with room for `n` elements without further allocation.
    pub fn with_capacity(n: usize) -> Result<Self, NoMemory> {
        let mut q = Self::new();
        q.slots.try_reserve_exact(n).map_err(|_| NoMemory)?;
        q.free.try_reserve_exact(n).map_err(|_| NoMemory)?;
        Ok(q)
    }

    /// Number of queued elements.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The highest priority with a queued element.
    pub fn highest(&self) -> Option<u8> {
        (0..4).rev().find_map(|w| {
            let bits = self.bitmap[w];
            (bits != 0).then(|| (w as u32 * 64 + 63 - bits.leading_zeros()) as u8)
        })
    }

    /// The element that [`dequeue`](Self::dequeue) would return.
    pub fn peek(&self) -> Option<(&H, u8)> {
        let p = self.highest()?;
        let head = self.heads[usize::from(p)]?;
        self.slots.get(head as usize)?.item.as_ref().map(|h| (h, p))
    }

    /// Queues `h` at priority `prio`, at the tail (round robin) or, with `front`, at
    /// the head (a preempted SC that still has budget continues first).
    pub fn enqueue(&mut self, h: H, prio: u8, front: bool) -> Result<Ticket, NoMemory> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| NoMemory)?;
                self.slots.try_reserve(1).map_err(|_| NoMemory)?;
                // Reserve the free-list room now so `remove` never allocates.
                self.free
                    .try_reserve(self.slots.len() + 1)
                    .map_err(|_| NoMemory)?;
                self.slots.push(Slot {
                    item: None,
                    gen: 0,
                    prio: 0,
                    prev: i,
                    next: i,
                });
                i
            }
        };
        let p = usize::from(prio);
        let (prev, next) = match self.heads[p] {
            None => {
                self.heads[p] = Some(idx);
                self.bitmap[p / 64] |= 1 << (p % 64);
                (idx, idx)
            }
            Some(head) => {
                let tail = self.slots[head as usize].prev;
                self.slots[tail as usize].next = idx;
                self.slots[head as usize].prev = idx;
                if front {
                    self.heads[p] = Some(idx);
                }
                (tail, head)
            }
        };
        let s = &mut self.slots[idx as usize];
        s.item = Some(h);
        s.prio = prio;
        s.prev = prev;
        s.next = next;
        self.len += 1;
        Ok(Ticket { idx, gen: s.gen })
    }

    /// Unlinks an occupied slot and returns its element.
    fn unlink(&mut self, idx: u32) -> Option<H> {
        let s = self.slots.get_mut(idx as usize)?;
        let item = s.item.take()?;
        s.gen = s.gen.wrapping_add(1);
        let (prev, next, p) = (s.prev, s.next, usize::from(s.prio));
        if next == idx {
            self.heads[p] = None;
            self.bitmap[p / 64] &= !(1 << (p % 64));
        } else {
            self.slots[prev as usize].next = next;
            self.slots[next as usize].prev = prev;
            if self.heads[p] == Some(idx) {
                self.heads[p] = Some(next);
            }
        }
        // Room was reserved by `enqueue`.
        self.free.push(idx);
        self.len -= 1;
        Some(item)
    }

    /// Takes the first element of the highest priority.
    pub fn dequeue(&mut self) -> Option<(H, u8)> {
        let p = self.highest()?;
        let head = self.heads[usize::from(p)]?;
        self.unlink(head).map(|h| (h, p))
    }

    /// Removes the element `t` names (its EC blocked or died); `None` if it was already
    /// dequeued or removed.
    pub fn remove(&mut self, t: Ticket) -> Option<H> {
        if self.slots.get(t.idx as usize)?.gen != t.gen {
            return None;
        }
        self.unlink(t.idx)
    }

    /// Whether `t` is still queued.
    pub fn contains(&self, t: Ticket) -> bool {
        self.slots
            .get(t.idx as usize)
            .is_some_and(|s| s.gen == t.gen && s.item.is_some())
    }
}

/// Quantum accounting of a scheduling context, in TSC ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    quantum: u64,
    left: u64,
    used: u64,
}

impl Budget {
    /// A full budget of `quantum` ticks.
    pub const fn new(quantum: u64) -> Self {
        Budget {
            quantum,
            left: quantum,
            used: 0,
        }
    }

    /// The quantum.
    pub const fn quantum(&self) -> u64 {
        self.quantum
    }

    /// Ticks left in the current quantum.
    pub const fn left(&self) -> u64 {
        self.left
    }

    /// All ticks consumed so far (for `sc_ctrl`).
    pub const fn used(&self) -> u64 {
        self.used
    }

    /// Charges `ticks` of run time; returns whether the quantum is used up.
    pub fn consume(&mut self, ticks: u64) -> bool {
        self.used = self.used.saturating_add(ticks);
        self.left = self.left.saturating_sub(ticks);
        self.left == 0
    }

    /// Charges the time between two TSC readings (a TSC that went backwards counts 0).
    pub fn consume_between(&mut self, start: u64, now: u64) -> bool {
        self.consume(now.saturating_sub(start))
    }

    /// The TSC value at which the quantum runs out if the SC runs from `now`.
    pub const fn deadline(&self, now: u64) -> u64 {
        now.saturating_add(self.left)
    }

    /// Starts a fresh quantum.
    pub fn refill(&mut self) {
        self.left = self.quantum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    use peregrine_rng::Rng;

    #[test]
    fn priorities_and_round_robin() {
        let mut q = RunQueue::new();
        assert_eq!(q.dequeue(), None);
        assert_eq!(q.highest(), None);
        q.enqueue('a', 10, false).unwrap();
        q.enqueue('b', 200, false).unwrap();
        q.enqueue('c', 10, false).unwrap();
        q.enqueue('d', 255, false).unwrap();
        q.enqueue('e', 0, false).unwrap();
        q.enqueue('f', 10, true).unwrap();
        assert_eq!(q.highest(), Some(255));
        assert_eq!(q.peek(), Some((&'d', 255)));
        let order: Vec<char> = std::iter::from_fn(|| q.dequeue().map(|x| x.0)).collect();
        assert_eq!(order, ['d', 'b', 'f', 'a', 'c', 'e']);
        assert!(q.is_empty());
    }

    #[test]
    fn remove_by_ticket() {
        let mut q = RunQueue::new();
        let a = q.enqueue(1, 5, false).unwrap();
        let b = q.enqueue(2, 5, false).unwrap();
        let c = q.enqueue(3, 5, false).unwrap();
        assert_eq!(q.remove(b), Some(2));
        assert_eq!(q.remove(b), None);
        assert!(!q.contains(b));
        // The slot is reused; the old ticket stays stale.
        let d = q.enqueue(4, 7, false).unwrap();
        assert_eq!(q.remove(b), None);
        assert!(q.contains(d));
        assert_eq!(q.dequeue(), Some((4, 7)));
        assert_eq!(q.remove(a), Some(1));
        assert_eq!(q.dequeue(), Some((3, 5)));
        assert_eq!(q.remove(c), None);
        assert_eq!(q.highest(), None);
    }

    #[test]
    fn random_against_model() {
        let mut rng = Rng::from_state(77);
        let mut q = RunQueue::with_capacity(16).unwrap();
        let mut model: Vec<VecDeque<u32>> = vec![VecDeque::new(); PRIORITIES];
        let mut tickets: Vec<(u32, Ticket)> = Vec::new();
        for n in 0..50_000u32 {
            match rng.below(4) {
                0 | 1 => {
                    let p = if rng.below(2) == 0 {
                        rng.below(256)
                    } else {
                        60 + rng.below(8)
                    } as u8;
                    let front = rng.below(4) == 0;
                    let t = q.enqueue(n, p, front).unwrap();
                    if front {
                        model[usize::from(p)].push_front(n);
                    } else {
                        model[usize::from(p)].push_back(n);
                    }
                    tickets.push((n, t));
                }
                2 => {
                    let want = (0..PRIORITIES)
                        .rev()
                        .find_map(|p| model[p].pop_front().map(|h| (h, p as u8)));
                    assert_eq!(q.dequeue(), want);
                }
                _ => {
                    if tickets.is_empty() {
                        continue;
                    }
                    let i = rng.below(tickets.len() as u64) as usize;
                    let (h, t) = tickets.swap_remove(i);
                    let mut found = None;
                    for l in model.iter_mut() {
                        if let Some(pos) = l.iter().position(|&x| x == h) {
                            found = l.remove(pos);
                        }
                    }
                    assert_eq!(q.remove(t), found);
                }
            }
            let n: usize = model.iter().map(|l| l.len()).sum();
            assert_eq!(q.len(), n);
            let hi = (0..PRIORITIES).rev().find(|&p| !model[p].is_empty());
            assert_eq!(q.highest().map(usize::from), hi);
        }
    }

    #[test]
    fn budget() {
        let mut b = Budget::new(1000);
        assert!(!b.consume(400));
        assert_eq!(b.deadline(50), 650);
        assert!(!b.consume_between(100, 50));
        assert!(b.consume(700));
        assert_eq!((b.left(), b.used()), (0, 1100));
        b.refill();
        assert_eq!(b.left(), 1000);
        assert!(b.consume(u64::MAX));
        assert_eq!(b.used(), u64::MAX);
        assert_eq!(Budget::new(5).deadline(u64::MAX), u64::MAX);
    }
}
