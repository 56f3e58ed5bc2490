//! `test=quota`, `test=fault`, `test=hostile`: the kernel-memory quota, a faulting
//! component removed while others keep running, and hostile components issuing random
//! hypercalls on several CPUs while a canary keeps answering.

use nul_rt::start_info::arg_u64;
use nul_rt::{hc, println, sel, thread};
use peregrine_abi::event::host;
use peregrine_abi::{perm, Crd, Mtd, Status, XferFlags};

use super::{check, deadline_ms, echo_ok, ms, need, sleep_ms, wait_child, wait_registered};
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
    let (Some(f), Some(c)) = (
        component::find_all("fault").first().copied(),
        need("canary"),
    ) else {
        println!("FAILED: needs modules nul-test role=fault and role=canary");
        return false;
    };
    let Some(pt) = wait_registered(c, 5000) else {
        return check(false, "canary registered within 5 s");
    };
    let gone = wait_child(f, 5000, |c| !c.alive);
    let last = component::with(f, |c| c.last_fault).flatten();
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

/// `test=hostile`.
pub fn hostile(args: &str) -> bool {
    let target = arg_u64(args, "calls").unwrap_or(10_000_000);
    let secs = arg_u64(args, "secs").unwrap_or(600);
    let hs = component::find_all("hostile");
    if hs.is_empty() {
        return check(false, "hostile components present (check the module list)");
    }
    let Some(c) = need("canary") else {
        return false;
    };
    let Some(pt) = wait_registered(c, 10_000) else {
        return check(false, "canary registered within 10 s");
    };
    println!(
        "hostile: {} components, target {} hypercalls, at most {} s",
        hs.len(),
        target,
        secs
    );
    let end = deadline_ms(secs.saturating_mul(1000));
    let (mut asked, mut answered) = (0u64, 0u64);
    let mut next_print = hc::rdtsc() + ms(5000);
    loop {
        asked += 1;
        match echo_ok(pt, 2, asked) {
            Ok(()) => answered += 1,
            Err(e) if asked - answered <= 5 => println!("canary call {}: {}", asked, e),
            Err(_) => {}
        }
        let total = progress(&hs);
        let now = hc::rdtsc();
        if total >= target || now >= end {
            break;
        }
        if now >= next_print {
            println!(
                "hostile: {} hypercalls so far, canary {}/{}",
                total, answered, asked
            );
            next_print = now + ms(5000);
        }
        sleep_ms(1);
    }
    let total = progress(&hs);
    let alive = hs
        .iter()
        .filter(|&&h| component::with(h, |c| c.alive).unwrap_or(false))
        .count();
    println!(
        "hostile: {} hypercalls, canary answered {} times",
        total, answered
    );
    println!(
        "hostile: {} of {} hostile components still running",
        alive,
        hs.len()
    );
    let mut ok = check(
        total >= target,
        "the hostile components reached the hypercall target",
    );
    ok &= check(answered == asked, "the canary answered every call");
    ok &= check(
        component::with(c, |c| c.alive).unwrap_or(false),
        "the canary is still running",
    );
    ok
}

/// The hypercalls the hostile components reported so far.
fn progress(hs: &[usize]) -> u64 {
    hs.iter()
        .map(|&h| component::with(h, |c| c.progress).unwrap_or(0))
        .sum()
}
