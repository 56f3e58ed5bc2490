//! `bench=ipc`: IPC round trips measured with rdtsc.
//!
//! Figures (TSC ticks; under QEMU `-icount shift=0` the TSC advances with instructions):
//! `ipc_rt_0w`, `ipc_rt_8w`, `ipc_rt_64w` (call + reply to the `benchsrv` component on
//! the same CPU with that many untyped words each way), `ipc_rt_deleg_1p` (0 words and
//! one page delegated to it per call; the root revokes it again outside the timed
//! part), `ipc_rt_local_0w` (a local EC in the root's own PD). Each prints
//! `BENCH <figure> <min> tsc-ticks` and a `bench:` line with the median and the 99th
//! percentile.

use alloc::vec::Vec;

use nul_rt::thread;
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, Mtd, Xfer, XferFlags, PAGE_BITS};

use super::{need, wait_registered};
use crate::{mem, services};

const WARMUP: usize = 100;
const ITER: usize = 1000;

/// The handler of the root-local benchmark portal: replies with the words it got.
extern "C" fn null_handler(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let n = u.untyped();
    u.get().head.set_counts(n, 0);
    hc::reply()
}

/// One timed round trip with `words` untyped words and an optional typed item; `None`
/// when the call failed or the reply is not what the server sends.
pub(super) fn once(pt: u64, words: usize, item: Option<Xfer>) -> Option<u64> {
    let u = UtcbRef::main();
    u.get().head.set_counts(words, 0);
    if let Some(x) = item {
        u.push_xfer(x);
    }
    let t0 = hc::rdtsc();
    let r = hc::call(pt);
    let t1 = hc::rdtsc();
    r.ok()?;
    let h = u.get().head;
    match item {
        // The server answers a delegation with one word: the typed items it received.
        Some(_) => (h.untyped() == 1 && u.word(0) == 1).then_some(t1 - t0),
        None => (h.untyped() == words).then_some(t1 - t0),
    }
}

/// Measures and prints one figure; false when a call failed.
fn figure(name: &str, pt: u64, words: usize, page: Option<u64>) -> bool {
    let item = page.map(|p| {
        let crd = Crd::mem((mem::WINDOW + p) >> PAGE_BITS, 0, MemPerm::R | MemPerm::W);
        Xfer::delegate(crd, XferFlags::empty(), 0)
    });
    let undo = || {
        if let Some(p) = page {
            let _ = hc::revoke(
                Crd::mem((mem::WINDOW + p) >> PAGE_BITS, 0, MemPerm::all()),
                false,
            );
        }
    };
    let mut samples = Vec::with_capacity(ITER);
    for i in 0..WARMUP + ITER {
        let t = once(pt, words, item);
        undo();
        let Some(t) = t else {
            println!("bench {}: call {} failed", name, i);
            return false;
        };
        if i >= WARMUP {
            samples.push(t);
        }
    }
    samples.sort_unstable();
    let (min, median) = (samples[0], samples[samples.len() / 2]);
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!("BENCH {} {} tsc-ticks", name, min);
    println!(
        "bench: {} min {} median {} p99 {} ({} iterations)",
        name, min, median, p99, ITER
    );
    true
}

/// `bench=ipc`.
pub fn ipc() -> bool {
    let Some(id) = need("benchsrv") else {
        return false;
    };
    let Some(pt) = wait_registered(id, 5000) else {
        println!("benchsrv did not register within 5 s");
        return false;
    };
    let Some(page) = mem::alloc(1) else {
        return false;
    };
    let mut ok = figure("ipc_rt_0w", pt, 0, None);
    ok &= figure("ipc_rt_8w", pt, 8, None);
    ok &= figure("ipc_rt_64w", pt, 64, None);
    ok &= figure("ipc_rt_deleg_1p", pt, 0, Some(page));
    let cpu = crate::children::with(id, |c| c.cpu).unwrap_or(0);
    let local = services::evt_base(cpu)
        .ok_or(peregrine_abi::Status::BadCpu)
        .and_then(|evt| thread::local_ec(cpu, evt))
        .and_then(|ec| thread::portal(&ec, null_handler, Mtd::empty(), 0));
    match local {
        Ok(lpt) => ok &= figure("ipc_rt_local_0w", lpt, 0, None),
        Err(e) => {
            println!("cannot create the local benchmark EC: {:?}", e);
            ok = false;
        }
    }
    ok & super::bench_more::ipc_more()
}
