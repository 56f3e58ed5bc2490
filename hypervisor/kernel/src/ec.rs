//! Execution contexts: threads (global ECs with their own SC), portal handlers (local
//! ECs that run only when called) and — with the virtualization work — vCPUs.
//!
//! An EC is bound to one CPU for life. Everything in [`EcLocal`] is touched only by
//! that CPU, with interrupts off, so it needs no lock; another CPU hands an EC back to
//! it only through the semaphore and remote-wake paths, which own a blocked EC until
//! they enqueue it. The frame, the local state and the UTCB are reached through that
//! CPU's token ([`crate::cpu`]), which keeps two references to them from living at once.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use peregrine_abi::{Mtd, Utcb};

use crate::cpu::Ecs;
use crate::frame::Frame;
use crate::pd::Pd;
use crate::sc::Sc;
use crate::sm::Sm;

/// What kind of EC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcKind {
    /// Portal handler.
    Local,
    /// Thread with its own SC.
    Global,
    /// Virtual CPU (see `vcpu`).
    Vcpu,
}

/// How the current call into a handler EC must be finished at reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A `call`: copy the reply message back.
    Ipc,
    /// An exception or start-up event: take the architectural state back under the
    /// MTD the handler leaves in its UTCB.
    Event,
}

/// CPU-local state of an EC.
pub struct EcLocal {
    /// The EC whose call this handler is serving.
    pub caller: Option<Arc<Ec>>,
    /// How to finish that call.
    pub kind: CallKind,
    /// The handler this EC is waiting on (it called it); the SC follows this chain.
    pub callee: Option<Arc<Ec>>,
    /// Callers waiting for this handler to become free.
    pub waiters: VecDeque<Arc<Ec>>,
    /// The SC to wake when this EC becomes runnable again after blocking.
    pub blocked_sc: Option<Arc<Sc>>,
    /// A global EC has received its start-up event.
    pub started: bool,
    /// The semaphore this EC waits on.
    pub waiting_on: Option<Arc<Sm>>,
    /// The busy handler in whose queue this EC waits (to call it, or to deliver an
    /// event to it).
    pub waiting_for: Option<Arc<Ec>>,
    /// A semaphore deadline of this EC is in its CPU's timeout list.
    pub timeout: bool,
}

/// An execution context.
pub struct Ec {
    /// Its protection domain.
    pub pd: Arc<Pd>,
    /// The CPU it is bound to.
    pub cpu: usize,
    /// Kind.
    pub kind: EcKind,
    /// Event selector base in its PD.
    pub evt: u64,
    /// Stack pointer a handler starts every call with.
    pub sp: u64,
    /// Kernel address of the UTCB page.
    pub utcb: *mut Utcb,
    /// Physical address of the UTCB page (freed with the EC).
    pub utcb_phys: u64,
    /// User address of the UTCB.
    pub utcb_uva: u64,
    frame: UnsafeCell<Frame>,
    local: UnsafeCell<EcLocal>,
    /// Set when the EC is stopped for good (PD destroyed, unhandled exception).
    pub dead: AtomicBool,
    /// A recall was requested.
    pub recall: AtomicBool,
    /// An SC is bound to it.
    pub has_sc: AtomicBool,
    _charge: Option<crate::kmem::Charge>,
    /// Bumped each time the EC blocks on a semaphore (matches timeouts to waits).
    pub wait_gen: AtomicU64,
    /// Saved FPU/SSE/AVX state (see `fpu`).
    pub fpu: crate::fpu::Fpu,
    /// The virtual-CPU part of a vCPU (VMCB, guest registers); set before the EC is
    /// shared.
    pub vcpu: Option<alloc::boxed::Box<crate::vcpu::Vcpu>>,
}

// SAFETY: the UnsafeCell parts are only accessed by the EC's own CPU with interrupts
// disabled, or by a CPU that owns the EC because it removed it from a wait queue under
// that queue's lock (see module doc); the UTCB pointer is into the physmap and owned by
// the EC.
unsafe impl Send for Ec {}
// SAFETY: as above.
unsafe impl Sync for Ec {}

