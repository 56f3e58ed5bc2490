//! The figures of `bench=ipc` beyond the same-CPU round trips, and `bench=xcpu`.
//!
//! Every timed figure prints `BENCH <figure> <min> tsc-ticks` and a line
//! `bench: <figure> min X median Y p99 Z (N iterations)`; under QEMU `-icount shift=0`
//! a TSC tick is one instruction (with two CPUs: one instruction of either CPU, as
//! QEMU runs them in turn on one clock). Memory figures print `BENCH mem_<object>
//! <pages> pages`.
//!
//! `bench=ipc` (one CPU, after `bench::ipc`'s figures):
//!
//! | figure | spans |
//! |---|---|
//! | `ipc_call_0w` | client's rdtsc before `call` → first rdtsc of the `stampsrv` handler (another PD) |
//! | `ipc_reply_0w` | the handler's rdtsc right before `reply` → the client's rdtsc after `call` |
//! | `ipc_rt_xfer_cap` | call + reply to `capsrv` delegating one semaphore capability (revoked outside the timed part) |
//! | `revoke_tree_N` | one `revoke` of a page the root delegated to N PDs (a fan-out of N children; N = 1, 16, 256) |
//! | `revoke_chain_N` | one `revoke` of a page delegated along a chain root → PD 1 → … → PD N (N = 16, 256) |
//! | `mem_<object>` | kernel-memory quota pages creating the object charged (PD, VM PD, local/global EC, SC, portal, semaphore, vCPU); the `bench:` line adds the kernel heap bytes |
//! | `irq_latency` | the PIT raising GSI 2 (its fire time computed from the count's load time) → the root thread woken by the GSI semaphore |
//! | `boot_root_start` | the TSC at the root's `main`: instructions since QEMU's virtual clock started (firmware, boot loader and kernel boot) |
//!
//! `bench=xcpu` (two CPUs, `-icount shift=0 -smp 2`):
//!
//! | figure | spans |
//! |---|---|
//! | `sm_xcpu_wake` | `sm_up` on CPU 0 (its rdtsc before) → rdtsc of the thread it woke from `sm_down` on CPU 1 |
//! | `sm_xcpu_rt` | up on CPU 0 → woken thread on CPU 1 ups back → CPU 0 woken again |
//! | `ec_recall_xcpu` | `ec_ctrl` recall on CPU 0 (its rdtsc before) → first rdtsc of the RECALL handler of the thread spinning on CPU 1 |
//! | `ec_recall_xcpu_rt` | the recall → its handler ups a semaphore → CPU 0 woken |
//!
//! With `-icount` QEMU runs the two CPUs in turn on one thread and one virtual clock,
//! so the TSC is the same on both; but it switches to CPU 1 only when CPU 0 halts (a
//! wake-up IPI does not preempt CPU 0: 1,000 more loop iterations on CPU 0 between its
//! up and its down made `sm_xcpu_wake` 3,006 ticks longer). The cross-CPU figures are
//! therefore the instructions both CPUs execute in between, serialized: CPU 0's rest of
//! the up, its down and its way into idle, then CPU 1's wake-up path; not a latency
//! that CPUs running in parallel would see. Their `BENCH` value is the median: a few
//! samples are shorter where QEMU's round robin happened to switch CPUs earlier, and
//! those differ from run to run, while the median repeats.

#[path = "bench_calc.rs"]
mod calc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nul_rt::hc::{self, EcKind};
use nul_rt::utcb::UtcbRef;
use nul_rt::{println, sel};
use peregrine_abi::hypercall::{gsi_flags, stat};
use peregrine_abi::perm::{self, MemPerm};
use peregrine_abi::{Crd, Mtd, Status, Xfer, XferFlags, PAGE_BITS};

use super::sync::{outb, ponger, take_gsi_sm, XCPU_S1, XCPU_S2, XCPU_STAMP};
use super::{deadline_ms, wait_registered};
use crate::hip::HipView;
use crate::{component, mem};

