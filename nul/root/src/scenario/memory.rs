//! `test=delegate`, `test=revoke`, `test=pager`: memory, I/O port and object
//! capabilities delegated to components, revoked again, and pages mapped on demand.

use nul_rt::start_info::{self, TEST_PAGE_ADDR};
use nul_rt::svc::key;
use nul_rt::{hc, println};
use peregrine_abi::event::host;
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::{Crd, CrdKind, Status, PAGE_BITS};

use super::{check, echo_ok, need, wait_child, wait_registered, wait_result};
use crate::children;
use crate::mem;

fn expected_checksum(id: usize) -> u64 {
    let mut words = [0u64; 512];
    for (i, w) in words.iter_mut().enumerate() {
        *w = start_info::pattern_word(id as u64, i as u64);
    }
    start_info::checksum(&words)
}

/// Checks the first reports of a memcheck component: its pattern page and a call to the
/// root's peer portal.
fn memcheck_start(id: usize) -> bool {
    let mut ok = true;
    let sum = wait_result(id, key::CHECKSUM, 5000);
    ok &= check(
        sum == Some(expected_checksum(id)),
        "memory: the delegated pattern page reads correctly in the component",
    );
    let st = wait_result(id, key::PEER_STATUS, 5000);
    let w = wait_result(id, key::PEER_WORD, 5000);
    ok &= check(
        st == Some(0) && w == Some(42),
        "object: the component calls the root's portal delegated to it",
    );
    ok
}

/// `test=delegate`.
pub fn delegate() -> bool {
    let mut ok = true;
    let Some(id) = need("memcheck") else {
        return false;
    };
    ok &= memcheck_start(id);
    let port = wait_result(id, key::PORT, 5000);
    ok &= check(
        port == Some(1),
        "I/O port: port 0x80 delegated, lookup and out work in the component",
    );

    // The root's own view through lookup.
    let r = hc::lookup(Crd::pio(0x3f8, 0));
    let pio_ok = matches!(r, Ok(c) if c.kind() == CrdKind::Pio
        && c.base() <= 0x3f8 && 0x3f8 < c.base() + (1 << c.order()));
    println!("lookup(pio 0x3f8) = {:?}", r);
    ok &= check(pio_ok, "lookup of COM1 in the root: an I/O port capability");
    let page = children::with(id, |c| c.test_page).unwrap_or(0);
    let r = hc::lookup(Crd::mem(
        (mem::WINDOW + page) >> PAGE_BITS,
        0,
        MemPerm::empty(),
    ));
    println!("lookup(pattern page) = {:?}", r);
    ok &= check(
        matches!(r, Ok(c) if c.kind() == CrdKind::Mem),
        "lookup of the pattern page in the root: a memory capability",
    );
    let r = hc::lookup(Crd::mem(0x7_0000_0000, 0, MemPerm::empty()));
    ok &= check(
        r == Ok(Crd::NULL),
        "lookup of an unmapped page: the null CRD",
    );

    // Object capability: the echo component registered its portal by delegation.
    if let Some(e) = need("echo") {
        match wait_registered(e, 5000) {
            Some(pt) => {
                let r = hc::lookup(Crd::obj(pt, 0, 0));
                println!("lookup(registered portal) = {:?}", r);
                ok &= check(
                    matches!(r, Ok(c) if c.kind() == CrdKind::Obj),
                    "lookup of the delegated portal: an object capability",
                );
                ok &= check(echo_ok(pt, 8, 7).is_ok(), "the delegated portal answers");
            }
            None => ok &= check(false, "echo component registered within 5 s"),
        }
    } else {
        ok = false;
    }
    ok
}

/// `test=revoke`.
pub fn revoke() -> bool {
    let mut ok = true;
    let Some(id) = need("memcheck") else {
        return false;
    };
    ok &= memcheck_start(id);
    let Some((page, peer, shared)) = children::with(id, |c| (c.test_page, c.peer_pt, c.shared))
    else {
        return false;
    };

    // Take the pattern page and the peer portal away from the component (not from us).
    let r = hc::revoke(
        Crd::mem((mem::WINDOW + page) >> PAGE_BITS, 0, MemPerm::all()),
        false,
    );
    ok &= check(r.is_ok(), "revoke of the pattern page");
    let r = hc::revoke(Crd::obj(peer, 0, perm::ALL), false);
    ok &= check(r.is_ok(), "revoke of the peer portal");
    ok &= check(
        echo_ok(peer, 4, 3).is_ok(),
        "the root's own portal still answers after revoke",
    );

    // Tell the component to go on: it calls the portal again, then reads the page.
    // SAFETY: the shared page is ours (mapped in the window) and shared with the
    // component by design; a volatile word write is the signal.
    unsafe { core::ptr::write_volatile(mem::virt(shared) as *mut u64, 1) };

    let after = wait_result(id, key::PEER_AFTER, 5000);
    println!(
        "peer call after revoke: {:?}",
        after.and_then(|s| Status::from_raw(s as u8))
    );
    ok &= check(
        after == Some(Status::BadCapability as u64),
        "a revoked portal returns bad capability",
    );
    let gone = wait_child(id, 5000, |c| !c.alive);
    let fault = children::with(id, |c| c.last_fault).flatten();
    println!(
        "memcheck component: alive={} last fault={:x?}",
        !gone, fault
    );
    ok &= check(
        gone && fault == Some((host::PF, TEST_PAGE_ADDR)),
        "a revoked page faults (page fault at the pattern page, component removed)",
    );
    let survived = children::with(id, |c| c.result(key::NO_FAULT)).flatten();
    ok &= check(
        survived.is_none(),
        "the component did not read the revoked page",
    );
    ok
}

/// `test=pager`.
pub fn pager() -> bool {
    let Some(id) = need("paged") else {
        return false;
    };
    let r = wait_result(id, key::PAGED_OK, 10_000);
    let faults = children::with(id, |c| c.paged_faults).unwrap_or(0);
    println!(
        "paged component: result {:?}, {} faults resolved",
        r, faults
    );
    let mut ok = check(
        r == Some(1),
        "values written to demand-paged memory read back",
    );
    ok &= check(
        faults >= 4,
        "the root's pager resolved at least 4 page faults",
    );
    ok &= check(
        children::with(id, |c| c.alive).unwrap_or(false),
        "the paged component is still running",
    );
    ok
}
