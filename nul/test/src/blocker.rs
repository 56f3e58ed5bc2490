//! `role=blocker`: ECs blocked for good, the way a component can leave them when it is
//! destroyed — a thread waiting on a semaphore nobody ups, and the main EC in a call to
//! its own handler, which waits on that semaphore too (so its SC is parked in the
//! handler). The root destroys it and checks that every page of kernel memory comes
//! back (`test=isolation`).

use nul_rt::start_info::StartInfo;
use nul_rt::thread;
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel, svc};
use peregrine_abi::event::host;
use peregrine_abi::Mtd;

/// The semaphore everything waits on.
static SM: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn sm() -> u64 {
    SM.load(core::sync::atomic::Ordering::Relaxed)
}

/// Handler: waits on the semaphore for good.
extern "C" fn wait_handler(_id: u64, _utcb: u64) -> ! {
    loop {
        let _ = hc::sm_down(sm(), false, 0);
    }
}

/// STARTUP of the waiting thread.
extern "C" fn startup(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    thread::startup_reply(u.get());
    hc::reply()
}

/// The waiting thread.
extern "C" fn waiter(_arg: u64, _utcb: u64) -> ! {
    loop {
        let _ = hc::sm_down(sm(), false, 0);
    }
}

fn setup(si: &StartInfo) -> Result<u64, peregrine_abi::Status> {
    let s = sel::alloc();
    hc::create_sm(s, sel::OWN_PD, 0)?;
    SM.store(s, core::sync::atomic::Ordering::Relaxed);
    // Event base of the second thread: only its STARTUP portal.
    let evt = sel::alloc_aligned(5);
    let ec = thread::local_ec(si.cpu, sel::EVT_BASE)?;
    let st = evt + host::STARTUP;
    hc::create_pt(
        st,
        sel::OWN_PD,
        ec.sel,
        Mtd::RSP,
        startup as thread::Handler as usize as u64,
    )?;
    thread::thread(si.cpu, evt, 5, waiter, 0)?;
    thread::portal(&ec, wait_handler, Mtd::empty(), 0)
}

/// Runs the role.
pub fn run(si: &StartInfo) -> ! {
    match setup(si) {
        Ok(pt) => {
            let _ = svc::result(svc::key::BLOCKED, 2);
            // Blocks for good inside the handler.
            let r = hc::call(pt);
            println!("blocker: call returned {:?}", r);
        }
        Err(e) => println!("blocker: set-up failed: {:?}", e),
    }
    crate::block_forever()
}
