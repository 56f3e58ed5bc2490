//! Synchronous IPC: `call` through a portal donates the caller's SC to the handler EC on
//! the same CPU and switches straight to it; `reply` switches back. Exceptions and the
//! start-up of global ECs are calls as well, carrying architectural state under the
//! portal's MTD.
//!
//! This is the general path; the common case of `call` and `reply` (untyped words to an
//! idle handler on the same CPU) takes the shorter one in [`crate::fastpath`], which
//! takes no lock at all and falls back to this one whenever it does not apply. Both
//! allocate nothing and copy only the message words.

use alloc::sync::Arc;

use peregrine_abi::event::host;
use peregrine_abi::perm::PtPerm;
use peregrine_abi::utcb::ArchState;
use peregrine_abi::{Mtd, Status, Utcb};

use crate::cap::KObj;
use crate::cpu::{Cpu, Ecs};
use crate::ec::{CallKind, Ec, EcKind};
use crate::frame::Frame;
use crate::sched;

/// What a call or event takes from a portal: read under the capability space's lock,
/// so that no reference to the portal itself is counted up and down on the hot path.
struct Entry {
    /// The handler EC.
    ec: Arc<Ec>,
    ip: u64,
    mtd: Mtd,
    id: u64,
}

/// Looks up the portal at `sel` for a call (`need_call`: the capability must carry the
/// call permission) or an event.
fn portal(ec: &Ec, sel: u64, need_call: bool) -> Result<Entry, Status> {
    let objs = ec.pd.obj.lock();
    let Some(c) = objs.get(sel) else {
        return Err(Status::BadCapability);
    };
    match &c.obj {
        KObj::Pt(pt) if !need_call || c.perm & PtPerm::CALL.bits() != 0 => Ok(Entry {
            ec: pt.ec.clone(),
            ip: pt.ip,
            mtd: pt.mtd,
            id: pt.id(),
        }),
        _ => Err(Status::BadCapability),
    }
}

/// Prepares `h` to run the portal's entry.
fn enter_handler(h: &Ec, pt: &Entry, ecs: &mut Ecs) {
    // `h` is a local EC on this CPU, idle (no caller) until now.
    let f = h.frame(ecs);
    // Field by field (not `Frame::user`): a whole-frame store compiles to a `rep stos`,
    // which costs an instruction per word under the emulators' instruction counts.
    let zero = [
        &mut f.r15,
        &mut f.r14,
        &mut f.r13,
        &mut f.r12,
        &mut f.r11,
        &mut f.r10,
        &mut f.r9,
        &mut f.r8,
        &mut f.rbp,
        &mut f.rdx,
        &mut f.rcx,
        &mut f.rbx,
        &mut f.rax,
        &mut f.vector,
        &mut f.error,
    ];
    for r in zero {
        // SAFETY: a plain store to a field of the frame (volatile so that the stores are
        // not merged back into a `memset`).
        unsafe { core::ptr::write_volatile(r, 0) };
    }
    let user = Frame::user(pt.ip, h.sp);
    (f.rip, f.cs, f.rflags, f.rsp, f.ss) = (user.rip, user.cs, user.rflags, user.rsp, user.ss);
    f.rdi = pt.id;
    f.rsi = h.utcb_uva;
}

/// What a call or event leads to.
enum Next {
    /// Switch to this handler.
    Handler(Arc<Ec>),
    /// The caller waits in the handler's queue.
    Block,
}

/// `call` hypercall by the running EC `c` through the portal at `sel`.
///
/// Every diverging path below drops its references first: a function that never
/// returns never runs its locals' destructors.
pub fn call(c: Arc<Ec>, sel: u64, nonblocking: bool, cpu: &mut Cpu) -> ! {
    match enter_call(&c, sel, nonblocking, cpu) {
        Ok(Next::Handler(h)) => {
            // The handler holds its caller (moved, not copied: this path is hot); it is
            // bound to this CPU and about to run for `c`.
            h.local(cpu).caller = Some(c);
            sched::ret_to(h, cpu)
        }
        Ok(Next::Block) => {
            drop(c);
            sched::block_current(cpu);
            sched::schedule()
        }
        Err(s) => finish(c, s, cpu),
    }
}

