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

use crate::cpu::{Cpu, Ecs};
use crate::ec::Ec;
use crate::platform::percpu;
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
    /// Semaphore deadlines (unordered; an EC has at most one, see `EcLocal::timeout`).
    pub timeouts: Vec<Timeout>,
    /// No deadline in `timeouts` is earlier (the timer tick looks at the list only
    /// then).
    pub next_due: u64,
    /// TSC when the current SC was last charged.
    pub last: u64,
    /// Id of the PD whose page table is loaded.
    pub space: u64,
    /// This CPU's index (see [`CpuLocal::cpu`]).
    cpu: usize,
    /// Key of the port space open in this CPU's TSS (`SpacePio::key`; 0: none).
    pub pio_key: u64,
}

impl CpuLocal {
    /// This CPU's index.
    #[inline(always)]
    pub fn cpu(&self) -> usize {
        // SAFETY: `init_cpu` stores `percpu::cpu_id()`, which is below MAX_CPUS; the
        // per-CPU tables indexed with it need no bounds check.
        unsafe { core::hint::assert_unchecked(self.cpu < MAX_CPUS) };
        self.cpu
    }
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
    /// A new SC to schedule (or a dead one to take apart: see [`kill_sc`]).
    Sc(Arc<Sc>),
    /// A dead EC to take out of every queue and chain (see [`reap`]).
    Reap(Arc<Ec>),
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
            next_due: u64::MAX,
            last: crate::arch::rdtsc(),
            space: 0,
            pio_key: 0,
            cpu: c,
        });
    }
}

/// This CPU's scheduler state and the part of its token that reaches its ECs' state,
/// both borrowed from the token.
#[inline(always)]
pub fn split(cpu: &mut Cpu) -> (&mut CpuLocal, &mut Ecs) {
    let c = percpu::cpu_id();
    // SAFETY: the token proves this CPU runs in the kernel with interrupts off, and the
    // cell of this CPU is only used by this CPU, through its token, whose borrow for the
    // result's lifetime excludes any other reference; `init_cpu` initialized it before
    // the first entry into the scheduler.
    let l = unsafe { (*LOCAL[c].0.get()).as_mut().unwrap_unchecked() };
    (l, cpu.ecs())
}

/// This CPU's scheduler state, borrowed from its token.
#[inline(always)]
pub fn local(cpu: &mut Cpu) -> &mut CpuLocal {
    split(cpu).0
}

