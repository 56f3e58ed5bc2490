//! `role=hostile seed=N`: random hypercalls forever — random numbers (0–20), selectors,
//! argument words, flags and UTCB contents (counts, typed items with random CRDs,
//! windows) — reporting the count and the calls by status to the root every 4,096
//! calls. Beside the random calls (the second generation of the hostile test, issue 8):
//! - a *victim* thread makes random hypercalls like the main EC, and a *scribbler*
//!   thread on the next CPU rewrites the victim's UTCB all the time, so the kernel reads
//!   UTCBs that change under it during the victim's hypercalls;
//! - a *sleeper* thread waits on the semaphores the root shares among the hostile
//!   components ([`SHARED_SM`]) with far deadlines, and the main EC ups them;
//! - after 20,000 calls and then every [`CHAIN_EVERY`] calls a chain of [`CHAIN_DEPTH`]
//!   PDs, each the parent of the next, is built and destroyed at once (deeper than any
//!   kernel stack could recurse), and its depth reported;
//! - the peers' echo portals ([`PEER_PT`]), the shared semaphores and a shared PD
//!   ([`SHARED_PD`]) that the root delegates to every hostile component are called, upped,
//!   downed and used as parent or target like its own objects, and typed items carry
//!   its playground (PDs included) to whoever it calls.
//!
//! The kernel must survive anything; the component only avoids hurting itself, so that
//! it keeps running:
//! - no `reply` from its main EC (with no caller the EC would wait for a call forever);
//! - no calls to selectors 0–39 (the root's event portals would report it as faulted,
//!   its console portal would print garbage) and no `ec_ctrl` below 64 (its own EC);
//! - `revoke` with "self" only outside its image, UTCBs and well-known selectors, and
//!   no delegation of selectors 0–63 (a copy of a root event portal, called, kills it);
//! - windows, UTCB addresses and event bases away from what it uses;
//! - semaphore downs of the main EC and the victim always with a deadline, SC
//!   priorities at most its own (10).
//!
//! Its own echo handler (selectors 40/41) answers its random calls with random replies.
//! Every 2,048 calls it revokes its playground (selectors 64–1023, the scratch memory
//! region) so that quota comes back.

use core::sync::atomic::{AtomicU64, Ordering};

use nul_rt::start_info::{self, StartInfo};
use nul_rt::thread;
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, svc};
use peregrine_abi::hypercall::{revoke_flags, sm_flags, Hypercall};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, CrdKind, Mtd, Status, Xfer};

/// Its echo portal and handler EC.
const ECHO_PT: u64 = 40;
const ECHO_EC: u64 = 41;
/// The echo EC's UTCB (in the protected high zone).
const ECHO_UTCB: u64 = 0x7e00_0000_0000;
/// Where random memory windows point.
const SCRATCH_PAGE: u64 = 0x5000_0000_0000 >> 12;
const SCRATCH_ORDER: u8 = 12;
/// Playground selectors for random windows.
const PLAY_BASE: u64 = 64;
const PLAY_END: u64 = 1024;
/// Random event bases land here, clear of everything it uses.
const EVT_ZONE: u64 = 0x2_0000;
/// The peers' echo portals (delegated by the root): 4 selectors.
pub const PEER_PT: u64 = 48;
/// Semaphores shared by all hostile components (delegated by the root): 4 selectors.
pub const SHARED_SM: u64 = 52;
/// A PD shared by all hostile components (delegated by the root).
pub const SHARED_PD: u64 = 56;
/// Event bases of its threads, one per CPU (only STARTUP is served).
const THREAD_EVT: u64 = 0x3_0000;
/// Where the PD chains are built (below the limit of 2^18 selectors).
const CHAIN_BASE: u64 = 0x3_8000;
/// PDs per chain.
pub const CHAIN_DEPTH: u64 = 1000;
/// Calls between two chains.
const CHAIN_EVERY: u64 = 100_000;
/// Calls between two progress reports.
const REPORT_EVERY: u64 = 4096;
/// A deadline that never comes.
const FAR: u64 = u64::MAX >> 1;

/// The victim's calls, and its calls by status.
static VICTIM_CALLS: AtomicU64 = AtomicU64::new(0);
static VICTIM_STATUS: [AtomicU64; svc::STATUS_BUCKETS] =
    [const { AtomicU64::new(0) }; svc::STATUS_BUCKETS];

static RNG: AtomicU64 = AtomicU64::new(1);

fn rnd() -> u64 {
    let x = peregrine_rng::step(RNG.load(Ordering::Relaxed));
    RNG.store(x, Ordering::Relaxed);
    peregrine_rng::output(x)
}

/// A random argument word: small, selector-like, address-like, extreme or anything.
fn word() -> u64 {
    let r = rnd();
    match r % 8 {
        0 => r >> 56,
        1 => (r >> 20) % 1024,
        2 => (r >> 16) & 0x7fff_ffff_f000,
        3 => 0,
        4 => u64::MAX >> (r >> 58),
        _ => rnd(),
    }
}

