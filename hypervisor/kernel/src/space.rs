//! Delegation, revocation and lookup across the three kinds of space, on top of the
//! mapping database (`peregrine_core::mdb`): one database per kind, spaces named by PD.
//!
//! Lock order: a mapping database, then a PD's object, memory or port space. Nothing
//! takes a database lock while holding a space lock.

use alloc::collections::BTreeMap;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use peregrine_abi::crd::delegation_target;
use peregrine_abi::{Crd, CrdKind, Status, Xfer, XferFlags, PAGE_BITS};
use peregrine_core::mdb::{Mapping, Mdb, MdbError, Removed, SpaceId};
use spin::Mutex;

use crate::cap::{Cap, KObj};
use crate::pd::Pd;

static MDB_MEM: Mutex<Mdb> = Mutex::new(Mdb::new());
static MDB_PIO: Mutex<Mdb> = Mutex::new(Mdb::new());
static MDB_OBJ: Mutex<Mdb> = Mutex::new(Mdb::new());

/// Every live PD by id, to apply revocations to the spaces the database names.
static PDS: Mutex<BTreeMap<u64, Weak<Pd>>> = Mutex::new(BTreeMap::new());

/// Mapping-database nodes in all (a figure of `pd_ctrl` stat).
pub fn nodes() -> u64 {
    [&MDB_MEM, &MDB_PIO, &MDB_OBJ]
        .iter()
        .map(|m| m.lock().len() as u64)
        .sum()
}

/// Registers a PD so revocations can find it.
pub fn register(pd: &Arc<Pd>) {
    PDS.lock().insert(pd.id, Arc::downgrade(pd));
}

fn pd_of(space: SpaceId) -> Option<Arc<Pd>> {
    PDS.lock().get(&space.0).and_then(|w| w.upgrade())
}

fn sid(pd: &Pd) -> SpaceId {
    SpaceId(pd.id)
}

fn mdb_err(e: MdbError) -> Status {
    match e {
        MdbError::NotFound => Status::BadCapability,
        _ => Status::BadParameter,
    }
}

/// Installs the original capability to a newly created object at `sel`, charging the
/// capability-space tables it needs to `pd`. Fails once `pd` is destroyed (checked under
/// the database lock its destruction takes too, so no capability lands in a dead space).
pub fn insert_root_cap(pd: &Arc<Pd>, sel: u64, obj: KObj) -> Result<(), Status> {
    let perm = peregrine_abi::perm::ALL;
    let mut mdb = MDB_OBJ.lock();
    if pd.is_dead() {
        return Err(Status::BadCapability);
    }
    mdb.insert_root(sid(pd), sel, 0, perm, 0).map_err(mdb_err)?;
    let child = if let KObj::Pd(p) = &obj {
        Some(p.clone())
    } else {
        None
    };
    // The node is charged like every node of the space, the tables the capability
    // needs as well.
    let undone = if let Err(e) = settle(&mdb, Db::Obj, pd, true) {
        Some((e, Some(Cap { obj, perm })))
    } else {
        let mut s = pd.obj.lock();
        match s.insert(sel, Cap { obj, perm }) {
            Err((e, cap)) => Some((
                if e == peregrine_core::capspace::CapError::NoMemory {
                    Status::OutOfMemory
                } else {
                    Status::BadCapability
                },
                Some(cap),
            )),
            Ok(()) => match pd.settle_cap_tables(s.pages(), true) {
                Ok(()) => None,
                Err(e) => {
                    let cap = s.remove(sel);
                    let _ = pd.settle_cap_tables(s.pages(), false);
                    Some((e, cap))
                }
            },
        }
    };
    if let Some((e, cap)) = undone {
        let _ = mdb.revoke(sid(pd), sel, 0, true, |_| {});
        let _ = settle(&mdb, Db::Obj, pd, false);
        drop(mdb);
        // The object goes here, outside every lock (a PD's release takes its own).
        drop(cap);
        return Err(e);
    }
    if let Some(p) = child {
        register(&p);
    }
    Ok(())
}

/// Records the kernel PD's possessions at boot: memory `pages` from `base` (by physical
/// page number) and all I/O ports.
pub fn kernel_root_mem(kern: &Pd, base: u64, order: u8) {
    let _ = MDB_MEM
        .lock()
        .insert_root(sid(kern), base, order, 0x7, base);
}

