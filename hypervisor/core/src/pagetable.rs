//! x86-64 four-level page tables over an abstract table memory.
//!
//! [`PageTable`] walks and edits a radix tree of 512-entry tables through [`TableMem`]
//! (the kernel implements it over its direct map of physical memory, tests over a
//! `HashMap`), with the entry encoding behind [`PteFormat`]: [`Host`] (IA-32e paging for
//! user address spaces), [`Ept`] (Intel extended page tables) and [`Npt`] (AMD nested
//! page tables, which are IA-32e tables walked as user accesses).
//!
//! Invariants kept by every operation:
//! - an intermediate table reachable from the root is never empty: `unmap` frees tables
//!   it empties, and a failing `map` rolls back what it did and prunes what it created;
//! - intermediate entries are permissive (all rights); leaves alone carry permissions;
//! - a leaf sits at level 0 (4 KiB), 1 (2 MiB) or 2 (1 GiB, where the format allows it),
//!   and `map` always uses the largest leaf that alignment and size permit.
//!
//! Unmapping part of a large page splits it into a table of next-smaller leaves (this
//! needs a table allocation, so `unmap` can fail with [`PtError::NoMemory`]; what was
//! done until then stays done). Whenever a present entry is cleared or replaced the
//! result says a TLB flush is needed. [`TableMem::free_table`] is called right after the
//! last reference to a table is cleared: the kernel must not reuse that memory before
//! the TLB shootdown that the returned flag asks for (e.g. by deferring the free).
//!
//! Recursion depth is the fixed number of levels (4), never input-controlled.

use core::marker::PhantomData;
use core::ops::Range;

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Paging levels (PML4, PDPT, PD, PT).
pub const LEVELS: usize = 4;
/// Largest `order` (in 4 KiB pages) of one map or unmap call: the 256 TiB address width.
pub const MAX_ORDER: u8 = 36;
const PAGE_SHIFT: u32 = 12;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const VA_MASK: u64 = (1 << 48) - 1;
const PHYS_LIMIT: u64 = 1 << 52;

/// Access rights of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm(pub u8);

impl Perm {
    /// Readable.
    pub const R: Perm = Perm(1);
    /// Writable.
    pub const W: Perm = Perm(2);
    /// Executable.
    pub const X: Perm = Perm(4);
    /// Accessible from user mode (host tables only).
    pub const U: Perm = Perm(8);
    /// Uncacheable: device memory (IA-32e formats: PCD and PWT, which select the UC
    /// entry of the power-on PAT; EPT leaves stay write-back).
    pub const UC: Perm = Perm(16);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

/// Why a page-table operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtError {
    /// An address is not aligned to the size of the range.
    Misaligned,
    /// The range leaves the address width (or is not canonical), or the order is above
    /// [`MAX_ORDER`], or the physical range passes 2^52.
    OutOfRange,
    /// Part of the range is already mapped.
    AlreadyMapped,
    /// A table could not be allocated.
    NoMemory,
    /// The format cannot express the permissions (e.g. writable but not readable).
    BadPerm,
}

/// Memory holding page tables, addressed by physical address.
pub trait TableMem {
    /// A zeroed 4 KiB table, or `None` when out of memory.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Gives a table back (see the module note on TLB shootdown before reuse).
    fn free_table(&mut self, table: u64);
    /// Entry `idx` (`< 512`) of `table`.
    fn read(&self, table: u64, idx: usize) -> u64;
    /// Writes entry `idx` of `table`.
    fn write(&mut self, table: u64, idx: usize, val: u64);
}

/// An entry encoding.
pub trait PteFormat {
    /// Whether a leaf may sit at `level` (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
    fn leaf_ok(level: usize) -> bool;
    /// Whether the entry maps anything.
    fn present(pte: u64) -> bool;
    /// Whether a present entry at `level` is a leaf.
    fn is_leaf(pte: u64, level: usize) -> bool;
    /// A leaf mapping `phys` at `level`; `None` if `perm` is not expressible.
    fn leaf(phys: u64, perm: Perm, level: usize) -> Option<u64>;
    /// An entry pointing to the next-level table at `phys`.
    fn table(phys: u64) -> u64;
    /// The physical address a leaf at `level` maps.
    fn addr(pte: u64, level: usize) -> u64;
    /// The physical address of the table a non-leaf entry points to.
    fn table_addr(pte: u64) -> u64 {
        pte & ADDR_MASK
    }
    /// The permissions of a leaf.
    fn perm(pte: u64) -> Perm;
    /// Whether `first ..= last` is a valid input address range.
    fn valid_range(first: u64, last: u64) -> bool;
}

