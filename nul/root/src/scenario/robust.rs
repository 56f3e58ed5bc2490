//! `test=quota`, `test=fault`, `test=hostile`: the kernel-memory quota, a faulting
//! component removed while others keep running, and hostile components issuing random
//! hypercalls on several CPUs while a canary keeps answering.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use nul_rt::start_info::arg_u64;
use nul_rt::{hc, println, sel, thread};
use peregrine_abi::event::host;
use peregrine_abi::perm::PtPerm;
use peregrine_abi::{perm, Crd, Mtd, Status, XferFlags};

use super::isolation::{quota_avail, Kmem};
use super::{check, deadline_ms, echo_ok, ms, need, sleep_ms, wait_child, wait_registered};
use crate::children;
use crate::hip::HipView;
use crate::{component, services};

/// Where `role=fault` touches (unmapped).
const FAULT_ADDR: u64 = 0xdead_0000;

/// `test=quota`.
pub fn quota(hip: &HipView) -> bool {
    let mut ok = true;
    let pd = sel::alloc();
    let r = hc::create_pd(pd, sel::OWN_PD, 4, false);
    ok &= check(r.is_ok(), "create a PD with a quota of 4 pages");
    if r.is_err() {
        return false;
    }
    let mut made = 0;
    let mut last = Ok(());
    for _ in 0..64 {
        last = hc::create_sm(sel::alloc(), pd, 0);
        if last.is_err() {
            break;
        }
        made += 1;
    }
    println!(
        "semaphores created in the 4-page PD: {}, then {:?}",
        made, last
    );
    ok &= check(
        last == Err(Status::OutOfMemory) && made <= 8,
        "semaphores in a 4-page PD: out of memory within a few calls",
    );
    let big = hip.0.root_quota.saturating_add(1);
    let r = hc::create_pd(sel::alloc(), sel::OWN_PD, big, false);
    ok &= check(
        r == Err(Status::OutOfMemory),
        "create_pd with more quota than the root has: out of memory",
    );
    let r = hc::create_pd(sel::alloc(), sel::OWN_PD, u64::MAX, false);
    ok &= check(
        r == Err(Status::OutOfMemory),
        "create_pd with quota 2^64-1: out of memory",
    );
    ok &= portals_freed(hip);
    let r = hc::revoke(Crd::obj(pd, 0, perm::ALL), true);
    ok &= check(r.is_ok(), "destroy the small PD");
    let pd2 = sel::alloc();
    let r = hc::create_pd(pd2, sel::OWN_PD, 4, false);
    ok &= check(r.is_ok(), "create another 4-page PD after that");
    let _ = hc::revoke(Crd::obj(pd2, 0, perm::ALL), true);
    ok
}

/// Portals charged to a 3-page PD, each called (so the kernel's call path held it) and
/// revoked, 40 times: every one is freed and its page returned, or the PD's quota runs
/// out after three rounds.
fn portals_freed(hip: &HipView) -> bool {
    let q = sel::alloc();
    if hc::create_pd(q, sel::OWN_PD, 3, false).is_err() {
        return check(false, "create a PD with a quota of 3 pages");
    }
    let cpu = hip.online_cpus().next().unwrap_or(0);
    let Some(evt) = services::evt_base(cpu) else {
        return check(false, "service event base");
    };
    let Ok(ec) = thread::local_ec(cpu, evt) else {
        return check(false, "create a local echo EC");
    };
    let mut rounds = 0;
    let mut last = Ok(());
    for i in 0..40u64 {
        let pt = sel::alloc();
        let ip = services::echo_handler as *const () as u64;
        last = hc::create_pt(pt, q, ec.sel, Mtd::empty(), ip);
        if last.is_err() {
            break;
        }
        let r = echo_ok(pt, 4, 0x9900 + i);
        let _ = hc::revoke(Crd::obj(pt, 0, perm::ALL), true);
        if r.is_err() {
            break;
        }
        rounds += 1;
    }
    println!("portal rounds in a 3-page PD: {} ({:?})", rounds, last);
    let _ = hc::revoke(Crd::obj(q, 0, perm::ALL), true);
    let mut ok = check(
        rounds == 40,
        "40 rounds of create, call and revoke a portal in a 3-page PD",
    );
    // No SC above the creator's priority (the check precedes the EC kind's).
    let r = hc::create_sc(sel::alloc(), sel::OWN_PD, ec.sel, 255, 1000);
    ok &= check(
        r == Err(Status::BadParameter),
        "an SC above the creator's priority: bad parameter",
    );
    let r = hc::create_sc(sel::alloc(), sel::OWN_PD, ec.sel, 1, 1000);
    ok &= check(
        r == Err(Status::BadCapability),
        "an SC at a low priority for a local EC: bad capability",
    );
    ok & nodes_charged()
}

