//! The hypercall dispatcher: decodes the registers once, checks every argument, and
//! finishes each hypercall with a status. Nothing user space passes can make it panic.

use alloc::sync::Arc;

use peregrine_abi::args::{self, EcCtrlOp, HcArgs, PdCtrlOp, Regs, SmOp};
use peregrine_abi::hypercall::{self, Hypercall, HypercallWord};
use peregrine_abi::perm::{EcPerm, PdPerm, PtPerm, ScPerm, SmPerm};
use peregrine_abi::Status;

use crate::cap::{Cap, CapObj, KObj};
use crate::cpu::Cpu;
use crate::ec::{Ec, EcKind};
use crate::frame::{user_addr, Frame};
use crate::pd::Pd;
use crate::pt::Pt;
use crate::sc::Sc;
use crate::sm::{Down, Sm};
use crate::{ipc, sched, space};

/// Print every failing hypercall (kernel command line `trace_hc`).
pub static TRACE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// A hypercall's entry registers in the order [`args`] decodes them.
#[inline(always)]
fn regs(f: &Frame) -> Regs {
    [f.rdi, f.rsi, f.rdx, f.rax, f.r8, f.r9]
}

/// Decodes `A` from `r` (the dispatcher has matched its number).
#[inline(always)]
fn arg<A: HcArgs>(r: &Regs) -> Result<A, Status> {
    A::from_regs(r)
}

/// Entered from the syscall stub with the running EC's saved frame.
///
/// # Safety
/// Only the syscall stub calls this, with the frame it has just filled (the running
/// EC's), on this CPU's kernel stack with interrupts off.
pub unsafe extern "C" fn syscall_handler(frame: *mut Frame) -> ! {
    // SAFETY: the syscall entry: on this CPU's kernel stack with interrupts off (FMASK),
    // nothing of the kernel's live on this CPU.
    let cpu = &mut unsafe { Cpu::enter() };
    // No lock is held here: free what waits for a TLB shootdown.
    crate::tlb::reclaim();
    // SAFETY: the stub passes the running EC's frame, which it has just filled; nothing
    // writes it while this shared reference lives (it ends with the fast path's look).
    crate::fastpath::try_fast(unsafe { &*frame }, cpu);
    let c = sched::current(cpu);
    // The same frame, reached through the running EC: keeping the stub's pointer alive
    // across the fast path would cost the IPC path a register.
    let r = regs(c.frame(cpu));
    let word = HypercallWord(r[0]);
    let Some(h) = Hypercall::from_raw(word.number()) else {
        ipc::finish(c, Status::BadHypercall, cpu);
    };
    let res = match h {
        Hypercall::Call => match arg::<args::Call>(&r) {
            Ok(a) => ipc::call(c, a.pt, a.non_blocking, cpu),
            Err(s) => Err(s),
        },
        Hypercall::Reply => ipc::reply(c, cpu),
        Hypercall::CreatePd => arg(&r).and_then(|a| create_pd(&c, &a)).map(|()| 0),
        Hypercall::CreateEc => arg(&r).and_then(|a| create_ec(&c, &a)).map(|()| 0),
        Hypercall::CreateSc => arg(&r).and_then(|a| create_sc(&c, &a, cpu)).map(|()| 0),
        Hypercall::CreatePt => arg(&r).and_then(|a| create_pt(&c, &a)).map(|()| 0),
        Hypercall::CreateSm => arg(&r).and_then(|a| create_sm(&c, &a)).map(|()| 0),
        Hypercall::Revoke => arg::<args::Revoke>(&r)
            .and_then(|a| space::revoke(&c.pd, a.crd, a.own, cpu))
            .map(|()| 0),
        Hypercall::Lookup => arg::<args::Lookup>(&r).and_then(|a| match a.phys {
            false => space::lookup(&c.pd, a.crd).map(|crd| crd.0),
            true => space::lookup_phys(&c.pd, a.crd),
        }),
        Hypercall::EcCtrl => ec_ctrl(&c, &r).map(|()| 0),
        Hypercall::ScCtrl => arg(&r).and_then(|a| sc_ctrl(&c, &a)),
        Hypercall::PtCtrl => arg(&r).and_then(|a| pt_ctrl(&c, &a)).map(|()| 0),
        Hypercall::SmCtrl => match arg(&r).and_then(|a| sm_ctrl(&c, &a, cpu)) {
            Ok(true) => {
                // Blocked: the semaphore (and a timeout) hold the EC now.
                drop(c);
                sched::block_current(cpu);
                sched::schedule()
            }
            r => r.map(|_| 0),
        },
        Hypercall::AssignPci => Err(Status::BadFeature),
        Hypercall::AssignGsi => arg(&r).and_then(|a| assign_gsi(&c, &a)),
        Hypercall::PdCtrl => pd_ctrl(&c, &r),
    };
    if TRACE.load(core::sync::atomic::Ordering::Relaxed) {
        if let Err(s) = res {
            crate::kprintln!(
                "hc pd {} {:?} sel {:#x} flags {:#x} args {:x?}: {}",
                c.pd.id,
                h,
                word.sel(),
                word.flags(),
                &r[1..],
                s.name()
            );
        }
    }
    let f = c.frame(cpu);
    match res {
        Ok(v) => {
            f.rdi = Status::Success as u64;
            f.rsi = v;
        }
        Err(s) => f.rdi = s as u64,
    }
    sched::ret_from_hypercall(c, cpu)
}

