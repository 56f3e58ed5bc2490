//! Virtual CPUs: one backend-neutral interface over Intel VT-x with EPT ([`vmx`]) and
//! AMD SVM with nested paging ([`svm`]).
//!
//! A vCPU is an EC of kind [`EcKind::Vcpu`] in a VM PD, with its own SC. Where a thread
//! returns to user mode (`sched::ret_to`), a vCPU enters its guest ([`resume`]): on a
//! fresh kernel stack, with its FPU state loaded and the guest's XCR0, after a guest-TLB
//! flush when its VM's guest-physical table lost mappings since its last entry. An exit
//! is mapped onto the backend-neutral event numbers (`peregrine_abi::event::vcpu`, the
//! VMX basic exit reasons) and delivered as a call to the portal at event base + number
//! *in the VM PD's object space*, with the state the portal's MTD selects
//! ([`get_state`]); the reply writes state back under the reply MTD ([`put_state`]),
//! validated field by field. A value the kernel refuses is left unchanged and the vCPU's
//! next event is INVALID_STATE; so is a VM entry the processor refuses.
//!
//! Whatever the VMM asks for, every vCPU intercepts #DB and #AC (delivered to the VMM,
//! which reflects them: an exception that re-raises itself during its own delivery then
//! exits each time instead of holding the CPU), #MC (the host's: the kernel takes it),
//! and every debug-register access (the kernel's lazy switch of DR0–DR3: [`Dr`]); no
//! guest may set CR4.PKE (PKRU is not switched).
//!
//! Host interrupts and NMIs always exit the guest; the kernel takes them after the exit
//! (a short interrupt window) and then runs the scheduler, which preempts the vCPU at
//! the end of its quantum like any thread. `ec_ctrl` recall sets the flag and sends an
//! IPI; the vCPU exits and delivers RECALL before it enters the guest again.
//!
//! Which backend runs is decided once at boot (VMX where the CPU offers VMX with EPT
//! and unrestricted guest, else SVM with NPT); both fill the same UTCB layout.

mod svm;
mod vmx;

use alloc::sync::Arc;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use peregrine_abi::event::VcpuEvent as Ev;
use peregrine_abi::hip::{Features, MAX_CPUS};
use peregrine_abi::utcb::{inj, ArchState, Segment};
use peregrine_abi::{Mtd, Status};

use crate::cpu::{Cpu, Ecs};
use crate::ec::{Ec, EcKind};
use crate::frame::Frame;
use crate::pd::Pd;
use crate::sched;

/// The backend-neutral state of a vCPU, touched only by its CPU with interrupts off.
struct Common {
    xcr0: u64,
    ctrl: [u64; 2],
    qual: [u64; 2],
    inst_len: u64,
    /// The VM's guest-TLB flush generation this vCPU has flushed for.
    flush_seen: u64,
    /// The last reply carried a value the kernel refused.
    invalid: bool,
    /// The VMM wrote state the backend's entry checks depend on (`CHECKED`) since they
    /// last passed: they run before the next entry. State the guest itself exited with
    /// was consistent for the processor, which entered it.
    check: bool,
    /// An event that must reach the VMM before the guest runs again (set before the
    /// delivery, cleared when the handler gets it: a busy handler delays it).
    pending: Option<u64>,
    /// The guest's debug registers that the hardware does not switch.
    dr: Dr,
}

/// A vCPU's DR0–DR3 (and on VT-x DR6), which neither VT-x nor SVM switches between
/// guest and host (DR7 is in the VMCS or VMCB, and SVM's VMCB holds DR6 too).
///
/// Kept lazily, the way KVM does: every access of the guest to a debug register
/// exits (MOV-DR exiting, SVM's DR intercepts), and the kernel handles that exit
/// itself ([`Dr::accessed`]): it turns the intercept off and lets the instruction run
/// again with the guest's registers loaded; at the next exit it saves them and turns
/// the intercept on again. A guest that never touches its debug registers costs one
/// test per entry and exit. While the guest's DR7 enables a breakpoint, DR0–DR3 are
/// loaded at every entry too, so that its breakpoints (and only its) fire in it.
#[derive(Clone, Copy)]
struct Dr {
    /// DR0–DR3 (saved at the exit after a [`LIVE`](Self::LIVE) run).
    db: [u64; 4],
    /// DR6 (VT-x only; saved likewise). The kernel applies a #DB's conditions here
    /// (see `vmx::debug_exit`).
    dr6: u64,
    /// [`Dr::LIVE`], [`Dr::ARMED`]: one byte, so that a guest that uses neither costs
    /// one test per entry and one per exit.
    state: u8,
}

