//! The per-CPU scheduler: run queues of SCs, the running EC, blocking and waking,
//! timeouts, preemption, and the switch to user mode.
//!
//! Every kernel path ends here: [`ret_to`] resumes a given EC, [`schedule`] picks the
//! next SC. Run queues are strictly CPU-local; another CPU makes an EC runnable by
//! posting it on the target's remote list and sending an IPI.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use peregrine_abi::hip::MAX_CPUS;
use peregrine_abi::Status;
use peregrine_core::runqueue::RunQueue;
use spin::Mutex;

use crate::ec::Ec;
use crate::percpu;
use crate::sc::Sc;
use crate::sm::Sm;

/// A pending semaphore timeout.
pub struct Timeout {
    /// Absolute TSC deadline.
    pub deadline: u64,
    /// The waiting EC.
    pub ec: Arc<Ec>,
    /// Its semaphore.
    pub sm: Arc<Sm>,
    /// The EC's wait generation when it blocked.
    pub gen: u64,
}

/// Scheduler state of one CPU, touched only by that CPU with interrupts off.
pub struct CpuLocal {
    /// The EC running (or about to run) in user mode.
    pub current: Option<Arc<Ec>>,
    /// The SC whose time it runs on.
    pub sc: Option<Arc<Sc>>,
    /// Ready SCs.
    pub rq: RunQueue<Arc<Sc>>,
    /// Semaphore deadlines.
    pub timeouts: Vec<Timeout>,
    /// TSC when the current SC was last charged.
    pub last: u64,
    /// Id of the PD whose page table is loaded.
    pub space: u64,
    /// Port-space generation loaded into this CPU's TSS.
    pub pio_gen: u64,
}

struct CpuCell(UnsafeCell<Option<CpuLocal>>);
// SAFETY: each cell is accessed only by its own CPU (see `local`).
unsafe impl Sync for CpuCell {}

#[allow(clippy::declare_interior_mutable_const)]
const CELL: CpuCell = CpuCell(UnsafeCell::new(None));
static LOCAL: [CpuCell; MAX_CPUS] = [CELL; MAX_CPUS];

/// What another CPU hands to this one.
enum Remote {
    /// A blocked EC woken, with the status its blocking hypercall returns.
    Wake(Arc<Ec>, Option<Status>),
    /// A new SC to schedule.
    Sc(Arc<Sc>),
}

type RemoteList = Mutex<Vec<Remote>>;
#[allow(clippy::declare_interior_mutable_const)]
const REMOTE_INIT: RemoteList = Mutex::new(Vec::new());
static REMOTE: [RemoteList; MAX_CPUS] = [REMOTE_INIT; MAX_CPUS];

/// Initializes this CPU's scheduler (once per CPU at boot).
pub fn init_cpu() {
    let c = percpu::cpu_id();
    // SAFETY: called once per CPU during bring-up before anything else uses the cell.
    unsafe {
        *LOCAL[c].0.get() = Some(CpuLocal {
            current: None,
            sc: None,
            rq: RunQueue::new(),
            timeouts: Vec::new(),
            last: crate::arch::rdtsc(),
            space: 0,
            pio_gen: 0,
        });
    }
}

/// This CPU's scheduler state.
///
/// # Safety
/// Interrupts must be off and the returned reference must not outlive the current
/// kernel entry's use of it alongside another call to `local` (callers take what they
/// need and drop it before calling functions that also use it).
#[allow(clippy::mut_from_ref)]
pub unsafe fn local() -> &'static mut CpuLocal {
    let c = percpu::cpu_id();
    // SAFETY: the cell of this CPU is only used by this CPU with interrupts off; it was
    // initialized by `init_cpu` before the first entry into the scheduler.
    unsafe { (*LOCAL[c].0.get()).as_mut().unwrap_unchecked() }
}

/// The running EC.
pub fn current() -> Arc<Ec> {
    // SAFETY: interrupts are off in the kernel; no other reference is alive.
    let l = unsafe { local() };
    match &l.current {
        Some(e) => e.clone(),
        None => crate::kpanic("no current EC"),
    }
}

/// Charges the running SC up to now; true when its quantum ran out.
fn account(l: &mut CpuLocal) -> bool {
    let now = crate::arch::rdtsc();
    let d = now.wrapping_sub(l.last);
    l.last = now;
    match &l.sc {
        Some(sc) => sc.charge(d),
        None => false,
    }
}

/// Makes `sc` ready on its CPU.
pub fn enqueue(sc: Arc<Sc>) {
    if sc.cpu == percpu::cpu_id() {
        // SAFETY: interrupts are off in the kernel.
        let l = unsafe { local() };
        let p = sc.prio;
        let _ = l.rq.enqueue(sc, p, false);
    } else {
        let cpu = sc.cpu;
        REMOTE[cpu].lock().push(Remote::Sc(sc));
        crate::arch::send_resched_ipi(cpu);
    }
}