/// A random selector: mostly small, so that real capabilities are hit.
fn selector() -> u64 {
    let r = rnd();
    match r % 10 {
        0..=6 => (r >> 8) % 128,
        7 | 8 => (r >> 8) % 4096,
        _ => rnd() >> 12,
    }
}

/// A random CRD.
fn crd() -> Crd {
    let r = rnd();
    if r.is_multiple_of(8) {
        return Crd(rnd());
    }
    let kind = match (r >> 3) % 4 {
        0 => CrdKind::Null,
        1 => CrdKind::Mem,
        2 => CrdKind::Pio,
        _ => CrdKind::Obj,
    };
    let order = if (r >> 5).is_multiple_of(4) {
        (r >> 8) as u8 % 32
    } else {
        (r >> 8) as u8 % 6
    };
    let base = word() & !((1u64 << order) - 1);
    Crd::new(kind, base, order, (r >> 16) as u8 & 0x1f)
}

/// Keeps a receive window (where things get delegated to us) away from what we use.
fn window(c: Crd) -> Crd {
    let r = rnd();
    match c.kind() {
        CrdKind::Mem => {
            let order = c.order().min(8);
            let base = (SCRATCH_PAGE + (r % (1 << SCRATCH_ORDER))) & !((1u64 << order) - 1);
            Crd::new(CrdKind::Mem, base, order, c.perm())
        }
        CrdKind::Obj => {
            let order = c.order().min(6);
            let base = (PLAY_BASE + r % (PLAY_END - PLAY_BASE)) & !((1u64 << order) - 1);
            Crd::new(CrdKind::Obj, base.max(PLAY_BASE), order, c.perm())
        }
        _ => c,
    }
}

/// Keeps what we send away from selectors 0–63: a copy of one of the root's event
/// portals in the playground, called later, would report us as faulted.
fn source(c: Crd) -> Crd {
    if c.kind() == CrdKind::Obj && c.base() < PLAY_BASE {
        window(c)
    } else {
        c
    }
}

/// Keeps an address we let the kernel map (a UTCB) out of our image and high pages.
fn addr(a: u64) -> u64 {
    if a < 0x1000_0000 || (0x7e00_0000_0000..0x8000_0000_0000).contains(&a) {
        a ^ 0x4000_0000_0000
    } else {
        a
    }
}

/// Whether revoking `c` from ourselves leaves everything we use in place.
fn self_revoke_ok(c: Crd) -> bool {
    let end = |c: Crd| c.base().saturating_add(1u64 << c.order().min(63));
    match c.kind() {
        CrdKind::Obj => c.base() >= PLAY_BASE,
        CrdKind::Mem => c.base() >= 0x1000_0000 >> 12 && end(c) <= 0x7e00_0000_0000 >> 12,
        _ => true,
    }
}

/// Fills a UTCB with a random message: counts (sometimes invalid), words, typed items.
fn random_msg(u: &UtcbRef) {
    let utcb = u.get();
    let r = rnd();
    let untyped = if r.is_multiple_of(8) {
        (r >> 8) as usize % 600
    } else {
        (r >> 8) as usize % 16
    };
    let typed = (r >> 24) as usize % 4;
    for w in utcb.data.iter_mut().take(untyped.min(16)) {
        *w = word();
    }
    for i in 0..typed {
        let x = Xfer {
            crd: source(crd()),
            meta: (rnd() & 0x701) | (word() << 12),
        };
        utcb.set_xfer(i, x);
    }
    utcb.head.mtr = untyped as u64 | ((typed as u64) << 16);
    if r.is_multiple_of(64) {
        utcb.head.mtr = rnd();
    }
    utcb.head.crd_dlg = window(crd());
    utcb.head.crd_xlt = crd();
}

/// Its own portal handler: answers with the echo or with a random reply.
extern "C" fn echo(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    if rnd().is_multiple_of(2) {
        let n = u.untyped();
        u.get().head.set_counts(n, 0);
        u.get().head.crd_dlg = window(crd());
    } else {
        random_msg(&u);
    }
    hc::reply()
}

#[repr(align(16))]
#[allow(dead_code)] // only its address is used
struct Stack([u8; 16 * 1024]);
static mut ECHO_STACK: Stack = Stack([0; 16 * 1024]);

fn setup(si: &StartInfo) -> Result<(), Status> {
    let top = core::ptr::addr_of_mut!(ECHO_STACK) as u64 + 16 * 1024 - 8;
    let evt = EVT_ZONE + 0x1_0000;
    hc::create_ec(
        ECHO_EC,
        nul_rt::sel::OWN_PD,
        hc::EcKind::Local,
        si.cpu,
        ECHO_UTCB,
        top,
        evt,
    )?;
    hc::create_pt(
        ECHO_PT,
        nul_rt::sel::OWN_PD,
        ECHO_EC,
        Mtd::empty(),
        echo as thread::Handler as usize as u64,
    )
}

