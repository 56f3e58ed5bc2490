//! `test=ipc`: calls with untyped words to a local EC of the root and across PDs to the
//! echo component; bad selectors and the wrong CPU.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nul_rt::thread;
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel};
use peregrine_abi::utcb::DATA_WORDS;
use peregrine_abi::{Mtd, Status};

use super::{check, echo_ok, need, wait_registered};
use crate::hip::HipView;
use crate::services;

/// A root echo portal served by a new local EC on `cpu`.
pub fn local_echo(cpu: u64) -> Result<u64, Status> {
    let evt = services::evt_base(cpu).ok_or(Status::BadCpu)?;
    let ec = thread::local_ec(cpu, evt)?;
    thread::portal(&ec, services::echo_handler, Mtd::empty(), 0)
}

fn echo_all(pt: u64, counts: &[usize], what: &str) -> bool {
    let mut ok = true;
    for (k, &n) in counts.iter().enumerate() {
        let r = echo_ok(pt, n, 0x1234_5678_0000 + k as u64);
        if let Err(e) = r {
            println!("{}: {} words: {}", what, n, e);
        }
        ok &= r.is_ok();
    }
    ok
}

/// Runs the scenario.
pub fn run(hip: &HipView) -> bool {
    let mut ok = true;
    let cpus: alloc::vec::Vec<u64> = hip.online_cpus().collect();
    let cpu0 = cpus[0];

    // Root-local: a local EC in our own PD on our CPU.
    match local_echo(cpu0) {
        Ok(pt) => {
            let r = echo_all(pt, &[0, 1, 8, 64, DATA_WORDS], "local");
            ok &= check(r, "local echo with 0, 1, 8, 64 and 508 words");
            // Counts beyond the data area are refused.
            let u = UtcbRef::main();
            u.get().head.set_counts(DATA_WORDS + 1, 0);
            let r = hc::call(pt);
            ok &= check(
                r == Err(Status::BadParameter),
                "509 untyped words: bad parameter",
            );
            u.get().head.set_counts(DATA_WORDS - 1, 1);
            let r = hc::call(pt);
            ok &= check(
                r == Err(Status::BadParameter),
                "507 words + 1 typed item: bad parameter",
            );
        }
        Err(e) => {
            println!("cannot create a local echo EC: {:?}", e);
            ok = false;
        }
    }

    // Cross-PD: the echo component's registered portal.
    if let Some(id) = need("echo") {
        match wait_registered(id, 5000) {
            Some(pt) => {
                let r = echo_all(pt, &[0, 8, 64, DATA_WORDS], "echo component");
                ok &= check(r, "cross-PD echo with 0, 8, 64 and 508 words");
            }
            None => ok &= check(false, "echo component registered within 5 s"),
        }
    } else {
        ok = false;
    }

    // Bad capabilities.
    UtcbRef::main().set_msg(&[]);
    let r = hc::call(sel::OWN_PD);
    ok &= check(
        r == Err(Status::BadCapability),
        "call to a PD capability: bad capability",
    );
    let r = hc::call(0xf_ff00);
    ok &= check(
        r == Err(Status::BadCapability),
        "call to an empty selector: bad capability",
    );

    // A portal whose handler is on another CPU.
    if let Some(&cpu1) = cpus.get(1) {
        match local_echo(cpu1) {
            Ok(pt) => {
                let r = hc::call(pt);
                ok &= check(
                    r == Err(Status::BadCpu),
                    "call to a portal on another CPU: bad CPU",
                );
            }
            Err(e) => {
                println!("cannot create a local EC on cpu {}: {:?}", cpu1, e);
                ok = false;
            }
        }
    } else {
        println!("one CPU: skipping the bad-CPU check");
    }
    ok & busy_handler(cpu0)
}

/// The slow portal of [`busy_handler`] (selector), the second caller's result.
static SLOW_PT: AtomicU64 = AtomicU64::new(0);
static SECOND: AtomicU64 = AtomicU64::new(0);
static SECOND_DONE: AtomicBool = AtomicBool::new(false);

/// An echo that sleeps 20 ms first: whoever calls meanwhile waits for it.
extern "C" fn slow_echo(_id: u64, utcb: u64) -> ! {
    super::sleep_ms(20);
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let d = &mut u.get().data;
    d[0] = d[0].wrapping_add(1);
    u.get().head.set_counts(1, 0);
    hc::reply()
}

/// The second caller: calls the slow portal while the first call is in it.
extern "C" fn second_caller(_arg: u64, utcb: u64) -> ! {
    super::sleep_ms(5);
    // SAFETY: this thread's own UTCB, passed by its start-up.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    u.get().data[0] = 0x5151;
    u.get().head.set_counts(1, 0);
    let r = hc::call(SLOW_PT.load(Ordering::Relaxed));
    let v = if r.is_ok() { u.get().data[0] } else { 0 };
    SECOND.store(v, Ordering::Relaxed);
    SECOND_DONE.store(true, Ordering::Release);
    crate::block_forever()
}

/// A call that finds its handler busy waits and is re-issued when the handler replies
/// to the first caller: with its registers intact (the hypercall word included), so it
/// reaches the same portal and gets its own answer.
fn busy_handler(cpu: u64) -> bool {
    let Some(evt) = services::evt_base(cpu) else {
        return check(false, "event base");
    };
    let pt = match thread::local_ec(cpu, evt)
        .and_then(|ec| thread::portal(&ec, slow_echo, Mtd::empty(), 0))
    {
        Ok(p) => p,
        Err(e) => return check(false, &alloc::format!("slow echo portal: {:?}", e)),
    };
    SLOW_PT.store(pt, Ordering::Relaxed);
    if let Err(e) = super::spawn(cpu, second_caller, 0) {
        return check(false, &alloc::format!("second caller: {:?}", e));
    }
    let u = UtcbRef::main();
    u.get().data[0] = 0x4040;
    u.get().head.set_counts(1, 0);
    let r = hc::call(pt);
    let first = if r.is_ok() { u.get().data[0] } else { 0 };
    let end = super::deadline_ms(2000);
    while !SECOND_DONE.load(Ordering::Acquire) && hc::rdtsc() < end {
        super::sleep_ms(1);
    }
    let second = SECOND.load(Ordering::Relaxed);
    println!("busy handler: first {:#x}, second {:#x}", first, second);
    check(
        first == 0x4041 && second == 0x5152,
        "a call that waited for a busy handler is re-issued intact and answered",
    )
}