fn post_remote(ec: Arc<Ec>, st: Option<Status>) {
    let cpu = ec.cpu;
    REMOTE[cpu].lock().push(Remote::Wake(ec, st));
    crate::arch::send_resched_ipi(cpu);
}

/// Wakes a blocked EC with the status its blocking hypercall returns. The caller owns
/// the EC: it removed it from the queue it was blocked on.
pub fn wake(ec: Arc<Ec>, st: Status) {
    if ec.cpu != percpu::cpu_id() {
        post_remote(ec, Some(st));
        return;
    }
    wake_local(ec, Some(st));
}

/// Makes a blocked EC runnable again without touching its registers: it re-executes
/// what blocked it (a call that waited for a busy handler, whose hypercall word is
/// still in `rdi`; an exception whose handler was busy, with the thread's own `rdi`).
pub fn wake_retry(ec: Arc<Ec>) {
    if ec.cpu != percpu::cpu_id() {
        post_remote(ec, None);
        return;
    }
    wake_local(ec, None);
}

fn wake_local(ec: Arc<Ec>, st: Option<Status>) {
    // SAFETY: the EC is blocked and bound to this CPU; its local state is ours.
    let (f, lcl) = unsafe { (ec.frame(), ec.local()) };
    if let Some(st) = st {
        f.rdi = st as u64;
    }
    lcl.waiting_on = None;
    if let Some(sc) = lcl.blocked_sc.take() {
        // SAFETY: interrupts are off in the kernel.
        let l = unsafe { local() };
        let p = sc.prio;
        let _ = l.rq.enqueue(sc, p, false);
    }
}

/// Takes ECs posted by other CPUs into the run queue.
pub fn drain_remote() {
    let c = percpu::cpu_id();
    let posted = core::mem::take(&mut *REMOTE[c].lock());
    for r in posted {
        match r {
            Remote::Wake(ec, st) => {
                if !ec.is_dead() {
                    wake_local(ec, st);
                }
            }
            Remote::Sc(sc) => {
                // SAFETY: interrupts are off in the kernel.
                let l = unsafe { local() };
                let p = sc.prio;
                let _ = l.rq.enqueue(sc, p, false);
            }
        }
    }
}

/// Stops an EC of a destroyed PD that may run on another CPU.
pub fn kill_remote(ec: &Arc<Ec>) {
    if ec.cpu != percpu::cpu_id() {
        crate::arch::send_resched_ipi(ec.cpu);
    }
}

/// Stops `ec` for good (its original capability was revoked): it never runs again;
/// its CPU, if another, reschedules at once.
pub fn kill(ec: &Arc<Ec>) {
    ec.dead.store(true, core::sync::atomic::Ordering::Release);
    kill_remote(ec);
}

/// Deschedules `sc` for good: its CPU drops it when it next dispatches or preempts it.
pub fn kill_sc(sc: &Arc<Sc>) {
    sc.dead.store(true, core::sync::atomic::Ordering::Release);
    if sc.cpu != percpu::cpu_id() {
        crate::arch::send_resched_ipi(sc.cpu);
    }
}

/// Blocks the running EC: its SC leaves the CPU until [`wake`].
pub fn block_current() {
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    account(l);
    let sc = l.sc.take();
    if let Some(ec) = &l.current {
        // SAFETY: the running EC belongs to this CPU.
        unsafe { ec.local() }.blocked_sc = sc;
    }
}

/// Registers a semaphore deadline for the running EC (which is about to block).
pub fn add_timeout(deadline: u64, ec: Arc<Ec>, sm: Arc<Sm>) {
    let gen = ec.wait_gen.load(core::sync::atomic::Ordering::Relaxed);
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    l.timeouts.push(Timeout {
        deadline,
        ec,
        sm,
        gen,
    });
}

fn fire_timeouts(now: u64) {
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    if l.timeouts.is_empty() {
        return;
    }
    let mut due = Vec::new();
    l.timeouts.retain(|t| {
        if t.deadline <= now {
            due.push((t.ec.clone(), t.sm.clone(), t.gen));
            false
        } else {
            true
        }
    });
    for (ec, sm, gen) in due {
        if ec.wait_gen.load(core::sync::atomic::Ordering::Relaxed) == gen && sm.dequeue(&ec) {
            wake_local(ec, Some(Status::Timeout));
        }
    }
}

/// The timer interrupt: account, fire deadlines, preempt at the end of a quantum.
pub fn tick() {
    drain_remote();
    fire_timeouts(crate::arch::rdtsc());
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    if account(l) {
        if let Some(sc) = l.sc.take() {
            let p = sc.prio;
            let _ = l.rq.enqueue(sc, p, false);
        }
    }
}