impl Dr {
    /// The access intercept is off: the guest's registers are loaded at entry and saved
    /// at the exit.
    const LIVE: u8 = 1;
    /// The guest's DR7 enables a breakpoint: DR0–DR3 are loaded at every entry.
    const ARMED: u8 = 2;

    const fn new() -> Self {
        Dr {
            db: [0; 4],
            dr6: crate::arch::x86::dr::DR6_INIT,
            state: 0,
        }
    }

    /// Before an entry: loads the guest's DR0–DR3 if it can use them (and its DR6 if
    /// it can read it, on VT-x: `with_dr6`).
    #[inline(always)]
    fn enter(&self, with_dr6: bool) {
        if self.state != 0 {
            self.load(with_dr6);
        }
    }

    #[cold]
    fn load(&self, with_dr6: bool) {
        use crate::arch::x86::dr;
        // SAFETY: the host enables no breakpoint (DR7 is 0x400 outside guests), so the
        // guest's addresses matter only in the guest; DR6 holds bits 0–31 only
        // (`put_state` refuses more, the kernel's own values have none).
        unsafe {
            dr::write_db(self.db);
            if with_dr6 && self.live() {
                dr::write_dr6(self.dr6 & 0xffff_ffff);
            }
        }
    }

    /// After an exit: whether the guest ran with its registers live (then the caller
    /// saves them with [`Dr::save`] and turns the intercept on again).
    #[inline(always)]
    fn live(&self) -> bool {
        self.state & Self::LIVE != 0
    }

    /// Saves the guest's registers after a live run; `dr7` is the guest's DR7.
    #[cold]
    fn save(&mut self, with_dr6: bool, dr7: u64) {
        use crate::arch::x86::dr;
        self.db = dr::read_db();
        if with_dr6 {
            self.dr6 = dr::read_dr6();
        }
        self.state = 0;
        self.set_dr7(dr7);
    }

    /// The guest accessed a debug register (an exit the kernel handles): the caller
    /// turns the intercept off and enters the guest again, which repeats the access.
    fn accessed(&mut self) {
        self.state |= Self::LIVE;
    }

    /// The guest's DR7 is `dr7` (the VMM wrote it, or the guest did while live).
    fn set_dr7(&mut self, dr7: u64) {
        if dr7 & crate::arch::x86::dr::DR7_ENABLED != 0 {
            self.state |= Self::ARMED;
        } else {
            self.state &= !Self::ARMED;
        }
    }
}

enum Hw {
    Svm(svm::Vcpu),
    Vmx(vmx::Vcpu),
}

/// The virtual-CPU part of a vCPU EC.
pub struct Vcpu {
    pd: Arc<Pd>,
    cpu: usize,
    common: UnsafeCell<Common>,
    /// The kernel's copy of a reply's state: [`put_state`] validates and applies only
    /// this copy, never the UTCB, which other threads of the VMM may change meanwhile.
    /// Only what the reply's MTD selects is copied; the rest is stale and unread.
    reply: UnsafeCell<ArchState>,
    hw: Hw,
}

/// The CPU-local state of a vCPU, borrowed from its CPU's token ([`Vcpu::parts`]).
struct Parts<'a> {
    common: &'a mut Common,
    /// The reply copy (see [`Vcpu::reply`]).
    reply: &'a mut ArchState,
    hw: HwMut<'a>,
}

/// The backend's part of a vCPU with its CPU-local state.
enum HwMut<'a> {
    Svm(&'a svm::Vcpu, &'a mut svm::State),
    Vmx(&'a vmx::Vcpu, &'a mut vmx::State),
}

impl Vcpu {
    /// The vCPU's CPU-local state (the common part, the reply copy, the backend's),
    /// through its CPU's token.
    #[inline(always)]
    fn parts<'a>(&'a self, _: &'a mut Ecs) -> Parts<'a> {
        debug_assert_eq!(self.cpu, crate::platform::percpu::cpu_id());
        let hw = match &self.hw {
            // SAFETY: as below, for the backend's cell.
            Hw::Svm(s) => HwMut::Svm(s, unsafe { &mut *s.state_ptr() }),
            // SAFETY: as below, for the backend's cell.
            Hw::Vmx(x) => HwMut::Vmx(x, unsafe { &mut *x.state_ptr() }),
        };
        // SAFETY: the token proves this CPU runs in the kernel with interrupts off, and
        // a vCPU's state is touched only by the CPU it is bound to, like its EC's (see
        // `ec`); borrowing the token for `'a` excludes every other reference to this
        // CPU's EC state meanwhile. The cells are distinct.
        let (common, reply) = unsafe { (&mut *self.common.get(), &mut *self.reply.get()) };
        Parts { common, reply, hw }
    }