/// Mapping-database nodes are charged to the PD that receives a delegation (a page
/// per `NODES_PER_PAGE` = 16 nodes), and so are the capability-space tables they land
/// in (2 pages for the first 128 selectors): one capability delegated to an 8-page PD
/// at ever new selectors runs out of quota after at most 96 nodes.
fn nodes_charged() -> bool {
    let q = sel::alloc();
    let sm = sel::alloc();
    if hc::create_pd(q, sel::OWN_PD, 8, false).is_err()
        || hc::create_sm(sm, sel::OWN_PD, 0).is_err()
    {
        return check(false, "create an 8-page PD and a semaphore");
    }
    let mut n = 0;
    let mut last = Ok(());
    while n < 200 {
        let dst = Crd::obj(0x100 + n, 0, perm::ALL);
        last = hc::pd_delegate(
            sel::OWN_PD,
            q,
            Crd::obj(sm, 0, perm::ALL),
            dst,
            0,
            XferFlags::empty(),
        );
        if last.is_err() {
            break;
        }
        n += 1;
    }
    println!(
        "capabilities delegated into an 8-page PD: {} ({:?})",
        n, last
    );
    let ok = check(
        last == Err(Status::OutOfMemory) && (32..=96).contains(&n),
        "delegations into an 8-page PD: out of memory after at most 96 nodes",
    );
    // Revoking them returns the pages: the same number fits again.
    let _ = hc::revoke(Crd::obj(sm, 0, perm::ALL), false);
    let mut again = 0;
    while again < n {
        let dst = Crd::obj(0x1000 + again, 0, perm::ALL);
        if hc::pd_delegate(
            sel::OWN_PD,
            q,
            Crd::obj(sm, 0, perm::ALL),
            dst,
            0,
            XferFlags::empty(),
        )
        .is_err()
        {
            break;
        }
        again += 1;
    }
    let _ = hc::revoke(Crd::obj(q, 0, perm::ALL), true);
    let _ = hc::revoke(Crd::obj(sm, 0, perm::ALL), true);
    ok & check(again == n, "after revocation the same number fits again")
}

/// `test=fault`.
pub fn fault() -> bool {
    let mut ok = true;
    // The faulting component may be gone already: look it up dead or alive.
    let (Some(f), Some(c)) = (children::find_all("fault").first().copied(), need("canary")) else {
        println!("FAILED: needs modules nul-test role=fault and role=canary");
        return false;
    };
    let Some(pt) = wait_registered(c, 5000) else {
        return check(false, "canary registered within 5 s");
    };
    let gone = wait_child(f, 5000, |c| !c.alive);
    let last = children::with(f, |c| c.last_fault).flatten();
    println!("fault component: removed={} last fault={:x?}", gone, last);
    ok &= check(
        gone && last == Some((host::PF, FAULT_ADDR)),
        "the faulting component was reported (page fault at 0xdead0000) and removed",
    );
    let mut answered = 0;
    for i in 0..10 {
        if echo_ok(pt, 4, i).is_ok() {
            answered += 1;
        }
    }
    ok &= check(answered == 10, "the canary still answers (10 of 10 calls)");
    ok
}

/// How long a hostile component may go without reporting progress before the test
/// calls it stuck.
const STUCK_MS: u64 = 60_000;

/// One hostile module and its incarnations.
struct Slot {
    module: component::Module,
    /// Component ids, the last one alive (unless the run ended).
    lives: Vec<usize>,
    /// When the current one started (TSC).
    since: u64,
}

/// Shared objects (root selectors) and where they go in every hostile component.
struct Shared {
    sms: [u64; 4],
    pd: u64,
}

/// Gives every living hostile component the shared objects and the others' echo
/// portals (a slot whose peer died is empty again and gets the successor's). A
/// delegation onto an occupied slot fails: that is fine.
fn connect(slots: &[Slot], shared: &Shared) {
    let live: Vec<(usize, Option<u64>)> = slots
        .iter()
        .filter_map(|s| s.lives.last().copied())
        .filter_map(|id| children::with(id, |c| c.alive.then_some((c.pd, c.registered))).flatten())
        .map(|(pd, reg)| (pd as usize, reg))
        .collect();
    for (i, &(pd, _)) in live.iter().enumerate() {
        let pd = pd as u64;
        let give = |root: u64, at: u64, p: u8| {
            let _ = hc::pd_delegate(
                sel::OWN_PD,
                pd,
                Crd::obj(root, 0, p),
                Crd::obj(at, 0, p),
                0,
                XferFlags::empty(),
            );
        };
        for (k, &sm) in shared.sms.iter().enumerate() {
            give(sm, nul_test_sel::SHARED_SM + k as u64, perm::ALL);
        }
        give(shared.pd, nul_test_sel::SHARED_PD, perm::ALL);
        for (k, &(_, reg)) in live.iter().enumerate().filter(|&(k, _)| k != i).take(4) {
            if let Some(r) = reg {
                give(
                    r,
                    nul_test_sel::PEER_PT + (k as u64 % 4),
                    PtPerm::CALL.bits(),
                );
            }
        }
    }
}