/// The object of the capability at `sel` in the caller's space if it is a `T` with at
/// least the permissions `need`; `BadCapability` otherwise.
fn cap<T: CapObj>(c: &Ec, sel: u64, need: T::Perm) -> Result<Arc<T>, Status> {
    let need = T::perm_bits(need);
    match c.pd.cap(sel) {
        Some(Cap { obj, perm }) if perm & need == need => {
            T::from_kobj(obj).ok_or(Status::BadCapability)
        }
        _ => Err(Status::BadCapability),
    }
}

/// Installs a new object's capability at `sel` in the caller's space.
fn install(c: &Ec, sel: u64, obj: KObj) -> Result<(), Status> {
    space::insert_root_cap(&c.pd, sel, obj)
}

fn check_free(c: &Ec, sel: u64) -> Result<(), Status> {
    let s = c.pd.obj.lock();
    if sel >= s.limit() || s.contains(sel) {
        Err(Status::BadCapability)
    } else {
        Ok(())
    }
}

#[inline(never)] // off the IPC path: the dispatcher's frame stays small
fn create_pd(c: &Ec, a: &args::CreatePd) -> Result<(), Status> {
    let parent = cap::<Pd>(c, a.parent, PdPerm::PD)?;
    check_free(c, a.dst)?;
    let vm = a.vm;
    if vm && !crate::vcpu::available() {
        return Err(Status::BadFeature);
    }
    let quota = u32::try_from(a.quota).map_err(|_| Status::OutOfMemory)?;
    // One page for the PD object itself (and its top-level page table), plus the quota
    // it receives.
    crate::kmem::charge(&parent, 2)?;
    let q = match parent.quota.carve(quota) {
        Ok(q) => q,
        Err(_) => {
            crate::kmem::uncharge(&parent, 2);
            return Err(Status::OutOfMemory);
        }
    };
    match Pd::new(Some(parent.clone()), q, false, vm) {
        // A PD that is not installed goes at once: dropping it returns both the two
        // pages and its quota to the parent (nothing else may return them again).
        Ok(pd) => install(c, a.dst, KObj::Pd(crate::kmem::try_arc(pd)?)),
        Err(q) => {
            let _ = q.merge_into(&parent.quota);
            crate::kmem::uncharge(&parent, 2);
            Err(Status::OutOfMemory)
        }
    }
}

#[inline(never)] // off the IPC path: the dispatcher's frame stays small
fn create_ec(c: &Ec, a: &args::CreateEc) -> Result<(), Status> {
    let pd = cap::<Pd>(c, a.pd, PdPerm::EC)?;
    let cpu = a.cpu;
    if !crate::arch::cpu_online(cpu) {
        return Err(Status::BadCpu);
    }
    check_free(c, a.dst)?;
    if a.vcpu {
        // SVM: a vCPU in a VM PD (no UTCB, no stack; the event base names selectors of
        // the VM PD).
        if pd.kernel || pd.is_dead() {
            return Err(Status::BadCapability);
        }
        let ec = crate::vcpu::create(&pd, cpu as usize, a.evt)?;
        pd.add_ec(&ec)?;
        return install(c, a.dst, KObj::Ec(ec));
    }
    if pd.vm {
        // A VM PD has no host address space for threads.
        return Err(Status::BadParameter);
    }
    let kind = if a.global {
        EcKind::Global
    } else {
        EcKind::Local
    };
    let (utcb, sp, evt) = (a.utcb, a.sp, a.evt);
    if utcb & 0xfff != 0 || !user_addr(utcb) || utcb == 0 || !user_addr(sp) {
        return Err(Status::BadParameter);
    }
    if pd.kernel || pd.is_dead() {
        return Err(Status::BadCapability);
    }
    let charge = crate::kmem::Charge::new(&pd, 1)?;
    let page = crate::kmem::alloc_frame(&pd)?;
    if let Err(e) = pd.mem.map_kernel_page(&pd, utcb, page) {
        crate::kmem::free_frame(&pd, page);
        return Err(e);
    }
    let ec = crate::kmem::try_arc(Ec::new(
        charge,
        pd.clone(),
        cpu as usize,
        kind,
        evt,
        sp,
        page,
        utcb,
        Frame::user(0, sp),
    ))?;
    pd.add_ec(&ec)?;
    install(c, a.dst, KObj::Ec(ec))
}