    /// The common part of the vCPU's CPU-local state, through its CPU's token.
    #[inline(always)]
    fn common<'a>(&'a self, _: &'a mut Ecs) -> &'a mut Common {
        // SAFETY: as in `parts`, for the common cell alone.
        unsafe { &mut *self.common.get() }
    }
}

/// Which backend runs vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No hardware virtualization.
    None = 0,
    /// AMD SVM with nested paging.
    Svm = 1,
    /// Intel VT-x with EPT and unrestricted guest.
    Vmx = 2,
}

static BACKEND: spin::Once<Backend> = spin::Once::new();

/// The backend (decided by the first CPU that asks; CPUs are assumed alike).
pub fn backend() -> Backend {
    *BACKEND.call_once(|| {
        if crate::arch::x86::vmx::caps().is_some() {
            Backend::Vmx
        } else if crate::arch::x86::svm::caps().is_some() {
            Backend::Svm
        } else {
            Backend::None
        }
    })
}

// Architectural bits both backends check in the state a VMM writes back.
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// VME..UMIP, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP. Not PKE: the kernel does not switch
/// PKRU, which a guest with CR4.PKE could read and set for the next guest with it.
const CR4_OK: u64 = 0x0037_0fff;
/// CR4.PKE.
const CR4_PKE: u64 = 1 << 22;
/// RFLAGS bits a guest may hold (bit 1 is forced on).
const RFLAGS_OK: u64 = 0x003f_7fd5;

/// Exceptions every vCPU intercepts, whatever its VMM asks for in `ctrl[1]`: #DB (1)
/// and #AC (17), whose delivery can raise them again (a #DB on a breakpoint the
/// delivery's own stack writes hit, an #AC on a misaligned stack at CPL 3), which the
/// processor would repeat inside itself, never taking an interrupt, holding its CPU
/// (CVE-2015-8104, CVE-2015-5307); intercepted, each repetition exits. They go to the
/// VMM as EXCEPTION events (which reflects them). #MC (18) is the host's: the kernel
/// takes it, the VMM never sees it ([`machine_check`]).
const FORCED_EXC: u32 = (1 << 1) | (1 << 17) | (1 << 18);

/// A machine check that arrived while a guest ran (intercepted: `FORCED_EXC`): it is
/// the host's, handled as the kernel handles one in user mode (it has no recovery to
/// offer): logged, then the scheduler runs and the vCPU enters its guest again.
fn machine_check() -> Next {
    crate::kprintln!(
        "cpu {}: machine check while a guest ran",
        crate::platform::percpu::cpu_id()
    );
    Next::Interrupt
}

/// The MTD groups whose state lies at or after `ArchState::qual` (see [`put_state`]).
const TAIL: Mtd = Mtd::all()
    .difference(Mtd::GPRS)
    .difference(Mtd::GPR_R8_R15)
    .difference(Mtd::RIP_LEN)
    .difference(Mtd::RFLAGS)
    .difference(Mtd::INJ)
    .difference(Mtd::STA);
/// The groups a backend's `get_state`/`put_state` handles after the common ones
/// (GPRs, RIP, RFLAGS, injection, interruptibility): most exits select none of them.
const RARE: Mtd = TAIL.difference(Mtd::QUAL).difference(Mtd::XSAVE);
/// Reply groups both backends take back in one pass straight from the VMM's UTCB
/// (`put_simple`): what the common exits' replies select.
const SIMPLE: Mtd = Mtd::GPRS.union(Mtd::RIP_LEN).union(Mtd::RFLAGS);
/// Reply groups whose state the backend's entry checks depend on (CR0, CR4, EFER, CS,
/// SS, RFLAGS, injection): without them the state the guest exited with enters again
/// unchecked.
const CHECKED: Mtd = Mtd::CR
    .union(Mtd::EFER)
    .union(Mtd::CS_SS)
    .union(Mtd::RFLAGS)
    .union(Mtd::INJ)
    .union(Mtd::CTRL);