fn enter_call(c: &Arc<Ec>, sel: u64, nonblocking: bool, cpu: &mut Cpu) -> Result<Next, Status> {
    let pt = portal(c, sel, true)?;
    let h = &pt.ec;
    if h.cpu != c.cpu {
        return Err(Status::BadCpu);
    }
    if h.is_dead() {
        return Err(Status::Aborted);
    }
    // Both ECs are bound to this CPU.
    let hl = h.local(cpu);
    if hl.caller.is_some() || Arc::ptr_eq(h, c) {
        if nonblocking || Arc::ptr_eq(h, c) {
            return Err(Status::Timeout);
        }
        // Wait for the handler; the call is re-issued when it becomes free.
        hl.waiters.try_reserve(1).map_err(|_| Status::OutOfMemory)?;
        hl.waiters.push_back(c.clone());
        let f = c.frame(cpu);
        f.rip = f.rip.wrapping_sub(2);
        c.local(cpu).waiting_for = Some(h.clone());
        return Ok(Next::Block);
    }
    // SAFETY: both UTCBs belong to ECs on this CPU (the token is held, unused, while
    // they live), and neither runs now; they are distinct (`h` is not `c`, checked).
    let (su, du) = unsafe { (&*c.utcb, &mut *h.utcb) };
    copy_msg(c, su, h, du)?;
    // `call` stores the caller in `hl.caller`.
    h.local(cpu).kind = CallKind::Ipc;
    c.local(cpu).callee = Some(h.clone());
    enter_handler(h, &pt, cpu);
    Ok(Next::Handler(pt.ec))
}

/// Copies a message (untyped words and typed items) from `s` to `d`.
fn copy_msg(se: &Ec, s: &Utcb, de: &Ec, d: &mut Utcb) -> Result<(), Status> {
    let head = s.head;
    if !head.counts_valid() {
        return Err(Status::BadParameter);
    }
    let n = head.untyped();
    d.data[..n].copy_from_slice(&s.data[..n]);
    let t = head.typed();
    let mut got = 0;
    for i in 0..t {
        if let Some(x) = s.xfer(i) {
            if crate::space::transfer(&se.pd, &de.pd, x, d.head.crd_dlg).is_ok() {
                got += 1;
            }
        }
    }
    d.head.mtr = (n as u64) | ((got as u64) << 16);
    Ok(())
}

/// Writes the status into the running EC and resumes it.
pub fn finish(c: Arc<Ec>, s: Status, cpu: &mut Cpu) -> ! {
    c.frame(cpu).rdi = s as u64;
    sched::ret_to(c, cpu)
}

/// `reply` by the running handler `h`.
pub fn reply(h: Arc<Ec>, cpu: &mut Cpu) -> ! {
    let hl = h.local(cpu);
    let Some(c) = hl.caller.take() else {
        // Nothing to reply to: the handler just idles until the next call.
        drop(h);
        sched::block_current(cpu);
        sched::schedule();
    };
    let kind = hl.kind;
    let waiter = hl.waiters.pop_front();
    // The caller is bound to this CPU and blocked in its call.
    c.local(cpu).callee = None;
    if let Some(w) = waiter {
        // It re-issues its call (or re-raises its exception) with its registers intact.
        sched::wake_retry(w, cpu);
    }
    if !c.is_dead() {
        match kind {
            CallKind::Ipc => {
                // SAFETY: both UTCBs belong to ECs on this CPU (the token is held,
                // unused, while they live), neither runs now, and they are distinct (a
                // handler is never its own caller: `enter_call` and `enter_event`
                // refuse it); a caller of an IPC call is a thread with a UTCB.
                let (hu, cu) = unsafe { (&*h.utcb, &mut *c.utcb) };
                let st = match copy_msg(&h, hu, &c, cu) {
                    Ok(()) => Status::Success,
                    Err(s) => s,
                };
                c.frame(cpu).rdi = st as u64;
            }
            CallKind::Event => {
                // A vCPU's state goes back into its VMCB/VMCS, validated (from the
                // kernel's own copy, see `vcpu::put_state`).
                // SAFETY: the UTCB of `h`, bound to this CPU and in the kernel; nothing
                // reached through the token while it lives is this UTCB (a handler is
                // never its own caller).
                let hu = unsafe { &*h.utcb };
                if c.kind == EcKind::Vcpu {
                    crate::vcpu::put_state(&c, hu.arch(), cpu);
                } else {
                    let a = *hu.arch();
                    put_state(c.frame(cpu), &a);
                }
            }
        }
    }
    // The handler's stack and frame are reset on its next call.
    drop(h);
    sched::ret_to(c, cpu)
}