/// Issues one random hypercall; returns its status byte.
fn one(u: &UtcbRef) -> u8 {
    let mut n = (rnd() % 21) as u8;
    let mut flags = (rnd() % 16) as u8;
    let mut sel = selector();
    let mut a = [word(), word(), word(), word(), word()];
    match Hypercall::from_raw(n) {
        Some(Hypercall::Call) => {
            if sel < 40 || rnd().is_multiple_of(4) {
                sel = ECHO_PT;
            }
            if rnd().is_multiple_of(8) {
                // A peer's echo portal: on this CPU a call, on another BadCpu.
                sel = PEER_PT + rnd() % 4;
            }
            random_msg(u);
        }
        Some(Hypercall::Reply) => {
            n = Hypercall::Lookup as u8;
            a[0] = crd().0;
        }
        Some(Hypercall::CreateEc) => {
            a[2] = addr(a[2]);
            a[4] = EVT_ZONE + (a[4] & 0xffff);
        }
        Some(Hypercall::CreateSc) => a[2] = (a[2] & !0xff) | (a[2] % 11),
        Some(Hypercall::Revoke) => {
            a[0] = crd().0;
            if !self_revoke_ok(Crd(a[0])) {
                flags &= !revoke_flags::SELF;
            }
        }
        Some(Hypercall::Lookup) => a[0] = crd().0,
        Some(Hypercall::EcCtrl) if sel < 64 => sel += 64,
        Some(Hypercall::SmCtrl) if flags & sm_flags::DOWN != 0 => {
            a[0] = if rnd().is_multiple_of(2) {
                1
            } else {
                hc::rdtsc() + rnd() % 20_000
            };
        }
        Some(Hypercall::SmCtrl) if rnd().is_multiple_of(4) => sel = SHARED_SM + rnd() % 4,
        Some(Hypercall::PdCtrl) => {
            a[1] = source(crd()).0;
            a[2] = window(crd()).0;
        }
        _ => {}
    }
    // The PD the root shares among the hostile components: parent or home of new
    // objects, destination of delegations.
    if matches!(
        Hypercall::from_raw(n),
        Some(
            Hypercall::CreatePd
                | Hypercall::CreateSm
                | Hypercall::CreatePt
                | Hypercall::CreateSc
                | Hypercall::PdCtrl
        )
    ) && rnd().is_multiple_of(4)
    {
        a[0] = SHARED_PD;
    }
    let w = n as u64 | ((flags as u64) << 8) | (sel << 12);
    hc::raw(w, a[0], a[1], a[2], a[3], a[4]).status
}

/// Revokes the playground so that its quota comes back.
fn cleanup() {
    for (base, order) in [(64, 6), (128, 7), (256, 8), (512, 9)] {
        let _ = hc::revoke(Crd::obj(base, order, peregrine_abi::perm::ALL), true);
    }
    let _ = hc::revoke(Crd::mem(SCRATCH_PAGE, SCRATCH_ORDER, MemPerm::all()), true);
}

/// Builds a chain of [`CHAIN_DEPTH`] PDs, each created with the previous one as its
/// parent, and destroys it with one revocation of the first; returns the statuses.
fn chain(by_status: &mut [u64; svc::STATUS_BUCKETS]) -> u64 {
    let mut parent = nul_rt::sel::OWN_PD;
    let mut quota = 2 * CHAIN_DEPTH;
    let mut n = 0;
    for i in 0..CHAIN_DEPTH {
        let st = hc::raw(
            peregrine_abi::hypercall::HypercallWord::new(Hypercall::CreatePd, 0, CHAIN_BASE + i).0,
            parent,
            quota,
            0,
            0,
            0,
        )
        .status;
        by_status[(st as usize).min(svc::STATUS_BUCKETS - 1)] += 1;
        n += 1;
        if st != 0 {
            break;
        }
        parent = CHAIN_BASE + i;
        quota -= 2;
    }
    let r = hc::revoke(Crd::obj(CHAIN_BASE, 10, peregrine_abi::perm::ALL), true);
    by_status[if r.is_ok() {
        0
    } else {
        svc::STATUS_BUCKETS - 1
    }] += 1;
    n + 1
}

/// STARTUP of its threads.
extern "C" fn thread_startup(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    thread::startup_reply(u.get());
    hc::reply()
}