/// Where the hostile component (`nul/test/src/hostile.rs`) expects what the root
/// shares.
mod nul_test_sel {
    pub const PEER_PT: u64 = 48;
    pub const SHARED_SM: u64 = 52;
    pub const SHARED_PD: u64 = 56;
}

/// `test=hostile [calls=N] [secs=S] [respawn_ms=M] [quick]`: hostile components (deferred
/// modules, started here) issue random hypercalls on every CPU, the canary's too, and
/// share semaphores, a PD and their portals; one of them is destroyed and started again
/// every `respawn_ms`. The canary answers every call; each component makes progress;
/// the calls reach the deep paths (a share of them succeeds, many statuses show); and
/// when every hostile component is gone, the kernel's memory is where it was: the
/// root's quota to the page, the frames to the frame, the heap within a margin (B-tree
/// shapes and queue capacities are not restored byte by byte). `quick` (a short run
/// beside another test, e.g. an NMI flood) leaves out the checks of the run's shape
/// (restarts, PD chains, the spread of statuses).
pub fn hostile(args: &str) -> bool {
    let quick = nul_rt::start_info::flag(args, "quick");
    let target = arg_u64(args, "calls").unwrap_or(10_000_000);
    let secs = arg_u64(args, "secs").unwrap_or(600);
    let respawn = arg_u64(args, "respawn_ms").unwrap_or(3000).max(100);
    let mods = component::modules("hostile");
    if mods.is_empty() || mods.iter().any(|m| !m.deferred()) {
        return check(
            false,
            "hostile modules present, all deferred (nul-test role=hostile … deferred)",
        );
    }
    let Some(c) = need("canary") else {
        return false;
    };
    let Some(pt) = wait_registered(c, 10_000) else {
        return check(false, "canary registered within 10 s");
    };
    let k0 = Kmem::settled();
    let q0 = quota_avail(sel::OWN_PD);
    let shared = Shared {
        sms: core::array::from_fn(|_| {
            let s = sel::alloc();
            let _ = hc::create_sm(s, sel::OWN_PD, 0);
            s
        }),
        pd: {
            let p = sel::alloc();
            let _ = hc::create_pd(p, sel::OWN_PD, 256, false);
            p
        },
    };
    let mut slots: Vec<Slot> = mods
        .into_iter()
        .map(|module| Slot {
            module,
            lives: Vec::new(),
            since: 0,
        })
        .collect();
    for s in slots.iter_mut() {
        if let Ok(id) = component::start_module(s.module.clone()) {
            s.lives.push(id);
            s.since = hc::rdtsc();
        }
    }
    println!(
        "hostile: {} components, target {} hypercalls, at most {} s, one restarted every {} ms",
        slots.len(),
        target,
        secs,
        respawn
    );
    let start = hc::rdtsc();
    let end = deadline_ms(secs.saturating_mul(1000));
    let (mut asked, mut answered, mut restarts, mut stuck_lives) = (0u64, 0u64, 0u64, 0u64);
    let mut next_print = start + ms(5000);
    let mut next_connect = start;
    let mut next_respawn = start + ms(respawn);
    let mut victim = 0;
    loop {
        asked += 1;
        match echo_ok(pt, 2, asked) {
            Ok(()) => answered += 1,
            Err(e) if asked - answered <= 5 => println!("canary call {}: {}", asked, e),
            Err(_) => {}
        }
        let total = progress(&slots);
        let now = hc::rdtsc();
        if total >= target || now >= end {
            break;
        }
        if now >= next_connect {
            connect(&slots, &shared);
            next_connect = now + ms(100);
        }
        if now >= next_respawn {
            let n = slots.len();
            let s = &mut slots[victim % n];
            victim += 1;
            let id = s.lives.last().copied();
            let progressed =
                id.is_some_and(|id| children::with(id, |c| c.progress).unwrap_or(0) > 0);
            // A component goes once it has made progress (so every incarnation shows
            // some, however loaded the host); one that made none for a minute is stuck.
            let stuck = !progressed && now - s.since >= ms(STUCK_MS);
            if progressed || stuck || id.is_none() {
                if let Some(id) = id {
                    if stuck {
                        stuck_lives += 1;
                        println!(
                            "hostile: component {} (cpu {}) made no progress in {} ms",
                            id,
                            s.module.cpu,
                            (now - s.since) / ms(1).max(1)
                        );
                    }
                    children::kill(id, "restarted by the hostile test");
                    children::reap(id);
                }
                if let Ok(id) = component::start_module(s.module.clone()) {
                    s.lives.push(id);
                    s.since = now;
                    restarts += 1;
                }
                next_respawn = now + ms(respawn);
            }
        }
        if now >= next_print {
            println!(
                "hostile: {} hypercalls so far, canary {}/{}, {} restarts",
                total, answered, asked, restarts
            );
            next_print = now + ms(5000);
        }
        sleep_ms(1);
    }
    let now = hc::rdtsc();
    for s in &slots {
        if let Some(&id) = s.lives.last() {
            if now - s.since >= ms(STUCK_MS) && children::with(id, |c| c.progress).unwrap_or(0) == 0
            {
                stuck_lives += 1;
                println!(
                    "hostile: component {} made no progress in its {} ms",
                    id,
                    (now - s.since) / ms(1).max(1)
                );
            }
        }
    }
    let elapsed_ms = (now - start) / ms(1).max(1);
    let total = progress(&slots);
    let mut by_status = [0u64; nul_rt::svc::STATUS_BUCKETS];
    let (mut alive_at_end, mut chains) = (0, 0);
    for s in &slots {
        for &id in &s.lives {
            children::with(id, |c| {
                for (t, v) in by_status.iter_mut().zip(c.by_status) {
                    *t += v;
                }
                alive_at_end += usize::from(c.alive);
                chains += c
                    .results
                    .iter()
                    .filter(|r| r.0 == nul_rt::svc::key::CHAIN && r.1 >= 1000)
                    .count();
            });
        }
    }
    // Every hostile component goes, then the root's shared objects: the kernel's
    // memory must be back where it was.
    for s in &slots {
        for &id in &s.lives {
            children::kill(id, "end of the hostile test");
            children::reap(id);
        }
    }
    for &o in shared.sms.iter().chain([&shared.pd]) {
        let _ = hc::revoke(Crd::obj(o, 0, perm::ALL), true);
        sel::free(o);
    }
    let lost = k0.lost("hostile: after every hostile PD is destroyed");
    let q1 = quota_avail(sel::OWN_PD);
    let counted: u64 = by_status.iter().sum();
    println!(
        "hostile: {} hypercalls in {} ms, {} components alive at the end, {} restarts, {} PD chains 1000 deep; canary answered {} of {}",
        total, elapsed_ms, alive_at_end, restarts, chains, answered, asked
    );
    let mut line = String::from("hostile: calls by status:");
    for (i, &n) in by_status.iter().enumerate() {
        let name = Status::from_raw(i as u8).map_or("other", |s| s.name());
        let _ = write!(
            line,
            " {} {}.{}%",
            name,
            n * 100 / counted.max(1),
            n * 1000 / counted.max(1) % 10
        );
    }
    println!("{}", line);
    println!(
        "hostile: root quota {} -> {} pages, kernel frames {} fewer free, kernel heap {} bytes larger, {} mapping-database nodes more",
        q0, q1, lost.frames, lost.heap, lost.nodes
    );
    let mut ok = check(
        total >= target,
        "the hostile components reached the hypercall target",
    );
    ok &= check(answered == asked, "the canary answered every call");
    ok &= check(
        children::with(c, |c| c.alive).unwrap_or(false),
        "the canary is still running",
    );
    ok &= check(
        alive_at_end == slots.len() && stuck_lives == 0,
        "every hostile component made progress before it was destroyed (none stuck for a minute)",
    );
    if !quick {
        ok &= check(
            restarts >= slots.len() as u64,
            "every hostile component was destroyed and started again during the run",
        );
        ok &= check(
            chains >= slots.len(),
            "PD chains 1000 deep (deeper than any kernel stack) built and destroyed",
        );
        let distinct = by_status.iter().filter(|&&n| n * 1000 >= counted).count();
        ok &= check(
            by_status[0] * 20 >= counted && distinct >= 6,
            "the calls reach the deep paths: at least 5% succeed, 6 statuses each >= 0.1%",
        );
    }
    ok &= check(
        q1 == q0 && lost.frames == 0 && lost.nodes == 0 && lost.heap.unsigned_abs() < 64 * 1024,
        "accounting: the root's quota, the kernel's frames and mapping-database nodes back exactly, its heap within 64 KiB",
    );
    ok
}

/// The hypercalls the hostile components reported so far (every incarnation).
fn progress(slots: &[Slot]) -> u64 {
    slots
        .iter()
        .flat_map(|s| s.lives.iter())
        .map(|&h| children::with(h, |c| c.progress).unwrap_or(0))
        .sum()
}