/// Records all I/O ports as the kernel PD's.
pub fn kernel_root_pio(kern: &Pd) {
    let _ = MDB_PIO.lock().insert_root(sid(kern), 0, 16, 1, 0);
}

/// A typed item of a message: delegate `x` from `src` into `dst`'s window.
pub fn transfer(src: &Arc<Pd>, dst: &Arc<Pd>, x: Xfer, window: Crd) -> Result<(), Status> {
    if !x.flags().contains(XferFlags::DELEGATE) {
        // Translation is not supported yet.
        return Err(Status::BadFeature);
    }
    delegate(src, dst, x.crd, window, x.hotspot(), x.flags())
}

/// Delegates `src_crd` of `src` into the window `win` of `dst` (NOVA's rules; see
/// `peregrine_abi::crd::delegation_target`).
#[inline(never)] // off the IPC path: a reply with typed items calls it
pub fn delegate(
    src: &Arc<Pd>,
    dst: &Arc<Pd>,
    src_crd: Crd,
    win: Crd,
    hotspot: u64,
    flags: XferFlags,
) -> Result<(), Status> {
    let kind = src_crd.kind();
    if kind == CrdKind::Null || win.kind() != kind {
        return Err(Status::BadParameter);
    }
    reserve_heap()?;
    if !src_crd.is_aligned() || !win.is_aligned() {
        return Err(Status::BadParameter);
    }
    if flags.contains(XferFlags::DMA) {
        return Err(Status::BadFeature);
    }
    // SVM/NPT: memory into a VM's guest-physical space.
    let guest = flags.contains(XferFlags::GUEST);
    if guest && (kind != CrdKind::Mem || dst.guest.is_none()) {
        return Err(Status::BadParameter);
    }
    let (sb, db, order) = delegation_target(
        src_crd.base(),
        src_crd.order(),
        win.base(),
        win.order(),
        hotspot,
    )
    .ok_or(Status::BadParameter)?;
    let r = Range {
        sb,
        db,
        order,
        mask: src_crd.perm() & win.perm(),
    };
    match kind {
        CrdKind::Mem if guest => delegate_guest(src, dst, r),
        CrdKind::Mem => delegate_mem(src, dst, r),
        CrdKind::Pio => delegate_pio(src, dst, r),
        CrdKind::Obj => delegate_obj(src, dst, r),
        CrdKind::Null => Err(Status::BadParameter),
    }
}

/// Heap room a delegation or revocation makes sure of before it changes anything (see
/// `mem::heap::reserve`): B-tree nodes for the new mapping-database entries (a few per
/// node inserted, each under 1 KiB) and the list of removed mappings.
const HEAP_RESERVE: usize = 64 * 1024;

fn reserve_heap() -> Result<(), Status> {
    if crate::mem::heap::reserve(HEAP_RESERVE) {
        Ok(())
    } else {
        Err(Status::OutOfMemory)
    }
}

/// Which mapping database (the index [`Pd::settle_nodes`] charges under).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Mem = 0,
    Pio = 1,
    Obj = 2,
}

/// Brings `pd`'s node charge for `db` up to date (the caller holds `db`'s lock).
fn settle(mdb: &Mdb, db: Db, pd: &Pd, strict: bool) -> Result<(), Status> {
    let mut n = mdb.count(sid(pd));
    if db == Db::Mem && pd.vm {
        n += mdb.count(crate::space_guest::sid(pd));
    }
    pd.settle_nodes(db as usize, n, strict)
}

/// Settles every PD whose space lost (or, by a split, gained) nodes.
fn settle_removed(mdb: &Mdb, db: Db, removed: &[Removed]) {
    let mut ids: Vec<u64> = removed
        .iter()
        .map(|r| r.space.0 & !crate::space_guest::GUEST_SPACE_BIT)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        if let Some(p) = pd_of(SpaceId(id)) {
            let _ = settle(mdb, db, &p, false);
        }
    }
}

