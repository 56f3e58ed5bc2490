//! Test scenarios and benchmarks run by the root (`test=NAME`, `bench=NAME`).
//!
//! Each scenario prints what it checks (`ok: …` / `FAILED: …`) and returns whether all
//! checks held; `main` then prints `PASS NAME` or `FAIL NAME` and exits through
//! isa-debug-exit. The components a scenario talks to are boot modules after the root,
//! all the `nul-test` binary with a role (see `nul/test`); `cpu=N` places a component's
//! main EC (default: round robin over the CPUs). Module lists (after the root module,
//! whose arguments come first):
//!
//! | root arguments | modules | CPUs |
//! |---|---|---|
//! | `test=boot` | any | any |
//! | `test=ipc` | `nul-test role=echo cpu=0` | ≥ 1 (BadCpu check needs ≥ 2) |
//! | `test=delegate` | `nul-test role=memcheck cpu=0`, `nul-test role=echo cpu=0` | ≥ 1 |
//! | `test=revoke` | `nul-test role=memcheck cpu=0` | ≥ 1 |
//! | `test=pager` | `nul-test role=paged cpu=0` | ≥ 1 |
//! | `test=sm` | none | ≥ 1 |
//! | `test=irq` | none | ≥ 1 |
//! | `test=devmem` | none (q35: an HPET at 0xfed00000) | ≥ 1 |
//! | `test=xcpu` | none | ≥ 2 |
//! | `test=lock` | none | ≥ 1 |
//! | `test=wakeup` | none | ≥ 1 |
//! | `test=quota` | none | ≥ 1 |
//! | `test=fault` | `nul-test role=fault cpu=0`, `nul-test role=canary cpu=0` | ≥ 1 |
//! | `test=hostile calls=10000000 secs=900 respawn_ms=2000` | `nul-test role=hostile seed=K cpu=C quota=2600 deferred` for several K and C (e.g. seeds 1–4 on CPUs 0–3), `nul-test role=canary cpu=0` | ≥ 2 (4 suggested; 1 GiB) |
//! | `bench=ipc` | `nul-test role=benchsrv cpu=0` (also started as `stampsrv`, `capsrv`) | ≥ 1 |
//! | `bench=xcpu` | none | ≥ 2 |
//! | `test=isolation` | `nul-test role=blocker deferred` | 2 |
//! | `test=vm [rounds=N] [seed=S]` | none (SVM with NPT: QEMU `-cpu EPYC`) | ≥ 1 (2: cross-CPU recall) |
//! | `bench=vmexit` | none; `-icount shift=0 -smp 1` for instruction counts | 1 |
//! | `test=vmm [secs=N]` | `nul-vmm guest=guest-test cpus=C mem=16 mode=check\|bench\|hostile\|loops [seed=S] [name=TAG] [cpu=N]` (one or more), and the `guest-test` module; optionally `nul-test role=canary cpu=N` | ≥ C |
//!
//! `calls=` (default 10,000,000) and `secs=` (default 600 s of TSC time) bound the
//! hostile test; `respawn_ms=` (default 3000) is how often it destroys and restarts one
//! hostile component. A module with `deferred` is not started at boot: the scenario
//! starts it (and measures the kernel's memory before). The benchmark prints `BENCH <figure> <min>` lines (TSC ticks, the
//! minimum over the iterations) and `BENCH-MEDIAN <figure> <median>` lines.

mod bench;
pub mod bench_more;
mod device;
mod ipc;
mod isolation;
mod memory;
mod robust;
mod sync;
mod vm;
mod vmm;

use core::sync::atomic::{AtomicU64, Ordering};

use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel};
use peregrine_abi::Status;

use crate::children;
use crate::children::Child;
use crate::hip::HipView;

/// Priority of the scenario thread and the threads scenarios start (the components').
pub const PRIO: u8 = 10;

static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);
static SLEEP_SM: AtomicU64 = AtomicU64::new(0);

/// Runs test scenario `name`; true when it passed.
pub fn run(name: &str, args: &str, hip: &HipView) -> bool {
    init(hip);
    match name {
        "boot" => true,
        "ipc" => ipc::run(hip),
        "delegate" => memory::delegate(),
        "revoke" => memory::revoke(),
        "pager" => memory::pager(),
        "sm" => sync::sm(),
        "irq" => sync::irq(),
        "devmem" => device::devmem(hip),
        "xcpu" => sync::xcpu(hip),
        "lock" => sync::lock(hip),
        "wakeup" => sync::wakeup(hip),
        "recall" => sync::recall(hip),
        "quota" => robust::quota(hip),
        "fault" => robust::fault(),
        "hostile" => robust::hostile(args),
        "isolation" => isolation::run(hip, args),
        "vm" => vm::test(hip, args),
        "vmm" => vmm::run(args),
        _ => {
            println!("unknown test scenario {}", name);
            false
        }
    }
}