struct Held(UnsafeCell<Option<Arc<Pd>>>);
// SAFETY: each CPU's slot is used only by that CPU with interrupts off.
unsafe impl Sync for Held {}
/// Per CPU: the PD whose host page table stays loaded while a vCPU runs.
static HELD: [Held; MAX_CPUS] = [const { Held(UnsafeCell::new(None)) }; MAX_CPUS];

/// Print every VM entry and exit (kernel command line `trace_vm`).
static TRACE: AtomicBool = AtomicBool::new(false);

fn trace() -> bool {
    TRACE.load(Ordering::Relaxed)
}

/// Enables hardware virtualization on this CPU at bring-up (the backend is decided
/// once, by whichever CPU asks first: see `backend`).
pub fn init_cpu(cpu: usize) {
    if cpu == 0 && crate::platform::multiboot::info().has_arg("trace_vm") {
        TRACE.store(true, Ordering::Relaxed);
    }
    match backend() {
        Backend::Svm => svm::init_cpu(cpu),
        Backend::Vmx => vmx::init_cpu(cpu),
        Backend::None => {}
    }
}

/// Whether VM PDs can be created (some CPU runs vCPUs).
pub fn available() -> bool {
    match backend() {
        Backend::Svm => crate::arch::x86::svm::enabled(),
        Backend::Vmx => crate::arch::x86::vmx::enabled(),
        Backend::None => false,
    }
}

/// The HIP's feature bits: the CPU's, with the virtualization bits only of the backend
/// that runs vCPUs (none if neither is usable).
pub fn hip_features(cpu: Features) -> Features {
    let vmx = Features::VMX | Features::EPT | Features::VPID | Features::UG;
    let svm = Features::SVM | Features::NPT | Features::NRIPS;
    match (backend(), available()) {
        (Backend::Vmx, true) => cpu - svm,
        (Backend::Svm, true) => cpu - vmx,
        _ => cpu - vmx - svm,
    }
}

/// The page-table format of guest-physical spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestFormat {
    /// AMD nested page tables.
    Npt,
    /// Intel EPT with 2 MiB and 1 GiB leaves.
    Ept,
    /// Intel EPT without 1 GiB leaves.
    Ept2M,
    /// Intel EPT with 4 KiB leaves only.
    Ept4K,
}

/// The format guest-physical tables are built in.
pub fn guest_format() -> GuestFormat {
    match backend() {
        Backend::Vmx => {
            let c = crate::arch::x86::vmx::info();
            if !c.ept_2m() {
                GuestFormat::Ept4K
            } else if !c.ept_1g() {
                GuestFormat::Ept2M
            } else {
                GuestFormat::Ept
            }
        }
        _ => GuestFormat::Npt,
    }
}

/// Whether `a` is a canonical address.
fn canonical(a: u64) -> bool {
    ((a << 16) as i64 >> 16) as u64 == a
}

/// A segment the VMM may write: canonical base, attributes within 12 bits.
fn seg_ok(s: &Segment) -> bool {
    canonical(s.base) && s.ar & 0xf000 == 0
}