/// Writes the state selected by `mtd` from an EC's frame into a handler's UTCB.
fn get_state(f: &Frame, mtd: Mtd, vector: u64, a: &mut ArchState) {
    a.mtd = mtd;
    if mtd.contains(Mtd::GPR_ACDB) {
        a.gpr[0] = f.rax;
        a.gpr[1] = f.rcx;
        a.gpr[2] = f.rdx;
        a.gpr[3] = f.rbx;
    }
    if mtd.contains(Mtd::GPR_BSD) {
        a.gpr[5] = f.rbp;
        a.gpr[6] = f.rsi;
        a.gpr[7] = f.rdi;
    }
    if mtd.contains(Mtd::RSP) {
        a.gpr[4] = f.rsp;
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        for i in 8..16 {
            a.gpr[i] = f.gpr(i);
        }
    }
    if mtd.contains(Mtd::RIP_LEN) {
        a.rip = f.rip;
        a.inst_len = 0;
    }
    if mtd.contains(Mtd::RFLAGS) {
        a.rflags = f.rflags;
    }
    if mtd.contains(Mtd::QUAL) {
        a.qual[0] = f.error;
        a.qual[1] = if vector == host::PF {
            crate::arch::read_cr2()
        } else {
            0
        };
    }
}

/// Takes back the state a handler selected with its reply MTD, validating every value.
fn put_state(f: &mut Frame, a: &ArchState) {
    let mtd = a.mtd;
    if mtd.contains(Mtd::GPR_ACDB) {
        for i in 0..4 {
            f.set_gpr(i, a.gpr[i]);
        }
    }
    if mtd.contains(Mtd::GPR_BSD) {
        for i in 5..8 {
            f.set_gpr(i, a.gpr[i]);
        }
    }
    if mtd.contains(Mtd::RSP) {
        f.set_gpr(4, a.gpr[4]);
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        for i in 8..16 {
            f.set_gpr(i, a.gpr[i]);
        }
    }
    if mtd.contains(Mtd::RIP_LEN) {
        f.set_rip(a.rip);
    }
    if mtd.contains(Mtd::RFLAGS) {
        f.set_rflags(a.rflags);
    }
}

/// Reports of ECs stopped for want of an event portal: a component can stop thousands
/// of ECs a second, and the UART busy-waits with interrupts off, so the kernel prints
/// at most [`Reports::BURST`] of them per second and counts the rest.
static REPORTS: Reports = Reports::new();

/// A rate limit for kernel reports (lock-free: a lost race costs one line either way).
struct Reports {
    window: core::sync::atomic::AtomicU64,
    printed: core::sync::atomic::AtomicU64,
    suppressed: core::sync::atomic::AtomicU64,
}

impl Reports {
    /// Reports per window.
    const BURST: u64 = 8;