/// Runs benchmark `name`; true when it completed.
pub fn bench(name: &str, _args: &str, hip: &HipView) -> bool {
    init(hip);
    match name {
        "ipc" => bench::ipc(),
        "vmexit" => vm::bench(hip),
        "xcpu" => bench_more::xcpu(hip),
        _ => {
            println!("unknown benchmark {}", name);
            false
        }
    }
}

fn init(hip: &HipView) {
    if hip.0.freq_tsc_khz != 0 {
        TSC_KHZ.store(hip.0.freq_tsc_khz, Ordering::Relaxed);
    }
    let sm = sel::alloc();
    if hc::create_sm(sm, sel::OWN_PD, 0).is_ok() {
        SLEEP_SM.store(sm, Ordering::Relaxed);
    }
}

/// TSC ticks in `n` milliseconds.
pub fn ms(n: u64) -> u64 {
    n.saturating_mul(TSC_KHZ.load(Ordering::Relaxed))
}

/// The TSC `n` milliseconds from now.
pub fn deadline_ms(n: u64) -> u64 {
    hc::rdtsc().saturating_add(ms(n))
}

/// Sleeps for `n` milliseconds (a down on a semaphore nobody ups, with a deadline).
pub fn sleep_ms(n: u64) {
    let end = deadline_ms(n);
    while hc::rdtsc() < end {
        let _ = hc::sm_down(SLEEP_SM.load(Ordering::Relaxed), false, end);
    }
}

/// Prints and returns a check.
pub fn check(ok: bool, what: &str) -> bool {
    if ok {
        println!("ok: {}", what);
    } else {
        println!("FAILED: {}", what);
    }
    ok
}

/// Waits up to `ms_max` milliseconds until `cond` holds for component `id`, sleeping on
/// the component's semaphore (upped on its reports and its removal).
pub fn wait_child(id: usize, ms_max: u64, cond: impl Fn(&Child) -> bool) -> bool {
    let end = deadline_ms(ms_max);
    loop {
        let Some((done, sm)) = children::with(id, |c| (cond(c), c.sm)) else {
            return false;
        };
        if done {
            return true;
        }
        let now = hc::rdtsc();
        if now >= end {
            return false;
        }
        let _ = hc::sm_down(sm, false, end.min(now + ms(10)));
    }
}

/// Waits for result `key` of component `id`.
pub fn wait_result(id: usize, key: u64, ms_max: u64) -> Option<u64> {
    wait_child(id, ms_max, |c| c.result(key).is_some() || !c.alive);
    children::with(id, |c| c.result(key)).flatten()
}

/// Waits for component `id` to register its portal; returns the root's selector.
pub fn wait_registered(id: usize, ms_max: u64) -> Option<u64> {
    wait_child(id, ms_max, |c| c.registered.is_some() || !c.alive);
    children::with(id, |c| c.registered).flatten()
}

/// The first component with `role`, reporting when there is none.
pub fn need(role: &str) -> Option<usize> {
    let r = children::find(role);
    if r.is_none() {
        println!(
            "FAILED: no component with role={} (check the module list)",
            role
        );
    }
    r
}

/// Calls an echo portal (replies with every word plus one) with `n` words and checks
/// the reply.
pub fn echo_ok(pt: u64, n: usize, salt: u64) -> Result<(), &'static str> {
    echo_ok_on(UtcbRef::main(), pt, n, salt)
}

/// [`echo_ok`] from a thread whose UTCB is `u`.
pub fn echo_ok_on(u: UtcbRef, pt: u64, n: usize, salt: u64) -> Result<(), &'static str> {
    let utcb = u.get();
    let n = n.min(utcb.data.len());
    for (i, w) in utcb.data[..n].iter_mut().enumerate() {
        *w = salt ^ (i as u64).wrapping_mul(0x1000_0001);
    }
    utcb.head.set_counts(n, 0);
    hc::call(pt).map_err(|s| s.name())?;
    let utcb = u.get();
    if utcb.head.untyped() != n || utcb.head.typed() != 0 {
        return Err("wrong reply counts");
    }
    for (i, &w) in utcb.data[..n].iter().enumerate() {
        if w != (salt ^ (i as u64).wrapping_mul(0x1000_0001)).wrapping_add(1) {
            return Err("wrong reply word");
        }
    }
    Ok(())
}

/// Starts a root thread on `cpu` at the scenario priority.
pub fn spawn(cpu: u64, entry: nul_rt::thread::ThreadEntry, arg: u64) -> Result<(), Status> {
    let evt = crate::services::evt_base(cpu).ok_or(Status::BadCpu)?;
    nul_rt::thread::thread(cpu, evt, PRIO, entry, arg).map(|_| ())
}