/// A PAT whose entries are all valid memory types.
fn pat_ok(p: u64) -> bool {
    p.to_le_bytes()
        .iter()
        .all(|b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// An XCR0 the guest may have: x87, a subset of the host's, AVX only with SSE.
fn xcr0_ok(x: u64) -> bool {
    let host = crate::arch::x86::cpu::info().xsave.unwrap_or(3);
    x & 1 != 0 && x & !host == 0 && (x & 4 == 0 || x & 2 != 0)
}

/// Checks a VMX-format injection request (without the window bits); returns
/// `(vector, type, error-code valid)`.
fn injection(info: u64) -> Option<(u64, u64, bool)> {
    if info & 0x7fff_f000 != 0 || info >> 32 != 0 {
        return None;
    }
    let vector = info & 0xff;
    let ty = (info >> 8) & 7;
    let ev = info & inj::ERROR_VALID != 0;
    match ty {
        0 | 4 => {}
        2 if vector == 2 => {}
        3 | 5 | 6 if vector < 32 && vector != 2 => {}
        _ => return None,
    }
    if ev && ty != 3 {
        return None;
    }
    Some((vector, ty, ev))
}

/// `create_ec` with the vCPU flag: a vCPU on `cpu` in VM PD `pd` with event base `evt`
/// (selectors of `pd`'s object space).
pub fn create(pd: &Arc<Pd>, cpu: usize, evt: u64) -> Result<Arc<Ec>, Status> {
    let Some(g) = pd.guest.as_ref() else {
        return Err(Status::BadParameter);
    };
    if evt
        .checked_add(Ev::Recall as u64)
        .is_none_or(|e| e >= crate::pd::SEL_NUM)
    {
        return Err(Status::BadParameter);
    }
    let hw = match backend() {
        Backend::Svm if crate::arch::x86::svm::enabled_on(cpu) => Hw::Svm(svm::create(pd, g)?),
        Backend::Vmx if crate::arch::x86::vmx::enabled_on(cpu) => Hw::Vmx(vmx::create(pd, g)?),
        _ => return Err(Status::BadFeature),
    };
    let charge = match crate::kmem::Charge::new(pd, 1) {
        Ok(c) => c,
        Err(e) => {
            drop(Vcpu {
                pd: pd.clone(),
                cpu,
                common: UnsafeCell::new(new_common(0)),
                reply: UnsafeCell::new(ArchState::default()),
                hw,
            });
            return Err(e);
        }
    };
    let mut ec = Ec::new(
        charge,
        pd.clone(),
        cpu,
        EcKind::Vcpu,
        evt,
        0,
        0,
        0,
        Frame::default(),
    );
    ec.vcpu = Some(crate::kmem::try_box(Vcpu {
        pd: pd.clone(),
        cpu,
        common: UnsafeCell::new(new_common(g.flush_gen.load(Ordering::Acquire))),
        reply: UnsafeCell::new(ArchState::default()),
        hw,
    })?);
    crate::kmem::try_arc(ec)
}

fn new_common(flush_seen: u64) -> Common {
    Common {
        xcr0: 1,
        ctrl: [0; 2],
        qual: [0; 2],
        inst_len: 0,
        flush_seen,
        invalid: false,
        check: true,
        pending: None,
        dr: Dr::new(),
    }
}

/// Makes `ec` this CPU's current EC, keeping the host address space that stays loaded
/// alive (a vCPU has none of its own).
#[inline(always)]
fn make_current(ec: &Arc<Ec>, cpu: &mut Cpu) {
    let l = sched::local(cpu);
    // SAFETY: this CPU's slot, used only by this CPU through its token (borrowed here
    // as `l`, so no other reference to the slot is alive).
    let held = unsafe { &mut *HELD[l.cpu()].0.get() };
    if l.space != 0 && held.as_ref().is_none_or(|p| p.id != l.space) {
        match &l.current {
            Some(cur) if cur.pd.id == l.space => *held = Some(cur.pd.clone()),
            _ => {
                crate::arch::load_kernel_space();
                l.space = 0;
            }
        }
    }
    if !l.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, ec)) {
        l.current = Some(ec.clone());
    }
}

/// The first dispatch of a vCPU: its STARTUP event.
pub fn startup(ec: Arc<Ec>, cpu: &mut Cpu) -> ! {
    make_current(&ec, cpu);
    deliver(ec, Ev::Startup, cpu)
}

/// Delivers `event` of vCPU `ec` to its VMM's portal (in line: the number the
/// callers pass is mostly a constant, which the conversion then folds into).
#[inline(always)]
fn deliver(ec: Arc<Ec>, event: Ev, cpu: &mut Cpu) -> ! {
    deliver_nr(ec, event as u64, cpu)
}

/// [`deliver`] with the event's number: its portal's offset from the event base (and
/// the number the UTCB carries).
fn deliver_nr(ec: Arc<Ec>, nr: u64, cpu: &mut Cpu) -> ! {
    // The common case first: an idle handler on this CPU (nothing pending then).
    let ec = crate::fastpath::vcpu_event(ec, nr, cpu);
    if let Some(v) = ec.vcpu.as_deref() {
        v.common(cpu).pending = Some(nr);
    }
    crate::ipc::event(ec, nr, cpu)
}

/// Enters the guest of vCPU `ec` (from `sched::ret_to`): on a fresh kernel stack, so
/// that the exit → schedule → resume cycle does not nest.
pub fn resume(ec: Arc<Ec>) -> ! {
    let p = Arc::into_raw(ec);
    // SAFETY: every kernel path ends in a non-returning switch, so nothing on the kernel
    // stack is live; `entry` takes over the reference `p` carries.
    unsafe { crate::sched::on_fresh_stack!(entry, p as usize) }
}

