//! `test=isolation`: the kernel-object findings of the isolation review (issue 8), each
//! a check that failed on the kernel the review read (41e9cbb): kernel memory that
//! grew without a charge, quota minted by a failed `create_pd`, a PD chain whose
//! release recursed off the kernel stack, death that left handlers busy, waiters
//! asleep and destroyed PDs alive, a failed delegation that unmapped what it had not
//! mapped, and a log flood from ECs without event portals.
//!
//! Kernel memory is read through `pd_ctrl` STAT on the kernel PD: "kernel free bytes"
//! are the pool's free frames plus the heap's mapped but unused bytes, so a leak of
//! either shows.
//!
//! Modules: `nul-test role=blocker deferred` (the root starts and destroys it here).
//! CPUs: 2 (the `create_pd` race needs a second one).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use nul_rt::thread::{self, LocalEc};
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel};
use peregrine_abi::hypercall::stat;
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::{Crd, Status, XferFlags, PAGE_BITS};

use super::{check, deadline_ms, sleep_ms, PRIO};
use crate::children;
use crate::hip::HipView;
use crate::{component, mem, services};

/// Kernel PD figure `item`.
fn kstat(item: u64) -> u64 {
    hc::pd_stat(peregrine_abi::sel::KERN_PD, item).unwrap_or(0)
}

/// The kernel's memory as the STAT figures show it.
#[derive(Debug, Clone, Copy)]
pub struct Kmem {
    /// Frames not handed out as page tables, UTCBs, VMCBs, bitmaps…: the pool's free
    /// frames and the heap's (the heap takes frames from the pool and keeps them).
    pub frames: u64,
    /// Bytes of kernel heap in use.
    pub heap: u64,
    /// Mapping-database nodes.
    pub nodes: u64,
}

/// What [`Kmem::lost`] found.
#[derive(Debug, Clone, Copy)]
pub struct Lost {
    /// Frames fewer free.
    pub frames: i64,
    /// Heap bytes more in use.
    pub heap: i64,
    /// Mapping-database nodes more.
    pub nodes: i64,
}

impl Kmem {
    /// Now, after this CPU's and the others' next scheduling decisions, which take
    /// apart what died meanwhile (dead SCs, ECs of another CPU).
    pub fn settled() -> Self {
        sleep_ms(10);
        Self::now()
    }

    /// Now.
    pub fn now() -> Self {
        Kmem {
            frames: kstat(stat::POOL_FREE) + (kstat(stat::HEAP_MAPPED) >> PAGE_BITS),
            heap: kstat(stat::HEAP_USED),
            nodes: kstat(stat::MDB_NODES),
        }
    }

    /// What was lost since `self` (settled), printed as `what`.
    pub fn lost(&self, what: &str) -> Lost {
        let n = Kmem::settled();
        let d = Lost {
            frames: self.frames as i64 - n.frames as i64,
            heap: n.heap as i64 - self.heap as i64,
            nodes: n.nodes as i64 - self.nodes as i64,
        };
        println!(
            "{}: {} kernel frames fewer free, kernel heap {} bytes larger, {} mapping-database nodes more",
            what, d.frames, d.heap, d.nodes
        );
        d
    }
}

/// Uncharged pages of PD `pd`'s quota.
pub fn quota_avail(pd: u64) -> u64 {
    hc::pd_stat(pd, stat::QUOTA_AVAIL).unwrap_or(0)
}

fn new_sm(count: u64) -> Option<u64> {
    let s = sel::alloc();
    hc::create_sm(s, sel::OWN_PD, count).ok().map(|()| s)
}

fn destroy(s: u64) {
    let _ = hc::revoke(Crd::obj(s, 0, perm::ALL), true);
}

/// A thread on `cpu` at the scenario priority; returns (EC, SC).
fn start(cpu: u64, entry: thread::ThreadEntry, arg: u64) -> Option<(u64, u64)> {
    let evt = services::evt_base(cpu)?;
    thread::thread(cpu, evt, PRIO, entry, arg)
        .ok()
        .map(|t| (t.ec, t.sc))
}

