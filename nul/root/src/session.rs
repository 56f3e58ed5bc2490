//! Disk sessions: the root binds a VMM (`blk=BINDING`) to the disk component
//! (`role=disk`) as `nul_rt::blk` describes, and closes the session before it takes
//! the VMM's memory back.

use core::sync::atomic::Ordering;

use nul_rt::blk::{self, SessionSlot, MAX_SESSIONS};
use nul_rt::sync::Mutex;
use nul_rt::{hc, println, sel};
use peregrine_abi::perm::{MemPerm, SmPerm};
use peregrine_abi::{Crd, Status, XferFlags, PAGE_BITS};
use peregrine_blkproto::Layout;

use crate::component::{map_range, StartError};
use crate::mem;

use nul_rt::blk::{SLOT_CLOSED, SLOT_CLOSING};

/// The disk component as the root knows it.
#[derive(Debug, Clone, Copy)]
struct Disk {
    /// Its PD (root selector).
    pd: u64,
    /// Its wake semaphore (root selector).
    wake: u64,
    /// Physical address of its sessions page.
    page: u64,
}

static DISK: Mutex<Option<Disk>> = Mutex::new(None);
/// Which VMM (component id) holds each slot.
static OWNERS: Mutex<[Option<usize>; MAX_SESSIONS]> = Mutex::new([None; MAX_SESSIONS]);

/// Records the disk component (started with `role=disk`): its PD, its wake semaphore
/// and its sessions page (read-write: the service writes a slot's state when it closed
/// it; the root reads nothing else back).
pub fn register_disk(pd: u64, wake: u64, page: u64) {
    *DISK.lock() = Some(Disk { pd, wake, page });
}

fn slots(d: &Disk) -> &'static [SessionSlot; MAX_SESSIONS] {
    // SAFETY: the sessions page is a root page in the window for as long as the disk
    // component lives (the root never frees it: see `register_disk`'s caller); the
    // slots are plain integers and atomics.
    unsafe { &*(mem::virt(d.page) as *const [SessionSlot; MAX_SESSIONS]) }
}

fn delegate_sm(src: u64, pd: u64, dst: u64, perm: SmPerm) -> Result<(), Status> {
    hc::pd_delegate(
        sel::OWN_PD,
        pd,
        Crd::obj(src, 0, perm.bits()),
        Crd::obj(dst, 0, perm.bits()),
        0,
        XferFlags::empty(),
    )
}

/// Sets up a session for VMM `id` (PD `pd`, guest RAM `pool` = physical address and
/// pages) bound by `binding`; returns the ring region's size. The ring's memory goes
/// into `ranges` (taken back when the VMM goes, after [`close`]).
pub fn open(
    pd: u64,
    id: usize,
    binding: &str,
    pool: (u64, u64),
    ranges: &mut alloc::vec::Vec<(u64, u64)>,
    owned: &mut alloc::vec::Vec<u64>,
) -> Result<u64, StartError> {
    let Some(d) = *DISK.lock() else {
        println!(
            "blk={}: no disk component (role=disk) started before",
            binding
        );
        return Err(StartError::Kernel(Status::BadDevice));
    };
    if binding.len() > blk::BINDING_MAX || pool.1 == 0 {
        return Err(StartError::Kernel(Status::BadParameter));
    }
    let slot = {
        let mut o = OWNERS.lock();
        let free = slots(&d)
            .iter()
            .zip(o.iter())
            .position(|(s, o)| o.is_none() && s.state.load(Ordering::Acquire) == blk::SLOT_EMPTY);
        let Some(i) = free else {
            println!(
                "blk={}: the disk component serves {} sessions already",
                binding, MAX_SESSIONS
            );
            return Err(StartError::NoMemory);
        };
        o[i] = Some(id);
        i
    };
    let r = setup(&d, slot, (pd, id), binding, pool, ranges, owned);
    if r.is_err() {
        OWNERS.lock()[slot] = None;
    }
    r
}