extern "C" fn entry(p: usize) -> ! {
    let p = p as *const Ec;
    // SAFETY: `p` came from `Arc::into_raw` in `resume`.
    let ec = unsafe { Arc::from_raw(p) };
    // SAFETY: a kernel entry of its own: on this CPU's fresh kernel stack with
    // interrupts off; whoever held a token here before has diverged (`resume`).
    run(ec, &mut unsafe { Cpu::enter() })
}

/// What an exit asks for. (A tag of its own, not a niche of the event's: the exit paths
/// then hand each event straight to `deliver`, whose number folds into a constant.)
#[repr(u8)]
enum Next {
    /// Deliver this event to the VMM.
    Event(Ev),
    /// A host interrupt or NMI, or an exit the kernel handled itself: take pending
    /// interrupts, then schedule (which enters the guest again, unless another EC is
    /// due).
    Interrupt,
}

/// The guest-TLB flush generation of `ec`'s VM.
fn flush_gen(ec: &Ec) -> u64 {
    ec.pd
        .guest
        .as_ref()
        .map_or(0, |g| g.flush_gen.load(Ordering::Acquire))
}

/// Loads the guest's XCR0 if it differs from the host's; returns the host's to restore.
#[inline(always)]
fn enter_xcr0(xcr0: u64) -> Option<u64> {
    let host = crate::arch::x86::cpu::host_xcr0();
    if host == xcr0 || host == 0 {
        return None;
    }
    // SAFETY: CR4.OSXSAVE is set (host XSAVE); `put_state` admits only an XCR0 with x87
    // set and a subset of the host's components (`xcr0_ok`).
    unsafe { crate::arch::x86::cr::write_xcr0(xcr0) };
    Some(host)
}

/// Restores the host's XCR0 after [`enter_xcr0`].
#[inline(always)]
fn leave_xcr0(host: Option<u64>) {
    if let Some(h) = host {
        // SAFETY: restores the kernel's own XCR0.
        unsafe { crate::arch::x86::cr::write_xcr0(h) };
    }
}

pub fn run(ec: Arc<Ec>, cpu: &mut Cpu) -> ! {
    make_current(&ec, cpu);
    let Some(v) = ec.vcpu.as_deref() else {
        crate::ipc::stop(ec, cpu);
    };
    let c = v.common(cpu);
    if let Some(nr) = c.pending {
        crate::ipc::event(ec, nr, cpu);
    }
    // A refused reply makes INVALID_STATE the next event, before a pending recall.
    if core::mem::take(&mut c.invalid) {
        deliver(ec, Ev::InvalidState, cpu);
    }
    if ec.recall.swap(false, Ordering::AcqRel) {
        deliver(ec, Ev::Recall, cpu);
    }
    crate::fpu::load_for_guest(&ec);
    let p = v.parts(cpu);
    let next = match p.hw {
        HwMut::Svm(s, st) => svm::run(&ec, s, st, p.common),
        HwMut::Vmx(x, st) => vmx::run(&ec, x, st, p.common),
    };
    match next {
        Next::Event(nr) => deliver(ec, nr, cpu),
        Next::Interrupt => {
            interrupt_window(cpu);
            drop(ec);
            sched::preempt_if_needed(cpu);
            sched::schedule()
        }
    }
}

/// Takes the host interrupts pending since the exit, lending the token to their
/// handlers (no borrow of it is alive across the window).
#[inline(always)]
fn interrupt_window(_: &mut Cpu) {
    crate::arch::x86::cr::interrupt_window();
}

/// Writes the state `mtd` selects from vCPU `ec` into a handler's UTCB (inline: its
/// one caller is the event path).
#[inline(always)]
pub fn get_state(ec: &Ec, mtd: Mtd, vector: u64, a: &mut ArchState, ecs: &mut Ecs) {
    let Some(v) = ec.vcpu.as_deref() else {
        return;
    };
    // The vCPU is bound to this CPU and does not run (it is delivering).
    v.common(ecs).pending = None;
    if vector == Ev::Startup as u64 {
        ec.local(ecs).started = true;
    }
    let c = v.common(ecs);
    a.mtd = mtd;
    if mtd.contains(Mtd::RIP_LEN) {
        a.inst_len = c.inst_len;
    }
    if mtd.contains(Mtd::QUAL) {
        a.qual = c.qual;
    }
    if mtd.contains(Mtd::CTRL) {
        a.ctrl = c.ctrl;
    }
    if mtd.contains(Mtd::XSAVE) {
        a.xcr0 = c.xcr0;
    }
    let p = v.parts(ecs);
    match p.hw {
        HwMut::Svm(s, st) => svm::get_state(s, st, mtd, a),
        HwMut::Vmx(x, st) => vmx::get_state(x, st, p.common, mtd, a),
    }
}