/// The TSC when the root's `main` started (stored there first thing).
pub static ROOT_START_TSC: AtomicU64 = AtomicU64::new(0);
/// The TSC at the kernel's first Rust code (the HIP's `boot_tsc`).
pub static KERNEL_ENTRY_TSC: AtomicU64 = AtomicU64::new(0);

/// Prints the boot stamps the root knows: `boot_kernel_entry`, `boot_root_start`
/// (TSC values: under `-icount shift=0` instructions since QEMU's virtual clock
/// started; `cargo xtask bench vmexit` turns them and the VMM's into the spans).
pub fn print_boot() {
    println!(
        "BENCH boot_kernel_entry {} tsc-ticks",
        KERNEL_ENTRY_TSC.load(Ordering::Relaxed)
    );
    println!(
        "BENCH boot_root_start {} tsc-ticks",
        ROOT_START_TSC.load(Ordering::Relaxed)
    );
}

const WARMUP: usize = 100;
const ITER: usize = 1000;

/// Prints a timed figure from its samples (the `BENCH` value: the minimum); false when
/// there are none.
fn report(name: &str, samples: &mut [u64]) -> bool {
    report_as(name, samples, false)
}

/// [`report`], with the median as the `BENCH` value when `median` (cross-CPU figures:
/// their rare shorter samples come from where QEMU's round robin switched CPUs, and
/// differ run to run; the median repeats).
fn report_as(name: &str, samples: &mut [u64], median: bool) -> bool {
    let Some(s) = calc::summarize(samples) else {
        println!("bench {}: no samples", name);
        return false;
    };
    let value = if median { s.median } else { s.min };
    println!("BENCH {} {} tsc-ticks", name, value);
    println!(
        "bench: {} min {} median {} p99 {} ({} iterations)",
        name, s.min, s.median, s.p99, s.n
    );
    true
}

/// Runs `once` `WARMUP + iter` times and reports the samples after the warm-up; false
/// (with a line saying which) when a run failed.
fn timed(name: &str, iter: usize, mut once: impl FnMut() -> Option<u64>) -> bool {
    let mut samples = Vec::with_capacity(iter);
    for i in 0..WARMUP + iter {
        let Some(t) = once() else {
            println!("bench {}: run {} failed", name, i);
            return false;
        };
        if i >= WARMUP {
            samples.push(t);
        }
    }
    report(name, &mut samples)
}

/// Starts another component from the `benchsrv` module with `role=ROLE` and returns
/// the portal it registers.
fn start_server(role: &str) -> Option<u64> {
    let mut m = component::module("benchsrv")?;
    m.args = alloc::format!("role={} cpu={}", role, m.cpu);
    let id = match component::start_module(m) {
        Ok(id) => id,
        Err(e) => {
            println!("cannot start {}: {:?}", role, e);
            return None;
        }
    };
    let pt = wait_registered(id, 5000);
    if pt.is_none() {
        println!("{} did not register within 5 s", role);
    }
    pt
}

/// `bench=ipc`'s further figures (called at its end).
pub fn ipc_more() -> bool {
    let mut ok = one_way();
    ok &= xfer_cap();
    ok &= revoke_trees();
    ok &= memory();
    ok &= irq_latency();
    print_boot();
    ok
}

/// `ipc_call_0w`, `ipc_reply_0w`.
fn one_way() -> bool {
    let Some(pt) = start_server("stampsrv") else {
        return false;
    };
    let u = UtcbRef::main();
    let (mut call, mut reply) = (Vec::with_capacity(ITER), Vec::with_capacity(ITER));
    for i in 0..WARMUP + ITER {
        u.get().head.set_counts(0, 0);
        let t0 = hc::rdtsc();
        let r = hc::call(pt);
        let t1 = hc::rdtsc();
        let s = r
            .ok()
            .filter(|()| u.untyped() == 2)
            .and_then(|()| calc::one_way(t0, u.word(0), u.word(1), t1));
        let Some((c, r)) = s else {
            println!("bench ipc_call_0w: call {} failed", i);
            return false;
        };
        if i >= WARMUP {
            call.push(c);
            reply.push(r);
        }
    }
    report("ipc_call_0w", &mut call) & report("ipc_reply_0w", &mut reply)
}

