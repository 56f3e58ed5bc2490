//! The root's portal handlers: one local EC per CPU serves every component on that CPU
//! (portals are CPU-local) — console output, start-up and exceptions.

use alloc::vec::Vec;

use nul_rt::hc;
use nul_rt::thread::{self, LocalEc};
use nul_rt::utcb::UtcbRef;
use peregrine_abi::event::host;
use peregrine_abi::utcb::gpr;
use peregrine_abi::{Mtd, Status};
use spin::Mutex;

use crate::component;
use crate::serial;

/// A portal handler entry.
pub type Handler = thread::Handler;

static SVC: Mutex<Vec<Option<LocalEc>>> = Mutex::new(Vec::new());

/// Creates the service EC of every online CPU.
pub fn init(cpus: impl Iterator<Item = u64>) -> Result<(), Status> {
    let mut svc = SVC.lock();
    for cpu in cpus {
        let ec = thread::local_ec(cpu, 0)?;
        let i = cpu as usize;
        if svc.len() <= i {
            svc.resize(i + 1, None);
        }
        svc[i] = Some(ec);
    }
    Ok(())
}

/// The service EC of `cpu`.
pub fn for_cpu(cpu: u64) -> Option<LocalEc> {
    SVC.lock().get(cpu as usize).copied().flatten()
}

/// Creates a portal to a service EC.
pub fn portal(ec: &LocalEc, h: Handler, mtd: Mtd, id: u64) -> Result<u64, Status> {
    thread::portal(ec, h, mtd, id)
}

/// Console output of component `id`: one line per call.
pub extern "C" fn console_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let n = u.untyped().min(64);
    let words = &u.get().data[..n];
    let mut buf = [0u8; nul_rt::console::LINE_MAX];
    let len = nul_rt::console::decode(words, &mut buf);
    let name = component::name_of(id as usize);
    serial::write_tagged(&name, &buf[..len]);
    u.get().head.set_counts(0, 0);
    hc::reply()
}

/// Start-up of a component's main EC: enter the ELF entry with the start arguments.
pub extern "C" fn startup_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let child = (id >> 8) as usize;
    let entry = component::CHILDREN
        .lock()
        .get(child)
        .map(|c| c.entry)
        .unwrap_or(0);
    let a = u.get().arch_mut();
    a.rip = entry;
    a.gpr[gpr::RDI] = child as u64;
    a.gpr[gpr::RSI] = peregrine_abi::hip::ROOT_UTCB_ADDR;
    a.mtd = Mtd::RIP_LEN | Mtd::GPR_BSD;
    hc::reply()
}

/// An exception in a component: report it and remove the component.
pub extern "C" fn fault_handler(id: u64, utcb: u64) -> ! {
    // SAFETY: the kernel passes this handler EC's own UTCB address.
    let u = unsafe { UtcbRef::from_addr(utcb) };
    let child = (id >> 8) as usize;
    let vec = id & 0xff;
    let a = *u.get().arch();
    let what = match vec {
        host::PF => "page fault",
        host::GP => "general protection",
        host::UD => "invalid opcode",
        host::DE => "divide error",
        host::RECALL => "recall",
        _ => "exception",
    };
    nul_rt::println!(
        "component {} ({}): {} (vector {}) at rip={:#x} err={:#x} addr={:#x}",
        component::name_of(child),
        child,
        what,
        vec,
        a.rip,
        a.qual[0],
        a.qual[1]
    );
    component::kill(child, what);
    u.get().arch_mut().mtd = Mtd::empty();
    hc::reply()
}