/// The scribbler: rewrites the victim's UTCB (address in `arg`) with garbage, for good.
extern "C" fn scribbler(arg: u64, _utcb: u64) -> ! {
    let words = (arg as *mut u64, 4096 / 8);
    let mut x = arg | 1;
    let mut i = 0usize;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mostly the header and the first words (counts, windows, message), sometimes
        // the typed items at the top.
        let idx = match x % 4 {
            0 => (x >> 8) as usize % 4,
            1 => words.1 - 1 - (x >> 8) as usize % 16,
            _ => (x >> 8) as usize % 64,
        };
        // SAFETY: `arg` is the victim's UTCB, one page mapped read-write in this PD;
        // `idx` < 512. Writing it while the victim and the kernel use it is the point
        // (hostile); volatile so that every write happens.
        unsafe {
            words
                .0
                .add(idx)
                .write_volatile(x.rotate_left(i as u32 % 64))
        };
        i = i.wrapping_add(1);
    }
}

/// The victim: random hypercalls like the main EC's, from a UTCB the scribbler rewrites.
extern "C" fn victim(_arg: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this thread's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    loop {
        let st = one(&u);
        VICTIM_STATUS[(st as usize).min(svc::STATUS_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        VICTIM_CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The sleeper: downs a shared semaphore with a far deadline, over and over.
extern "C" fn sleeper(arg: u64, _utcb: u64) -> ! {
    let mut x = arg | 1;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if hc::sm_down(SHARED_SM + x % 4, false, FAR).is_err() {
            // Not delegated yet (or gone): wait a little on nothing.
            let _ = hc::sm_down(arg, false, hc::rdtsc() + 1_000_000);
        }
    }
}

/// Starts the victim and the sleeper on this CPU, the scribbler on the next.
fn threads(si: &StartInfo) -> Result<(), Status> {
    let other = (si.cpu + 1) % si.ncpus.max(1);
    let nap = nul_rt::sel::alloc();
    hc::create_sm(nap, nul_rt::sel::OWN_PD, 0)?;
    for cpu in [si.cpu, other] {
        let evt = THREAD_EVT + 32 * cpu;
        let ec = thread::local_ec(cpu, EVT_ZONE)?;
        hc::create_pt(
            evt + peregrine_abi::event::host::STARTUP,
            nul_rt::sel::OWN_PD,
            ec.sel,
            Mtd::RSP,
            thread_startup as thread::Handler as usize as u64,
        )?;
    }
    let v = thread::thread(si.cpu, THREAD_EVT + 32 * si.cpu, 10, victim, 0)?;
    thread::thread(other, THREAD_EVT + 32 * other, 10, scribbler, v.utcb)?;
    thread::thread(si.cpu, THREAD_EVT + 32 * si.cpu, 10, sleeper, nap)?;
    Ok(())
}

/// Runs forever.
pub fn run(si: &StartInfo) -> ! {
    let seed = start_info::arg_u64(si.args(), "seed").unwrap_or(1);
    RNG.store(
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        Ordering::Relaxed,
    );
    // What the runtime allocates from here on (its threads, their portals) lies above
    // the playground (64–1023), which every cleanup revokes.
    let _ = nul_rt::sel::alloc_aligned(10);
    if let Err(e) = setup(si) {
        println!("hostile: no echo portal ({:?}); going on without", e);
    } else if svc::register(ECHO_PT).is_err() {
        println!("hostile: cannot register the echo portal");
    }
    if let Err(e) = threads(si) {
        println!(
            "hostile: no scribbler or sleeper ({:?}); going on without",
            e
        );
    }
    let u = UtcbRef::main();
    let mut count: u64 = 0;
    let mut by_status = [0u64; svc::STATUS_BUCKETS];
    let (mut next_chain, mut next_report, mut next_print) = (20_000, REPORT_EVERY, 1_000_000);
    loop {
        let st = one(&u);
        by_status[(st as usize).min(svc::STATUS_BUCKETS - 1)] += 1;
        count += 1;
        if count.is_multiple_of(64) {
            let _ = hc::sm_up(SHARED_SM + rnd() % 4);
        }
        if count.is_multiple_of(2048) {
            cleanup();
        }
        if count >= next_chain {
            let n = chain(&mut by_status);
            count += n;
            next_chain += CHAIN_EVERY;
            // The depth reached (all created and destroyed: CHAIN_DEPTH + 1 calls).
            let _ = svc::result(svc::key::CHAIN, n - 1);
        }
        if count >= next_report {
            next_report += REPORT_EVERY;
            // The reply needs no window: clear what the random calls left.
            u.get().head.crd_dlg = Crd::NULL;
            let mut all = by_status;
            for (a, v) in all.iter_mut().zip(VICTIM_STATUS.iter()) {
                *a += v.load(Ordering::Relaxed);
            }
            let _ = svc::progress_stats(count + VICTIM_CALLS.load(Ordering::Relaxed), &all);
        }
        if count >= next_print {
            next_print += 1_000_000;
            println!("hostile: {} calls; by status {:?}", count, by_status);
        }
    }
}
