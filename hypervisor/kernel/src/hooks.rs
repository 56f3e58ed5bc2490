//! Hooks from the platform layer into the kernel proper.

use crate::arch::x86::idt;
use crate::arch::x86::regs::Regs;
use crate::frame::Frame;

fn frame_of(r: &Regs) -> Frame {
    // Regs and Frame have the same layout (asserted in both modules), kept as two types
    // so the platform layer does not depend on the kernel proper.
    Frame {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rbp: r.rbp,
        rdi: r.rdi,
        rsi: r.rsi,
        rdx: r.rdx,
        rcx: r.rcx,
        rbx: r.rbx,
        rax: r.rax,
        vector: r.vector,
        error: r.error,
        rip: r.rip,
        cs: r.cs,
        rflags: r.rflags,
        rsp: r.rsp,
        ss: r.ss,
    }
}

/// An exception from ring 3: an event to the EC's portal.
pub fn user_trap(regs: &mut Regs) -> ! {
    crate::trap::from_user(regs.vector, &frame_of(regs))
}

/// An interrupt arrived while user code ran (already handled by the hooks below).
pub fn user_interrupt(regs: &mut Regs) -> ! {
    crate::trap::after_user_interrupt(&frame_of(regs))
}

/// The local APIC timer fired on `cpu` (already acknowledged).
pub fn timer_tick(_cpu: usize) {
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