/// A check: its name and the function that runs it.
type Check = (&'static str, fn() -> bool);

/// The checks, by name (`only=NAME,NAME` runs a selection).
const CHECKS: &[Check] = &[
    ("pd_chain", pd_chain),
    ("create_pd_race", create_pd_race),
    ("timeouts", timeouts_freed),
    ("ecs", ecs_freed),
    ("capspace", capspace_tables_charged),
    ("splits", splits_charged),
    ("io_bitmap", io_bitmap_charged),
    ("dead_sc", dead_sc_frees_its_handler),
    ("dead_handler", dead_handler_wakes_its_waiters),
    ("dead_waiter", dead_waiter_eats_no_up),
    ("destroyed_pd", destroyed_pd_returns_its_quota),
    ("failed_delegation", failed_delegation_keeps_the_utcb),
    ("delegate_race", delegation_races_destruction),
    ("unhandled_events", unhandled_events_rate_limited),
];

/// The semaphore the checks' threads wait on for good when they are done ([`park`]).
static PARK: AtomicU64 = AtomicU64::new(0);

/// Blocks the running thread for good, on one semaphore for all (a semaphore each would
/// be kernel memory the checks count).
fn park() -> ! {
    loop {
        let _ = hc::sm_down(PARK.load(Ordering::Relaxed), false, 0);
    }
}

/// Runs the scenario (`only=` a comma-separated selection of [`CHECKS`]).
pub fn run(hip: &HipView, args: &str) -> bool {
    let only = nul_rt::start_info::arg(args, "only");
    match new_sm(0) {
        Some(s) => PARK.store(s, Ordering::Relaxed),
        None => return check(false, "create the parking semaphore"),
    }
    let mut ok = true;
    for &(name, f) in CHECKS {
        if only.is_some_and(|o| !o.split(',').any(|n| n == name)) {
            continue;
        }
        if name == "create_pd_race" && hip.online_cpus().count() < 2 {
            ok &= check(false, "the create_pd race needs two CPUs");
            continue;
        }
        println!("isolation: {}", name);
        ok &= f();
    }
    ok
}

/// A chain of PDs, each created with the previous one as parent, deeper than any kernel
/// stack could recurse, destroyed at once: the kernel survives and every page comes
/// back.
fn pd_chain() -> bool {
    const N: u64 = 3000;
    let base = sel::alloc_aligned(12);
    let before = quota_avail(sel::OWN_PD);
    let mut made = 0;
    let mut parent = sel::OWN_PD;
    let mut quota = 2 * N;
    for i in 0..N {
        if hc::create_pd(base + i, parent, quota, false).is_err() {
            break;
        }
        made += 1;
        parent = base + i;
        quota -= 2;
    }
    let r = hc::revoke(Crd::obj(base, 12, perm::ALL), true);
    let after = quota_avail(sel::OWN_PD);
    println!(
        "pd chain: {} PDs deep, destroyed: {:?}; root quota {} -> {}",
        made, r, before, after
    );
    check(
        made == N && r.is_ok() && after == before,
        "a chain of 3000 PDs is destroyed and returns every page",
    )
}

static RACE_GO: AtomicU64 = AtomicU64::new(0);
static RACE_DONE: AtomicU64 = AtomicU64::new(0);
static RACE_SEL: AtomicU64 = AtomicU64::new(0);
static RACE_SM_OK: AtomicU64 = AtomicU64::new(0);

/// The second racer: `create_sm` onto the selector of each round.
extern "C" fn racer(rounds: u64, _utcb: u64) -> ! {
    for r in 1..=rounds {
        while RACE_GO.load(Ordering::Acquire) != r {
            core::hint::spin_loop();
        }
        let s = RACE_SEL.load(Ordering::Relaxed);
        if hc::create_sm(s, sel::OWN_PD, 0).is_ok() {
            RACE_SM_OK.fetch_add(1, Ordering::Relaxed);
        }
        RACE_DONE.store(r, Ordering::Release);
    }
    park()
}

/// `create_pd` and `create_sm` race onto one selector; the loser's `create_pd` must
/// return its parent's charge once, not twice (which minted quota without bound).
fn create_pd_race() -> bool {
    const ROUNDS: u64 = 2000;
    const QUOTA: u64 = 64;
    const SMS: u64 = 40;
    let p = sel::alloc();
    if hc::create_pd(p, sel::OWN_PD, QUOTA, false).is_err() {
        return check(false, "create the parent PD of the race");
    }
    let sms: Vec<u64> = (0..SMS)
        .filter_map(|_| {
            let s = sel::alloc();
            hc::create_sm(s, p, 0).ok().map(|()| s)
        })
        .collect();
    RACE_GO.store(0, Ordering::Relaxed);
    RACE_DONE.store(0, Ordering::Relaxed);
    let Some((ec, sc)) = start(1, racer, ROUNDS) else {
        return check(false, "start the racer on CPU 1");
    };
    let mut pd_lost = 0;
    for r in 1..=ROUNDS {
        let s = sel::alloc();
        RACE_SEL.store(s, Ordering::Relaxed);
        RACE_GO.store(r, Ordering::Release);
        if hc::create_pd(s, p, 0, false).is_err() {
            pd_lost += 1;
        }
        while RACE_DONE.load(Ordering::Acquire) != r {
            core::hint::spin_loop();
        }
        destroy(s);
        sel::free(s);
    }
    destroy(sc);
    destroy(ec);
    let avail = quota_avail(p);
    let total = hc::pd_stat(p, stat::QUOTA_TOTAL).unwrap_or(0);
    println!(
        "create_pd race: {} rounds, create_pd lost {}, create_sm won {}; parent quota {}/{} (expected {}/{})",
        ROUNDS,
        pd_lost,
        RACE_SM_OK.load(Ordering::Relaxed),
        avail,
        total,
        QUOTA - sms.len() as u64,
        QUOTA
    );
    for s in sms {
        destroy(s);
    }
    destroy(p);
    check(
        pd_lost > 0 && avail == QUOTA - SMS && total == QUOTA,
        "a create_pd that lost a race for its selector charged its parent exactly once",
    )
}

/// Rounds of the timeout test.
const TIMEOUT_ROUNDS: u64 = 20_000;

/// Blocks on `arg`'s first semaphore with a far deadline, then ups the second.
extern "C" fn far_waiter(arg: u64, _utcb: u64) -> ! {
    let (a, b) = (arg & 0xffff_ffff, arg >> 32);
    for _ in 0..TIMEOUT_ROUNDS {
        let _ = hc::sm_down(a, false, u64::MAX - 1);
        let _ = hc::sm_up(b);
    }
    park()
}

/// A semaphore down with a far deadline, ended by an up: the deadline leaves with the
/// wait (it stayed in the CPU's timeout list for good, scanned at every tick).
fn timeouts_freed() -> bool {
    let (Some(a), Some(b)) = (new_sm(0), new_sm(0)) else {
        return check(false, "create semaphores");
    };
    let before = Kmem::now();
    let Some((ec, sc)) = start(0, far_waiter, a | (b << 32)) else {
        return check(false, "start the waiter");
    };
    let mut done = 0;
    for _ in 0..TIMEOUT_ROUNDS {
        let _ = hc::sm_up(a);
        if hc::sm_down(b, false, deadline_ms(1000)).is_err() {
            break;
        }
        done += 1;
    }
    destroy(sc);
    destroy(ec);
    let grew = before.lost("far deadlines").heap;
    destroy(a);
    destroy(b);
    check(
        done == TIMEOUT_ROUNDS && grew < 64 * 1024,
        "20,000 downs with a far deadline, each ended by an up, leave no kernel memory behind",
    )
}

/// ECs created and destroyed: their memory goes back (a PD's list of its ECs kept
/// every EC's allocation).
fn ecs_freed() -> bool {
    const N: u64 = 3000;
    let Some(evt) = services::evt_base(0) else {
        return check(false, "event base");
    };
    let utcb = 0x7d00_0000_0000;
    let s = sel::alloc();
    let before = Kmem::now();
    let mut made = 0;
    for _ in 0..N {
        if hc::create_ec(s, sel::OWN_PD, hc::EcKind::Local, 0, utcb, 0x1000, evt).is_err() {
            break;
        }
        made += 1;
        destroy(s);
    }
    let grew = before.lost("EC churn").heap;
    println!("EC churn: {} of {} ECs created", made, N);
    check(
        made == N && grew < 64 * 1024,
        "3,000 ECs created and destroyed leave no kernel memory behind",
    )
}

/// Capability-space tables are charged to the PD whose space holds them: one
/// capability delegated to each of many leaf tables of a 4-page PD runs out of quota
/// within a few tables (a leaf table is 3 KiB of kernel heap, the middle one 4 KiB).
fn capspace_tables_charged() -> bool {
    let c = sel::alloc();
    let Some(sm) = new_sm(0) else {
        return check(false, "create a semaphore");
    };
    if hc::create_pd(c, sel::OWN_PD, 4, false).is_err() {
        return check(false, "create a 4-page PD");
    }
    let mut n = 0;
    let mut last = Ok(());
    while n < 64 {
        last = hc::pd_delegate(
            sel::OWN_PD,
            c,
            Crd::obj(sm, 0, perm::ALL),
            Crd::obj(128 * (n + 1), 0, perm::ALL),
            0,
            XferFlags::empty(),
        );
        if last.is_err() {
            break;
        }
        n += 1;
    }
    println!(
        "capabilities in distinct leaf tables of a 4-page PD: {} ({:?})",
        n, last
    );
    destroy(c);
    destroy(sm);
    check(
        last == Err(Status::OutOfMemory) && (1..8).contains(&n),
        "sparse delegations into a 4-page PD run out of quota within a few tables",
    )
}

/// A node split by partial revocations is charged to its holder: revoking every other
/// page of a 2,048-page node held by a 4-page PD grows kernel memory no more than the
/// pages charged for it.
fn splits_charged() -> bool {
    const ORDER: u8 = 11;
    let pages = 1u64 << ORDER;
    let Some(phys) = mem::alloc_aligned(pages, pages) else {
        return check(false, "8 MiB of aligned memory");
    };
    let c = sel::alloc();
    if hc::create_pd(c, sel::OWN_PD, 4, false).is_err() {
        mem::free(phys, pages);
        return check(false, "create a 4-page PD");
    }
    let src = (mem::WINDOW + phys) >> PAGE_BITS;
    let rw = MemPerm::R | MemPerm::W;
    let r = hc::pd_delegate(
        sel::OWN_PD,
        c,
        Crd::mem(src, ORDER, rw),
        Crd::mem(0x1000_0000 >> PAGE_BITS, ORDER, rw),
        0,
        XferFlags::empty(),
    );
    let used0 = 4 - quota_avail(c);
    let before = Kmem::now();
    for i in (0..pages).step_by(2) {
        let _ = hc::revoke(Crd::mem(src + i, 0, rw), false);
    }
    let lost = before.lost("splits");
    let grew = lost.frames * 4096 + lost.heap;
    let charged = (4 - quota_avail(c)) as i64 - used0 as i64;
    println!(
        "splits: delegation {:?}; kernel memory grew {} bytes, {} pages more charged to the holder",
        r, grew, charged
    );
    destroy(c);
    let _ = hc::revoke(Crd::mem(src, ORDER, rw), false);
    mem::free(phys, pages);
    check(
        r.is_ok() && grew <= charged * 4096 + 4096,
        "nodes split by revocation are charged to their holder (or the node goes whole)",
    )
}

/// The 8 KiB I/O permission bitmap is charged: a 2-page PD cannot take a port (1 page
/// for the node, 2 for the bitmap), a 3-page PD can.
fn io_bitmap_charged() -> bool {
    let mut r = [Ok(()); 2];
    for (i, q) in [2u64, 3].into_iter().enumerate() {
        let c = sel::alloc();
        if hc::create_pd(c, sel::OWN_PD, q, false).is_err() {
            return check(false, "create a small PD");
        }
        r[i] = hc::pd_delegate(
            sel::OWN_PD,
            c,
            Crd::pio(0x80, 0),
            Crd::pio(0x80, 0),
            0,
            XferFlags::empty(),
        );
        destroy(c);
    }
    println!(
        "a port into a 2-page PD: {:?}, into a 3-page PD: {:?}",
        r[0], r[1]
    );
    check(
        r[0] == Err(Status::OutOfMemory) && r[1].is_ok(),
        "the I/O bitmap is charged to the PD that receives ports",
    )
}

/// First word of a message that makes [`blocking_echo`] block on its semaphore.
const BLOCK: u64 = 0xb10c;
/// Handlers of [`blocking_echo`] that blocked.
static BLOCKED: AtomicU64 = AtomicU64::new(0);

/// Echoes every word plus one; with [`BLOCK`] first, first blocks on the semaphore
/// whose selector is the portal id.
extern "C" fn blocking_echo(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let n = u.untyped().min(8);
    if n >= 1 && u.word(0) == BLOCK {
        BLOCKED.fetch_add(1, Ordering::Release);
        let _ = hc::sm_down(id, false, 0);
    }
    let utcb = u.get();
    for w in utcb.data[..n].iter_mut() {
        *w = w.wrapping_add(1);
    }
    utcb.head.set_counts(n, 0);
    hc::reply()
}

/// Status (+1) of the last call of each [`caller`] slot (0: not returned).
static CALLED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Calls the portal in `arg`'s low 32 bits with the first word `arg >> 48` and records
/// the status in slot `(arg >> 32) & 0xffff`.
extern "C" fn caller(arg: u64, utcb: u64) -> ! {
    let (pt, slot, w) = (
        arg & 0xffff_ffff,
        ((arg >> 32) & 0xffff) as usize,
        arg >> 48,
    );
    // SAFETY: the kernel passes this thread's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    u.set_msg(&[w]);
    let r = hc::call(pt);
    let code = match r {
        Ok(()) => 0,
        Err(s) => s as u64,
    };
    CALLED[slot % 4].store(code + 1, Ordering::Release);
    park()
}

/// A local EC on CPU 0 with a [`blocking_echo`] portal blocking on a fresh semaphore.
fn blocking_portal() -> Option<(LocalEc, u64, u64)> {
    let sm = new_sm(0)?;
    let ec = thread::local_ec(0, services::evt_base(0)?).ok()?;
    let pt = thread::portal(&ec, blocking_echo, peregrine_abi::Mtd::empty(), sm).ok()?;
    Some((ec, pt, sm))
}

fn wait_blocked(n: u64) -> bool {
    let end = deadline_ms(2000);
    while BLOCKED.load(Ordering::Acquire) < n {
        if hc::rdtsc() > end {
            return false;
        }
        sleep_ms(1);
    }
    true
}

/// The SC driving a call is destroyed while the handler serves it: the handler is freed
/// for other callers (it stayed busy for good, and every other client waited).
fn dead_sc_frees_its_handler() -> bool {
    let Some((ec, pt, sm)) = blocking_portal() else {
        return check(false, "create a blocking portal");
    };
    let n = BLOCKED.load(Ordering::Relaxed);
    let Some((t_ec, t_sc)) = start(0, caller, pt | (BLOCK << 48)) else {
        return check(false, "start a caller");
    };
    let blocked = wait_blocked(n + 1);
    destroy(t_sc);
    sleep_ms(5);
    let u = UtcbRef::main();
    u.set_msg(&[7]);
    let r = hc::call_nonblocking(pt);
    let echoed = r.is_ok() && u.untyped() == 1 && u.word(0) == 8;
    println!(
        "dead SC: handler blocked {}, another caller then got {:?} (echo {})",
        blocked, r, echoed
    );
    destroy(t_ec);
    destroy(pt);
    destroy(ec.sel);
    destroy(sm);
    check(
        blocked && echoed,
        "a handler whose caller's SC was destroyed serves the next caller",
    )
}

/// The handler dies while serving a call with another caller waiting: both callers
/// learn it (`Aborted`); the waiter slept for good.
fn dead_handler_wakes_its_waiters() -> bool {
    let Some((ec, pt, sm)) = blocking_portal() else {
        return check(false, "create a blocking portal");
    };
    CALLED[0].store(0, Ordering::Relaxed);
    CALLED[1].store(0, Ordering::Relaxed);
    let n = BLOCKED.load(Ordering::Relaxed);
    let Some(t1) = start(0, caller, pt | (BLOCK << 48)) else {
        return check(false, "start the first caller");
    };
    let blocked = wait_blocked(n + 1);
    let Some(t2) = start(0, caller, pt | (1 << 32) | (5 << 48)) else {
        return check(false, "start the second caller");
    };
    sleep_ms(10);
    destroy(ec.sel);
    let end = deadline_ms(1000);
    while (CALLED[0].load(Ordering::Acquire) == 0 || CALLED[1].load(Ordering::Acquire) == 0)
        && hc::rdtsc() < end
    {
        sleep_ms(1);
    }
    let (a, b) = (
        CALLED[0].load(Ordering::Acquire),
        CALLED[1].load(Ordering::Acquire),
    );
    println!(
        "dead handler: blocked {}, first caller status+1 {}, waiting caller status+1 {}",
        blocked, a, b
    );
    for s in [t1.0, t1.1, t2.0, t2.1, pt, sm] {
        destroy(s);
    }
    let aborted = Status::Aborted as u64 + 1;
    check(
        blocked && a == aborted && b == aborted,
        "the caller and the waiting caller of a handler that died get Aborted",
    )
}

static WOKEN: AtomicU64 = AtomicU64::new(0);

/// Downs the semaphore `arg` and counts the wake-up.
extern "C" fn downer(arg: u64, _utcb: u64) -> ! {
    if hc::sm_down(arg, false, 0).is_ok() {
        WOKEN.fetch_add(1, Ordering::Release);
    }
    park()
}

/// A dead EC in a semaphore's queue does not swallow an up meant for a live waiter.
fn dead_waiter_eats_no_up() -> bool {
    let Some(s) = new_sm(0) else {
        return check(false, "create a semaphore");
    };
    WOKEN.store(0, Ordering::Relaxed);
    let Some(t1) = start(0, downer, s) else {
        return check(false, "start the first waiter");
    };
    sleep_ms(5);
    destroy(t1.0);
    let Some(t2) = start(0, downer, s) else {
        return check(false, "start the second waiter");
    };
    sleep_ms(5);
    let _ = hc::sm_up(s);
    let end = deadline_ms(500);
    while WOKEN.load(Ordering::Acquire) == 0 && hc::rdtsc() < end {
        sleep_ms(1);
    }
    let woken = WOKEN.load(Ordering::Acquire);
    println!("dead waiter: the live waiter woke {} time(s)", woken);
    for x in [t1.1, t2.0, t2.1, s] {
        destroy(x);
    }
    check(
        woken == 1,
        "an up after a waiter died wakes the live waiter",
    )
}

/// A component whose threads are blocked for good (on a semaphore, and in a call to a
/// handler blocked on a semaphore) is destroyed: every page of kernel memory it and
/// the root spent on it comes back.
fn destroyed_pd_returns_its_quota() -> bool {
    let Some(m) = component::module("blocker") else {
        return check(false, "module nul-test role=blocker deferred");
    };
    let before = Kmem::settled();
    let before_q = quota_avail(sel::OWN_PD);
    let id = match component::start_module(m) {
        Ok(id) => id,
        Err(e) => return check(false, &alloc::format!("start the blocker: {:?}", e)),
    };
    let ready = super::wait_result(id, nul_rt::svc::key::BLOCKED, 5000).is_some();
    sleep_ms(20);
    children::kill(id, "test");
    children::reap(id);
    let lost = before.lost("blocker destroyed");
    let after_q = quota_avail(sel::OWN_PD);
    println!(
        "blocker: ready {}, root quota {} -> {}",
        ready, before_q, after_q
    );
    check(
        ready
            && after_q == before_q
            && lost.frames == 0
            && lost.nodes == 0
            && lost.heap < 16 * 1024,
        "a destroyed component with blocked threads returns all its kernel memory",
    )
}

/// A delegation that fails (here: onto a page where a UTCB is mapped) takes away only
/// what it mapped: the UTCB stays, and its handler still answers.
fn failed_delegation_keeps_the_utcb() -> bool {
    // Exceptions of this EC go to empty selectors: a fault stops it (Aborted).
    let evt = sel::alloc_aligned(5);
    let Ok(ec) = thread::local_ec(0, evt) else {
        return check(false, "create a local EC");
    };
    let Ok(pt) = thread::portal(&ec, blocking_echo, peregrine_abi::Mtd::empty(), 0) else {
        return check(false, "create its portal");
    };
    let Some(phys) = mem::alloc(1) else {
        return check(false, "a page");
    };
    let rw = MemPerm::R | MemPerm::W;
    let r = hc::pd_delegate(
        sel::OWN_PD,
        sel::OWN_PD,
        Crd::mem((mem::WINDOW + phys) >> PAGE_BITS, 0, rw),
        Crd::mem(ec.utcb >> PAGE_BITS, 0, rw),
        0,
        XferFlags::empty(),
    );
    let u = UtcbRef::main();
    u.set_msg(&[41]);
    let c = hc::call(pt);
    let echoed = c.is_ok() && u.word(0) == 42;
    println!(
        "delegation onto a UTCB: {:?}; the handler's answer {:?} (echo {})",
        r, c, echoed
    );
    destroy(pt);
    destroy(ec.sel);
    mem::free(phys, 1);
    check(
        r.is_err() && echoed,
        "a delegation refused at a UTCB leaves the UTCB mapped",
    )
}

static TARGET: AtomicU64 = AtomicU64::new(0);
static RACING: AtomicU64 = AtomicU64::new(0);
static DELEGATED: AtomicU64 = AtomicU64::new(0);

/// Delegates the page whose window address is in `arg` into the PD named by [`TARGET`],
/// at ever new addresses, as long as [`RACING`] is set.
extern "C" fn delegator(arg: u64, _utcb: u64) -> ! {
    let rw = MemPerm::R | MemPerm::W;
    let mut at = 0x2000_0000 >> PAGE_BITS;
    while RACING.load(Ordering::Acquire) != 0 {
        let t = TARGET.load(Ordering::Acquire);
        if t != 0
            && hc::pd_delegate(
                sel::OWN_PD,
                t,
                Crd::mem(arg >> PAGE_BITS, 0, rw),
                Crd::mem(at, 0, rw),
                0,
                XferFlags::empty(),
            )
            .is_ok()
        {
            DELEGATED.fetch_add(1, Ordering::Relaxed);
        }
        at += 1;
    }
    RACING.store(2, Ordering::Release);
    park()
}

/// Delegations into a PD race its destruction on another CPU: nothing lands in the
/// dead PD's spaces (checked once before the database lock, a delegation could insert
/// nodes after the destruction had torn the spaces down, and they stayed for good).
fn delegation_races_destruction() -> bool {
    const ROUNDS: u64 = 400;
    let Some(phys) = mem::alloc(1) else {
        return check(false, "a page");
    };
    let before = Kmem::settled();
    let q0 = quota_avail(sel::OWN_PD);
    RACING.store(1, Ordering::Release);
    DELEGATED.store(0, Ordering::Relaxed);
    let Some((ec, sc)) = start(1, delegator, mem::WINDOW + phys) else {
        return check(false, "start the delegator on CPU 1");
    };
    let c = sel::alloc();
    for r in 0..ROUNDS {
        if hc::create_pd(c, sel::OWN_PD, 64, false).is_err() {
            break;
        }
        TARGET.store(c, Ordering::Release);
        // Let it delegate a little, for a varying while, then pull the PD away.
        let spin = hc::rdtsc() + 20_000 + (r * 7919) % 60_000;
        while hc::rdtsc() < spin {
            core::hint::spin_loop();
        }
        destroy(c);
        TARGET.store(0, Ordering::Release);
    }
    RACING.store(0, Ordering::Release);
    let end = deadline_ms(1000);
    while RACING.load(Ordering::Acquire) != 2 && hc::rdtsc() < end {
        sleep_ms(1);
    }
    destroy(sc);
    destroy(ec);
    let _ = hc::revoke(
        Crd::mem((mem::WINDOW + phys) >> PAGE_BITS, 0, MemPerm::all()),
        false,
    );
    mem::free(phys, 1);
    let lost = before.lost("delegations racing destruction");
    let q1 = quota_avail(sel::OWN_PD);
    println!(
        "delegations racing destruction: {} delegations into {} PDs; root quota {} -> {}",
        DELEGATED.load(Ordering::Relaxed),
        ROUNDS,
        q0,
        q1
    );
    check(
        DELEGATED.load(Ordering::Relaxed) > 0 && lost.nodes == 0 && lost.frames == 0 && q1 == q0,
        "delegations racing the destruction of their target leave no node behind",
    )
}

/// Threads started without any event portal: each is stopped, and the kernel's
/// report of it is rate-limited (the integration test counts the lines: a busy-waiting
/// UART is no place for a flood).
fn unhandled_events_rate_limited() -> bool {
    const N: u64 = 200;
    let evt = sel::alloc_aligned(5);
    let (ec, sc) = (sel::alloc_aligned(8), sel::alloc_aligned(8));
    let mut made = 0;
    for i in 0..N {
        let utcb = 0x7c00_0000_0000 + i * 4096;
        if hc::create_ec(
            ec + i,
            sel::OWN_PD,
            hc::EcKind::Global,
            0,
            utcb,
            0x1000,
            evt,
        )
        .is_ok()
            && hc::create_sc(sc + i, sel::OWN_PD, ec + i, PRIO, 1000).is_ok()
        {
            made += 1;
        }
    }
    sleep_ms(50);
    let _ = hc::revoke(Crd::obj(ec, 8, perm::ALL), true);
    let _ = hc::revoke(Crd::obj(sc, 8, perm::ALL), true);
    println!(
        "unhandled-events: {} threads without event portals started",
        made
    );
    check(
        made == N,
        "200 threads without event portals started and stopped",
    )
}
