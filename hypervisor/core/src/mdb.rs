//! The mapping database: who delegated what to whom, for recursive revocation.
//!
//! One [`Mdb`] tracks one kind of resource (memory pages, I/O ports or object
//! selectors); the kernel keeps one per kind. Items are numbered by `u64` addresses in
//! *spaces* named by an opaque [`SpaceId`] (a PD's host memory, its guest memory, its
//! port space, its object space, …: the kernel chooses the encoding).
//!
//! A *node* is a naturally aligned range `base .. base + 2^order` in one space with a
//! permission mask, an *origin* (the address the range has in the root node it derives
//! from, e.g. the physical frame for memory) and, unless it is a root, its *source*: the
//! `(space, address)` it was delegated from.
//!
//! Invariants (checked by [`Mdb::check`]):
//! 1. nodes of one space never overlap, so an address of a space has at most one node;
//! 2. every non-root node's source range `src .. src + 2^order` lies inside exactly one
//!    node of the source space (its *parent*), whose permissions include the child's;
//! 3. the child index holds exactly one entry per non-root node, keyed by its source.
//!
//! Because children are indexed by *source address* rather than by parent identity,
//! splitting a parent into pieces never touches its children: a node's children are
//! simply the index entries whose source lies inside its range. That makes partial
//! revocation simple: revoking a sub-range `R` of a node `N` revokes the children
//! derived from `R` (whole children inside `R`, and recursively the matching sub-range
//! of children that contain `R`), and, when `N` itself goes, replaces `N` by the
//! `order(N) - order(R)` buddy pieces that make up `N` without `R`.
//!
//! Revocation walks an explicit work list, so the depth of a delegation chain costs heap,
//! not stack. Every removed range is reported to a callback as a [`Removed`] so the
//! kernel can unmap it from page tables, port bitmaps or capability tables.
//!
//! Cost: lookup, delegate and the per-node steps of revoke are `O(log n)` B-tree
//! operations (revoke additionally scans one index slot per order between the revoked
//! and the covering range). B-tree node allocation uses the global allocator; a kernel
//! must treat allocation failure there as fatal or pre-check its quota.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

/// Names a space (the kernel's choice of encoding, e.g. PD number and space kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpaceId(pub u64);

/// Largest order of a range (the range then covers half of the 64-bit address space).
pub const MAX_ORDER: u8 = 63;

/// Why a mapping-database operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MdbError {
    /// A base is not aligned to the order, the order exceeds [`MAX_ORDER`], or an origin
    /// would overflow.
    BadRange,
    /// No single node covers the source range.
    NotFound,
    /// The target range overlaps an existing node of the target space.
    Overlap,
    /// The permission mask leaves no permission.
    NoPerm,
}

/// A node as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The space the range is in.
    pub space: SpaceId,
    /// The first address.
    pub base: u64,
    /// log2 of the number of items.
    pub order: u8,
    /// Permission bits.
    pub perm: u8,
    /// The address of `base` in the root node the range derives from.
    pub origin: u64,
    /// Where `base` was delegated from; `None` for a root.
    pub src: Option<(SpaceId, u64)>,
}

/// A range that revocation took away; the kernel unmaps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// The space.
    pub space: SpaceId,
    /// The first address.
    pub base: u64,
    /// log2 of the number of items.
    pub order: u8,
    /// The permissions the range had.
    pub perm: u8,
    /// The origin of `base` (physical frame for memory).
    pub origin: u64,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    order: u8,
    perm: u8,
    origin: u64,
    src: Option<(SpaceId, u64)>,
}

/// The nodes a [`Mdb::delegate_range`] created, as a slice: most often one, kept
/// without an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegated {
    /// One node.
    One(Mapping),
    /// Any number of nodes.
    Many(Vec<Mapping>),
}

impl core::ops::Deref for Delegated {
    type Target = [Mapping];

    fn deref(&self) -> &[Mapping] {
        match self {
            Delegated::One(m) => core::slice::from_ref(m),
            Delegated::Many(v) => v,
        }
    }
}

/// Child index key: (source space, source base, order, child space, child base).
type ChildKey = (SpaceId, u64, u8, SpaceId, u64);

const fn mask(order: u8) -> u64 {
    if order >= 64 {
        u64::MAX
    } else {
        (1u64 << order) - 1
    }
}

const fn aligned(base: u64, order: u8) -> bool {
    order <= MAX_ORDER && base & mask(order) == 0
}

/// One pending step of a revocation: take away `base .. base + 2^order` in `space`
/// (from its descendants, and from the nodes themselves if `this`).
#[derive(Debug, Clone, Copy)]
struct Work {
    space: SpaceId,
    base: u64,
    order: u8,
    this: bool,
}

/// The mapping database for one resource kind.
#[derive(Debug, Default)]
pub struct Mdb {
    nodes: BTreeMap<(SpaceId, u64), Node>,
    children: BTreeSet<ChildKey>,
    /// Nodes per space (what a space's owner is charged for).
    counts: BTreeMap<SpaceId, u64>,
}