/// The running EC.
pub fn current(cpu: &mut Cpu) -> Arc<Ec> {
    let l = local(cpu);
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
pub fn enqueue(sc: Arc<Sc>, cpu: &mut Cpu) {
    if sc.cpu == percpu::cpu_id() {
        let l = local(cpu);
        let p = sc.prio;
        let _ = l.rq.enqueue(sc, p, false);
    } else {
        let cpu = sc.cpu;
        post(cpu, Remote::Sc(sc));
    }
}

fn post_remote(ec: Arc<Ec>, st: Option<Status>) {
    let cpu = ec.cpu;
    post(cpu, Remote::Wake(ec, st));
}

/// Hands `r` to CPU `cpu` (this one too: then it is taken at the next scheduling
/// decision) and interrupts it if it is another.
fn post(cpu: usize, r: Remote) {
    REMOTE[cpu].lock().push(r);
    if cpu != percpu::cpu_id() {
        crate::arch::send_resched_ipi(cpu);
    }
}

/// Wakes a blocked EC with the status its blocking hypercall returns. The caller owns
/// the EC: it removed it from the queue it was blocked on.
pub fn wake(ec: Arc<Ec>, st: Status, cpu: &mut Cpu) {
    if ec.cpu != percpu::cpu_id() {
        post_remote(ec, Some(st));
        return;
    }
    wake_local(ec, Some(st), cpu);
}

/// Makes a blocked EC runnable again without touching its registers: it re-executes
/// what blocked it (a call that waited for a busy handler, whose hypercall word is
/// still in `rdi`; an exception whose handler was busy, with the thread's own `rdi`).
pub fn wake_retry(ec: Arc<Ec>, cpu: &mut Cpu) {
    if ec.cpu != percpu::cpu_id() {
        post_remote(ec, None);
        return;
    }
    wake_local(ec, None, cpu);
}

fn wake_local(ec: Arc<Ec>, st: Option<Status>, cpu: &mut Cpu) {
    // The EC is blocked and bound to this CPU: its state is ours.
    if let Some(st) = st {
        ec.frame(cpu).rdi = st as u64;
    }
    let lcl = ec.local(cpu);
    lcl.waiting_on = None;
    lcl.waiting_for = None;
    if core::mem::take(&mut lcl.timeout) {
        remove_timeout(local(cpu), &ec);
    }
    if let Some(sc) = ec.local(cpu).blocked_sc.take() {
        let l = local(cpu);
        let p = sc.prio;
        let _ = l.rq.enqueue(sc, p, false);
    }
}

/// Takes ECs posted by other CPUs into the run queue.
pub fn drain_remote(cpu: &mut Cpu) {
    let c = percpu::cpu_id();
    let posted = core::mem::take(&mut *REMOTE[c].lock());
    for r in posted {
        match r {
            // A dead EC is woken all the same: what it blocked (its SC) must go on,
            // and the scheduler ends its part in a call chain.
            Remote::Wake(ec, st) => wake_local(ec, st, cpu),
            Remote::Sc(sc) => {
                let l = local(cpu);
                let p = sc.prio;
                let _ = l.rq.enqueue(sc, p, false);
            }
            Remote::Reap(ec) => reap(ec, cpu),
        }
    }
}

/// Interrupts `ec`'s CPU, if another, so that it reschedules (e.g. for a recall).
pub fn kick(ec: &Arc<Ec>) {
    if ec.cpu != percpu::cpu_id() {
        crate::arch::send_resched_ipi(ec.cpu);
    }
}

/// Stops `ec` for good (its original capability was revoked, or its PD destroyed): it
/// never runs again, and its CPU takes it out of whatever it waited in ([`reap`]).
pub fn kill(ec: &Arc<Ec>, cpu: &mut Cpu) {
    ec.dead.store(true, core::sync::atomic::Ordering::Release);
    if ec.cpu == percpu::cpu_id() {
        // Callers hold no lock; the EC does not run now (at most it is the caller).
        reap(ec.clone(), cpu);
    } else {
        post(ec.cpu, Remote::Reap(ec.clone()));
    }
}

/// Deschedules `sc` for good. Its CPU takes it apart at its next scheduling decision:
/// the call chain it drove is unwound wherever the SC is parked (see [`unwind`]).
pub fn kill_sc(sc: &Arc<Sc>, cpu: &mut Cpu) {
    sc.dead.store(true, core::sync::atomic::Ordering::Release);
    enqueue(sc.clone(), cpu);
}

/// On a dead EC's CPU: takes it out of the semaphore, handler queue and timeout list it
/// waited in, hands the SC it held to the scheduler (which ends its part of the call
/// chain: see [`runnable_head`]) and sends the callers that waited for it (a handler)
/// to retry, which tells them it died. No queue keeps a reference to it afterwards, so
/// it and its PD go as soon as the capabilities to them do.
fn reap(ec: Arc<Ec>, cpu: &mut Cpu) {
    // A dead EC bound to this CPU; it does not run (the scheduler never resumes a dead
    // EC).
    let (l, ecs) = split(cpu);
    let lcl = ec.local(ecs);
    let mut release = false;
    let waiting_on = lcl.waiting_on.take();
    let waiting_for = lcl.waiting_for.take();
    let timeout = core::mem::take(&mut lcl.timeout);
    let waiters = core::mem::take(&mut lcl.waiters);
    if let Some(sm) = waiting_on {
        release |= sm.dequeue(&ec);
    }
    if let Some(h) = waiting_for {
        // The handler is bound to this CPU too (IPC is CPU-local).
        let hw = &mut h.local(ecs).waiters;
        if let Some(i) = hw.iter().position(|w| Arc::ptr_eq(w, &ec)) {
            hw.remove(i);
            release = true;
        }
    }
    if timeout {
        remove_timeout(l, &ec);
    }
    for w in waiters {
        wake_retry(w, cpu);
    }
    if release {
        if let Some(sc) = ec.local(cpu).blocked_sc.take() {
            enqueue(sc, cpu);
        }
    }
}

/// Blocks the running EC: its SC leaves the CPU until [`wake`].
pub fn block_current(cpu: &mut Cpu) {
    let (l, ecs) = split(cpu);
    account(l);
    let sc = l.sc.take();
    if let Some(sc) = sc
        .as_ref()
        .filter(|s| s.dead.load(core::sync::atomic::Ordering::Acquire))
    {
        // A dead SC drove the chain this far: where it blocks, the chain ends.
        unwind(sc, cpu);
        return;
    }
    if let Some(ec) = &l.current {
        ec.local(ecs).blocked_sc = sc;
    }
}

/// Per CPU, the room the timeout list keeps when it empties (more is given back).
const TIMEOUTS_KEEP: usize = 16;

/// Makes room for one more semaphore deadline on this CPU (before the running EC
/// blocks: a failure is its `OutOfMemory`, never a lost deadline).
pub fn reserve_timeout(cpu: &mut Cpu) -> Result<(), Status> {
    let l = local(cpu);
    if l.timeouts.capacity() == 0 {
        l.timeouts
            .try_reserve_exact(TIMEOUTS_KEEP)
            .map_err(|_| Status::OutOfMemory)?;
    }
    l.timeouts.try_reserve(1).map_err(|_| Status::OutOfMemory)
}

/// Registers a semaphore deadline for the running EC (which is about to block; room
/// was made by [`reserve_timeout`]).
pub fn add_timeout(deadline: u64, ec: Arc<Ec>, sm: Arc<Sm>, cpu: &mut Cpu) {
    let gen = ec.wait_gen.load(core::sync::atomic::Ordering::Relaxed);
    ec.local(cpu).timeout = true;
    let l = local(cpu);
    l.next_due = l.next_due.min(deadline);
    l.timeouts.push(Timeout {
        deadline,
        ec,
        sm,
        gen,
    });
}

/// Drops `ec`'s deadline (it was woken before it, or died).
fn remove_timeout(l: &mut CpuLocal, ec: &Arc<Ec>) {
    if let Some(i) = l.timeouts.iter().position(|t| Arc::ptr_eq(&t.ec, ec)) {
        let t = l.timeouts.swap_remove(i);
        shrink_timeouts(l);
        drop(t);
    }
}

/// An empty list keeps a little room, not what a burst of waiters needed.
fn shrink_timeouts(l: &mut CpuLocal) {
    if l.timeouts.is_empty() {
        l.next_due = u64::MAX;
        if l.timeouts.capacity() > TIMEOUTS_KEEP {
            l.timeouts.shrink_to(TIMEOUTS_KEEP);
        }
    }
}

fn fire_timeouts(now: u64, cpu: &mut Cpu) {
    let l = local(cpu);
    if now < l.next_due {
        return;
    }
    let mut due = Vec::new();
    let mut next = u64::MAX;
    let mut i = 0;
    while i < l.timeouts.len() {
        if l.timeouts[i].deadline <= now {
            if due.try_reserve(1).is_err() {
                // Fired at the next tick.
                next = now;
                break;
            }
            due.push(l.timeouts.swap_remove(i));
        } else {
            next = next.min(l.timeouts[i].deadline);
            i += 1;
        }
    }
    l.next_due = next;
    shrink_timeouts(l);
    for t in due {
        t.ec.local(cpu).timeout = false;
        if t.ec.wait_gen.load(core::sync::atomic::Ordering::Relaxed) == t.gen && t.sm.dequeue(&t.ec)
        {
            wake_local(t.ec, Some(Status::Timeout), cpu);
        }
    }
}

/// The timer interrupt: account, fire deadlines, preempt at the end of a quantum.
pub fn tick(cpu: &mut Cpu) {
    drain_remote(cpu);
    fire_timeouts(crate::arch::rdtsc(), cpu);
    let l = local(cpu);
    if account(l) {
        if let Some(sc) = l.sc.take() {
            let p = sc.prio;
            let _ = l.rq.enqueue(sc, p, false);
        }
    }
}

/// Puts the running SC back in the queue if one of higher priority is ready.
pub fn preempt_if_needed(cpu: &mut Cpu) {
    let l = local(cpu);
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
///
/// A dead SC still drives the handlers of its call chain while they run: a handler
/// stopped in the middle of its work would leave the server's own state (a lock, a
/// half-done update) torn. Once the chain's head blocks, or the SC's own EC would run
/// again, the rest of the chain is taken apart ([`unwind`]) and the SC runs nothing.
fn runnable_head(sc: &Arc<Sc>, cpu: &mut Cpu) -> Option<Arc<Ec>> {
    let dead_sc = sc.dead.load(core::sync::atomic::Ordering::Acquire);
    loop {
        // The chain lives on this CPU.
        let head = sc.head(cpu);
        if !head.is_dead() {
            if dead_sc {
                let parked = head
                    .local(cpu)
                    .blocked_sc
                    .as_ref()
                    .is_some_and(|b| Arc::ptr_eq(b, sc));
                if parked || Arc::ptr_eq(&head, &sc.ec) {
                    unwind(sc, cpu);
                    return None;
                }
            }
            return Some(head);
        }
        // Whoever waited for the dead handler retries and learns it died.
        for w in core::mem::take(&mut head.local(cpu).waiters) {
            wake_retry(w, cpu);
        }
        if Arc::ptr_eq(&head, &sc.ec) {
            if dead_sc {
                unwind(sc, cpu);
            }
            return None;
        }
        // A handler died while serving a call: the caller gets Aborted.
        let caller = head.local(cpu).caller.take()?;
        caller.local(cpu).callee = None;
        caller.frame(cpu).rdi = Status::Aborted as u64;
    }
}

/// Takes apart the call chain of the dead SC `sc` (on its CPU): every call on it is
/// aborted and its handler freed for the callers that wait for it; the EC at the head is
/// taken out of whatever it waits in, and the SC out of it. Nothing keeps a reference
/// to the SC afterwards but its capabilities, and nothing stays busy for it. Idempotent.
fn unwind(sc: &Arc<Sc>, cpu: &mut Cpu) {
    let mut ec = sc.ec.clone();
    loop {
        // The chain's ECs are bound to this CPU and none runs (we schedule).
        match ec.local(cpu).callee.take() {
            Some(h) => {
                ec.frame(cpu).rdi = Status::Aborted as u64;
                let hl = h.local(cpu);
                hl.caller = None;
                for w in core::mem::take(&mut hl.waiters) {
                    wake_retry(w, cpu);
                }
                ec = h;
            }
            None => {
                // The head: out of whatever it waits in (it blocks on the dead SC, or
                // the SC is parked with it), and the SC out of it.
                let (l, ecs) = split(cpu);
                let lcl = ec.local(ecs);
                if lcl.blocked_sc.as_ref().is_some_and(|b| Arc::ptr_eq(b, sc)) {
                    lcl.blocked_sc = None;
                }
                let waiting_for = lcl.waiting_for.take();
                let timeout = core::mem::take(&mut lcl.timeout);
                if let Some(sm) = lcl.waiting_on.take() {
                    sm.dequeue(&ec);
                }
                if let Some(h) = waiting_for {
                    let hw = &mut h.local(ecs).waiters;
                    hw.retain(|w| !Arc::ptr_eq(w, &ec));
                }
                if timeout {
                    remove_timeout(l, &ec);
                }
                return;
            }
        }
    }
}

/// Priority of the SC this CPU runs now (0 when none).
pub fn current_prio(cpu: &mut Cpu) -> u8 {
    local(cpu).sc.as_ref().map_or(0, |sc| sc.prio)
}

/// Picks the next SC and runs it; idles when there is none.
///
/// On a fresh kernel stack: every path into the scheduler diverges (its callers hold
/// nothing they need afterwards), and an EC's start-up or death can lead straight back
/// here, so without the reset each such turn would nest a frame deeper.
pub fn schedule() -> ! {
    // SAFETY: nothing on this CPU's kernel stack is live (every caller diverges and
    // passes nothing).
    unsafe { on_fresh_stack!(scheduler, 0usize) }
}

/// Calls `f(arg)` (an `extern "C" fn(usize) -> !`, called directly) from the top of this
/// CPU's kernel stack, dropping everything on it. Use inside `unsafe`: nothing on the
/// kernel stack may be live (the caller diverges and passes all it needs in `arg`), and
/// the kernel must run on that stack (never on an IST stack).
macro_rules! on_fresh_stack {
    ($f:path, $arg:expr) => {
        // The per-CPU slot holds the top of this CPU's kernel stack; `f` never returns.
        core::arch::asm!(
            "mov rsp, gs:[{k}]",
            "xor ebp, ebp",
            "call {f}",
            "ud2",
            k = const crate::platform::percpu::PERCPU_KSTACK_TOP,
            f = sym $f,
            in("rdi") $arg,
            options(noreturn)
        )
    };
}
pub(crate) use on_fresh_stack;

extern "C" fn scheduler(_: usize) -> ! {
    // SAFETY: a kernel entry of its own: on this CPU's fresh kernel stack with
    // interrupts off; whoever held a token here before has diverged (`schedule`). The
    // idle loop lends it to the interrupts it waits for.
    let cpu = &mut unsafe { Cpu::enter() };
    loop {
        drain_remote(cpu);
        let l = local(cpu);
        let sc = match l.sc.take() {
            Some(sc) => Some(sc),
            None => l.rq.dequeue().map(|(s, _)| s),
        };
        match sc {
            Some(sc) => {
                let Some(ec) = runnable_head(&sc, cpu) else {
                    continue;
                };
                let l = local(cpu);
                l.sc = Some(sc);
                l.last = crate::arch::rdtsc();
                if !ec.local(cpu).started {
                    crate::ipc::startup(ec, cpu);
                }
                ret_to(ec, cpu);
            }
            None => {
                clear_current(cpu);
                idle_wait(cpu);
            }
        }
    }
}

/// Waits for an interrupt with interrupts on, lending the token to the interrupt
/// handlers (no borrow of it is alive across the wait).
#[inline(always)]
fn idle_wait(_: &mut Cpu) {
    crate::arch::idle_wait();
}

/// Ends the running EC's hypercall (its result is in its frame): back to `ec`, unless
/// the hypercall gave the CPU away. An `up` that woke, or an SC created for, a thread of
/// a higher priority put the SC `ec` runs on back in the run queue
/// ([`preempt_if_needed`]); then the scheduler decides, and `ec` resumes from its frame
/// when that SC runs again. (Returning to `ec` regardless let it run without its SC: the
/// woken thread waited for the next interrupt, and a `down` of `ec` that blocked left
/// its SC in the run queue, which resumed `ec` at once while it stayed queued on the
/// semaphore; that semaphore's next `up` then wrote its status over the `rdi` of `ec`
/// running on.)
pub fn ret_from_hypercall(ec: Arc<Ec>, cpu: &mut Cpu) -> ! {
    if local(cpu).sc.is_none() {
        drop(ec);
        schedule();
    }
    ret_to(ec, cpu)
}

/// Resumes `ec` in user mode (switching address spaces as needed).
pub fn ret_to(ec: Arc<Ec>, cpu: &mut Cpu) -> ! {
    if ec.is_dead() {
        clear_current(cpu);
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
        set_current(&ec, cpu);
        crate::ipc::event(ec, peregrine_abi::event::host::RECALL, cpu);
    }
    let l = local(cpu);
    load_context(l, &ec);
    let frame = ec.frame_ptr();
    l.current = Some(ec);
    // SAFETY: the frame belongs to the EC we just made current (kept alive by
    // `l.current`), built only by checked setters; we are on this CPU's kernel stack.
    unsafe { crate::entry::ret_user(frame) }
}

/// Loads what `ec` runs with on this CPU: its address space, its port bitmap and its
/// FPU state; and points the syscall stub at its frame. (The IPC fast path's switch and
/// [`ret_to`]'s.)
#[inline(always)]
pub fn load_context(l: &mut CpuLocal, ec: &Ec) {
    let pd = &ec.pd;
    let cpu = l.cpu();
    if l.space != pd.id {
        l.space = pd.id;
        crate::tlb::loading_on(cpu, pd.id);
        pd.mem.activate();
    }
    let key = pd.pio.key();
    if l.pio_key != key {
        l.pio_key = key;
        pd.pio.activate(cpu, key);
    }
    // Each EC has its own FPU state (see `fpu`).
    crate::fpu::switch_to(cpu, ec);
    percpu::set_running(
        crate::entry::frame_top(ec.frame_ptr()),
        ec.kind == crate::ec::EcKind::Local,
    );
}

/// Forgets the running EC. The kernel's own page table is loaded first, so a PD whose
/// last reference this was never has its page tables freed while loaded here.
pub fn clear_current(cpu: &mut Cpu) {
    let l = local(cpu);
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
pub fn set_current(ec: &Arc<Ec>, cpu: &mut Cpu) {
    let l = local(cpu);
    if l.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, ec)) {
        return;
    }
    if l.space != ec.pd.id {
        clear_current(cpu);
    }
    local(cpu).current = Some(ec.clone());
}

/// Resumes the running EC.
pub fn ret_current(cpu: &mut Cpu) -> ! {
    let c = current(cpu);
    ret_to(c, cpu)
}