/// What a delegation moves: `2^order` items from `sb` in the source's space to `db` in
/// the destination's, with the permissions of `mask`.
#[derive(Debug, Clone, Copy)]
struct Range {
    sb: u64,
    db: u64,
    order: u8,
    mask: u8,
}

impl Range {
    /// `BadParameter` unless the order is at most `max_order` and the destination range
    /// ends at or below `end`.
    fn fits(self, max_order: u8, end: u64) -> Result<(), Status> {
        if self.order > max_order || self.db.checked_add(1 << self.order).is_none_or(|e| e > end) {
            return Err(Status::BadParameter);
        }
        Ok(())
    }
}

/// The shape every delegation shares: record the new nodes in `db` from `src`'s space
/// into `dst`'s space `dsid`, charge them to `dst`, and `apply` each to `dst`'s space;
/// if the charge or an application fails, remove the new nodes again, `undo` each
/// and return the error.
fn delegate_nodes(
    db: Db,
    src: &Pd,
    dst: &Pd,
    dsid: SpaceId,
    r: Range,
    mut apply: impl FnMut(&Mapping) -> Result<(), Status>,
    mut undo: impl FnMut(&Mapping),
) -> Result<(), Status> {
    let lock = match db {
        Db::Mem => &MDB_MEM,
        Db::Pio => &MDB_PIO,
        Db::Obj => &MDB_OBJ,
    };
    let mut mdb = lock.lock();
    // A PD being destroyed takes this lock after it is marked dead: whatever lands in
    // its spaces before is torn down with them, nothing lands after.
    if dst.is_dead() {
        return Err(Status::BadCapability);
    }
    let new = mdb
        .delegate_range(sid(src), r.sb, dsid, r.db, r.order, r.mask)
        .map_err(mdb_err)?;
    let mut applied = 0;
    let res = settle(&mdb, db, dst, true).and_then(|()| {
        new.iter().try_for_each(|m| {
            apply(m)?;
            applied += 1;
            Ok(())
        })
    });
    if res.is_err() {
        for m in new.iter() {
            let _ = mdb.revoke(m.space, m.base, m.order, true, |_| {});
        }
        // Only what this delegation put there goes again (an application that failed
        // changed nothing: it may have met a UTCB or another mapping it must not touch).
        for m in &new[..applied] {
            undo(m);
        }
        let _ = settle(&mdb, db, dst, false);
    }
    res
}

/// Memory into one of `dst`'s page tables (its host space, or its guest space
/// `dsid`): `map` each new node; on failure `unmap` what was mapped, `flush` the TLBs
/// that may cache it, and only then free the tables that emptied.
fn delegate_pages(
    src: &Pd,
    dst: &Arc<Pd>,
    dsid: SpaceId,
    r: Range,
    map: impl FnMut(&Mapping) -> Result<(), Status>,
    mut unmap: impl FnMut(&Mapping, &mut Vec<u64>),
    flush: impl FnOnce(),
) -> Result<(), Status> {
    let mut freed = Vec::new();
    let res = delegate_nodes(Db::Mem, src, dst, dsid, r, map, |m| unmap(m, &mut freed));
    if res.is_err() {
        flush();
        for t in freed {
            crate::kmem::free_frame(dst, t);
        }
    }
    res
}

fn delegate_mem(src: &Pd, dst: &Arc<Pd>, r: Range) -> Result<(), Status> {
    r.fits(40, peregrine_abi::hip::USER_END >> peregrine_abi::PAGE_BITS)?;
    delegate_pages(
        src,
        dst,
        sid(dst),
        r,
        |m| dst.mem.map(dst, m.base, m.origin, m.order, m.perm),
        |m, freed| dst.mem.unmap_deferred(None, m.base, m.order, freed),
        // What was mapped may be cached: flush before the tables are reused.
        || crate::tlb::shootdown_to(crate::tlb::Targets::Pds(&[dst.id])),
    )
}

/// Delegates host memory of `src` into the guest-physical space of VM `dst`
/// (recorded under the guest space id, see `space_guest`).
fn delegate_guest(src: &Pd, dst: &Arc<Pd>, r: Range) -> Result<(), Status> {
    let Some(g) = dst.guest.as_ref() else {
        return Err(Status::BadParameter);
    };
    r.fits(36, crate::space_guest::GUEST_PAGES)?;
    delegate_pages(
        src,
        dst,
        crate::space_guest::sid(dst),
        r,
        |m| g.map(dst, m.base, m.origin, m.order, m.perm),
        |m, freed| g.unmap_deferred(None, m.base, m.order, freed),
        crate::tlb::shootdown,
    )
}

