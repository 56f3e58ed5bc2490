//! Hypercall bindings. See `hypervisor/abi/ABI.md` for the register convention.

use core::arch::asm;

use peregrine_abi::args::{self, EcCtrlOp, HcArgs, PdCtrlOp, SmOp};
use peregrine_abi::{Crd, Mtd, Status};

/// The raw results of a hypercall: status and two result words.
#[derive(Debug, Clone, Copy)]
pub struct Raw {
    /// Low byte of `rdi`.
    pub status: u8,
    /// `rsi`.
    pub out1: u64,
    /// `rdx`.
    pub out2: u64,
}

/// Issues a hypercall with raw arguments. Any argument values are allowed: the kernel
/// checks everything (the hostile test component relies on this).
#[inline(always)]
pub fn raw(word: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> Raw {
    let (st, o1, o2): (u64, u64, u64);
    // SAFETY: `syscall` enters the kernel, which preserves every register but rcx and
    // r11 (clobbered by syscall/sysret) and rdi/rsi/rdx (results); rax/r8/r9 are declared
    // clobbered as well to stay correct if that ever changes. The kernel never touches
    // this EC's memory except its UTCB, which the caller owns as a plain page.
    unsafe {
        asm!(
            "syscall",
            inlateout("rdi") word => st,
            inlateout("rsi") a1 => o1,
            inlateout("rdx") a2 => o2,
            inlateout("rax") a3 => _,
            inlateout("r8") a4 => _,
            inlateout("r9") a5 => _,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    Raw {
        status: st as u8,
        out1: o1,
        out2: o2,
    }
}

/// A hypercall that takes nothing but its first word (`call`, `reply`): the other
/// argument registers are neither set nor, since the kernel preserves them, clobbered
/// (the IPC path's own stub, as short as libsel4's).
#[inline(always)]
fn word_only(word: u64) -> Raw {
    let (st, o1, o2): (u64, u64, u64);
    // SAFETY: as in `raw`: the kernel preserves every register but rcx and r11
    // (clobbered by syscall/sysret) and rdi/rsi/rdx (results), and touches no memory of
    // this EC but its UTCB.
    unsafe {
        asm!(
            "syscall",
            inlateout("rdi") word => st,
            lateout("rsi") o1,
            lateout("rdx") o2,
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    Raw {
        status: st as u8,
        out1: o1,
        out2: o2,
    }
}

/// Issues the hypercall `a` describes (its registers packed by `peregrine_abi::args`).
#[inline(always)]
fn hc<A: HcArgs>(a: A) -> Raw {
    let r = a.to_regs();
    raw(r[0], r[1], r[2], r[3], r[4], r[5])
}

#[inline(always)]
fn st(r: Raw) -> Result<(), Status> {
    Status::from_raw(r.status)
        .unwrap_or(Status::BadHypercall)
        .into_result()
}

/// Calls portal `pt`: the UTCB message goes to the handler, its reply comes back in the
/// UTCB.
#[inline(always)]
pub fn call(pt: u64) -> Result<(), Status> {
    let a = args::Call {
        pt,
        non_blocking: false,
    };
    st(word_only(a.to_regs()[0]))
}

/// Like [`call`] but fails with `Timeout` instead of waiting for a busy handler.
pub fn call_nonblocking(pt: u64) -> Result<(), Status> {
    st(hc(args::Call {
        pt,
        non_blocking: true,
    }))
}

/// Replies to the current caller with the message in the UTCB. A portal handler ends
/// with this; it does not return (the next call starts the handler afresh).
#[inline(always)]
pub fn reply() -> ! {
    word_only(args::Reply.to_regs()[0]);
    // The kernel only comes back here when there was no caller to reply to.
    loop {
        core::hint::spin_loop();
    }
}

/// Creates a PD at `dst`, carving `quota` pages of kernel memory out of `parent`'s.
pub fn create_pd(dst: u64, parent: u64, quota: u64, vm: bool) -> Result<(), Status> {
    st(hc(args::CreatePd {
        dst,
        parent,
        quota,
        vm,
    }))
}

/// What kind of EC to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcKind {
    /// A portal handler: runs only when called.
    Local,
    /// A thread with its own SC.
    Global,
    /// A virtual CPU.
    Vcpu,
}

/// Creates an EC at `dst` in PD `pd` on `cpu`, with its UTCB at `utcb` (in `pd`), stack
/// pointer `sp` and event base `evt`.
pub fn create_ec(
    dst: u64,
    pd: u64,
    kind: EcKind,
    cpu: u64,
    utcb: u64,
    sp: u64,
    evt: u64,
) -> Result<(), Status> {
    st(hc(args::CreateEc {
        dst,
        pd,
        cpu,
        utcb,
        sp,
        evt,
        global: kind != EcKind::Local,
        vcpu: kind == EcKind::Vcpu,
    }))
}

/// Creates an SC at `dst` for global EC `ec` with priority `prio` and quantum in µs.
pub fn create_sc(dst: u64, pd: u64, ec: u64, prio: u8, quantum_us: u64) -> Result<(), Status> {
    st(hc(args::CreateSc {
        dst,
        pd,
        ec,
        prio,
        quantum_us,
    }))
}

/// Creates a portal at `dst` to local EC `ec`, entering at `ip` with state `mtd`.
pub fn create_pt(dst: u64, pd: u64, ec: u64, mtd: Mtd, ip: u64) -> Result<(), Status> {
    st(hc(args::CreatePt {
        dst,
        pd,
        ec,
        mtd,
        ip,
    }))
}

/// Creates a semaphore at `dst` with an initial count.
pub fn create_sm(dst: u64, pd: u64, count: u64) -> Result<(), Status> {
    st(hc(args::CreateSm { dst, pd, count }))
}

/// Revokes `crd` from the caller's children (and from the caller if `own`).
pub fn revoke(crd: Crd, own: bool) -> Result<(), Status> {
    st(hc(args::Revoke { crd, own }))
}

/// Looks up what covers the first item of `crd`; the null CRD when nothing does.
pub fn lookup(crd: Crd) -> Result<Crd, Status> {
    let r = hc(args::Lookup { crd, phys: false });
    st(r).map(|()| Crd(r.out1))
}

/// The physical address of the page at the base of memory CRD `crd` in the caller's
/// space: where a device reaches it by DMA.
pub fn lookup_phys(crd: Crd) -> Result<u64, Status> {
    let r = hc(args::Lookup { crd, phys: true });
    st(r).map(|()| r.out1)
}

/// Recalls EC `ec`.
pub fn ec_recall(ec: u64) -> Result<(), Status> {
    st(hc(args::EcCtrl {
        ec,
        op: EcCtrlOp::Recall,
    }))
}

/// The time SC `sc` has consumed, in TSC ticks.
pub fn sc_time(sc: u64) -> Result<u64, Status> {
    let r = hc(args::ScCtrl { sc });
    st(r).map(|()| r.out1)
}

/// Sets the identifier portal `pt` passes to its handler.
pub fn pt_ctrl(pt: u64, id: u64) -> Result<(), Status> {
    st(hc(args::PtCtrl { pt, id }))
}

/// Semaphore up.
pub fn sm_up(sm: u64) -> Result<(), Status> {
    st(hc(args::SmCtrl { sm, op: SmOp::Up }))
}

/// Semaphore down; `deadline` is an absolute TSC value (0: wait forever). `zero`
/// consumes the whole count.
pub fn sm_down(sm: u64, zero: bool, deadline: u64) -> Result<(), Status> {
    st(hc(args::SmCtrl {
        sm,
        op: SmOp::Down { zero, deadline },
    }))
}

/// Routes the GSI behind interrupt semaphore `sm` to `cpu`; for a message-signalled GSI
/// the answer packs the MSI address and data (`hypercall::msi_address`/`msi_data`).
pub fn assign_gsi(sm: u64, cpu: u64, flags: u64) -> Result<u64, Status> {
    let r = hc(args::AssignGsi { sm, cpu, flags });
    st(r).map(|()| r.out1)
}

/// Delegates `src` of PD `src_pd` into the window `dst` of PD `dst_pd` (at `hotspot`),
/// with typed-item `flags` (e.g. `XferFlags::GUEST`).
pub fn pd_delegate(
    src_pd: u64,
    dst_pd: u64,
    src: Crd,
    dst: Crd,
    hotspot: u64,
    flags: peregrine_abi::XferFlags,
) -> Result<(), Status> {
    st(hc(args::PdCtrl {
        src: src_pd,
        op: PdCtrlOp::Delegate {
            dst_pd,
            src,
            dst,
            hotspot,
            flags,
        },
    }))
}

/// Moves `pages` of kernel-memory quota from `src_pd` to `dst_pd`.
pub fn pd_quota(src_pd: u64, dst_pd: u64, pages: u64) -> Result<(), Status> {
    st(hc(args::PdCtrl {
        src: src_pd,
        op: PdCtrlOp::Quota { dst_pd, pages },
    }))
}

/// Reads figure `item` (`peregrine_abi::hypercall::stat`) of PD `pd`: its quota, or
/// on the kernel PD the kernel's memory.
pub fn pd_stat(pd: u64, item: u64) -> Result<u64, Status> {
    let r = hc(args::PdCtrl {
        src: pd,
        op: PdCtrlOp::Stat { item },
    });
    st(r).map(|()| r.out1)
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; CR4.TSD is clear so it works in ring 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}
