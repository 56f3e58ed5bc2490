//! The root's portal handlers: one local EC per CPU serves every component on that CPU
//! (portals are CPU-local) — console output, the service protocol ([`nul_rt::svc`]),
//! an echo portal for tests, start-up and exceptions (with the pager), and the event
//! portals of the root's own threads.

use alloc::vec::Vec;

use nul_rt::start_info::START_INFO_ADDR;
use nul_rt::sync::Mutex;
use nul_rt::thread::{self, LocalEc};
use nul_rt::utcb::UtcbRef;
use nul_rt::{hc, println, sel, svc};
use peregrine_abi::event::host;
use peregrine_abi::utcb::gpr;
use peregrine_abi::{perm, Crd, Mtd, Status};

use crate::children;
use crate::serial;

/// A portal handler entry.
pub type Handler = thread::Handler;

/// Per CPU: the service EC and the event base of the root's own threads on that CPU.
#[derive(Clone, Copy)]
struct Cpu {
    ec: LocalEc,
    evt: u64,
}

static SVC: Mutex<Vec<Option<Cpu>>> = Mutex::new(Vec::new());

/// Opens a fresh one-selector delegation window in a service EC's UTCB: a portal a
/// component registers lands there.
fn open_window(u: &UtcbRef) {
    u.get().head.crd_dlg = Crd::obj(sel::alloc(), 0, perm::ALL);
}

/// Creates the service EC of every online CPU, and the event portals of the root's own
/// threads on it (the first CPU's are at selectors 0–31, the root EC's event base).
pub fn init(cpus: impl Iterator<Item = u64>) -> Result<(), Status> {
    let mut first = true;
    for cpu in cpus {
        let ec = thread::local_ec(cpu, 0)?;
        // SAFETY: the UTCB of a local EC of ours, mapped in our space; the EC has not
        // been called yet, so nothing else uses it.
        open_window(&unsafe { UtcbRef::from_addr(ec.utcb) });
        let evt = if first { 0 } else { sel::alloc_aligned(5) };
        first = false;
        for v in 0..32u64 {
            let (h, mtd): (Handler, Mtd) = if v == host::STARTUP {
                (root_startup_handler, Mtd::RSP)
            } else {
                (root_fault_handler, Mtd::RIP_LEN | Mtd::QUAL | Mtd::GPRS)
            };
            hc::create_pt(evt + v, sel::OWN_PD, ec.sel, mtd, h as usize as u64)?;
            hc::pt_ctrl(evt + v, v)?;
        }
        let mut svc = SVC.lock();
        let i = cpu as usize;
        if svc.len() <= i {
            svc.resize(i + 1, None);
        }
        svc[i] = Some(Cpu { ec, evt });
    }
    Ok(())
}

/// The service EC of `cpu`.
pub fn for_cpu(cpu: u64) -> Option<LocalEc> {
    SVC.lock()
        .get(cpu as usize)
        .copied()
        .flatten()
        .map(|c| c.ec)
}

/// The event base for the root's own threads on `cpu`.
pub fn evt_base(cpu: u64) -> Option<u64> {
    SVC.lock()
        .get(cpu as usize)
        .copied()
        .flatten()
        .map(|c| c.evt)
}

/// Creates a portal to a service EC.
pub fn portal(ec: &LocalEc, h: Handler, mtd: Mtd, id: u64) -> Result<u64, Status> {
    thread::portal(ec, h, mtd, id)
}

/// A call that delegated something to a handler that did not want it: the window's
/// selector is used up, open a fresh one.
fn refresh_window(u: &UtcbRef) {
    if u.get().head.typed() > 0 {
        open_window(u);
    }
}

/// Console output of component `id`: one line per call.
pub extern "C" fn console_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    refresh_window(&u);
    let n = u.untyped().min(64);
    let words = &u.get().data[..n];
    let mut buf = [0u8; nul_rt::console::LINE_MAX];
    let len = nul_rt::console::decode(words, &mut buf);
    if words.first().is_some_and(|w| w & nul_rt::console::RAW != 0) {
        serial::write_raw(&buf[..len]);
    } else {
        let name = children::name_of(id as usize);
        serial::write_tagged(&name, &buf[..len]);
    }
    u.get().head.set_counts(0, 0);
    hc::reply()
}