/// `ipc_rt_xfer_cap`: a call that delegates one semaphore capability to the handler
/// (`capsrv`, which answers with the number of typed items it got); the root revokes
/// the capability from it after each call.
fn xfer_cap() -> bool {
    let Some(pt) = start_server("capsrv") else {
        return false;
    };
    let sm = sel::alloc();
    if let Err(e) = hc::create_sm(sm, sel::OWN_PD, 0) {
        println!("bench ipc_rt_xfer_cap: create_sm {:?}", e);
        return false;
    }
    let item = Xfer::delegate(Crd::obj(sm, 0, perm::ALL), XferFlags::empty(), 0);
    let ok = timed("ipc_rt_xfer_cap", ITER, || {
        let t = super::bench::once(pt, 0, Some(item));
        let _ = hc::revoke(Crd::obj(sm, 0, perm::ALL), false);
        t
    });
    let _ = hc::revoke(Crd::obj(sm, 0, perm::ALL), true);
    ok
}

/// Where the receivers of `revoke_*` get the page.
const RECV_ADDR: u64 = 0x1000_0000;

/// Creates `n` PDs with a small quota each (enough for the page tables of one page).
fn receivers(n: usize) -> Result<Vec<u64>, Status> {
    let mut pds = Vec::with_capacity(n);
    for _ in 0..n {
        let pd = sel::alloc();
        if let Err(e) = hc::create_pd(pd, sel::OWN_PD, 8, false) {
            destroy(&pds);
            return Err(e);
        }
        pds.push(pd);
    }
    Ok(pds)
}

fn destroy(sels: &[u64]) {
    for &s in sels {
        let _ = hc::revoke(Crd::obj(s, 0, perm::ALL), true);
        sel::free(s);
    }
}

/// One timed revoke of `page` (a root window page) after `give` delegated it.
fn revoke_once(page: u64, give: &dyn Fn() -> Result<(), Status>) -> Option<u64> {
    let crd = Crd::mem((mem::WINDOW + page) >> PAGE_BITS, 0, MemPerm::all());
    give().ok()?;
    let t0 = hc::rdtsc();
    let r = hc::revoke(crd, false);
    let t1 = hc::rdtsc();
    r.ok().map(|()| t1 - t0)
}

/// `revoke_tree_N` and `revoke_chain_N`.
fn revoke_trees() -> bool {
    let Some(page) = mem::alloc(1) else {
        return false;
    };
    let rw = MemPerm::R | MemPerm::W;
    let src = Crd::mem((mem::WINDOW + page) >> PAGE_BITS, 0, rw);
    let dst = Crd::mem(RECV_ADDR >> PAGE_BITS, 0, rw);
    let deleg =
        |from: u64, to: u64, s: Crd| hc::pd_delegate(from, to, s, dst, 0, XferFlags::empty());
    let mut ok = true;
    for (n, iter) in [(1usize, 200usize), (16, 100), (256, 20)] {
        let pds = match receivers(n) {
            Ok(p) => p,
            Err(e) => {
                println!("bench revoke_tree_{}: create {} PDs: {:?}", n, n, e);
                return false;
            }
        };
        let fan = || pds.iter().try_for_each(|&pd| deleg(sel::OWN_PD, pd, src));
        let chain = || {
            deleg(sel::OWN_PD, pds[0], src)?;
            pds.windows(2).try_for_each(|w| deleg(w[0], w[1], dst))
        };
        ok &= timed(&alloc::format!("revoke_tree_{}", n), iter, || {
            revoke_once(page, &fan)
        });
        if n > 1 {
            ok &= timed(&alloc::format!("revoke_chain_{}", n), iter, || {
                revoke_once(page, &chain)
            });
        }
        destroy(&pds);
    }
    mem::free(page, 1);
    ok
}