/// Takes back the state a VMM's reply selects, validating every value: a value that
/// would make the VM entry fail or harm the host is not written, and the vCPU's next
/// event is INVALID_STATE. In line: the common replies take the short way.
#[inline(always)]
pub fn put_state(ec: &Ec, utcb: &ArchState, ecs: &mut Ecs) {
    let Some(v) = ec.vcpu.as_deref() else {
        return;
    };
    let mtd = utcb.mtd;
    // The vCPU is bound to this CPU and waits for this reply.
    if SIMPLE.contains(mtd) {
        let p = v.parts(ecs);
        let c = p.common;
        // The common replies (CPUID, port I/O, MMIO: registers and RIP) go straight
        // from the UTCB, each value read once.
        let ok = match p.hw {
            HwMut::Svm(s, st) => svm::put_simple(s, st, utcb, mtd),
            HwMut::Vmx(x, st) => vmx::put_simple(x, st, utcb, mtd),
        };
        if mtd.intersects(CHECKED) {
            c.check = true;
        }
        if !ok {
            c.invalid = true;
        }
        return;
    }
    put_full(v.parts(ecs), utcb, mtd)
}

/// [`put_state`] for replies beyond [`SIMPLE`]: `mtd` is `utcb.mtd`, read once.
#[inline(always)]
fn put_full(p: Parts<'_>, utcb: &ArchState, mtd: Mtd) {
    let (c, a) = (p.common, p.reply);
    // What the MTD (read once) selects: the common groups one by one, the rest (at and
    // after `qual`) in one piece.
    a.mtd = mtd;
    if mtd.contains(Mtd::GPR_ACDB) {
        a.gpr[0..4].copy_from_slice(&utcb.gpr[0..4]);
    }
    if mtd.contains(Mtd::RSP) {
        a.gpr[4] = utcb.gpr[4];
    }
    if mtd.contains(Mtd::GPR_BSD) {
        a.gpr[5..8].copy_from_slice(&utcb.gpr[5..8]);
    }
    if mtd.contains(Mtd::GPR_R8_R15) {
        a.gpr[8..16].copy_from_slice(&utcb.gpr[8..16]);
    }
    if mtd.contains(Mtd::RIP_LEN) {
        a.rip = utcb.rip;
    }
    if mtd.contains(Mtd::RFLAGS) {
        a.rflags = utcb.rflags;
    }
    if mtd.contains(Mtd::INJ) {
        (a.inj_info, a.inj_error) = (utcb.inj_info, utcb.inj_error);
    }
    if mtd.contains(Mtd::STA) {
        (a.intr_state, a.actv_state) = (utcb.intr_state, utcb.actv_state);
    }
    if mtd.intersects(TAIL) {
        const HEAD: usize = core::mem::offset_of!(ArchState, qual);
        let src = utcb as *const ArchState as *const u8;
        let dst = a as *mut ArchState as *mut u8;
        // SAFETY: both are whole `ArchState`s (plain integers); the bytes from `qual` on.
        unsafe {
            core::ptr::copy_nonoverlapping(
                src.add(HEAD),
                dst.add(HEAD),
                core::mem::size_of::<ArchState>() - HEAD,
            )
        };
    }
    let a: &ArchState = a;
    let mut bad = false;
    if a.mtd.intersects(CHECKED) {
        c.check = true;
    }
    if a.mtd.contains(Mtd::XSAVE) {
        if xcr0_ok(a.xcr0) {
            c.xcr0 = a.xcr0;
        } else {
            bad = true;
        }
    }
    bad |= match p.hw {
        HwMut::Svm(s, st) => !svm::put_state(s, st, c, a),
        HwMut::Vmx(x, st) => !vmx::put_state(x, st, c, a),
    };
    if bad {
        c.invalid = true;
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        match &mut self.hw {
            Hw::Svm(s) => svm::release(&self.pd, s),
            Hw::Vmx(x) => vmx::release(&self.pd, self.cpu, x),
        }
    }
}