/// Puts the running SC back in the queue if one of higher priority is ready.
pub fn preempt_if_needed() {
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    if let (Some(sc), Some(top)) = (&l.sc, l.rq.highest()) {
        if top > sc.prio {
            account(l);
            let sc = l.sc.take().unwrap_or_else(|| crate::kpanic("sc vanished"));
            let p = sc.prio;
            let _ = l.rq.enqueue(sc, p, true);
        }
    }
}

/// Finds the EC an SC should run, ending calls into handlers that died on the way.
fn runnable_head(sc: &Arc<Sc>) -> Option<Arc<Ec>> {
    if sc.dead.load(core::sync::atomic::Ordering::Acquire) {
        return None;
    }
    loop {
        let head = sc.head();
        if !head.is_dead() {
            return Some(head);
        }
        if Arc::ptr_eq(&head, &sc.ec) {
            return None;
        }
        // A handler died while serving a call: the caller gets Aborted.
        // SAFETY: the chain lives on this CPU.
        let caller = unsafe { head.local() }.caller.take();
        let caller = caller?;
        // SAFETY: as above.
        unsafe {
            caller.local().callee = None;
            caller.frame().rdi = Status::Aborted as u64;
        }
    }
}

/// Priority of the SC this CPU runs now (0 when none).
pub fn current_prio() -> u8 {
    // SAFETY: interrupts are off in the kernel.
    unsafe { local() }.sc.as_ref().map_or(0, |sc| sc.prio)
}

/// Picks the next SC and runs it; idles when there is none.
pub fn schedule() -> ! {
    loop {
        drain_remote();
        // SAFETY: interrupts are off in the kernel.
        let l = unsafe { local() };
        let sc = match l.sc.take() {
            Some(sc) => Some(sc),
            None => l.rq.dequeue().map(|(s, _)| s),
        };
        match sc {
            Some(sc) => {
                let Some(ec) = runnable_head(&sc) else {
                    continue;
                };
                // SAFETY: interrupts are off in the kernel.
                let l = unsafe { local() };
                l.sc = Some(sc);
                l.last = crate::arch::rdtsc();
                // SAFETY: the EC is bound to this CPU.
                if !unsafe { ec.local() }.started {
                    crate::ipc::startup(ec);
                }
                ret_to(ec);
            }
            None => {
                clear_current();
                crate::arch::idle_wait();
            }
        }
    }
}

/// Resumes `ec` in user mode (switching address spaces as needed).
pub fn ret_to(ec: Arc<Ec>) -> ! {
    if ec.is_dead() {
        clear_current();
        drop(ec);
        // The SC that drove it finds the dead EC when dispatched again.
        schedule();
    }
    // SVM: a vCPU enters its guest instead of user mode.
    if ec.kind == crate::ec::EcKind::Vcpu {
        crate::vcpu::resume(ec);
    }
    if ec.kind == crate::ec::EcKind::Global
        && ec.recall.swap(false, core::sync::atomic::Ordering::AcqRel)
    {
        set_current(&ec);
        crate::ipc::event(ec, peregrine_abi::event::host::RECALL);
    }
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    let gen = crate::space_pio::GEN.load(core::sync::atomic::Ordering::Acquire);
    if l.space != ec.pd.id || l.pio_gen != gen {
        if l.space != ec.pd.id {
            l.space = ec.pd.id;
            crate::tlb::loading(ec.pd.id);
            ec.pd.mem.activate();
        }
        l.pio_gen = gen;
        ec.pd.pio.activate(ec.pd.id);
    }
    // Each EC has its own FPU state (switched lazily: see `fpu`).
    crate::fpu::switch_to(&ec);
    let frame = ec.frame_ptr();
    percpu::set_frame_top(crate::entry::frame_top(frame));
    l.current = Some(ec);
    // SAFETY: the frame belongs to the EC we just made current (kept alive by
    // `l.current`), built only by checked setters; we are on this CPU's kernel stack.
    unsafe { crate::entry::ret_user(frame) }
}

/// Forgets the running EC. The kernel's own page table is loaded first, so a PD whose
/// last reference this was never has its page tables freed while loaded here.
pub fn clear_current() {
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    if l.current.is_some() {
        crate::arch::load_kernel_space();
        l.space = 0;
        let old = l.current.take();
        drop(old);
    }
}

/// Makes `ec` the running EC before its state is handled in the kernel (start-up and
/// recall events). The previous EC may hold the last reference to the PD whose page
/// table is loaded: that table is unloaded first, never freed while loaded.
pub fn set_current(ec: &Arc<Ec>) {
    // SAFETY: interrupts are off in the kernel.
    let l = unsafe { local() };
    if l.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, ec)) {
        return;
    }
    if l.space != ec.pd.id {
        clear_current();
    }
    // SAFETY: as above.
    unsafe { local() }.current = Some(ec.clone());
}

/// Resumes the running EC.
pub fn ret_current() -> ! {
    ret_to(current())
}