    const fn new() -> Self {
        use core::sync::atomic::AtomicU64;
        Reports {
            window: AtomicU64::new(0),
            printed: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a report may be printed at `now`; if so, how many were suppressed
    /// before it.
    fn admit(&self, now: u64) -> Option<u64> {
        use core::sync::atomic::Ordering::Relaxed;
        let window = now / (crate::arch::tsc_khz().max(1) * 1000);
        if self.window.swap(window, Relaxed) != window {
            self.printed.store(0, Relaxed);
        }
        if self.printed.fetch_add(1, Relaxed) < Self::BURST {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// " (N more not reported)" for N > 0.
struct Suppressed(u64);

impl core::fmt::Display for Suppressed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 > 0 {
            write!(f, " ({} more not reported)", self.0)
        } else {
            Ok(())
        }
    }
}

/// Delivers event `vector` of the running EC `c` to its portal (exception or start-up),
/// or stops `c` if there is no usable portal.
pub fn event(c: Arc<Ec>, vector: u64, cpu: &mut Cpu) -> ! {
    match enter_event(&c, vector, cpu) {
        Some(Next::Handler(h)) => {
            drop(c);
            sched::ret_to(h, cpu)
        }
        Some(Next::Block) => {
            drop(c);
            sched::block_current(cpu);
            sched::schedule()
        }
        None => {
            if let Some(suppressed) = REPORTS.admit(crate::arch::rdtsc()) {
                crate::kprintln!(
                    "ec in pd {}: unhandled event {} at rip {:#x}: stopped{}",
                    c.pd.id,
                    vector,
                    c.frame(cpu).rip,
                    Suppressed(suppressed)
                );
            }
            stop(c, cpu)
        }
    }
}

fn enter_event(c: &Arc<Ec>, vector: u64, cpu: &mut Cpu) -> Option<Next> {
    let pt = match portal(c, c.evt.wrapping_add(vector), false) {
        Ok(p) if p.ec.cpu == c.cpu && !p.ec.is_dead() && !Arc::ptr_eq(&p.ec, c) => p,
        _ => return None,
    };
    let h = &pt.ec;
    // Both ECs are bound to this CPU.
    let hl = h.local(cpu);
    if hl.caller.is_some() {
        // Busy handler: wait, then take the event again (re-executing the faulting
        // instruction re-raises it; start-up is retried by the scheduler).
        hl.waiters.try_reserve(1).ok()?;
        hl.waiters.push_back(c.clone());
        c.local(cpu).waiting_for = Some(h.clone());
        return Some(Next::Block);
    }
    // SAFETY: the UTCB of `h`, a handler bound to this CPU and idle; nothing reached
    // through the token while it lives is this UTCB (`h` is not `c`, checked above).
    let hu = unsafe { &mut *h.utcb };
    hu.head.mtr = 0;
    // A vCPU's state comes from its VMCB/VMCS.
    if c.kind == EcKind::Vcpu {
        crate::vcpu::get_state(c, pt.mtd, vector, hu.arch_mut(), cpu);
    } else {
        get_state(c.frame(cpu), pt.mtd, vector, hu.arch_mut());
    }
    if vector == host::STARTUP {
        c.local(cpu).started = true;
    }
    let hl = h.local(cpu);
    hl.caller = Some(c.clone());
    hl.kind = CallKind::Event;
    c.local(cpu).callee = Some(h.clone());
    enter_handler(h, &pt, cpu);
    Some(Next::Handler(pt.ec))
}

/// The first dispatch of a global EC: its STARTUP event.
pub fn startup(ec: Arc<Ec>, cpu: &mut Cpu) -> ! {
    if ec.kind == EcKind::Vcpu {
        crate::vcpu::startup(ec, cpu);
    }
    sched::set_current(&ec, cpu);
    event(ec, host::STARTUP, cpu)
}

/// Stops an EC for good and schedules something else.
pub fn stop(c: Arc<Ec>, cpu: &mut Cpu) -> ! {
    c.dead.store(true, core::sync::atomic::Ordering::Release);
    sched::clear_current(cpu);
    drop(c);
    sched::schedule()
}
