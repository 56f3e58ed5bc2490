//! Hooks from the platform layer into the kernel proper: each one that reaches the
//! kernel's CPU-local state is a kernel entry and takes this CPU's token there. Traps
//! (never an NMI: its handler only counts it) run with interrupts off; from user mode
//! nothing of the kernel's is live on this CPU; in kernel mode interrupts are taken
//! only in the idle loop and in a vCPU's interrupt window, which lend their token
//! (`sched::idle_wait`, `vcpu::run`).

use crate::arch::x86::idt;
use crate::arch::x86::regs::Regs;
use crate::cpu::Cpu;

/// An exception from ring 3: an event to the EC's portal.
pub fn user_trap(regs: &mut Regs) -> ! {
    // SAFETY: an exception from user mode, interrupts off.
    let cpu = &mut unsafe { Cpu::enter() };
    crate::trap::from_user(regs.vector, regs, cpu)
}

/// An interrupt arrived while user code ran (already handled by the hooks below).
pub fn user_interrupt(regs: &mut Regs) -> ! {
    // SAFETY: an interrupt from user mode, interrupts off; the hooks before this one
    // have let go of their tokens.
    let cpu = &mut unsafe { Cpu::enter() };
    crate::trap::after_user_interrupt(regs, cpu)
}

/// The local APIC timer fired on `cpu` (already acknowledged).
pub fn timer_tick(cpu: usize) {
    crate::trap::trace_tick(cpu);
    // SAFETY: an interrupt, with interrupts off (see the module doc).
    crate::sched::tick(&mut unsafe { Cpu::enter() });
}

/// Device interrupt at `vector`, already acknowledged at the LAPIC.
pub fn irq(vector: u8) {
    // SAFETY: an interrupt, with interrupts off (see the module doc).
    crate::irq::interrupt(vector, &mut unsafe { Cpu::enter() });
}

/// An IPI arrived, already acknowledged.
pub fn ipi(vector: u8) {
    match vector {
        idt::VEC_IPI_TLB => crate::tlb::serve(),
        // SAFETY: an interrupt, with interrupts off (see the module doc).
        _ => crate::sched::drain_remote(&mut unsafe { Cpu::enter() }),
    }
}

/// The BSP finished bring-up (all CPUs online): start the root task.
pub fn bsp_ready() -> ! {
    crate::vcpu::init_cpu(0);
    crate::platform::start::bsp()
}

/// Application processor `cpu` finished bring-up.
pub fn ap_ready(cpu: usize) -> ! {
    crate::vcpu::init_cpu(cpu);
    crate::platform::start::ap()
}