fn avail(pd: u64) -> Option<u64> {
    hc::pd_stat(pd, stat::QUOTA_AVAIL).ok()
}

fn heap_used() -> u64 {
    hc::pd_stat(peregrine_abi::sel::KERN_PD, stat::HEAP_USED).unwrap_or(0)
}

/// Measures what `create` charges to `charged` (the quota pages the new object does
/// not hold as its own quota: `passed_on` reads that after the creation) and prints
/// `BENCH mem_<name>`; false when the creation failed.
fn mem_figure(
    name: &str,
    charged: u64,
    create: impl FnOnce() -> Result<(), Status>,
    passed_on: impl FnOnce() -> u64,
) -> bool {
    let (before, heap0) = (avail(charged), heap_used());
    if let Err(e) = create() {
        println!("bench mem_{}: {:?}", name, e);
        return false;
    }
    let (after, heap1) = (avail(charged), heap_used());
    let pages = before
        .zip(after)
        .and_then(|(b, a)| calc::pages_charged(b, a, passed_on()));
    match pages {
        Some(p) => {
            println!("BENCH mem_{} {} pages", name, p);
            println!(
                "bench: mem_{}: {} quota pages, kernel heap {:+} bytes",
                name,
                p,
                heap1 as i64 - heap0 as i64
            );
            true
        }
        None => {
            println!("bench mem_{}: quota {:?} -> {:?}", name, before, after);
            false
        }
    }
}

/// `mem_*`: each object created charged to a fresh PD `p` (its capability lands in
/// the root's space, whose growth the root pays): the quota pages its creation took.
/// `mem_ec_first` is the first EC of the PD, which also pays the page tables of its
/// UTCB's mapping; `mem_ec_local` and `mem_ec_global` are ECs after it.
fn memory() -> bool {
    let p = sel::alloc();
    if let Err(e) = hc::create_pd(p, sel::OWN_PD, 256, false) {
        println!("bench mem: create_pd {:?}", e);
        return false;
    }
    let mut made = Vec::new();
    let mut new = || {
        let s = sel::alloc();
        made.push(s);
        s
    };
    let (pd, vm) = (new(), new());
    let mut ok = mem_figure(
        "pd",
        p,
        || hc::create_pd(pd, p, 4, false),
        || avail(pd).unwrap_or(u64::MAX),
    );
    let vm_ok = mem_figure(
        "vm_pd",
        p,
        || hc::create_pd(vm, p, 16, true),
        || avail(vm).unwrap_or(u64::MAX),
    );
    ok &= vm_ok;
    let none = || 0;
    let ec = |sel: u64, kind: EcKind, page: u64| {
        move || hc::create_ec(sel, p, kind, 0, RECV_ADDR + page * 4096, RECV_ADDR, 0)
    };
    let (l1, l2, g) = (new(), new(), new());
    ok &= mem_figure("ec_first", p, ec(l1, EcKind::Local, 0), none);
    ok &= mem_figure("ec_local", p, ec(l2, EcKind::Local, 1), none);
    ok &= mem_figure("ec_global", p, ec(g, EcKind::Global, 2), none);
    // The SC makes `g` runnable at priority 1, below the root: it is revoked before
    // the root blocks next, so the thread (with no STARTUP portal) never runs.
    let sc = new();
    ok &= mem_figure("sc", p, || hc::create_sc(sc, p, g, 1, 1000), none);
    let _ = hc::revoke(Crd::obj(sc, 0, perm::ALL), true);
    let (pt, sm, vcpu) = (new(), new(), new());
    ok &= mem_figure(
        "pt",
        p,
        || hc::create_pt(pt, p, l1, Mtd::empty(), RECV_ADDR),
        none,
    );
    ok &= mem_figure("sm", p, || hc::create_sm(sm, p, 0), none);
    if vm_ok {
        ok &= mem_figure(
            "vcpu",
            vm,
            || hc::create_ec(vcpu, vm, EcKind::Vcpu, 0, 0, 0, 0),
            none,
        );
    }
    // The objects first (an SC or EC outlives its PD while its capability lives).
    made.reverse();
    destroy(&made);
    destroy(&[p]);
    ok
}