/// The service protocol of component `id` (see [`nul_rt::svc`]).
pub extern "C" fn service_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let id = id as usize;
    let (op, a, b) = (u.word(0), u.word(1), u.word(2));
    let n = u.untyped();
    let got = u.get().head.typed();
    let window = u.get().head.crd_dlg.base();
    let mut ok = false;
    let mut wake = None;
    match op {
        svc::REGISTER if got == 1 && n >= 1 => {
            // The portal landed in the window; keep it and open a new window.
            open_window(&u);
            wake = children::with(id, |c| {
                c.registered = Some(window);
                c.sm
            });
            ok = true;
        }
        svc::RESULT if got == 0 && n >= 3 => {
            wake = children::with(id, |c| {
                if c.results.len() < 64 {
                    c.results.push((a, b));
                }
                c.sm
            });
            ok = true;
        }
        svc::PROGRESS if got == 0 && n >= 2 => {
            let mut st = [0u64; svc::STATUS_BUCKETS];
            if n >= 2 + svc::STATUS_BUCKETS {
                for (i, v) in st.iter_mut().enumerate() {
                    *v = u.word(2 + i);
                }
            }
            children::with(id, |c| {
                c.progress = a;
                if n >= 2 + svc::STATUS_BUCKETS {
                    c.by_status = st;
                }
            });
            ok = true;
        }
        svc::INPUT if got == 0 => {
            let mut b = [0u8; svc::INPUT_MAX];
            let got = serial::read(&mut b);
            let mut w = [0u64; 2 + svc::INPUT_MAX / 8];
            w[1] = got as u64;
            for (i, &c) in b[..got].iter().enumerate() {
                w[2 + i / 8] |= u64::from(c) << ((i % 8) * 8);
            }
            u.set_msg(&w[..2 + got.div_ceil(8)]);
            hc::reply()
        }
        _ => refresh_window(&u),
    }
    if let Some(sm) = wake {
        let _ = hc::sm_up(sm);
    }
    u.set_msg(&[if ok { 0 } else { 1 }]);
    hc::reply()
}

/// An echo portal (the root's end of IPC tests): replies with every word plus one.
pub extern "C" fn echo_handler(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    refresh_window(&u);
    let utcb = u.get();
    let n = utcb.head.untyped().min(utcb.data.len());
    for w in &mut utcb.data[..n] {
        *w = w.wrapping_add(1);
    }
    utcb.head.set_counts(n, 0);
    hc::reply()
}

/// Start-up of a component's main EC: enter the ELF entry with the start-info page in
/// `rdi` and the UTCB in `rsi`. Any later STARTUP event (a thread the component made
/// with the root's event portals) is a fault.
pub extern "C" fn startup_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let child = (id >> 8) as usize;
    let entry = children::with(child, |c| {
        let first = !c.started;
        c.started = true;
        first.then_some(c.entry)
    })
    .flatten();
    let a = u.get().arch_mut();
    match entry {
        Some(entry) => {
            a.rip = entry;
            a.gpr[gpr::RDI] = START_INFO_ADDR;
            a.gpr[gpr::RSI] = peregrine_abi::hip::ROOT_UTCB_ADDR;
            a.mtd = Mtd::RIP_LEN | Mtd::GPR_BSD;
        }
        None => {
            children::kill(child, "start-up of a second thread through the root");
            a.mtd = Mtd::empty();
        }
    }
    hc::reply()
}

/// An exception in a component: the pager resolves page faults in its paged region;
/// anything else is reported, recorded and the component removed.
pub extern "C" fn fault_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let child = (id >> 8) as usize;
    let vec = id & 0xff;
    let a = *u.get().arch();
    u.get().arch_mut().mtd = Mtd::empty();
    if vec == host::PF && children::page_in(child, a.qual[1]) {
        hc::reply();
    }
    let what = match vec {
        host::PF => "page fault",
        host::GP => "general protection",
        host::UD => "invalid opcode",
        host::DE => "divide error",
        host::RECALL => "recall",
        _ => "exception",
    };
    println!(
        "component {} ({}): {} (vector {}) at rip={:#x} rsp={:#x} err={:#x} addr={:#x}",
        children::name_of(child),
        child,
        what,
        vec,
        a.rip,
        a.gpr[gpr::RSP],
        a.qual[0],
        a.qual[1]
    );
    children::with(child, |c| c.last_fault = Some((vec, a.qual[1])));
    children::kill(child, what);
    hc::reply()
}

/// Start-up of one of the root's own threads ([`nul_rt::thread::thread`]).
extern "C" fn root_startup_handler(_id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    thread::startup_reply(u.get());
    hc::reply()
}

/// An exception in the root itself: fatal.
extern "C" fn root_fault_handler(vec: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let a = *u.get().arch();
    println!(
        "root: exception {} at rip={:#x} err={:#x} addr={:#x}",
        vec, a.rip, a.qual[0], a.qual[1]
    );
    println!("FAIL root exception");
    serial::exit(false)
}
