//! The IPC fast path: `call` through a portal to an idle handler on the same CPU, and
//! `reply` from that handler to its caller, with untyped words only.
//!
//! Like seL4's fastpath, it handles the common case of the two hypercalls that define a
//! microkernel in one straight line and leaves everything else (typed items, a busy or
//! dead handler, another CPU, events, waiters, recall) to the general code in [`ipc`],
//! which it falls back to before it has changed anything. What it skips is bookkeeping,
//! not checks: the capability lookup, the permission, the handler's CPU, liveness and
//! idleness are the ones `ipc::call` makes, and the switch is `sched::load_context`, the
//! one every return to user mode makes. What it saves:
//! - the capability space is read without its lock ([`crate::cap::Caps::read_fast`]);
//! - no reference to the running EC is counted up and down: the reference the CPU holds
//!   moves into the handler's `caller` and back;
//! - a handler starts a call with fresh registers, so it is entered straight through
//!   `sysret` with its entry state in registers
//!   ([`crate::arch::x86::entry::enter_handler`]) rather than through a frame written to
//!   memory and popped again;
//! - the message words move with one `rep movsq`.
//!
//! [`ipc`]: crate::ipc

use core::sync::atomic::Ordering;

use peregrine_abi::hypercall::{Hypercall, HypercallWord};
use peregrine_abi::perm::PtPerm;
use peregrine_abi::utcb::DATA_WORDS;
use peregrine_abi::Status;

use alloc::sync::Arc;

use crate::cap::KObj;
use crate::cpu::{Cpu, Ecs};
use crate::ec::{CallKind, Ec, EcKind};
use crate::frame::Frame;
use crate::sched::{self, CpuLocal};

/// Takes the fast path for the hypercall whose registers are in `f` (the running EC's
/// frame) if it applies; returns, having changed nothing, if it does not.
#[inline(always)]
pub fn try_fast(f: &Frame, cpu: &mut Cpu) {
    let w = HypercallWord(f.rdi);
    // Number and flags in one compare: a plain blocking call, or a reply.
    let op = w.0 & 0xfff;
    if op > Hypercall::Reply as u64 {
        return;
    }
    let (l, ecs) = sched::split(cpu);
    if op == Hypercall::Call as u64 {
        call(l, ecs, w.sel());
    } else {
        reply(l, ecs);
    }
}

/// The message counts word of a UTCB if it is untyped words only, at most a UTCB's
/// worth: the number of words.
#[inline(always)]
fn untyped_only(mtr: u64) -> Option<usize> {
    // Typed items are bits 16..32: one compare of the low half checks both counts.
    let n = mtr as u32 as usize;
    (n <= DATA_WORDS).then_some(n)
}

/// `reply` to a vCPU's event by the running handler: takes the state back and enters
/// the guest again (`vcpu::run`, straight from this kernel entry's stack, which holds
/// nothing); returns, having changed nothing, for anything else.
#[inline(never)]
fn vcpu_reply(l: &mut CpuLocal, ecs: &mut Ecs) {
    let Some(h) = l.current.as_ref() else {
        return;
    };
    let hl = h.local(ecs);
    let Some(c) = hl.caller.as_ref() else {
        return;
    };
    if c.kind != EcKind::Vcpu || !hl.waiters.is_empty() || c.is_dead() {
        return;
    }
    let Some(c) = hl.caller.take() else {
        return;
    };
    // SAFETY: the UTCB of the running handler, bound to this CPU; nothing reached
    // through the token while it lives is this UTCB (`c` is a vCPU, not `h`).
    let hu = unsafe { &*h.utcb };
    // The vCPU is bound to this CPU and waits for this reply.
    crate::vcpu::put_state(&c, hu.arch(), ecs);
    let callee = c.local(ecs).callee.take();
    // The CPU's reference keeps the handler; `vcpu::run` makes the vCPU current and
    // keeps the handler's PD, whose address space stays loaded, alive while it runs.
    release(callee);
    crate::vcpu::run(c, Cpu::join(l, ecs))
}

/// Drops a reference to an EC, in line (the compiler's shared drop glue is a call).
#[inline(always)]
fn release(e: Option<Arc<Ec>>) {
    if let Some(e) = e {
        drop(e);
    }
}

