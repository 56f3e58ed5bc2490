//! Memory roles: `fault`, `paged`, `memcheck`.

use nul_rt::start_info::{self, StartInfo, PAGED_BASE, SHARED_ADDR, TEST_PAGE_ADDR};
use nul_rt::svc::{self, key};
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel};
use peregrine_abi::{Crd, CrdKind, Status};

/// The unmapped address `role=fault` reads.
const FAULT_ADDR: u64 = 0xdead_0000;

/// Reads a word with a plain `mov`, whether or not the address is mapped: a fault is an
/// event to the root, which is what the callers want to provoke.
fn touch(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: the load is outside Rust's memory model (inline assembly, no reference
    // is formed); if the page is not mapped the kernel delivers a page fault to the
    // root, which removes this component, and the instruction never completes.
    unsafe {
        core::arch::asm!("mov {v}, [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, readonly))
    };
    v
}

/// Reads an unmapped address: the root reports the page fault and removes us.
pub fn fault() -> ! {
    println!("about to read {:#x}", FAULT_ADDR);
    let v = touch(FAULT_ADDR);
    println!("read {:#x} and survived ({:#x})", FAULT_ADDR, v);
    crate::block_forever()
}

/// Writes and reads back words in 4 pages of the region the root's pager backs.
pub fn paged() -> ! {
    let addr = |k: u64, i: u64| PAGED_BASE + k * 0x1_0000 + i * 0x800;
    let val = |k: u64, i: u64| 0x5eed_0000_0000 + k * 16 + i;
    for k in 0..4 {
        for i in 0..2 {
            // SAFETY: the root's pager maps a fresh page on the first touch of each
            // page of the paged region; nothing else uses these addresses.
            unsafe { core::ptr::write_volatile(addr(k, i) as *mut u64, val(k, i)) };
        }
    }
    let mut ok = true;
    for k in 0..4 {
        for i in 0..2 {
            // SAFETY: as above; the pages are mapped now.
            ok &= unsafe { core::ptr::read_volatile(addr(k, i) as *const u64) } == val(k, i);
        }
    }
    println!("demand-paged values read back: {}", ok);
    let _ = svc::result(key::PAGED_OK, ok as u64);
    crate::block_forever()
}

fn status_code(r: Result<(), Status>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(s) => s as u64,
    }
}

fn call_peer() -> (u64, u64) {
    let u = UtcbRef::main();
    u.set_msg(&[41]);
    let st = status_code(hc::call(sel::PEER_PT));
    (st, if st == 0 { u.word(0) } else { 0 })
}

/// Checks the pattern page, the peer portal and port 0x80; waits for the root's go;
/// calls the (revoked) portal again and reads the (revoked) page.
pub fn memcheck(si: &StartInfo) -> ! {
    let mut words = [0u64; 512];
    for (i, w) in words.iter_mut().enumerate() {
        // SAFETY: the root maps the pattern page read-only at TEST_PAGE_ADDR before
        // starting a memcheck component.
        *w = unsafe { core::ptr::read_volatile((TEST_PAGE_ADDR as *const u64).add(i)) };
    }
    let _ = svc::result(key::CHECKSUM, start_info::checksum(&words));

    let (st, w) = call_peer();
    let _ = svc::result(key::PEER_STATUS, st);
    let _ = svc::result(key::PEER_WORD, w);

    let has = matches!(hc::lookup(Crd::pio(0x80, 0)), Ok(c) if c.kind() == CrdKind::Pio);
    if has {
        // SAFETY: port 0x80 (POST codes) was delegated to us; writing it has no
        // memory effects.
        unsafe { core::arch::asm!("out 0x80, al", in("al") 0x42u8, options(nomem, nostack)) };
    }
    let _ = svc::result(key::PORT, has as u64);
    println!(
        "memcheck: pattern checked, peer call {} -> {}, port 0x80 {}",
        st, w, has
    );

    let sm = sel::alloc();
    let _ = hc::create_sm(sm, sel::OWN_PD, 0);
    // SAFETY: the root maps the shared page read-write at SHARED_ADDR.
    while unsafe { core::ptr::read_volatile(SHARED_ADDR as *const u64) } == 0 {
        crate::sleep_ms(si, sm, 1);
    }
    let (st, _) = call_peer();
    let _ = svc::result(key::PEER_AFTER, st);
    println!(
        "memcheck: peer call after the go: status {}; reading the pattern page",
        st
    );
    // After the root's revoke this faults, which is what the test expects.
    let v = touch(TEST_PAGE_ADDR);
    let _ = svc::result(key::NO_FAULT, 1);
    println!("memcheck: the pattern page is still readable ({:#x})", v);
    crate::block_forever()
}
