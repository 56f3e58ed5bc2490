//! Capabilities to kernel objects.

use alloc::sync::Arc;
use core::sync::atomic::{fence, AtomicBool, AtomicPtr, Ordering};

use peregrine_abi::hip::MAX_CPUS;
use peregrine_abi::perm::{EcPerm, PdPerm, PtPerm, ScPerm, SmPerm};

use crate::ec::Ec;
use crate::pd::Pd;
use crate::pt::Pt;
use crate::sc::Sc;
use crate::sm::Sm;

/// A reference to a kernel object.
#[derive(Clone)]
pub enum KObj {
    /// Protection domain.
    Pd(Arc<Pd>),
    /// Execution context.
    Ec(Arc<Ec>),
    /// Scheduling context.
    Sc(Arc<Sc>),
    /// Portal.
    Pt(Arc<Pt>),
    /// Semaphore.
    Sm(Arc<Sm>),
}

impl KObj {
    /// Whether two references name the same object.
    pub fn same(&self, o: &KObj) -> bool {
        match (self, o) {
            (KObj::Pd(a), KObj::Pd(b)) => Arc::ptr_eq(a, b),
            (KObj::Ec(a), KObj::Ec(b)) => Arc::ptr_eq(a, b),
            (KObj::Sc(a), KObj::Sc(b)) => Arc::ptr_eq(a, b),
            (KObj::Pt(a), KObj::Pt(b)) => Arc::ptr_eq(a, b),
            (KObj::Sm(a), KObj::Sm(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// A kernel object type a capability can name: the [`KObj`] variant that holds it and
/// its permission bits (`peregrine_abi::perm`).
pub trait CapObj: Sized {
    /// The permissions of a capability to this type.
    type Perm: Copy;
    /// The bits of `p` as a capability stores them.
    fn perm_bits(p: Self::Perm) -> u8;
    /// The object `o` names if it is of this type.
    fn from_kobj(o: KObj) -> Option<Arc<Self>>;
}

macro_rules! cap_obj {
    ($($t:ident: $perm:ty),* $(,)?) => {$(
        impl CapObj for $t {
            type Perm = $perm;
            #[inline(always)]
            fn perm_bits(p: $perm) -> u8 {
                p.bits()
            }
            #[inline(always)]
            fn from_kobj(o: KObj) -> Option<Arc<Self>> {
                match o {
                    KObj::$t(x) => Some(x),
                    _ => None,
                }
            }
        }
    )*};
}

cap_obj!(Pd: PdPerm, Ec: EcPerm, Sc: ScPerm, Pt: PtPerm, Sm: SmPerm);

/// A capability: object and permissions.
pub type Cap = peregrine_core::capspace::Cap<KObj>;

/// A PD's capability space behind a lock for writers and a lock-free read side for the
/// IPC fast path.
///
/// Readers on the fast path write nothing shared: a CPU announces the space it reads in
/// its own slot of [`READING`] and then checks that no writer is active; a writer (any
/// holder of [`Caps::lock`]) raises `writing`, then waits until no CPU announces this
/// space, before it changes anything. Both sides order their store before their load
/// with a full fence, so either the reader sees `writing` (and takes the slow path, which
/// locks) or the writer sees the reader and waits for it (Dekker's pairing, as in a
/// per-CPU reader-writer lock). A reader never waits, so a writer's wait is bounded by
/// one fast-path lookup on each other CPU; interrupts are off in the kernel, so no
/// reader is preempted inside. Everything a reader takes out of the space (the portal's
/// handler EC) it takes as a counted reference before it leaves, so no object a writer
/// drops afterwards is still in use.
pub struct Caps {
    space: spin::mutex::SpinMutex<peregrine_core::capspace::CapSpace<KObj>>,
    writing: AtomicBool,
}

/// The space each CPU reads lock-free right now (null: none).
static READING: [AtomicPtr<Caps>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

/// Exclusive access to a [`Caps`] (see there); derefs to the space.
pub struct CapsGuard<'a> {
    caps: &'a Caps,
    guard: spin::mutex::SpinMutexGuard<'a, peregrine_core::capspace::CapSpace<KObj>>,
}

impl Caps {
    /// An empty space for selectors below `limit`.
    pub const fn new(limit: u64) -> Self {
        Caps {
            space: spin::mutex::SpinMutex::new(peregrine_core::capspace::CapSpace::new(limit)),
            writing: AtomicBool::new(false),
        }
    }

    /// Locks the space for reading or changing it: waits for the lock, then for every
    /// lock-free reader of this space to leave.
    pub fn lock(&self) -> CapsGuard<'_> {
        let guard = self.space.lock();
        self.writing.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let me = self as *const Caps as *mut Caps;
        for r in READING.iter().take(crate::platform::percpu::num_cpus()) {
            while r.load(Ordering::Acquire) == me {
                core::hint::spin_loop();
            }
        }
        CapsGuard { caps: self, guard }
    }

    /// Runs `f` on the space without taking the lock, on CPU `cpu` (the running one);
    /// `None` (without running `f`) while a writer holds it. `f` must not lock any
    /// [`Caps`] and must take counted references to whatever it returns.
    #[inline(always)]
    pub fn read_fast<R>(
        &self,
        cpu: usize,
        f: impl FnOnce(&peregrine_core::capspace::CapSpace<KObj>) -> R,
    ) -> Option<R> {
        let slot = &READING[cpu];
        slot.store(self as *const Caps as *mut Caps, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let r = if self.writing.load(Ordering::Acquire) {
            None
        } else {
            // SAFETY: no writer is active, and none becomes active before this CPU
            // clears its slot (a writer waits for it, see `lock`); readers only share
            // the space.
            Some(f(unsafe { &*self.space.as_mut_ptr() }))
        };
        slot.store(core::ptr::null_mut(), Ordering::Release);
        r
    }
}

impl Drop for CapsGuard<'_> {
    fn drop(&mut self) {
        // Every change is visible before a reader can pass `writing` again; the lock
        // itself is released after this (field drop).
        self.caps.writing.store(false, Ordering::Release);
    }
}

impl core::ops::Deref for CapsGuard<'_> {
    type Target = peregrine_core::capspace::CapSpace<KObj>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl core::ops::DerefMut for CapsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}
