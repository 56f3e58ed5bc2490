//! Traps from user mode: an exception of a user EC becomes an event to its portal; after
//! an interrupt (timer, IPI, device — handled by the platform hooks) the scheduler
//! decides who runs next.

use crate::frame::Frame;
use crate::{ipc, sched};

/// NMI.
const NMI: u64 = 2;
/// Machine check.
const MC: u64 = 18;
/// Device not available.
const NM: u64 = 7;

/// Saves the interrupted user state into the running EC.
fn save(saved: &Frame) -> alloc::sync::Arc<crate::ec::Ec> {
    let c = sched::current();
    // SAFETY: the running EC of this CPU, interrupts off.
    unsafe { *c.frame() = *saved };
    c
}

/// An exception in user mode.
pub fn from_user(v: u64, saved: &Frame) -> ! {
    let c = save(saved);
    match v {
        NMI | MC => sched::ret_to(c),
        // Lazy FPU switching (see `fpu`).
        NM if crate::fpu::device_not_available(&c) => sched::ret_to(c),
        _ => ipc::event(c, v),
    }
}

/// An interrupt arrived in user mode and was handled.
pub fn after_user_interrupt(saved: &Frame) -> ! {
    save(saved);
    sched::preempt_if_needed();
    sched::schedule()
}
