//! Hooks from the platform layer into the kernel proper.

use crate::arch::x86::idt;
use crate::arch::x86::regs::Regs;

/// An exception from ring 3: an event to the EC's portal.
pub fn user_trap(regs: &mut Regs) -> ! {
    crate::trap::from_user(regs.vector, regs)
}

/// An interrupt arrived while user code ran (already handled by the hooks below).
pub fn user_interrupt(regs: &mut Regs) -> ! {
    crate::trap::after_user_interrupt(regs)
}

/// The local APIC timer fired on `cpu` (already acknowledged).
pub fn timer_tick(cpu: usize) {
    crate::trap::trace_tick(cpu);
    crate::sched::tick();
}

/// Device interrupt at `vector`, already acknowledged at the LAPIC.
pub fn irq(vector: u8) {
    crate::irq::interrupt(vector);
}

/// An IPI arrived, already acknowledged.
pub fn ipi(vector: u8) {
    match vector {
        idt::VEC_IPI_TLB => crate::tlb::serve(),
        _ => crate::sched::drain_remote(),
    }
}

/// The BSP finished bring-up (all CPUs online): start the root task.
pub fn bsp_ready() -> ! {
    crate::vcpu::init_cpu(0);
    crate::start::bsp()
}

/// Application processor `cpu` finished bring-up.
pub fn ap_ready(cpu: usize) -> ! {
    crate::vcpu::init_cpu(cpu);
    crate::start::ap()
}