/// Writes the last byte of a PIT channel 0 count and returns the TSC of that write:
/// `rdtsc` right after the `out`, minus the one instruction (under icount both are
/// I/O instructions that end their translation block, so their clock reads are exact).
fn pit_arm(hi: u8) -> u64 {
    let (lo, hi_tsc): (u32, u32);
    // SAFETY: as in `outb`; rdtsc only writes edx:eax.
    unsafe {
        core::arch::asm!(
            "out 0x40, al",
            "rdtsc",
            inlateout("eax") u32::from(hi) => lo,
            lateout("edx") hi_tsc,
            options(nomem, nostack),
        )
    };
    ((u64::from(hi_tsc) << 32) | u64::from(lo)) - 1
}

static SPIN_STOP: AtomicBool = AtomicBool::new(false);

/// Keeps CPU 0 busy below the root's priority while the root waits for the PIT, so
/// that QEMU's virtual clock never jumps over an idle CPU (icount then stays exact).
extern "C" fn busy(_arg: u64, _utcb: u64) -> ! {
    while !SPIN_STOP.load(Ordering::Relaxed) {
        core::hint::spin_loop();
    }
    crate::block_forever()
}

/// `irq_latency`: the PIT in mode 0 (one interrupt on terminal count), GSI 2 routed to
/// a semaphore the root waits on. Under `-icount shift=0` the PIT runs on the virtual
/// clock, which is the TSC, so it fires exactly [`calc::pit_ns`] ticks after the write
/// of the count; the figure is from there to the root's rdtsc after `sm_down`. (A count
/// of 1,000 instead of 200 gave the same figure to the instruction: the model holds.)
fn irq_latency() -> bool {
    const GSI: u64 = 2;
    const COUNT: u16 = 200;
    let sm = match take_gsi_sm(GSI)
        .and_then(|sm| hc::assign_gsi(sm, 0, gsi_flags::DEFAULT).map(|_| sm))
    {
        Ok(sm) => sm,
        Err(e) => {
            println!("bench irq_latency: GSI {}: {:?}", GSI, e);
            return false;
        }
    };
    let evt = crate::services::evt_base(0).ok_or(Status::BadCpu);
    if let Err(e) = evt.and_then(|evt| nul_rt::thread::thread(0, evt, 1, busy, 0)) {
        println!("bench irq_latency: busy thread: {:?}", e);
        return false;
    }
    let ok = timed("irq_latency", 100, || {
        // Mode 0, lobyte/hibyte: the output goes low now and high at the count's end.
        outb(0x43, 0x30);
        outb(0x40, COUNT as u8);
        let loaded = pit_arm((COUNT >> 8) as u8);
        hc::sm_down(sm, false, deadline_ms(100)).ok()?;
        calc::irq_latency(loaded, COUNT, hc::rdtsc())
    });
    SPIN_STOP.store(true, Ordering::Relaxed);
    ok
}

/// Spins on CPU 1 until its EC is revoked (`ec_recall_xcpu`).
extern "C" fn spin(_arg: u64, _utcb: u64) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// STARTUP of the spinner.
extern "C" fn spin_startup(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    nul_rt::thread::startup_reply(u.get());
    hc::reply()
}

/// RECALL of the spinner: stamp, tell CPU 0, resume the thread unchanged.
extern "C" fn spin_recall(_id: u64, utcb: u64) -> ! {
    let t = hc::rdtsc();
    XCPU_STAMP.store(t, Ordering::Release);
    let _ = hc::sm_up(XCPU_S2.load(Ordering::Relaxed));
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    u.get().arch_mut().mtd = Mtd::empty();
    hc::reply()
}