/// Copies `n` (at most [`DATA_WORDS`]) words from `s` to `d`.
#[inline(always)]
fn copy_words(s: &[u64; DATA_WORDS], d: &mut [u64; DATA_WORDS], n: usize) {
    let n = n.min(DATA_WORDS);
    // SAFETY: both arrays hold DATA_WORDS >= n words; they are distinct UTCBs (the
    // handler is not the caller); `rep movsq` with DF clear (the kernel runs with DF
    // clear: FMASK clears it on entry) copies upwards and touches nothing else.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            inout("rcx") n => _,
            inout("rsi") s.as_ptr() => _,
            inout("rdi") d.as_mut_ptr() => _,
            options(nostack, preserves_flags)
        );
    }
}

/// `call` of portal `sel` by the running EC.
#[inline(always)]
fn call(l: &mut CpuLocal, ecs: &mut Ecs, sel: u64) {
    let Some(c) = l.current.as_ref() else {
        return;
    };
    // SAFETY: the running EC's UTCB, bound to this CPU; nothing reached through the
    // token while it lives is this UTCB (only the handler's state is, and the handler
    // is not `c`: checked before its state is touched).
    let su = unsafe { &*c.utcb };
    let Some(n) = untyped_only(su.head.mtr) else {
        return;
    };
    let need = PtPerm::CALL.bits();
    let Some(Some((h, ip, id))) = c.pd.obj.read_fast(l.cpu(), |s| match s.get(sel) {
        Some(cap) if cap.perm & need != 0 => match &cap.obj {
            KObj::Pt(pt) => Some((pt.ec.clone(), pt.ip, pt.id())),
            _ => None,
        },
        _ => None,
    }) else {
        return;
    };
    if h.cpu != c.cpu || h.is_dead() || core::ptr::eq(&*h, &**c) {
        return;
    }
    // `h` is bound to this CPU (checked), so only this CPU touches its local state, and
    // it does not run now (its `caller` is checked next).
    if h.local(ecs).caller.is_some() {
        return;
    }
    // From here on the call happens.
    // SAFETY: the UTCB of the idle handler `h`, bound to this CPU (checked); not the
    // caller's (`h` is not `c`, checked), and not reached through the token while it
    // lives.
    let du = unsafe { &mut *h.utcb };
    copy_words(&su.data, &mut du.data, n);
    du.head.mtr = n as u64;
    h.local(ecs).kind = CallKind::Ipc;
    // The CPU's reference to the caller moves into the handler; the caller keeps one
    // to its callee, the CPU one to the handler that runs now.
    let Some(c) = l.current.take() else {
        return;
    };
    // The caller runs on this CPU and is in the kernel.
    c.local(ecs).callee = Some(h.clone());
    // SAFETY: the handler's `caller` is None (checked above), so the plain write loses
    // nothing.
    unsafe { core::ptr::write(&mut h.local(ecs).caller, Some(c)) };
    sched::load_context(l, &h);
    let (sp, utcb) = (h.sp, h.utcb_uva);
    // SAFETY: `l.current` is None (taken above), so the plain write loses nothing.
    unsafe { core::ptr::write(&mut l.current, Some(h)) };
    // SAFETY: `ip` is a user address (checked when the portal was made), `sp` and
    // `utcb` are the handler's (checked when it was made); this CPU is on its kernel
    // stack with the kernel's GS and has switched to the handler's context above.
    unsafe { crate::arch::x86::entry::enter_handler(id, utcb, ip, sp) }
}

/// Entered from the syscall stub for a plain `reply` by a local EC, whose registers it
/// did not save: neither path here needs them. The handler's frame keeps whatever its
/// last kernel entry left; nothing reads it before its next call, which starts it
/// afresh (`enter_handler` here or in `ipc`), and `ipc::reply` never resumes a handler.
pub extern "C" fn local_reply() -> ! {
    // SAFETY: a kernel entry (the syscall stub, on this CPU's kernel stack, interrupts
    // off by FMASK); nothing of the kernel's is live on this CPU.
    let cpu = &mut unsafe { Cpu::enter() };
    crate::tlb::reclaim();
    let (l, ecs) = sched::split(cpu);
    reply(l, ecs);
    let h = sched::current(cpu);
    crate::ipc::reply(h, cpu)
}