#[inline(never)] // off the IPC path: the dispatcher's frame stays small
fn create_sc(c: &Ec, a: &args::CreateSc, cpu: &mut Cpu) -> Result<(), Status> {
    let pd = cap::<Pd>(c, a.pd, PdPerm::SC)?;
    let ec = cap::<Ec>(c, a.ec, EcPerm::BIND_SC)?;
    let (prio, quantum_us) = (a.prio, a.quantum_us);
    if prio == 0 || quantum_us == 0 || quantum_us > 10_000_000 {
        return Err(Status::BadParameter);
    }
    // No SC above the one the creator runs on: a component cannot outrank the
    // component that gave it its time (seL4's maximum controlled priority, taken from
    // the running SC).
    if prio > sched::current_prio(cpu) {
        return Err(Status::BadParameter);
    }
    if ec.kind == EcKind::Local {
        return Err(Status::BadCapability);
    }
    check_free(c, a.dst)?;
    use core::sync::atomic::Ordering;
    if ec.has_sc.swap(true, Ordering::AcqRel) {
        return Err(Status::BadCapability);
    }
    let charge = match crate::kmem::Charge::new(&pd, 1) {
        Ok(c) => c,
        Err(e) => {
            ec.has_sc.store(false, Ordering::Release);
            return Err(e);
        }
    };
    let ticks = quantum_us.saturating_mul(crate::arch::tsc_khz()) / 1000;
    let sc = match crate::kmem::try_arc(Sc::new(charge, ec.clone(), prio, ticks.max(1))) {
        Ok(sc) => sc,
        Err(e) => {
            ec.has_sc.store(false, Ordering::Release);
            return Err(e);
        }
    };
    if let Err(e) = install(c, a.dst, KObj::Sc(sc.clone())) {
        ec.has_sc.store(false, Ordering::Release);
        return Err(e);
    }
    sched::enqueue(sc, cpu);
    sched::preempt_if_needed(cpu);
    Ok(())
}

#[inline(never)] // off the IPC path: the dispatcher's frame stays small
fn create_pt(c: &Ec, a: &args::CreatePt) -> Result<(), Status> {
    let pd = cap::<Pd>(c, a.pd, PdPerm::PT)?;
    let ec = cap::<Ec>(c, a.ec, EcPerm::BIND_PT)?;
    if ec.kind != EcKind::Local {
        return Err(Status::BadCapability);
    }
    if !user_addr(a.ip) {
        return Err(Status::BadParameter);
    }
    check_free(c, a.dst)?;
    let charge = crate::kmem::Charge::new(&pd, 1)?;
    let pt = crate::kmem::try_arc(Pt::new(charge, ec, a.ip, a.mtd))?;
    install(c, a.dst, KObj::Pt(pt))
}

#[inline(never)] // off the IPC path: the dispatcher's frame stays small
fn create_sm(c: &Ec, a: &args::CreateSm) -> Result<(), Status> {
    let pd = cap::<Pd>(c, a.pd, PdPerm::SM)?;
    check_free(c, a.dst)?;
    let charge = crate::kmem::Charge::new(&pd, 1)?;
    install(
        c,
        a.dst,
        KObj::Sm(crate::kmem::try_arc(Sm::new(Some(charge), a.count))?),
    )
}

/// `ec_ctrl`: the capability is checked before the operation is decoded (a bad
/// capability with an undefined operation answers `BadCapability`).
fn ec_ctrl(c: &Ec, r: &Regs) -> Result<(), Status> {
    let ec = cap::<Ec>(c, HypercallWord(r[0]).sel(), EcPerm::CTRL)?;
    match arg::<args::EcCtrl>(r)?.op {
        EcCtrlOp::Recall => {
            ec.recall.store(true, core::sync::atomic::Ordering::Release);
            sched::kick(&ec);
            Ok(())
        }
    }
}

fn sc_ctrl(c: &Ec, a: &args::ScCtrl) -> Result<u64, Status> {
    let sc = cap::<Sc>(c, a.sc, ScPerm::CTRL)?;
    Ok(sc.time.load(core::sync::atomic::Ordering::Relaxed))
}