impl Mdb {
    /// An empty database.
    pub const fn new() -> Self {
        Mdb {
            nodes: BTreeMap::new(),
            children: BTreeSet::new(),
            counts: BTreeMap::new(),
        }
    }

    /// Number of nodes in `space` (a split by a partial revocation adds nodes; the
    /// kernel charges each space's owner for its nodes).
    pub fn count(&self, space: SpaceId) -> u64 {
        self.counts.get(&space).copied().unwrap_or(0)
    }

    fn insert_raw(&mut self, space: SpaceId, base: u64, node: Node) {
        if self.nodes.insert((space, base), node).is_none() {
            *self.counts.entry(space).or_insert(0) += 1;
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn mapping(space: SpaceId, base: u64, n: &Node) -> Mapping {
        Mapping {
            space,
            base,
            order: n.order,
            perm: n.perm,
            origin: n.origin,
            src: n.src,
        }
    }

    /// The node key covering `addr` in `space`.
    fn covering(&self, space: SpaceId, addr: u64) -> Option<(u64, &Node)> {
        let (&(_, base), node) = self.nodes.range((space, 0)..=(space, addr)).next_back()?;
        (addr - base <= mask(node.order)).then_some((base, node))
    }

    /// Bases of the nodes overlapping `base ..= last` in `space`, ascending.
    fn overlapping(&self, space: SpaceId, base: u64, last: u64) -> Vec<u64> {
        let mut v = Vec::new();
        if let Some((b, _)) = self.covering(space, base) {
            if b < base {
                v.push(b);
            }
        }
        v.extend(
            self.nodes
                .range((space, base)..=(space, last))
                .map(|(&(_, b), _)| b),
        );
        v
    }

    fn overlaps(&self, space: SpaceId, base: u64, last: u64) -> bool {
        self.covering(space, base).is_some()
            || self
                .nodes
                .range((space, base)..=(space, last))
                .next()
                .is_some()
    }

    /// The node covering `addr` in `space` (for the `lookup` hypercall and for finding
    /// the origin of a page to map: `origin + (addr - base)`).
    pub fn lookup(&self, space: SpaceId, addr: u64) -> Option<Mapping> {
        self.covering(space, addr)
            .map(|(b, n)| Self::mapping(space, b, n))
    }

    /// The nodes of `space` overlapping `base ..= last`, in ascending order.
    pub fn mappings_in(&self, space: SpaceId, base: u64, last: u64) -> Vec<Mapping> {
        self.overlapping(space, base, last)
            .into_iter()
            .filter_map(|b| {
                self.nodes
                    .get(&(space, b))
                    .map(|n| Self::mapping(space, b, n))
            })
            .collect()
    }

    /// The nodes of `space` in ascending order.
    pub fn mappings(&self, space: SpaceId) -> impl Iterator<Item = Mapping> + '_ {
        self.nodes
            .range((space, 0)..=(space, u64::MAX))
            .map(move |(&(_, b), n)| Self::mapping(space, b, n))
    }

    /// The direct children of the node at `(space, base)` (all nodes delegated from it).
    pub fn children(&self, space: SpaceId, base: u64) -> Vec<Mapping> {
        let Some(node) = self.nodes.get(&(space, base)) else {
            return Vec::new();
        };
        let last = base | mask(node.order);
        self.children
            .range(
                (space, base, 0, SpaceId(0), 0)
                    ..=(space, last, u8::MAX, SpaceId(u64::MAX), u64::MAX),
            )
            .filter_map(|&(_, _, _, cs, cb)| self.lookup(cs, cb))
            .collect()
    }

    /// Records a root node: the kernel's original possession of `base .. base + 2^order`
    /// in `space`, whose items have origins `origin ..`.
    pub fn insert_root(
        &mut self,
        space: SpaceId,
        base: u64,
        order: u8,
        perm: u8,
        origin: u64,
    ) -> Result<Mapping, MdbError> {
        if !aligned(base, order) || origin.checked_add(mask(order)).is_none() {
            return Err(MdbError::BadRange);
        }
        if perm == 0 {
            return Err(MdbError::NoPerm);
        }
        if self.overlaps(space, base, base | mask(order)) {
            return Err(MdbError::Overlap);
        }
        let node = Node {
            order,
            perm,
            origin,
            src: None,
        };
        self.insert_raw(space, base, node);
        Ok(Self::mapping(space, base, &node))
    }

    fn insert_child(&mut self, space: SpaceId, base: u64, node: Node) {
        if let Some((ss, sb)) = node.src {
            self.children.insert((ss, sb, node.order, space, base));
        }
        self.insert_raw(space, base, node);
    }

    fn remove_node(&mut self, space: SpaceId, base: u64) -> Option<Node> {
        let node = self.nodes.remove(&(space, base))?;
        if let Some(c) = self.counts.get_mut(&space) {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&space);
            }
        }
        if let Some((ss, sb)) = node.src {
            self.children.remove(&(ss, sb, node.order, space, base));
        }
        Some(node)
    }

    /// Delegates `src_base .. src_base + 2^order` of `src` (which one node must cover) to
    /// `dst_base ..` of `dst` with the parent's permissions reduced by `perm_mask`.
    pub fn delegate(
        &mut self,
        src: SpaceId,
        src_base: u64,
        dst: SpaceId,
        dst_base: u64,
        order: u8,
        perm_mask: u8,
    ) -> Result<Mapping, MdbError> {
        if !aligned(src_base, order) || !aligned(dst_base, order) {
            return Err(MdbError::BadRange);
        }
        let (pbase, parent) = self.covering(src, src_base).ok_or(MdbError::NotFound)?;
        if parent.order < order {
            return Err(MdbError::NotFound);
        }
        let perm = parent.perm & perm_mask;
        if perm == 0 {
            return Err(MdbError::NoPerm);
        }
        let origin = parent.origin + (src_base - pbase);
        if self.overlaps(dst, dst_base, dst_base | mask(order)) {
            return Err(MdbError::Overlap);
        }
        let node = Node {
            order,
            perm,
            origin,
            src: Some((src, src_base)),
        };
        self.insert_child(dst, dst_base, node);
        Ok(Self::mapping(dst, dst_base, &node))
    }

    /// Delegates every part of `src_base .. src_base + 2^order` that nodes of `src` cover
    /// (holes are skipped, like NOVA) to the same offsets from `dst_base` in `dst`.
    /// Parts whose permissions `perm_mask` would empty are skipped. All or nothing: if any
    /// target part overlaps an existing node, nothing changes and `Overlap` comes back.
    /// Returns the new nodes.
    pub fn delegate_range(
        &mut self,
        src: SpaceId,
        src_base: u64,
        dst: SpaceId,
        dst_base: u64,
        order: u8,
        perm_mask: u8,
    ) -> Result<Delegated, MdbError> {
        if !aligned(src_base, order) || !aligned(dst_base, order) {
            return Err(MdbError::BadRange);
        }
        // The common case, a range inside one node (a page out of a larger mapping, one
        // capability): one new node, and no list of the source's nodes to build.
        if let Some((pb, parent)) = self.covering(src, src_base) {
            if parent.order >= order {
                let parent = *parent;
                let perm = parent.perm & perm_mask;
                if perm == 0 {
                    return Ok(Delegated::Many(Vec::new()));
                }
                if self.overlaps(dst, dst_base, dst_base | mask(order)) {
                    return Err(MdbError::Overlap);
                }
                let node = Node {
                    order,
                    perm,
                    origin: parent.origin + (src_base - pb),
                    src: Some((src, src_base)),
                };
                self.insert_child(dst, dst_base, node);
                return Ok(Delegated::One(Self::mapping(dst, dst_base, &node)));
            }
        }
        let last = src_base | mask(order);
        let mut new = Vec::new();
        for pb in self.overlapping(src, src_base, last) {
            let Some(parent) = self.nodes.get(&(src, pb)) else {
                continue;
            };
            let (ib, io) = if parent.order >= order {
                (src_base, order)
            } else {
                (pb, parent.order)
            };
            let perm = parent.perm & perm_mask;
            if perm == 0 {
                continue;
            }
            let db = dst_base + (ib - src_base);
            if self.overlaps(dst, db, db | mask(io)) {
                return Err(MdbError::Overlap);
            }
            let node = Node {
                order: io,
                perm,
                origin: parent.origin + (ib - pb),
                src: Some((src, ib)),
            };
            new.push(Self::mapping(dst, db, &node));
        }
        for m in &new {
            let node = Node {
                order: m.order,
                perm: m.perm,
                origin: m.origin,
                src: m.src,
            };
            self.insert_child(m.space, m.base, node);
        }
        Ok(Delegated::Many(new))
    }

    /// Revokes `base .. base + 2^order` of `space`: removes everything delegated from it,
    /// recursively, and with `include_self` the range itself. Nodes only partly inside
    /// the range lose just that part (they are split into aligned pieces). Every range
    /// taken away is passed to `removed`.
    pub fn revoke(
        &mut self,
        space: SpaceId,
        base: u64,
        order: u8,
        include_self: bool,
        removed: impl FnMut(Removed),
    ) -> Result<(), MdbError> {
        self.revoke_with(space, base, order, include_self, |_, _| true, removed)
    }

    /// [`revoke`](Self::revoke), asking `can_split(space, extra)` before a node of
    /// `space` would be split into pieces that add `extra` nodes: when it answers no
    /// (the space's owner cannot pay for them), the whole node goes instead, with
    /// everything derived from it. Revocation never needs memory it cannot get.
    pub fn revoke_with(
        &mut self,
        space: SpaceId,
        base: u64,
        order: u8,
        include_self: bool,
        mut can_split: impl FnMut(SpaceId, u64) -> bool,
        removed: impl FnMut(Removed),
    ) -> Result<(), MdbError> {
        if !aligned(base, order) {
            return Err(MdbError::BadRange);
        }
        let work = alloc::vec![Work {
            space,
            base,
            order,
            this: include_self,
        }];
        self.run(work, &mut can_split, removed);
        Ok(())
    }

    /// [`revoke`](Self::revoke) collecting the removed ranges.
    pub fn revoke_collect(
        &mut self,
        space: SpaceId,
        base: u64,
        order: u8,
        include_self: bool,
    ) -> Result<Vec<Removed>, MdbError> {
        self.revoke_collect_with(space, base, order, include_self, |_, _| true)
    }

    /// [`revoke_with`](Self::revoke_with) collecting the removed ranges.
    pub fn revoke_collect_with(
        &mut self,
        space: SpaceId,
        base: u64,
        order: u8,
        include_self: bool,
        can_split: impl FnMut(SpaceId, u64) -> bool,
    ) -> Result<Vec<Removed>, MdbError> {
        let mut v = Vec::new();
        self.revoke_with(space, base, order, include_self, can_split, |r| v.push(r))?;
        Ok(v)
    }

    /// Removes everything `space` holds and everything delegated from it (its PD is
    /// destroyed).
    pub fn destroy_space(&mut self, space: SpaceId, removed: impl FnMut(Removed)) {
        self.destroy_space_some(space, usize::MAX, removed);
    }

    /// [`destroy_space`](Self::destroy_space) for at most `max` of the space's nodes
    /// (with everything derived from them); true when the space is empty afterwards. A
    /// kernel calls it again and again, letting go of its lock in between, so that no
    /// space makes others wait for all of it.
    pub fn destroy_space_some(
        &mut self,
        space: SpaceId,
        max: usize,
        removed: impl FnMut(Removed),
    ) -> bool {
        let work = self
            .mappings(space)
            .take(max)
            .map(|m| Work {
                space,
                base: m.base,
                order: m.order,
                this: true,
            })
            .collect();
        // Whole nodes go, and what derives from them lies inside them: nothing splits.
        self.run(work, &mut |_, _| true, removed);
        self.count(space) == 0
    }

    fn run(
        &mut self,
        mut work: Vec<Work>,
        can_split: &mut dyn FnMut(SpaceId, u64) -> bool,
        mut removed: impl FnMut(Removed),
    ) {
        while let Some(w) = work.pop() {
            let last = w.base | mask(w.order);
            for nb in self.overlapping(w.space, w.base, last) {
                let Some(&node) = self.nodes.get(&(w.space, nb)) else {
                    continue;
                };
                // Both ranges are naturally aligned and overlap: one contains the other.
                let (mut ib, mut io) = if node.order >= w.order {
                    (w.base, w.order)
                } else {
                    (nb, node.order)
                };
                // Taking a part leaves the rest as `node.order - io` buddy pieces: one
                // node becomes that many.
                if w.this && io < node.order && !can_split(w.space, u64::from(node.order - io) - 1)
                {
                    (ib, io) = (nb, node.order);
                }
                self.revoke_part(w.space, nb, node, ib, io, w.this, &mut work, &mut removed);
            }
        }
    }

    /// Takes `ib .. ib + 2^io` (inside the node at `(space, nb)`) away from the node's
    /// children, and from the node itself if `this`.
    #[allow(clippy::too_many_arguments)]
    fn revoke_part(
        &mut self,
        space: SpaceId,
        nb: u64,
        node: Node,
        ib: u64,
        io: u8,
        this: bool,
        work: &mut Vec<Work>,
        removed: &mut impl FnMut(Removed),
    ) {
        let ilast = ib | mask(io);
        // Children derived from inside the range go entirely.
        for &(_, _, co, cs, cb) in self.children.range(
            (space, ib, 0, SpaceId(0), 0)..=(space, ilast, u8::MAX, SpaceId(u64::MAX), u64::MAX),
        ) {
            if co <= io {
                work.push(Work {
                    space: cs,
                    base: cb,
                    order: co,
                    this: true,
                });
            }
        }
        // Children derived from a larger range containing this one lose the matching part.
        for j in io + 1..=node.order {
            let sb = ib & !mask(j);
            for &(_, _, _, cs, cb) in self
                .children
                .range((space, sb, j, SpaceId(0), 0)..=(space, sb, j, SpaceId(u64::MAX), u64::MAX))
            {
                work.push(Work {
                    space: cs,
                    base: cb + (ib - sb),
                    order: io,
                    this: true,
                });
            }
        }
        if !this {
            return;
        }
        self.remove_node(space, nb);
        removed(Removed {
            space,
            base: ib,
            order: io,
            perm: node.perm,
            origin: node.origin + (ib - nb),
        });
        // The rest of the node stays, as the buddy pieces around the removed range.
        for j in io..node.order {
            let pb = (ib & !mask(j)) ^ (1u64 << j);
            let off = pb - nb;
            self.insert_child(
                space,
                pb,
                Node {
                    order: j,
                    perm: node.perm,
                    origin: node.origin + off,
                    src: node.src.map(|(ss, sb)| (ss, sb + off)),
                },
            );
        }
    }

    /// Verifies the invariants listed in the module documentation; for tests and debug
    /// checks (`O(n log n)`).
    pub fn check(&self) -> Result<(), &'static str> {
        let mut prev: Option<(SpaceId, u64)> = None;
        let mut n_children = 0;
        for (&(space, base), node) in &self.nodes {
            if !aligned(base, node.order) {
                return Err("misaligned node");
            }
            if let Some((ps, plast)) = prev {
                if ps == space && plast >= base {
                    return Err("overlapping nodes");
                }
            }
            prev = Some((space, base | mask(node.order)));
            if let Some((ss, sb)) = node.src {
                n_children += 1;
                let Some((pb, parent)) = self.covering(ss, sb) else {
                    return Err("source not covered");
                };
                if sb | mask(node.order) > pb | mask(parent.order) {
                    return Err("source range leaves its parent");
                }
                if node.perm & !parent.perm != 0 {
                    return Err("child has more permissions than parent");
                }
                if node.origin != parent.origin + (sb - pb) {
                    return Err("origin mismatch");
                }
                if !self.children.contains(&(ss, sb, node.order, space, base)) {
                    return Err("child missing from index");
                }
            }
        }
        if n_children != self.children.len() {
            return Err("stale child index entries");
        }
        let mut counts = BTreeMap::new();
        for &(space, _) in self.nodes.keys() {
            *counts.entry(space).or_insert(0u64) += 1;
        }
        if counts != self.counts {
            return Err("per-space node counts wrong");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap as Map, BTreeSet as Set};

    const K: SpaceId = SpaceId(0);
    const A: SpaceId = SpaceId(1);
    const B: SpaceId = SpaceId(2);
    const C: SpaceId = SpaceId(3);

    use peregrine_rng::Rng;

    fn items(v: &[Removed]) -> Set<(SpaceId, u64)> {
        let mut s = Set::new();
        for r in v {
            for i in 0..(1u64 << r.order) {
                assert!(s.insert((r.space, r.base + i)), "item removed twice");
            }
        }
        s
    }

    #[test]
    fn root_and_lookup() {
        let mut m = Mdb::new();
        m.insert_root(K, 0x100, 8, 7, 0x100).unwrap();
        assert_eq!(m.insert_root(K, 0x180, 4, 7, 0), Err(MdbError::Overlap));
        assert_eq!(m.insert_root(K, 0x3, 2, 7, 0), Err(MdbError::BadRange));
        assert_eq!(m.insert_root(K, 0, 64, 7, 0), Err(MdbError::BadRange));
        assert_eq!(m.insert_root(K, 0, 0, 0, 0), Err(MdbError::NoPerm));
        assert_eq!(m.insert_root(K, 0, 4, 1, u64::MAX), Err(MdbError::BadRange));
        let l = m.lookup(K, 0x1ff).unwrap();
        assert_eq!((l.base, l.order, l.perm, l.src), (0x100, 8, 7, None));
        assert!(m.lookup(K, 0x200).is_none());
        assert!(m.lookup(K, 0xff).is_none());
        assert!(m.lookup(A, 0x100).is_none());
        m.insert_root(K, 1 << 63, 63, 1, 0).unwrap();
        let l = m.lookup(K, u64::MAX).unwrap();
        assert_eq!(l.origin + (u64::MAX - l.base), (1 << 63) - 1);
        m.check().unwrap();
    }

    #[test]
    fn node_counts_follow_splits() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 4, 7, 0).unwrap();
        m.delegate(K, 0, A, 0, 3, 7).unwrap();
        assert_eq!((m.count(K), m.count(A)), (1, 1));
        // Taking one page out of A's 8-page node leaves 3 buddy pieces there.
        m.revoke(A, 5, 0, true, |_| {}).unwrap();
        assert_eq!(m.count(A), 3);
        m.check().unwrap();
        m.destroy_space(A, |_| {});
        assert_eq!(m.count(A), 0);
        m.destroy_space(K, |_| {});
        assert_eq!((m.count(K), m.len()), (0, 0));
        m.check().unwrap();
    }

    #[test]
    fn delegate_checks() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 4, 0b011, 1000).unwrap();
        assert_eq!(m.delegate(K, 0, A, 0, 5, 7), Err(MdbError::NotFound));
        assert_eq!(m.delegate(K, 16, A, 0, 0, 7), Err(MdbError::NotFound));
        assert_eq!(m.delegate(K, 1, A, 0, 1, 7), Err(MdbError::BadRange));
        assert_eq!(m.delegate(K, 0, A, 1, 1, 7), Err(MdbError::BadRange));
        assert_eq!(m.delegate(K, 0, A, 0, 1, 0b100), Err(MdbError::NoPerm));
        let c = m.delegate(K, 4, A, 0x40, 2, 0b110).unwrap();
        assert_eq!((c.perm, c.origin, c.src), (0b010, 1004, Some((K, 4))));
        assert_eq!(m.delegate(K, 8, A, 0x42, 1, 7), Err(MdbError::Overlap));
        assert_eq!(m.delegate(K, 8, A, 0x40, 3, 7), Err(MdbError::Overlap));
        assert_eq!(m.delegate(K, 8, A, 0x44, 3, 7), Err(MdbError::BadRange));
        // Delegating within one space is fine if the ranges do not overlap.
        m.delegate(K, 0, K, 16, 2, 7).unwrap();
        assert_eq!(m.delegate(K, 0, K, 0, 0, 7), Err(MdbError::Overlap));
        assert_eq!(m.children(K, 0).len(), 2);
        m.check().unwrap();
    }

    #[test]
    fn chain_revoke() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 0, 7, 0).unwrap();
        let mut prev = K;
        for s in 1..1000u64 {
            m.delegate(prev, 0, SpaceId(s), 0, 0, 7).unwrap();
            prev = SpaceId(s);
        }
        // A deep chain: the work list, not the stack, carries the depth.
        let r = m.revoke_collect(SpaceId(500), 0, 0, false).unwrap();
        assert_eq!(r.len(), 499);
        assert_eq!(m.len(), 501);
        let r = m.revoke_collect(K, 0, 0, true).unwrap();
        assert_eq!(r.len(), 501);
        assert!(m.is_empty());
        m.check().unwrap();
    }

    #[test]
    fn fan_out_and_self_revoke() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 2, 7, 0).unwrap();
        for s in 1..=50u64 {
            m.delegate(K, 0, SpaceId(s), 0x10, 2, 3).unwrap();
            m.delegate(SpaceId(s), 0x10, SpaceId(s + 100), 0, 1, 1)
                .unwrap();
        }
        assert_eq!(m.len(), 101);
        let r = m.revoke_collect(SpaceId(7), 0x10, 2, true).unwrap();
        assert_eq!(r.len(), 2);
        assert!(m.lookup(SpaceId(7), 0x10).is_none());
        assert!(m.lookup(SpaceId(107), 0).is_none());
        assert!(m.lookup(SpaceId(8), 0x10).is_some());
        let r = m.revoke_collect(K, 0, 2, false).unwrap();
        assert_eq!(r.len(), 98);
        assert_eq!(m.len(), 1);
        m.check().unwrap();
    }

    #[test]
    fn partial_revoke_splits() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 4, 7, 100).unwrap();
        m.delegate(K, 0, A, 0x20, 4, 7).unwrap();
        m.delegate(A, 0x20, B, 0x40, 4, 3).unwrap();
        m.delegate(B, 0x48, C, 0, 1, 1).unwrap();
        m.delegate(B, 0x44, C, 4, 2, 1).unwrap();
        // Take page 5 of the root's range away from everyone below the root.
        let r = m.revoke_collect(K, 5, 0, false).unwrap();
        let got = items(&r);
        let want: Set<_> = [(A, 0x25), (B, 0x45), (C, 5)].into_iter().collect();
        assert_eq!(got, want);
        m.check().unwrap();
        // A keeps pages 0x20..0x30 except 0x25, as aligned pieces.
        for a in 0x20..0x30 {
            let l = m.lookup(A, a);
            assert_eq!(l.is_some(), a != 0x25, "{a:#x}");
            if let Some(l) = l {
                assert_eq!(l.origin + (a - l.base), 100 + (a - 0x20));
            }
        }
        let orders: Vec<u8> = m.mappings(A).map(|x| x.order).collect();
        assert_eq!(orders, [2, 0, 1, 3]);
        // C's untouched delegation survives, the split one kept 3 of 4 pages.
        assert!(m.lookup(C, 0).is_some());
        assert!(m.lookup(C, 4).is_some() && m.lookup(C, 6).is_some());
        // Revoking the big range at the root now removes all pieces.
        let r = m.revoke_collect(K, 0, 4, true).unwrap();
        assert_eq!(items(&r).len(), 16 + 15 + 15 + 2 + 3);
        assert!(m.is_empty());
    }

    #[test]
    fn unpaid_split_takes_the_whole_node() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 4, 7, 100).unwrap();
        m.delegate(K, 0, A, 0x20, 4, 7).unwrap();
        m.delegate(A, 0x28, B, 0, 2, 7).unwrap();
        // A may not grow: its node goes whole, with B's node derived from it.
        let mut asked = Vec::new();
        let r = m
            .revoke_collect_with(K, 5, 0, false, |s, n| {
                asked.push((s, n));
                s != A
            })
            .unwrap();
        assert_eq!(asked, [(A, 3)]);
        assert!(m.lookup(A, 0x20).is_none() && m.lookup(A, 0x2f).is_none());
        assert!(m.lookup(B, 0).is_none());
        assert_eq!(m.count(A), 0);
        let got = items(&r);
        assert!(got.contains(&(A, 0x25)) && got.contains(&(B, 3)));
        m.check().unwrap();
        // Paid: the same revocation splits A's node and leaves B's alone.
        m.delegate(K, 0, A, 0x20, 4, 7).unwrap();
        m.delegate(A, 0x28, B, 0, 2, 7).unwrap();
        m.revoke_collect_with(K, 5, 0, false, |_, n| n == 3)
            .unwrap();
        assert_eq!(m.count(A), 4);
        assert!(m.lookup(A, 0x25).is_none() && m.lookup(A, 0x24).is_some());
        assert!(m.lookup(B, 0).is_some());
        m.check().unwrap();
    }

    #[test]
    fn destroy_a_space_in_parts() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 10, 7, 0).unwrap();
        for i in 0..100u64 {
            m.delegate(K, i, A, 2 * i, 0, 7).unwrap();
            m.delegate(A, 2 * i, B, i, 0, 7).unwrap();
        }
        let mut gone = 0;
        let mut rounds = 0;
        while !m.destroy_space_some(A, 16, |_| gone += 1) {
            rounds += 1;
            m.check().unwrap();
        }
        assert_eq!((rounds, gone), (6, 200));
        assert_eq!((m.count(A), m.count(B), m.len()), (0, 0, 1));
    }

    #[test]
    fn mappings_in_a_range() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 4, 7, 0).unwrap();
        m.insert_root(K, 0x20, 0, 7, 0).unwrap();
        m.insert_root(K, 0x30, 3, 7, 0).unwrap();
        let bases = |v: Vec<Mapping>| v.iter().map(|x| x.base).collect::<Vec<_>>();
        assert_eq!(bases(m.mappings_in(K, 8, 0x20)), [0, 0x20]);
        assert_eq!(bases(m.mappings_in(K, 0x21, 0x2f)), Vec::<u64>::new());
        assert_eq!(bases(m.mappings_in(K, 0x34, 0x34)), [0x30]);
        assert_eq!(bases(m.mappings_in(A, 0, u64::MAX)), Vec::<u64>::new());
    }

    #[test]
    fn revoke_range_larger_than_nodes() {
        let mut m = Mdb::new();
        for p in 0..8 {
            m.insert_root(K, p, 0, 7, p).unwrap();
            m.delegate(K, p, A, 0x100 + p, 0, 7).unwrap();
        }
        let r = m.revoke_collect(A, 0x100, 2, true).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(m.len(), 12);
        let r = m.revoke_collect(K, 0, 3, true).unwrap();
        assert_eq!(r.len(), 12);
        assert!(m.is_empty());
        assert_eq!(m.revoke_collect(K, 1, 3, true), Err(MdbError::BadRange));
    }

    #[test]
    fn delegate_range_skips_holes() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 1, 7, 0).unwrap();
        m.insert_root(K, 4, 2, 1, 4).unwrap();
        m.insert_root(K, 32, 5, 7, 32).unwrap();
        let v = m.delegate_range(K, 0, A, 0x40, 3, 6).unwrap();
        assert_eq!(v.len(), 1); // the second root's permissions vanish under the mask
        assert_eq!((v[0].base, v[0].order, v[0].perm), (0x40, 1, 6));
        // A window smaller than the node: the part inside.
        let v = m.delegate_range(K, 40, A, 0x48, 2, 7).unwrap();
        assert_eq!((v[0].base, v[0].order, v[0].src), (0x48, 2, Some((K, 40))));
        assert_eq!(v[0].origin, 40);
        // All or nothing.
        assert_eq!(
            m.delegate_range(K, 0, A, 0x40, 4, 7),
            Err(MdbError::Overlap)
        );
        assert_eq!(m.len(), 5);
        m.check().unwrap();
    }

    #[test]
    fn destroy_space_revokes_descendants() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 4, 7, 0).unwrap();
        m.delegate(K, 0, A, 0, 3, 7).unwrap();
        m.delegate(A, 0, B, 0, 2, 7).unwrap();
        m.delegate(B, 0, C, 0, 1, 7).unwrap();
        m.delegate(K, 8, B, 8, 3, 7).unwrap();
        let mut r = Vec::new();
        m.destroy_space(A, |x| r.push(x));
        assert_eq!(r.len(), 3);
        assert!(m.mappings(A).next().is_none());
        assert!(m.lookup(B, 8).is_some());
        assert!(m.lookup(C, 0).is_none());
        m.check().unwrap();
    }

    #[test]
    fn same_space_delegation_revoke() {
        let mut m = Mdb::new();
        m.insert_root(K, 0, 3, 7, 0).unwrap();
        m.delegate(K, 0, A, 0, 3, 7).unwrap();
        m.delegate(A, 0, A, 8, 2, 7).unwrap();
        m.delegate(A, 8, A, 16, 1, 7).unwrap();
        // Revoking A's whole region keeps nothing of it; no item is reported twice.
        let r = m.revoke_collect(A, 0, 5, true).unwrap();
        assert_eq!(items(&r).len(), 8 + 4 + 2);
        m.check().unwrap();
        assert_eq!(m.len(), 1);
        // Partial, and without self.
        m.delegate(K, 0, A, 0, 3, 7).unwrap();
        m.delegate(A, 0, A, 8, 2, 7).unwrap();
        m.delegate(A, 8, A, 16, 1, 7).unwrap();
        let r = m.revoke_collect(A, 8, 3, false).unwrap();
        assert_eq!(items(&r).len(), 2);
        m.check().unwrap();
        let r = m.revoke_collect(A, 0, 4, false).unwrap();
        assert_eq!(items(&r).len(), 4);
        m.check().unwrap();
    }

    /// The naive model: one entry per item.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Item {
        perm: u8,
        origin: u64,
        parent: Option<(SpaceId, u64)>,
    }

    struct Model(Map<(SpaceId, u64), Item>);

    impl Model {
        fn revoke(
            &mut self,
            space: SpaceId,
            base: u64,
            order: u8,
            this: bool,
        ) -> Set<(SpaceId, u64)> {
            let mut gone = Set::new();
            let mut work: Vec<((SpaceId, u64), bool)> = (base..base + (1 << order))
                .filter(|&a| self.0.contains_key(&(space, a)))
                .map(|a| ((space, a), this))
                .collect();
            while let Some((k, rm)) = work.pop() {
                let kids: Vec<_> = self
                    .0
                    .iter()
                    .filter(|(_, it)| it.parent == Some(k))
                    .map(|(&c, _)| c)
                    .collect();
                for c in kids {
                    work.push((c, true));
                }
                if rm && self.0.remove(&k).is_some() {
                    gone.insert(k);
                }
            }
            gone
        }
    }

    const SPACES: u64 = 4;
    const ADDRS: u64 = 64;

    fn compare(m: &Mdb, model: &Model) {
        m.check().unwrap();
        for s in 0..SPACES {
            for a in 0..ADDRS {
                let got = m.lookup(SpaceId(s), a).map(|l| Item {
                    perm: l.perm,
                    origin: l.origin + (a - l.base),
                    parent: l.src.map(|(ss, sb)| (ss, sb + (a - l.base))),
                });
                assert_eq!(
                    got,
                    model.0.get(&(SpaceId(s), a)).copied(),
                    "space {s} addr {a}"
                );
            }
        }
    }

    fn random_run(seed: u64, steps: usize) {
        let mut rng = Rng::from_state(seed);
        let mut m = Mdb::new();
        let mut model = Model(Map::new());
        for _ in 0..steps {
            let sp = SpaceId(rng.below(SPACES));
            let order = rng.below(5) as u8;
            let base = rng.below(ADDRS) & !mask(order);
            match rng.below(10) {
                0 => {
                    let perm = 1 + rng.below(7) as u8;
                    let origin = rng.below(1 << 20);
                    let r = m.insert_root(sp, base, order, perm, origin);
                    let free = (0..1 << order).all(|i| !model.0.contains_key(&(sp, base + i)));
                    assert_eq!(r.is_ok(), free);
                    if free {
                        for i in 0..1 << order {
                            let it = Item {
                                perm,
                                origin: origin + i,
                                parent: None,
                            };
                            model.0.insert((sp, base + i), it);
                        }
                    }
                }
                1..=4 => {
                    let dst = SpaceId(rng.below(SPACES));
                    let dbase = rng.below(ADDRS) & !mask(order);
                    let pmask = rng.below(8) as u8;
                    let single = rng.below(2) == 0;
                    let mut plan = Vec::new();
                    let mut ok = true;
                    for i in 0..1 << order {
                        if let Some(it) = model.0.get(&(sp, base + i)) {
                            if it.perm & pmask != 0 {
                                if model.0.contains_key(&(dst, dbase + i)) {
                                    ok = false;
                                }
                                let new = Item {
                                    perm: it.perm & pmask,
                                    origin: it.origin,
                                    parent: Some((sp, base + i)),
                                };
                                plan.push(((dst, dbase + i), new));
                            }
                        }
                    }
                    if single {
                        match m.delegate(sp, base, dst, dbase, order, pmask) {
                            Ok(_) => {
                                assert!(ok);
                                assert_eq!(plan.len(), 1 << order);
                                model.0.extend(plan);
                            }
                            Err(MdbError::Overlap) => assert!(!ok),
                            Err(MdbError::NoPerm) => assert!(plan.is_empty()),
                            Err(MdbError::NotFound) => {}
                            Err(e) => panic!("{e:?}"),
                        }
                    } else {
                        let r = m.delegate_range(sp, base, dst, dbase, order, pmask);
                        assert_eq!(r.is_ok(), ok);
                        if let Ok(v) = r {
                            let n: u64 = v.iter().map(|x| 1u64 << x.order).sum();
                            assert_eq!(n as usize, plan.len());
                            model.0.extend(plan);
                        }
                    }
                }
                5..=8 => {
                    let this = rng.below(2) == 0;
                    let r = m.revoke_collect(sp, base, order, this).unwrap();
                    let want = model.revoke(sp, base, order, this);
                    assert_eq!(items(&r), want);
                }
                _ => {
                    let mut r = Vec::new();
                    m.destroy_space(sp, |x| r.push(x));
                    let want = model.revoke(sp, 0, 6, true);
                    assert_eq!(items(&r), want);
                }
            }
            compare(&m, &model);
        }
    }

    #[test]
    fn random_against_model() {
        for seed in 1..=40u64 {
            random_run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 400);
        }
    }
}