/// Delivers event `vector` of vCPU `c` (the running EC, just out of its guest; a vCPU,
/// `vcpu::deliver` calls this) to its portal's idle handler on this CPU, as
/// `ipc::event` would; gives `c` back, having changed nothing, where that takes more
/// than the common case.
pub fn vcpu_event(c: Arc<Ec>, vector: u64, cpu: &mut Cpu) -> Arc<Ec> {
    let (l, ecs) = sched::split(cpu);
    let Some(Some((h, ip, mtd, id))) = c.pd.obj.read_fast(l.cpu(), |s| {
        match s.get(c.evt.wrapping_add(vector)).map(|cap| &cap.obj) {
            Some(KObj::Pt(pt)) => Some((pt.ec.clone(), pt.ip, pt.mtd, pt.id())),
            _ => None,
        }
    }) else {
        return c;
    };
    if h.cpu != c.cpu || h.is_dead() {
        return c;
    }
    // `h` is bound to this CPU (checked); it does not run (see `caller`).
    if h.local(ecs).caller.is_some() {
        return c;
    }
    // SAFETY: the UTCB of the idle handler `h`, bound to this CPU; nothing reached
    // through the token while it lives is this UTCB (`h` is a portal's handler, `c` a
    // vCPU).
    let hu = unsafe { &mut *h.utcb };
    hu.head.mtr = 0;
    crate::vcpu::get_state(&c, mtd, vector, hu.arch_mut(), ecs);
    h.local(ecs).kind = CallKind::Event;
    // The vCPU runs on this CPU and is in the kernel.
    c.local(ecs).callee = Some(h.clone());
    // SAFETY: the handler's `caller` is None (checked above), so the plain write loses
    // nothing.
    unsafe { core::ptr::write(&mut h.local(ecs).caller, Some(c)) };
    sched::load_context(l, &h);
    let (sp, utcb) = (h.sp, h.utcb_uva);
    // The CPU's reference to the vCPU goes only now that the handler's context is
    // loaded (the vCPU's `caller` reference keeps it anyway).
    release(l.current.replace(h));
    // SAFETY: as in `call`.
    unsafe { crate::arch::x86::entry::enter_handler(id, utcb, ip, sp) }
}

/// `reply` by the running EC.
#[inline(always)]
fn reply(l: &mut CpuLocal, ecs: &mut Ecs) {
    let Some(h) = l.current.as_ref() else {
        return;
    };
    let hl = h.local(ecs);
    let Some(c) = hl.caller.as_ref() else {
        return;
    };
    if hl.kind == CallKind::Event {
        return vcpu_reply(l, ecs);
    }
    if !hl.waiters.is_empty()
        || c.is_dead()
        || (c.kind == EcKind::Global && c.recall.load(Ordering::Relaxed))
    {
        return;
    }
    // SAFETY: the UTCBs of the running handler `h` and of its caller `c`, both bound to
    // this CPU (the caller blocked in its call); distinct (a handler is never its own
    // caller: the call and event paths refuse it), and neither is reached through the
    // token while these live (`hl` is `h`'s local state).
    let (hu, cu) = unsafe { (&*h.utcb, &mut *c.utcb) };
    let Some(n) = untyped_only(hu.head.mtr) else {
        return;
    };
    copy_words(&hu.data, &mut cu.data, n);
    cu.head.mtr = n as u64;
    let Some(c) = hl.caller.take() else {
        return;
    };
    // The caller is bound to this CPU and blocked in its call: its frame and local
    // state are this CPU's to change.
    c.frame(ecs).rdi = Status::Success as u64;
    let callee = c.local(ecs).callee.take();
    sched::load_context(l, &c);
    let frame = c.frame_ptr();
    // The handler's references go only now that its address space is no longer loaded
    // (one of them may be the last reference to its PD).
    let h = l.current.replace(c);
    release(callee);
    release(h);
    // SAFETY: the caller's frame, saved by the syscall stub when it called (kept alive
    // by `l.current`); this CPU is on its kernel stack with the kernel's GS.
    unsafe { crate::entry::ret_user(frame) }
}
