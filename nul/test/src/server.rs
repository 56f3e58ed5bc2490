//! Server roles: a portal registered with the root (`echo`, `canary`, `benchsrv`,
//! `stampsrv`, `capsrv`).

use nul_rt::start_info::{StartInfo, BENCH_WINDOW_ADDR};
use nul_rt::thread::{self, Handler};
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel, svc};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{perm, Crd, Mtd, PAGE_BITS};

/// Replies with every untyped word plus one (same count, no typed items).
pub extern "C" fn echo_handler(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let utcb = u.get();
    let n = utcb.head.untyped().min(utcb.data.len());
    for w in &mut utcb.data[..n] {
        *w = w.wrapping_add(1);
    }
    utcb.head.set_counts(n, 0);
    hc::reply()
}

/// Replies with the words it got; a call that delegated something gets one word back:
/// the number of typed items received (the page lands in the window at
/// [`BENCH_WINDOW_ADDR`]; the root revokes it after each call).
pub extern "C" fn bench_handler(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let utcb = u.get();
    let mut n = utcb.head.untyped();
    let t = utcb.head.typed();
    if t > 0 {
        utcb.data[0] = t as u64;
        n = n.max(1);
    }
    utcb.head.set_counts(n, 0);
    hc::reply()
}

/// Replies with two words: the TSC when it started and the TSC right before its reply
/// (the one-way call and reply figures of the IPC benchmark; a portal of its own, so
/// that `bench_handler`'s figures stay what they are).
pub extern "C" fn stamp_handler(_id: u64, utcb: u64) -> ! {
    let t_in = hc::rdtsc();
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let utcb = u.get();
    utcb.data[0] = t_in;
    utcb.head.set_counts(2, 0);
    utcb.data[1] = hc::rdtsc();
    hc::reply()
}

/// The receive window of a benchmark server's handler EC.
pub fn bench_window() -> Crd {
    Crd::mem(BENCH_WINDOW_ADDR >> PAGE_BITS, 0, MemPerm::R | MemPerm::W)
}

/// The receive window of the `capsrv` handler: one object capability, at a selector of
/// its own.
pub fn cap_window() -> Crd {
    Crd::obj(sel::alloc(), 0, perm::ALL)
}

/// Creates a handler EC on our CPU with a portal to `h` (its delegation window
/// `window`), registers the portal with the root and blocks.
pub fn serve(si: &StartInfo, h: Handler, window: Option<Crd>) -> ! {
    let r = thread::local_ec(si.cpu, sel::EVT_BASE).and_then(|ec| {
        if let Some(w) = window {
            // SAFETY: the new EC's UTCB, mapped in our space; it has not run yet.
            let u = unsafe { UtcbRef::from_addr(ec.utcb) };
            u.get().head.crd_dlg = w;
        }
        let pt = thread::portal(&ec, h, Mtd::empty(), si.index)?;
        svc::register(pt).map(|()| pt)
    });
    match r {
        Ok(pt) => println!("serving portal {}", pt),
        Err(e) => println!("cannot serve: {:?}", e),
    }
    crate::block_forever()
}