const fn level_shift(level: usize) -> u32 {
    PAGE_SHIFT + 9 * level as u32
}

const fn level_size(level: usize) -> u64 {
    1 << level_shift(level)
}

const fn index(va: u64, level: usize) -> usize {
    ((va >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}

const fn canonical(va: u64) -> bool {
    ((va << 16) as i64 >> 16) as u64 == va
}

/// IA-32e paging (host page tables).
#[derive(Debug)]
pub struct Host;

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

fn ia32e_addr(pte: u64, level: usize) -> u64 {
    pte & ADDR_MASK & !(level_size(level) - 1)
}

fn ia32e_leaf(phys: u64, perm: Perm, level: usize, user: bool) -> Option<u64> {
    if !perm.contains(Perm::R) {
        return None;
    }
    let mut v = P | (phys & ADDR_MASK);
    if perm.contains(Perm::W) {
        v |= RW;
    }
    if user || perm.contains(Perm::U) {
        v |= US;
    }
    if !perm.contains(Perm::X) {
        v |= NX;
    }
    if perm.contains(Perm::UC) {
        v |= PCD | PWT;
    }
    if level > 0 {
        v |= PS;
    }
    Some(v)
}

fn ia32e_perm(pte: u64) -> Perm {
    let mut p = Perm::R;
    if pte & RW != 0 {
        p = p | Perm::W;
    }
    if pte & US != 0 {
        p = p | Perm::U;
    }
    if pte & NX == 0 {
        p = p | Perm::X;
    }
    if pte & PCD != 0 {
        p = p | Perm::UC;
    }
    p
}

impl PteFormat for Host {
    fn leaf_ok(level: usize) -> bool {
        level <= 2
    }
    fn present(pte: u64) -> bool {
        pte & P != 0
    }
    fn is_leaf(pte: u64, level: usize) -> bool {
        level == 0 || pte & PS != 0
    }
    fn leaf(phys: u64, perm: Perm, level: usize) -> Option<u64> {
        ia32e_leaf(phys, perm, level, false)
    }
    fn table(phys: u64) -> u64 {
        P | RW | US | (phys & ADDR_MASK)
    }
    fn addr(pte: u64, level: usize) -> u64 {
        ia32e_addr(pte, level)
    }
    fn perm(pte: u64) -> Perm {
        ia32e_perm(pte)
    }
    fn valid_range(first: u64, last: u64) -> bool {
        canonical(first) && canonical(last) && (first >> 47) == (last >> 47) && first <= last
    }
}

/// AMD nested page tables: IA-32e entries, always with the user bit (the walk is a user
/// access), guest-physical input addresses below 2^48.
#[derive(Debug)]
pub struct Npt;

impl PteFormat for Npt {
    fn leaf_ok(level: usize) -> bool {
        level <= 2
    }
    fn present(pte: u64) -> bool {
        pte & P != 0
    }
    fn is_leaf(pte: u64, level: usize) -> bool {
        level == 0 || pte & PS != 0
    }
    fn leaf(phys: u64, perm: Perm, level: usize) -> Option<u64> {
        ia32e_leaf(phys, perm, level, true)
    }
    fn table(phys: u64) -> u64 {
        P | RW | US | (phys & ADDR_MASK)
    }
    fn addr(pte: u64, level: usize) -> u64 {
        ia32e_addr(pte, level)
    }
    fn perm(pte: u64) -> Perm {
        Perm(ia32e_perm(pte).0 & !Perm::U.0)
    }
    fn valid_range(first: u64, last: u64) -> bool {
        first <= last && last <= VA_MASK
    }
}

/// Intel extended page tables (write-back memory type for every leaf).
#[derive(Debug)]
pub struct Ept;

const EPT_R: u64 = 1;
const EPT_W: u64 = 2;
const EPT_X: u64 = 4;
const EPT_WB: u64 = 6 << 3;

impl PteFormat for Ept {
    fn leaf_ok(level: usize) -> bool {
        level <= 2
    }
    fn present(pte: u64) -> bool {
        pte & (EPT_R | EPT_W | EPT_X) != 0
    }
    fn is_leaf(pte: u64, level: usize) -> bool {
        level == 0 || pte & PS != 0
    }
    fn leaf(phys: u64, perm: Perm, level: usize) -> Option<u64> {
        // Write without read is an EPT misconfiguration; an entry without rights is
        // not present.
        if perm.contains(Perm::W) && !perm.contains(Perm::R) {
            return None;
        }
        if perm.0 & (Perm::R.0 | Perm::W.0 | Perm::X.0) == 0 {
            return None;
        }
        let mut v = EPT_WB | (phys & ADDR_MASK);
        if perm.contains(Perm::R) {
            v |= EPT_R;
        }
        if perm.contains(Perm::W) {
            v |= EPT_W;
        }
        if perm.contains(Perm::X) {
            v |= EPT_X;
        }
        if level > 0 {
            v |= PS;
        }
        Some(v)
    }
    fn table(phys: u64) -> u64 {
        EPT_R | EPT_W | EPT_X | (phys & ADDR_MASK)
    }
    fn addr(pte: u64, level: usize) -> u64 {
        ia32e_addr(pte, level)
    }
    fn perm(pte: u64) -> Perm {
        Perm((pte & 7) as u8)
    }
    fn valid_range(first: u64, last: u64) -> bool {
        first <= last && last <= VA_MASK
    }
}

/// Intel extended page tables whose leaves sit at levels `0..=L` only (for processors
/// without 1 GiB (`L = 1`) or 2 MiB (`L = 0`) EPT pages); otherwise as [`Ept`].
#[derive(Debug)]
pub struct EptUpTo<const L: usize>;

impl<const L: usize> PteFormat for EptUpTo<L> {
    fn leaf_ok(level: usize) -> bool {
        level <= L
    }
    fn present(pte: u64) -> bool {
        Ept::present(pte)
    }
    fn is_leaf(pte: u64, level: usize) -> bool {
        Ept::is_leaf(pte, level)
    }
    fn leaf(phys: u64, perm: Perm, level: usize) -> Option<u64> {
        Ept::leaf(phys, perm, level)
    }
    fn table(phys: u64) -> u64 {
        Ept::table(phys)
    }
    fn addr(pte: u64, level: usize) -> u64 {
        Ept::addr(pte, level)
    }
    fn perm(pte: u64) -> Perm {
        Ept::perm(pte)
    }
    fn valid_range(first: u64, last: u64) -> bool {
        Ept::valid_range(first, last)
    }
}

/// What a virtual address translates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The physical address of the looked-up address (page offset included).
    pub phys: u64,
    /// The leaf's permissions.
    pub perm: Perm,
    /// The leaf's size as an order of 4 KiB pages (0, 9 or 18).
    pub order: u8,
}

/// A page table with root `root`, in format `F`.
#[derive(Debug)]
pub struct PageTable<F> {
    root: u64,
    _f: PhantomData<F>,
}

impl<F: PteFormat> PageTable<F> {
    /// A new, empty table.
    pub fn new(mem: &mut impl TableMem) -> Result<Self, PtError> {
        let root = mem.alloc_table().ok_or(PtError::NoMemory)?;
        Ok(Self::from_root(root))
    }

    /// Wraps an existing root table.
    pub const fn from_root(root: u64) -> Self {
        PageTable {
            root,
            _f: PhantomData,
        }
    }

    /// The root table's physical address (for CR3, the EPT pointer or nCR3).
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// Validates a range and returns its last address.
    fn check(virt: u64, order: u8) -> Result<u64, PtError> {
        if order > MAX_ORDER {
            return Err(PtError::OutOfRange);
        }
        let size = 1u64 << (u32::from(order) + PAGE_SHIFT);
        if virt & (size - 1) != 0 {
            return Err(PtError::Misaligned);
        }
        let last = virt.checked_add(size - 1).ok_or(PtError::OutOfRange)?;
        if !F::valid_range(virt, last) {
            return Err(PtError::OutOfRange);
        }
        Ok(last)
    }

    /// Maps `2^order` pages from `virt` to `phys` with `perm`, using the largest leaves
    /// possible. Fails without changes if any part is mapped already. (After an error
    /// the caller should flush the TLB: entries made and rolled back may have been
    /// cached.)
    pub fn map(
        &self,
        mem: &mut impl TableMem,
        virt: u64,
        phys: u64,
        order: u8,
        perm: Perm,
    ) -> Result<(), PtError> {
        let last = Self::check(virt, order)?;
        let size = last - virt + 1;
        if phys & (size - 1) != 0 {
            return Err(PtError::Misaligned);
        }
        if phys.checked_add(size).is_none_or(|e| e > PHYS_LIMIT) {
            return Err(PtError::OutOfRange);
        }
        if F::leaf(phys, perm, 0).is_none() {
            return Err(PtError::BadPerm);
        }
        let mut off = 0;
        while off < size {
            let (v, p) = (virt + off, phys + off);
            let level = (0..=2)
                .rev()
                .find(|&l| {
                    let s = level_size(l);
                    F::leaf_ok(l) && (v | p) & (s - 1) == 0 && size - off >= s
                })
                .unwrap_or(0);
            if let Err(e) = self.map_one(mem, v, p, level, perm) {
                self.prune(mem, v);
                if off > 0 {
                    // Everything before `v` was empty before this call.
                    let mut flush = false;
                    let _ = self.unmap_level(
                        mem,
                        self.root,
                        LEVELS - 1,
                        0,
                        virt & VA_MASK,
                        (v - 1) & VA_MASK,
                        &mut flush,
                    );
                }
                return Err(e);
            }
            off += level_size(level);
        }
        Ok(())
    }

    fn map_one(
        &self,
        mem: &mut impl TableMem,
        v: u64,
        p: u64,
        level: usize,
        perm: Perm,
    ) -> Result<(), PtError> {
        let mut table = self.root;
        for l in (level + 1..LEVELS).rev() {
            let i = index(v, l);
            let pte = mem.read(table, i);
            if !F::present(pte) {
                let t = mem.alloc_table().ok_or(PtError::NoMemory)?;
                mem.write(table, i, F::table(t));
                table = t;
            } else if F::is_leaf(pte, l) {
                return Err(PtError::AlreadyMapped);
            } else {
                table = F::table_addr(pte);
            }
        }
        let i = index(v, level);
        if F::present(mem.read(table, i)) {
            return Err(PtError::AlreadyMapped);
        }
        let leaf = F::leaf(p, perm, level).ok_or(PtError::BadPerm)?;
        mem.write(table, i, leaf);
        Ok(())
    }

    /// Frees empty tables on the path to `v`, bottom up.
    fn prune(&self, mem: &mut impl TableMem, v: u64) {
        let mut path = [(0u64, 0usize); LEVELS];
        let mut depth = 0;
        let mut table = self.root;
        for l in (1..LEVELS).rev() {
            let i = index(v, l);
            let pte = mem.read(table, i);
            if !F::present(pte) || F::is_leaf(pte, l) {
                break;
            }
            path[depth] = (table, i);
            depth += 1;
            table = F::table_addr(pte);
        }
        for &(parent, i) in path[..depth].iter().rev() {
            let child = F::table_addr(mem.read(parent, i));
            if !Self::empty(mem, child) {
                break;
            }
            mem.write(parent, i, 0);
            mem.free_table(child);
        }
    }

    fn empty(mem: &impl TableMem, table: u64) -> bool {
        (0..ENTRIES).all(|i| !F::present(mem.read(table, i)))
    }

    /// Unmaps `2^order` pages from `virt` (holes are fine), splitting large pages that
    /// are only partly inside. Returns whether a TLB flush is needed. On error (no
    /// memory to split) part of the range may be unmapped already: flush anyway.
    pub fn unmap(&self, mem: &mut impl TableMem, virt: u64, order: u8) -> Result<bool, PtError> {
        let last = Self::check(virt, order)?;
        let mut flush = false;
        self.unmap_level(
            mem,
            self.root,
            LEVELS - 1,
            0,
            virt & VA_MASK,
            last & VA_MASK,
            &mut flush,
        )?;
        Ok(flush)
    }

    /// Unmaps `start ..= last` (48-bit) from `table` at `level`, which covers from `base`.
    #[allow(clippy::too_many_arguments)]
    fn unmap_level(
        &self,
        mem: &mut impl TableMem,
        table: u64,
        level: usize,
        base: u64,
        start: u64,
        last: u64,
        flush: &mut bool,
    ) -> Result<(), PtError> {
        let span = level_size(level);
        let (i0, i1) = (index(start, level), index(last, level));
        for i in i0..=i1 {
            let e_start = base + i as u64 * span;
            let e_last = e_start + (span - 1);
            let (s, l) = (start.max(e_start), last.min(e_last));
            let pte = mem.read(table, i);
            if !F::present(pte) {
                continue;
            }
            let child = if F::is_leaf(pte, level) {
                // (A 4 KiB leaf is always wholly inside: ranges are page-aligned.)
                if level == 0 || (s == e_start && l == e_last) {
                    mem.write(table, i, 0);
                    *flush = true;
                    continue;
                }
                // Partly covered large page: split it into next-smaller leaves.
                let t = mem.alloc_table().ok_or(PtError::NoMemory)?;
                let (phys, perm, sub) = (F::addr(pte, level), F::perm(pte), level_size(level - 1));
                for j in 0..ENTRIES {
                    let leaf = F::leaf(phys + j as u64 * sub, perm, level - 1).unwrap_or(0);
                    mem.write(t, j, leaf);
                }
                mem.write(table, i, F::table(t));
                *flush = true;
                t
            } else {
                F::table_addr(pte)
            };
            self.unmap_level(mem, child, level - 1, e_start, s, l, flush)?;
            if Self::empty(mem, child) {
                mem.write(table, i, 0);
                mem.free_table(child);
                *flush = true;
            }
        }
        Ok(())
    }

    /// Translates `virt`.
    pub fn lookup(&self, mem: &impl TableMem, virt: u64) -> Option<Translation> {
        if !F::valid_range(virt, virt) {
            return None;
        }
        let mut table = self.root;
        for level in (0..LEVELS).rev() {
            let pte = mem.read(table, index(virt, level));
            if !F::present(pte) {
                return None;
            }
            if F::is_leaf(pte, level) {
                let off = virt & (level_size(level) - 1);
                return Some(Translation {
                    phys: F::addr(pte, level) + off,
                    perm: F::perm(pte),
                    order: (9 * level) as u8,
                });
            }
            table = F::table_addr(pte);
        }
        None
    }

    /// Frees every table below the root entries `entries` (`0..256` for the user half
    /// of a host table, `0..512` for EPT/NPT) and clears those entries. The caller
    /// flushes the TLB.
    pub fn teardown(&self, mem: &mut impl TableMem, entries: Range<usize>) {
        for i in entries.start..entries.end.min(ENTRIES) {
            let pte = mem.read(self.root, i);
            if F::present(pte) && !F::is_leaf(pte, LEVELS - 1) {
                Self::free_tree(mem, F::table_addr(pte), LEVELS - 2);
            }
            mem.write(self.root, i, 0);
        }
    }

    fn free_tree(mem: &mut impl TableMem, table: u64, level: usize) {
        if level > 0 {
            for i in 0..ENTRIES {
                let pte = mem.read(table, i);
                if F::present(pte) && !F::is_leaf(pte, level) {
                    Self::free_tree(mem, F::table_addr(pte), level - 1);
                }
            }
        }
        mem.free_table(table);
    }

    /// Tears down everything and frees the root.
    pub fn destroy(self, mem: &mut impl TableMem) {
        self.teardown(mem, 0..ENTRIES);
        mem.free_table(self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct FakeMem {
        tables: HashMap<u64, Vec<u64>>,
        next: u64,
        fail_after: Option<usize>,
    }

    impl TableMem for FakeMem {
        fn alloc_table(&mut self) -> Option<u64> {
            if let Some(n) = self.fail_after.as_mut() {
                if *n == 0 {
                    return None;
                }
                *n -= 1;
            }
            self.next += 0x1000;
            let t = 0x1_0000_0000 + self.next;
            self.tables.insert(t, vec![0; ENTRIES]);
            Some(t)
        }
        fn free_table(&mut self, table: u64) {
            assert!(self.tables.remove(&table).is_some(), "double free of table");
        }
        fn read(&self, table: u64, idx: usize) -> u64 {
            self.tables[&table][idx]
        }
        fn write(&mut self, table: u64, idx: usize, val: u64) {
            self.tables.get_mut(&table).unwrap()[idx] = val;
        }
    }

    const RW_: Perm = Perm(Perm::R.0 | Perm::W.0);
    const G: u64 = 1 << 30;
    const M2: u64 = 1 << 21;

    #[test]
    fn map_lookup_unmap_4k() {
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0x40_0000, 0x1234_5000, 0, RW_ | Perm::U)
            .unwrap();
        let t = pt.lookup(&mem, 0x40_0abc).unwrap();
        assert_eq!(
            t,
            Translation {
                phys: 0x1234_5abc,
                perm: RW_ | Perm::U,
                order: 0
            }
        );
        assert_eq!(mem.tables.len(), 4);
        assert_eq!(
            pt.map(&mut mem, 0x40_0000, 0, 0, RW_),
            Err(PtError::AlreadyMapped)
        );
        assert!(pt.lookup(&mem, 0x40_1000).is_none());
        assert!(pt.unmap(&mut mem, 0x40_0000, 0).unwrap());
        assert!(pt.lookup(&mem, 0x40_0000).is_none());
        assert_eq!(mem.tables.len(), 1, "emptied tables are freed");
        assert!(!pt.unmap(&mut mem, 0x40_0000, 9).unwrap());
    }

    #[test]
    fn uncacheable_leaves_keep_their_type_through_a_split() {
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        let uc = RW_ | Perm::U | Perm::UC;
        pt.map(&mut mem, 0x20_0000, 0xfe00_0000, 9, uc).unwrap();
        pt.map(&mut mem, 0x40_0000, 0x1000, 0, RW_).unwrap();
        let t = pt.lookup(&mem, 0x20_1000).unwrap();
        assert_eq!((t.perm, t.order), (uc, 9));
        assert_eq!(pt.lookup(&mem, 0x40_0000).unwrap().perm, RW_);
        // Unmapping one 4 KiB page splits the 2 MiB leaf: the rest stays uncacheable.
        assert!(pt.unmap(&mut mem, 0x20_0000, 0).unwrap());
        let t = pt.lookup(&mem, 0x20_1000).unwrap();
        assert_eq!((t.phys, t.perm, t.order), (0xfe00_1000, uc, 0));
        // NPT leaves take the bits too.
        let npt = PageTable::<Npt>::new(&mut mem).unwrap();
        npt.map(&mut mem, 0, 0xfe00_0000, 0, RW_ | Perm::UC)
            .unwrap();
        assert_eq!(npt.lookup(&mem, 0).unwrap().perm, RW_ | Perm::UC);
    }

    #[test]
    fn input_checks() {
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        assert_eq!(
            pt.map(&mut mem, 0x1000, 0x2000, 1, RW_),
            Err(PtError::Misaligned)
        );
        assert_eq!(
            pt.map(&mut mem, 0x2000, 0x1000, 1, RW_),
            Err(PtError::Misaligned)
        );
        assert_eq!(pt.map(&mut mem, 0, 0, 37, RW_), Err(PtError::OutOfRange));
        assert_eq!(pt.map(&mut mem, 0, 0, 36, RW_), Err(PtError::OutOfRange));
        assert_eq!(
            pt.map(&mut mem, 1 << 47, 0, 0, RW_),
            Err(PtError::OutOfRange)
        );
        assert_eq!(
            pt.map(&mut mem, 0xffff_ffff_ffff_f000, 0, 1, RW_),
            Err(PtError::Misaligned)
        );
        assert_eq!(
            pt.map(&mut mem, 0, PHYS_LIMIT, 0, RW_),
            Err(PtError::OutOfRange)
        );
        assert_eq!(pt.map(&mut mem, 0, 0, 0, Perm::W), Err(PtError::BadPerm));
        assert_eq!(pt.unmap(&mut mem, 0x1000, 1), Err(PtError::Misaligned));
        assert!(pt.lookup(&mem, 1 << 47).is_none());
        // The upper canonical half works too.
        let hi = 0xffff_8000_0000_0000;
        pt.map(&mut mem, hi, 0x5000, 0, Perm::R).unwrap();
        assert_eq!(pt.lookup(&mem, hi).unwrap().phys, 0x5000);
        assert!(pt.lookup(&mem, 0).is_none());
        assert!(pt.unmap(&mut mem, hi, 0).unwrap());
        assert_eq!(mem.tables.len(), 1);
    }

    #[test]
    fn large_pages_and_split() {
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        // 1 GiB + 2 MiB + 4 KiB pieces from one call.
        pt.map(&mut mem, G, 4 * G, 18, RW_ | Perm::X).unwrap();
        assert_eq!(pt.lookup(&mem, G + 0x1234).unwrap().order, 18);
        pt.map(&mut mem, 2 * G, 8 * G, 9, RW_).unwrap();
        assert_eq!(pt.lookup(&mem, 2 * G + 5).unwrap().order, 9);
        // 4 MiB: two 2 MiB leaves.
        pt.map(&mut mem, 3 * G, 2 * M2, 10, RW_).unwrap();
        assert_eq!(pt.lookup(&mem, 3 * G + M2).unwrap().order, 9);
        assert_eq!(pt.lookup(&mem, 3 * G + M2).unwrap().phys, 3 * M2);
        // Unmap one 4 KiB page in the middle of the 1 GiB page: split twice.
        assert!(pt.unmap(&mut mem, G + M2 + 0x3000, 0).unwrap());
        assert!(pt.lookup(&mem, G + M2 + 0x3000).is_none());
        let t = pt.lookup(&mem, G + M2 + 0x4000).unwrap();
        assert_eq!(
            (t.phys, t.order, t.perm),
            (4 * G + M2 + 0x4000, 0, RW_ | Perm::X)
        );
        assert_eq!(pt.lookup(&mem, G + 5 * M2).unwrap().order, 9);
        assert_eq!(
            pt.lookup(&mem, G + 5 * M2 + 7).unwrap().phys,
            4 * G + 5 * M2 + 7
        );
        // Unmapping the rest frees all tables.
        assert!(pt.unmap(&mut mem, 0, 27).unwrap());
        assert_eq!(mem.tables.len(), 1);
    }

    #[test]
    fn failed_map_rolls_back() {
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        pt.map(&mut mem, 0x20_3000, 0x9000, 0, RW_).unwrap();
        let before = mem.tables.len();
        // Conflict in the middle of the range: nothing stays mapped.
        assert_eq!(
            pt.map(&mut mem, 0x20_0000, 0, 9, RW_),
            Err(PtError::AlreadyMapped)
        );
        assert!(pt.lookup(&mem, 0x20_0000).is_none());
        assert_eq!(pt.lookup(&mem, 0x20_3000).unwrap().phys, 0x9000);
        assert_eq!(mem.tables.len(), before);
        // Out of memory in the middle of the range.
        // 1 TiB from 1 TiB: two PDPTs of 1 GiB leaves; the second PDPT cannot be
        // allocated, and the 512 leaves in the first are rolled back.
        mem.fail_after = Some(1);
        let v = 1 << 40;
        assert_eq!(pt.map(&mut mem, v, 0, 28, Perm::R), Err(PtError::NoMemory));
        assert!(pt.lookup(&mem, v).is_none());
        assert_eq!(mem.tables.len(), before);
        // And the path of a single page: PDPT and PD succeed, the PT fails.
        mem.fail_after = Some(2);
        assert_eq!(pt.map(&mut mem, v, 0, 0, Perm::R), Err(PtError::NoMemory));
        mem.fail_after = None;
        assert_eq!(mem.tables.len(), before);
        assert!(pt.lookup(&mem, v).is_none());
        // No memory to split: error, the large page stays.
        pt.map(&mut mem, G, G, 9, RW_).unwrap();
        mem.fail_after = Some(0);
        assert_eq!(pt.unmap(&mut mem, G, 0), Err(PtError::NoMemory));
        assert_eq!(pt.lookup(&mem, G).unwrap().order, 9);
    }

    #[test]
    fn teardown_user_half() {
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        for i in 0..20u64 {
            pt.map(&mut mem, i * (1 << 39) + i * M2, 0, 0, Perm::R)
                .unwrap();
        }
        let kernel = 0xffff_8000_0000_0000;
        pt.map(&mut mem, kernel, 0, 0, Perm::R).unwrap();
        pt.teardown(&mut mem, 0..256);
        assert_eq!(mem.tables.len(), 4, "root plus the kernel-half path");
        assert!(pt.lookup(&mem, kernel).is_some());
        pt.destroy(&mut mem);
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn ept_and_npt_formats() {
        let mut mem = FakeMem::default();
        let ept = PageTable::<Ept>::new(&mut mem).unwrap();
        ept.map(&mut mem, 0, 0x20_0000, 9, Perm::R | Perm::X)
            .unwrap();
        let e = mem.read(ept.root(), 0);
        assert_eq!(e & 7, 7);
        let t = ept.lookup(&mem, 0x1000).unwrap();
        assert_eq!((t.phys, t.perm, t.order), (0x20_1000, Perm::R | Perm::X, 9));
        assert_eq!(
            ept.map(&mut mem, 0x40_0000, 0, 0, Perm::W),
            Err(PtError::BadPerm)
        );
        ept.map(&mut mem, 0x40_0000, 0, 0, Perm::X).unwrap();
        assert_eq!(ept.lookup(&mem, 0x40_0000).unwrap().perm, Perm::X);
        assert_eq!(
            ept.map(&mut mem, 1 << 48, 0, 0, Perm::R),
            Err(PtError::OutOfRange)
        );
        ept.destroy(&mut mem);
        let npt = PageTable::<Npt>::new(&mut mem).unwrap();
        npt.map(&mut mem, 0x7000, 0x3000, 0, RW_).unwrap();
        let t = npt.lookup(&mem, 0x7000).unwrap();
        assert_eq!(t.perm, RW_);
        assert_eq!(
            npt.map(&mut mem, 0xffff_8000_0000_0000, 0, 0, RW_),
            Err(PtError::OutOfRange)
        );
        npt.destroy(&mut mem);
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn ept_without_large_leaves() {
        let mut mem = FakeMem::default();
        let ept = PageTable::<EptUpTo<0>>::new(&mut mem).unwrap();
        ept.map(&mut mem, 0, 0x20_0000, 9, Perm::R | Perm::W)
            .unwrap();
        let t = ept.lookup(&mem, 0x1000).unwrap();
        assert_eq!((t.phys, t.order), (0x20_1000, 0));
        ept.destroy(&mut mem);
        let ept = PageTable::<EptUpTo<1>>::new(&mut mem).unwrap();
        ept.map(&mut mem, 0, 0, 18, Perm::R).unwrap();
        assert_eq!(ept.lookup(&mem, 0x1000).unwrap().order, 9);
        ept.destroy(&mut mem);
        assert!(mem.tables.is_empty());
    }

    use peregrine_rng::Rng;

    /// Random map/unmap in a window of 4 x 2 MiB around a 1 GiB boundary, checked page
    /// by page against a map from page to (frame, perm).
    #[test]
    fn random_against_model() {
        let mut rng = Rng::from_state(99);
        let mut mem = FakeMem::default();
        let pt = PageTable::<Host>::new(&mut mem).unwrap();
        let base = G - 2 * M2;
        let pages = 4 * 512u64;
        let mut model: BTreeMap<u64, (u64, Perm)> = BTreeMap::new();
        let perms = [Perm::R, RW_, RW_ | Perm::U, Perm::R | Perm::X];
        for step in 0..3000 {
            let order = [0u8, 0, 1, 3, 9, 9, 10][rng.below(7) as usize];
            let page = rng.below(pages) & !((1 << order) - 1);
            let v = base + (page << 12);
            if rng.below(2) == 0 {
                let frame = (rng.below(1 << 20) << 12) & !((1u64 << (order + 12)) - 1);
                let perm = perms[rng.below(4) as usize];
                let free = (0..1u64 << order).all(|i| !model.contains_key(&(page + i)));
                let r = pt.map(&mut mem, v, frame, order, perm);
                assert_eq!(r.is_ok(), free, "step {step}");
                if free {
                    for i in 0..1u64 << order {
                        model.insert(page + i, (frame + (i << 12), perm));
                    }
                }
            } else {
                let had = (0..1u64 << order).any(|i| model.contains_key(&(page + i)));
                let flush = pt.unmap(&mut mem, v, order).unwrap();
                assert_eq!(flush, had);
                for i in 0..1u64 << order {
                    model.remove(&(page + i));
                }
            }
            let check: Vec<u64> = if step % 100 == 0 {
                (0..pages).collect()
            } else {
                (0..32).map(|_| rng.below(pages)).collect()
            };
            for p in check {
                let got = pt
                    .lookup(&mem, base + (p << 12) + 8)
                    .map(|t| (t.phys - 8, t.perm));
                assert_eq!(got, model.get(&p).copied(), "page {p}");
            }
        }
        pt.unmap(&mut mem, 0, 27).unwrap();
        assert_eq!(mem.tables.len(), 1);
    }
}