impl Ec {
    /// Creates an EC (the caller has charged its memory).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        charge: impl Into<Option<crate::kmem::Charge>>,
        pd: Arc<Pd>,
        cpu: usize,
        kind: EcKind,
        evt: u64,
        sp: u64,
        utcb_phys: u64,
        utcb_uva: u64,
        frame: Frame,
    ) -> Self {
        Ec {
            pd,
            cpu,
            kind,
            evt,
            sp,
            utcb: crate::kmem::phys_to_virt(utcb_phys) as *mut Utcb,
            utcb_phys,
            utcb_uva,
            frame: UnsafeCell::new(frame),
            local: UnsafeCell::new(EcLocal {
                caller: None,
                kind: CallKind::Ipc,
                callee: None,
                waiters: VecDeque::new(),
                blocked_sc: None,
                started: kind == EcKind::Local,
                waiting_on: None,
                waiting_for: None,
                timeout: false,
            }),
            dead: AtomicBool::new(false),
            recall: AtomicBool::new(false),
            has_sc: AtomicBool::new(false),
            wait_gen: AtomicU64::new(0),
            fpu: crate::fpu::Fpu::new(),
            vcpu: None,
            _charge: charge.into(),
        }
    }

    /// The register frame, through this CPU's token.
    #[inline(always)]
    pub fn frame<'a>(&'a self, _: &'a mut Ecs) -> &'a mut Frame {
        self.on_its_cpu();
        // SAFETY: the token proves this CPU runs in the kernel with interrupts off, and an
        // EC's frame is touched only by the CPU it is bound to (module doc); borrowing
        // the token for `'a` excludes every other reference to this CPU's EC state.
        unsafe { &mut *self.frame.get() }
    }

    /// Raw pointer to the frame (for the exit path and the syscall stub).
    pub fn frame_ptr(&self) -> *mut Frame {
        self.frame.get()
    }

    /// CPU-local state, through this CPU's token.
    #[inline(always)]
    pub fn local<'a>(&'a self, _: &'a mut Ecs) -> &'a mut EcLocal {
        self.on_its_cpu();
        // SAFETY: as in `frame`, for the local state.
        unsafe { &mut *self.local.get() }
    }

    /// The UTCB, through this CPU's token. The user side may write the page
    /// concurrently only while the EC runs, which it does not while the kernel handles
    /// it.
    #[inline(always)]
    pub fn utcb<'a>(&'a self, _: &'a mut Ecs) -> &'a mut Utcb {
        self.on_its_cpu();
        // SAFETY: as in `frame`, for the UTCB, which is mapped in the physmap for the
        // EC's lifetime.
        unsafe { &mut *self.utcb }
    }

    /// Debug builds check that the EC is bound to this CPU, the invariant the token's
    /// accessors rest on.
    #[inline(always)]
    fn on_its_cpu(&self) {
        debug_assert_eq!(self.cpu, crate::platform::percpu::cpu_id());
    }

    /// Whether the EC can no longer run.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed) || self.pd.is_dead()
    }

    /// Mode of the MTD transfer for this EC kind.
    pub fn host_mtd_mask(&self) -> Mtd {
        Mtd::GPRS | Mtd::RIP_LEN | Mtd::RFLAGS | Mtd::QUAL
    }
}

impl Drop for Ec {
    fn drop(&mut self) {
        // The charge first, while `pd` keeps the PD and its account alive (the fields
        // drop after this, `pd` before `_charge`).
        drop(self._charge.take());
        // Out of its PD's list (the list holds weak references, which would keep this
        // EC's memory allocated).
        self.pd.ecs.lock().retain(|w| w.strong_count() > 0);
        if self.utcb_phys != 0 {
            // Unmap the UTCB; the page (and any table emptied) is reused only after a
            // shootdown of the CPUs that have the PD loaded (batched: `tlb::reclaim`).
            // The last reference may go under a lock, where no shootdown may wait.
            let mut pages = Vec::new();
            self.pd.mem.unmap_deferred(
                None,
                self.utcb_uva >> peregrine_abi::PAGE_BITS,
                0,
                &mut pages,
            );
            if pages.try_reserve(1).is_ok() {
                pages.push(self.utcb_phys);
            }
            crate::kmem::uncharge(&self.pd, pages.len() as u64);
            crate::tlb::defer_free(self.pd.id, pages);
        }
        // The ECs it is linked to in call chains go iteratively: a chain of calls can
        // be longer than the kernel stack is deep.
        let mut stack: Vec<Arc<Ec>> = Vec::new();
        take_links(self.local.get_mut(), &mut stack);
        while let Some(e) = stack.pop() {
            if let Some(mut e) = Arc::into_inner(e) {
                take_links(e.local.get_mut(), &mut stack);
            }
        }
    }
}

/// Moves the EC references of `l` onto `stack` (where there is room; the rest are
/// dropped right here).
fn take_links(l: &mut EcLocal, stack: &mut Vec<Arc<Ec>>) {
    let links = [l.caller.take(), l.callee.take(), l.waiting_for.take()];
    let waiters = core::mem::take(&mut l.waiters);
    for e in links.into_iter().flatten().chain(waiters) {
        if stack.try_reserve(1).is_ok() {
            stack.push(e);
        }
    }
}