fn delegate_pio(src: &Pd, dst: &Arc<Pd>, r: Range) -> Result<(), Status> {
    if r.sb != r.db {
        // Ports keep their numbers.
        return Err(Status::BadParameter);
    }
    r.fits(16, 0x10000)?;
    delegate_nodes(
        Db::Pio,
        src,
        dst,
        sid(dst),
        r,
        |m| {
            dst.pio.set(m.base, m.order, true, || {
                dst.charge_io_bitmap(crate::space_pio::IOPB_PAGES)
            })
        },
        |m| {
            let _ = dst.pio.set(m.base, m.order, false, || Ok(()));
        },
    )
}

fn delegate_obj(src: &Pd, dst: &Arc<Pd>, r: Range) -> Result<(), Status> {
    r.fits(18, crate::pd::SEL_NUM)?;
    delegate_nodes(
        Db::Obj,
        src,
        dst,
        sid(dst),
        r,
        |m| {
            let (_, src_base) = m.src.unwrap_or((sid(src), m.base));
            // Only the slots that hold something (absent tables are skipped); the
            // source's lock is dropped before the destination's is taken.
            let mut caps: Vec<(u64, Cap)> = Vec::new();
            if let Ok(r) = src.obj.lock().range(src_base, m.order) {
                for (sel, c) in r {
                    caps.try_reserve(1).map_err(|_| Status::OutOfMemory)?;
                    caps.push((
                        m.base + (sel - src_base),
                        Cap {
                            obj: c.obj.clone(),
                            perm: c.perm & m.perm,
                        },
                    ));
                }
            }
            let mut d = dst.obj.lock();
            let mut r = Ok(());
            for (sel, cap) in caps {
                if let Err((e, _)) = d.insert(sel, cap) {
                    if e == peregrine_core::capspace::CapError::NoMemory {
                        r = Err(Status::OutOfMemory);
                        break;
                    }
                }
            }
            // The tables they needed are charged to the receiver.
            r.and_then(|()| dst.settle_cap_tables(d.pages(), true))
                .inspect_err(|_| clear_caps(dst, &mut d, m.base, m.order))
        },
        |m| clear_caps(dst, &mut dst.obj.lock(), m.base, m.order),
    )
}

/// Takes the capabilities of `base .. base + 2^order` out of `pd`'s space `s` (a
/// delegation undone: they are copies, their objects live on elsewhere) and returns
/// the table pages that freed.
fn clear_caps(pd: &Pd, s: &mut peregrine_core::capspace::CapSpace<KObj>, base: u64, order: u8) {
    let _ = s.remove_range(base, order, |_, _| {});
    let _ = pd.settle_cap_tables(s.pages(), false);
}

/// `lookup`: the node covering the CRD's base in the caller's space of that kind.
pub fn lookup(pd: &Pd, crd: Crd) -> Result<Crd, Status> {
    let (mdb, kind) = match crd.kind() {
        CrdKind::Mem => (&MDB_MEM, CrdKind::Mem),
        CrdKind::Pio => (&MDB_PIO, CrdKind::Pio),
        CrdKind::Obj => (&MDB_OBJ, CrdKind::Obj),
        CrdKind::Null => return Err(Status::BadParameter),
    };
    Ok(match mdb.lock().lookup(sid(pd), crd.base()) {
        Some(m) => Crd::new(kind, m.base, m.order, m.perm),
        None => Crd::NULL,
    })
}

/// `lookup` with `PHYS`: the physical address of the page at the base of memory CRD
/// `crd` in `pd`'s space (`BadParameter` for another kind, `BadCapability` where
/// nothing is mapped). No secret is given away: a PD learns it only of memory it holds.
pub fn lookup_phys(pd: &Pd, crd: Crd) -> Result<u64, Status> {
    if crd.kind() != CrdKind::Mem {
        return Err(Status::BadParameter);
    }
    pd.mem
        .lookup(crd.base() << PAGE_BITS)
        .map(|p| p & !((1u64 << PAGE_BITS) - 1))
        .ok_or(Status::BadCapability)
}

