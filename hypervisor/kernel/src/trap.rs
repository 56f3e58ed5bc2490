//! Traps from user mode: an exception of a user EC becomes an event to its portal; after
//! an interrupt (timer, IPI, device — handled by the platform hooks) the scheduler
//! decides who runs next.

use crate::cpu::Cpu;
use crate::frame::Frame;
use crate::{ipc, sched};

/// NMI.
const NMI: u64 = 2;
/// Machine check.
const MC: u64 = 18;
/// Device not available.
const NM: u64 = 7;

/// Saves the interrupted user state into the running EC.
fn save(saved: &Frame, cpu: &mut Cpu) -> alloc::sync::Arc<crate::ec::Ec> {
    let c = sched::current(cpu);
    *c.frame(cpu) = *saved;
    c
}

/// An exception in user mode.
pub fn from_user(v: u64, saved: &Frame, cpu: &mut Cpu) -> ! {
    let c = save(saved, cpu);
    match v {
        NMI | MC => sched::ret_to(c, cpu),
        // Lazy FPU switching (see `fpu`).
        NM if crate::fpu::device_not_available(&c) => sched::ret_to(c, cpu),
        _ => ipc::event(c, v, cpu),
    }
}

/// Print where user mode was interrupted, every 1024th interrupt (kernel command line
/// `trace_tick`: a watchdog view of a system that seems to hang).
pub static TRACE_TICK: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static TICKS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Timer ticks on `cpu` (with `trace_tick`: every 1024th is reported).
pub fn trace_tick(cpu: usize) {
    use core::sync::atomic::Ordering::Relaxed;
    static ALL: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    if TRACE_TICK.load(Relaxed) {
        let n = ALL.fetch_add(1, Relaxed);
        if n.is_multiple_of(1024) {
            crate::kprintln!(
                "tick {}: cpu {} (user interrupts {})",
                n,
                cpu,
                TICKS.load(Relaxed)
            );
        }
    }
}

/// An interrupt arrived in user mode and was handled.
pub fn after_user_interrupt(saved: &Frame, cpu: &mut Cpu) -> ! {
    use core::sync::atomic::Ordering::Relaxed;
    if TRACE_TICK.load(Relaxed) && TICKS.fetch_add(1, Relaxed).is_multiple_of(1024) {
        crate::kprintln!(
            "tick: cpu {} pd {} rip {:#x} rsp {:#x}",
            crate::platform::percpu::cpu_id(),
            sched::current(cpu).pd.id,
            saved.rip,
            saved.rsp
        );
    }
    save(saved, cpu);
    sched::preempt_if_needed(cpu);
    sched::schedule()
}