/// Splits a cross-CPU sample into (one way, round trip): `t0` on CPU 0 before the
/// wake-up, the stamp CPU 1 left, `t1` on CPU 0 after it woke again.
fn xcpu_sample(t0: u64, t1: u64) -> Option<(u64, u64)> {
    let stamp = XCPU_STAMP.swap(0, Ordering::Acquire);
    calc::one_way(t0, stamp, stamp, t1).map(|(there, back)| (there, there + back))
}

/// `bench=xcpu`.
pub fn xcpu(hip: &HipView) -> bool {
    let cpus: Vec<u64> = hip.online_cpus().collect();
    let Some(&cpu1) = cpus.get(1) else {
        println!("bench=xcpu needs 2 CPUs (only 1 online)");
        return false;
    };
    let new_sm = || {
        let s = sel::alloc();
        hc::create_sm(s, sel::OWN_PD, 0).map(|()| s)
    };
    let (Ok(go), Ok(back)) = (new_sm(), new_sm()) else {
        println!("bench=xcpu: cannot create semaphores");
        return false;
    };
    XCPU_S1.store(go, Ordering::Relaxed);
    XCPU_S2.store(back, Ordering::Relaxed);
    if let Err(e) = super::spawn(cpu1, ponger, 0) {
        println!("bench=xcpu: cannot start a thread on cpu {}: {:?}", cpu1, e);
        return false;
    }
    xcpu_figures("sm_xcpu_wake", "sm_xcpu_rt", back, || hc::sm_up(go)) && recall_xcpu(cpu1, back)
}

/// Times `trigger` (on CPU 0) → CPU 1 stamps `XCPU_STAMP` and ups `back` → CPU 0
/// woken: prints figure `one` (to the stamp) and `rt` (the whole round trip).
fn xcpu_figures(
    one: &str,
    rt: &str,
    back: u64,
    mut trigger: impl FnMut() -> Result<(), Status>,
) -> bool {
    let (mut there, mut round) = (Vec::with_capacity(ITER), Vec::with_capacity(ITER));
    for i in 0..WARMUP + ITER {
        let t0 = hc::rdtsc();
        let r = trigger().and_then(|()| hc::sm_down(back, false, deadline_ms(1000)));
        let t1 = hc::rdtsc();
        let Some((w, t)) = r.ok().and_then(|()| xcpu_sample(t0, t1)) else {
            println!("bench {}: round {} failed: {:?}", one, i, r);
            return false;
        };
        if i >= WARMUP {
            there.push(w);
            round.push(t);
        }
    }
    report_as(one, &mut there, true) & report_as(rt, &mut round, true)
}

/// `ec_recall_xcpu` and `ec_recall_xcpu_rt`.
fn recall_xcpu(cpu: u64, back: u64) -> bool {
    use peregrine_abi::event::host;
    let Some(svc) = crate::services::for_cpu(cpu) else {
        println!("bench ec_recall_xcpu: no service EC on cpu {}", cpu);
        return false;
    };
    let evt = sel::alloc_aligned(5);
    let handlers: [(u64, crate::services::Handler, Mtd); 2] = [
        (host::STARTUP, spin_startup, Mtd::RSP),
        (host::RECALL, spin_recall, Mtd::RIP_LEN),
    ];
    for (v, h, mtd) in handlers {
        if let Err(e) = hc::create_pt(evt + v, sel::OWN_PD, svc.sel, mtd, h as usize as u64) {
            println!("bench ec_recall_xcpu: event portal: {:?}", e);
            return false;
        }
    }
    let t = match nul_rt::thread::thread(cpu, evt, super::PRIO, spin, 0) {
        Ok(t) => t,
        Err(e) => {
            println!("bench ec_recall_xcpu: spinner: {:?}", e);
            return false;
        }
    };
    let ok = xcpu_figures("ec_recall_xcpu", "ec_recall_xcpu_rt", back, || {
        hc::ec_recall(t.ec)
    });
    destroy(&[t.ec, t.sc]);
    ok
}