fn pt_ctrl(c: &Ec, a: &args::PtCtrl) -> Result<(), Status> {
    let pt = cap::<Pt>(c, a.pt, PtPerm::CTRL)?;
    pt.id.store(a.id, core::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `sm_ctrl`; `Ok(true)`: the running EC blocked on the semaphore (the caller
/// schedules once its own references are gone).
fn sm_ctrl(c: &Arc<Ec>, a: &args::SmCtrl, cpu: &mut Cpu) -> Result<bool, Status> {
    let SmOp::Down { zero, deadline } = a.op else {
        let sm = cap::<Sm>(c, a.sm, SmPerm::UP)?;
        sm.up(cpu);
        drop(sm);
        sched::preempt_if_needed(cpu);
        return Ok(false);
    };
    let sm = cap::<Sm>(c, a.sm, SmPerm::DOWN)?;
    if deadline != 0 && crate::arch::rdtsc() >= deadline {
        // Poll: take it if available, else time out at once.
        return match sm.down_nowait(zero) {
            true => Ok(false),
            false => Err(Status::Timeout),
        };
    }
    if deadline != 0 {
        // Room for the deadline first: once queued on the semaphore, the EC blocks.
        sched::reserve_timeout(cpu)?;
    }
    c.wait_gen
        .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    match sm.down(c, zero)? {
        Down::Acquired => Ok(false),
        Down::Blocked => {
            // The running EC on this CPU.
            c.local(cpu).waiting_on = Some(sm.clone());
            if deadline != 0 {
                sched::add_timeout(deadline, c.clone(), sm, cpu);
            }
            Ok(true)
        }
    }
}

fn assign_gsi(c: &Ec, a: &args::AssignGsi) -> Result<u64, Status> {
    let sm = cap::<Sm>(c, a.sm, SmPerm::DOWN)?;
    let gsi = sm.gsi().ok_or(Status::BadCapability)?;
    let cpu = a.cpu;
    if !crate::arch::cpu_online(cpu) {
        return Err(Status::BadCpu);
    }
    let fl = a.flags;
    // Messages are edge-triggered whatever the flags say.
    let level = fl & hypercall::gsi_flags::LEVEL != 0 && gsi.gsi < crate::irq::msi_base();
    sm.set_level(level);
    crate::irq::route_gsi(gsi.gsi, cpu as usize, fl)
}

/// `pd_ctrl`. The checks keep their order: the source capability, then (but for STAT)
/// the destination PD in argument 1, then the operation; an undefined operation answers
/// `BadParameter` only once both PDs have passed.
fn pd_ctrl(c: &Ec, r: &Regs) -> Result<u64, Status> {
    let src = cap::<Pd>(c, HypercallWord(r[0]).sel(), PdPerm::empty())?;
    let op = arg::<args::PdCtrl>(r).map(|a| a.op);
    let dst = match op {
        Ok(PdCtrlOp::Stat { item }) => return pd_stat(&src, item),
        Ok(PdCtrlOp::Delegate { dst_pd, .. } | PdCtrlOp::Quota { dst_pd, .. }) => dst_pd,
        Err(_) => r[1],
    };
    let dst = cap::<Pd>(c, dst, PdPerm::empty())?;
    if !dst.is_within(&c.pd) || dst.kernel || dst.is_dead() {
        return Err(Status::BadCapability);
    }
    if !src.kernel && !src.is_within(&c.pd) {
        return Err(Status::BadCapability);
    }
    match op? {
        PdCtrlOp::Delegate {
            src: s,
            dst: d,
            hotspot,
            flags,
            ..
        } => space::delegate(&src, &dst, s, d, hotspot, flags).map(|()| 0),
        PdCtrlOp::Quota { pages, .. } => {
            if src.kernel {
                return Err(Status::BadCapability);
            }
            let n = u32::try_from(pages).map_err(|_| Status::OutOfMemory)?;
            peregrine_core::quota::Quota::transfer(&src.quota, &dst.quota, n)
                .map(|()| 0)
                .map_err(|_| Status::OutOfMemory)
        }
        PdCtrlOp::Stat { item } => pd_stat(&src, item),
    }
}

/// `pd_ctrl` STAT: one figure of PD `pd` (see `peregrine_abi::hypercall::stat`).
fn pd_stat(pd: &Pd, item: u64) -> Result<u64, Status> {
    use peregrine_abi::hypercall::stat;
    match item {
        stat::QUOTA_AVAIL => Ok(u64::from(pd.quota.avail())),
        stat::QUOTA_TOTAL => Ok(u64::from(pd.quota.total())),
        _ if !pd.kernel => Err(Status::BadParameter),
        stat::POOL_FREE => {
            // Frames waiting for a shootdown are free in all but name.
            crate::tlb::reclaim_now();
            Ok(crate::mem::pool::stats().0 as u64)
        }
        stat::POOL_TOTAL => Ok(crate::mem::pool::stats().1 as u64),
        stat::HEAP_USED => Ok(crate::mem::heap::stats().0 as u64),
        stat::HEAP_MAPPED => Ok(crate::mem::heap::stats().1),
        stat::MDB_NODES => Ok(space::nodes()),
        _ => Err(Status::BadParameter),
    }
}
