//! Server roles: a portal registered with the root (`echo`, `canary`, `benchsrv`).

use nul_rt::start_info::{StartInfo, BENCH_WINDOW_ADDR};
use nul_rt::thread::{self, Handler};
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel, svc};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, Mtd, PAGE_BITS};

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

/// Creates a handler EC on our CPU with a portal to `h`, registers the portal with the
/// root and blocks.
pub fn serve(si: &StartInfo, h: Handler, bench: bool) -> ! {
    let r = thread::local_ec(si.cpu, sel::EVT_BASE).and_then(|ec| {
        if bench {
            // SAFETY: the new EC's UTCB, mapped in our space; it has not run yet.
            let u = unsafe { UtcbRef::from_addr(ec.utcb) };
            u.get().head.crd_dlg =
                Crd::mem(BENCH_WINDOW_ADDR >> PAGE_BITS, 0, MemPerm::R | MemPerm::W);
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