/// `revoke`: takes the range away from everything derived from it (and from the caller
/// with `own`), in every PD, with TLB shootdown.
#[inline(never)] // off the IPC path (see `syscall_handler`)
pub fn revoke(pd: &Arc<Pd>, crd: Crd, own: bool, cpu: &mut crate::cpu::Cpu) -> Result<(), Status> {
    if !crd.is_aligned() {
        return Err(Status::BadParameter);
    }
    reserve_heap()?;
    let (base, order) = (crd.base(), crd.order());
    match crd.kind() {
        CrdKind::Null => Err(Status::BadParameter),
        CrdKind::Mem => {
            let removed = {
                let mut mdb = MDB_MEM.lock();
                let r = mdb
                    .revoke_collect_with(sid(pd), base, order, own, |s, n| can_split(Db::Mem, s, n))
                    .map_err(mdb_err)?;
                settle_removed(&mdb, Db::Mem, &r);
                r
            };
            unmap_removed(&removed);
            Ok(())
        }
        CrdKind::Pio => {
            let removed = {
                let mut mdb = MDB_PIO.lock();
                let r = mdb
                    .revoke_collect_with(sid(pd), base, order, own, |s, n| can_split(Db::Pio, s, n))
                    .map_err(mdb_err)?;
                settle_removed(&mdb, Db::Pio, &r);
                r
            };
            for r in removed {
                if let Some(p) = pd_of(r.space) {
                    let _ = p.pio.set(r.base, r.order, false, || Ok(()));
                }
            }
            crate::tlb::shootdown();
            Ok(())
        }
        CrdKind::Obj => {
            // Original capabilities removed with `own` end their objects: a PD is
            // destroyed, an EC stopped, an SC descheduled (NOVA: the creator's
            // capability is the object's life).
            let mut doomed = Vec::new();
            let mut ended = Vec::new();
            let removed = {
                let mut mdb = MDB_OBJ.lock();
                if own {
                    let last = base + (1u64 << order.min(63)) - 1;
                    // Only the nodes in the range: the work is the range's, not the
                    // size of the caller's space.
                    for m in mdb.mappings_in(sid(pd), base, last) {
                        if m.src.is_none() && m.base >= base && m.base <= last {
                            match pd.cap(m.base) {
                                Some(Cap {
                                    obj: KObj::Pd(p), ..
                                }) => doomed.push(p),
                                Some(Cap { obj, .. }) => ended.push(obj),
                                None => {}
                            }
                        }
                    }
                }
                let r = mdb
                    .revoke_collect_with(sid(pd), base, order, own, |s, n| can_split(Db::Obj, s, n))
                    .map_err(mdb_err)?;
                settle_removed(&mdb, Db::Obj, &r);
                r
            };
            remove_caps(&removed);
            for p in doomed {
                destroy(&p, cpu);
            }
            for o in ended {
                match o {
                    KObj::Ec(e) => crate::sched::kill(&e, cpu),
                    KObj::Sc(sc) => crate::sched::kill_sc(&sc, cpu),
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

/// Whether the owner of `space` can pay for `extra` more nodes of `db` that a split
/// by revocation would create (charged now; settled exactly when the revocation ends).
fn can_split(db: Db, space: SpaceId, extra: u64) -> bool {
    pd_of(SpaceId(space.0 & !crate::space_guest::GUEST_SPACE_BIT))
        .is_none_or(|p| p.reserve_nodes(db as usize, extra))
}

fn remove_caps(removed: &[Removed]) {
    let mut dropped = Vec::new();
    for r in removed {
        if let Some(p) = pd_of(r.space) {
            let mut s = p.obj.lock();
            let _ = s.remove_range(r.base, r.order, |_, c| {
                if dropped.try_reserve(1).is_ok() {
                    dropped.push(c);
                }
            });
            let _ = p.settle_cap_tables(s.pages(), false);
        }
    }
    // Objects are dropped outside the space locks (a dropped PD takes its own locks).
    drop(dropped);
}

fn unmap_removed(removed: &[Removed]) {
    let mut freed: Vec<(Arc<Pd>, Vec<u64>)> = Vec::new();
    for r in removed {
        let guest = r.space.0 & crate::space_guest::GUEST_SPACE_BIT != 0;
        let space = SpaceId(r.space.0 & !crate::space_guest::GUEST_SPACE_BIT);
        if let Some(p) = pd_of(space) {
            let mut f = Vec::new();
            match (&p.guest, guest) {
                // SVM/NPT: a guest-physical mapping.
                (Some(g), true) => g.unmap_deferred(Some(&p), r.base, r.order, &mut f),
                (_, true) => {}
                (_, false) => p.mem.unmap_deferred(Some(&p), r.base, r.order, &mut f),
            }
            freed.push((p, f));
        }
    }
    if !removed.is_empty() {
        // Host spaces: the CPUs that have one of them loaded; a guest space: all.
        let mut ids: Vec<u64> = removed.iter().map(|r| r.space.0).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids
            .iter()
            .any(|&s| s & crate::space_guest::GUEST_SPACE_BIT != 0)
        {
            crate::tlb::shootdown();
        } else {
            crate::tlb::shootdown_to(crate::tlb::Targets::Pds(&ids));
        }
    }
    for (p, f) in freed {
        for t in f {
            crate::kmem::free_frame(&p, t);
        }
    }
}

/// Destroys a PD (its original capability was revoked) and, iteratively, every PD it
/// created: their original capabilities were in its object space.
pub fn destroy(pd: &Arc<Pd>, cpu: &mut crate::cpu::Cpu) {
    let mut work = alloc::vec![pd.clone()];
    while let Some(p) = work.pop() {
        if !p.kill(cpu) {
            continue;
        }
        {
            let mdb = MDB_OBJ.lock();
            let s = p.obj.lock();
            for m in mdb.mappings(sid(&p)) {
                if m.src.is_none() {
                    if let Some(Cap {
                        obj: KObj::Pd(c), ..
                    }) = s.get(m.base)
                    {
                        if !Arc::ptr_eq(c, &p) {
                            work.push(c.clone());
                        }
                    }
                }
            }
        }
        destroy_spaces(&p);
    }
}

/// Nodes of a destroyed PD's space taken away per hold of a database's lock.
const DESTROY_PART: usize = 64;

/// Tears down the spaces of a destroyed PD: everything it holds and everything derived.
pub fn destroy_spaces(pd: &Arc<Pd>) {
    // A part at a time, with the database's lock let go in between: the work is
    // proportional to the PD's size, and other CPUs' delegations and revocations must
    // not wait for all of it.
    let destroy_in = |lock: &Mutex<Mdb>, db: Db, spaces: &[SpaceId], then: &dyn Fn(&[Removed])| {
        for &s in spaces {
            loop {
                let mut removed = Vec::new();
                let done = {
                    let mut mdb = lock.lock();
                    let done = mdb.destroy_space_some(s, DESTROY_PART, |r| removed.push(r));
                    settle_removed(&mdb, db, &removed);
                    let _ = settle(&mdb, db, pd, false);
                    done
                };
                then(&removed);
                if done {
                    break;
                }
            }
        }
    };
    let mut mem = alloc::vec![sid(pd)];
    if pd.vm {
        mem.push(crate::space_guest::sid(pd));
    }
    destroy_in(&MDB_MEM, Db::Mem, &mem, &|r| unmap_removed(r));
    destroy_in(&MDB_PIO, Db::Pio, &[sid(pd)], &|removed| {
        for r in removed {
            if let Some(p) = pd_of(r.space) {
                let _ = p.pio.set(r.base, r.order, false, || Ok(()));
            }
        }
    });
    destroy_in(&MDB_OBJ, Db::Obj, &[sid(pd)], &|r| remove_caps(r));
    // Caps it still holds without database nodes (none expected) go with the space.
    let mut rest = Vec::new();
    {
        let mut s = pd.obj.lock();
        s.clear(|_, c| {
            if rest.try_reserve(1).is_ok() {
                rest.push(c);
            }
        });
        let _ = pd.settle_cap_tables(s.pages(), false);
    }
    drop(rest);
    PDS.lock().remove(&pd.id);
}