/// `client`: the VMM's PD and component id.
fn setup(
    d: &Disk,
    slot: usize,
    (pd, id): (u64, usize),
    binding: &str,
    pool: (u64, u64),
    ranges: &mut alloc::vec::Vec<(u64, u64)>,
    owned: &mut alloc::vec::Vec<u64>,
) -> Result<u64, StartError> {
    let layout = Layout::new(blk::RING_ENTRIES).ok_or(StartError::NoMemory)?;
    let pages = (layout.bytes() as u64).div_ceil(1 << PAGE_BITS);
    let ring = mem::alloc(pages).ok_or(StartError::NoMemory)?;
    ranges.push((ring, pages));
    // SAFETY: fresh pages of the root's window, not yet given to anyone.
    unsafe { core::ptr::write_bytes(mem::virt(ring) as *mut u8, 0, (pages << PAGE_BITS) as usize) };
    let rw = MemPerm::R | MemPerm::W;
    map_range(pd, blk::VMM_RING_ADDR, ring, pages, rw)?;
    let service_ring = blk::SERVICE_RING_ADDR + slot as u64 * blk::RING_STRIDE;
    let service_data = blk::SERVICE_DATA_ADDR + slot as u64 * blk::DATA_STRIDE;
    map_range(d.pd, service_ring, ring, pages, rw)?;
    map_range(d.pd, service_data, pool.0, pool.1, rw)?;
    delegate_sm(d.wake, pd, blk::VMM_DOORBELL_SEL, SmPerm::UP)?;
    let done = sel::alloc();
    hc::create_sm(done, sel::OWN_PD, 0)?;
    // Destroyed with the VMM (after `close`), which takes both copies with it.
    owned.push(done);
    let service_sel = 0x900 + slot as u64;
    delegate_sm(done, pd, blk::VMM_COMPLETION_SEL, SmPerm::DOWN)?;
    delegate_sm(done, d.pd, service_sel, SmPerm::UP)?;
    // SAFETY: slot `slot` of the sessions page in the root's window, written through a
    // raw pointer (no reference to it lives meanwhile); the service reads these fields
    // only after it sees `state` READY (stored with release below) and writes only
    // `state`.
    unsafe {
        let p = (mem::virt(d.page) as *mut SessionSlot).add(slot);
        core::ptr::addr_of_mut!((*p).ring).write(service_ring);
        core::ptr::addr_of_mut!((*p).ring_bytes).write(pages << PAGE_BITS);
        core::ptr::addr_of_mut!((*p).entries).write(u64::from(blk::RING_ENTRIES));
        core::ptr::addr_of_mut!((*p).data).write(service_data);
        core::ptr::addr_of_mut!((*p).data_len).write(pool.1 << PAGE_BITS);
        core::ptr::addr_of_mut!((*p).completion_sel).write(service_sel);
        core::ptr::addr_of_mut!((*p).client).write(id as u64);
        let b = core::ptr::addr_of_mut!((*p).binding) as *mut u8;
        core::ptr::write_bytes(b, 0, blk::BINDING_MAX);
        core::ptr::copy_nonoverlapping(binding.as_ptr(), b, binding.len());
        core::ptr::addr_of_mut!((*p).binding_len).write(binding.len() as u64);
    }
    let s = &slots(d)[slot];
    s.state.store(blk::SLOT_READY, Ordering::Release);
    let _ = hc::sm_up(d.wake);
    println!(
        "blk={}: session {} for component {}, data area {:#x}..{:#x}",
        binding,
        slot,
        id,
        pool.0,
        pool.0 + (pool.1 << PAGE_BITS)
    );
    Ok(pages << PAGE_BITS)
}

/// Closes component `id`'s session, if it has one, before its memory is taken back:
/// asks the service to finish what is in flight and waits for its answer (2 s). The
/// root's service EC of this CPU waits meanwhile, so the service must answer before it
/// calls the root for anything (such as printing). Returns
/// false if the service did not answer: the caller must then not reuse the memory (the
/// device may still write it).
pub fn close(id: usize) -> bool {
    let Some(d) = *DISK.lock() else { return true };
    let Some(slot) = OWNERS.lock().iter().position(|o| *o == Some(id)) else {
        return true;
    };
    let s = &slots(&d)[slot];
    s.state.store(SLOT_CLOSING, Ordering::Release);
    let _ = hc::sm_up(d.wake);
    let deadline = hc::rdtsc() + 2_000 * tsc_khz();
    let closed = loop {
        if s.state.load(Ordering::Acquire) == SLOT_CLOSED {
            break true;
        }
        if hc::rdtsc() > deadline {
            break false;
        }
        sleep(tsc_khz());
    };
    if closed {
        s.state.store(blk::SLOT_EMPTY, Ordering::Release);
        OWNERS.lock()[slot] = None;
        // The service's mappings of the ring and data area go with the revocation of
        // the VMM's memory that follows.
    } else {
        println!(
            "session {}: the disk component did not close it; its memory stays out of use",
            slot
        );
    }
    closed
}

static TSC_KHZ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1_000_000);

/// Records the TSC frequency (boot).
pub fn set_tsc_khz(khz: u64) {
    if khz != 0 {
        TSC_KHZ.store(khz, Ordering::Relaxed);
    }
}

/// Sleeps `ticks` TSC ticks on a private semaphore nobody ups.
fn sleep(ticks: u64) {
    static SM: spin::Once<u64> = spin::Once::new();
    let sm = *SM.call_once(|| {
        let s = sel::alloc();
        let _ = hc::create_sm(s, sel::OWN_PD, 0);
        s
    });
    let _ = hc::sm_down(sm, false, hc::rdtsc() + ticks);
}

fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}
