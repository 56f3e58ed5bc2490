//! The Rust side of every interrupt and exception.

use super::idt::{
    exc, VEC_APIC_ERROR, VEC_GSI_BASE, VEC_GSI_LAST, VEC_IPI_HALT, VEC_IPI_LAST, VEC_SPURIOUS,
    VEC_TIMER,
};
use super::regs::Regs;
use super::{apic, cr};
use crate::hooks;
use crate::platform::percpu;

/// Called by `trap_common` with the frame on the kernel stack.
///
/// Exceptions from ring 3 go to [`hooks::user_trap`]; kernel exceptions dump the frame and
/// panic. Interrupts are acknowledged at the local APIC *before* the hook runs (a hook may
/// switch away and never return here); a level-triggered GSI's hook must therefore mask
/// the pin until the interrupt is handled.
pub extern "C" fn trap_handler(regs: &mut Regs) {
    let v = regs.vector as u8;
    let user = regs.from_user();
    match v {
        // NMIs are counted, nothing else: an NMI may arrive while its CPU holds any lock
        // (the console's included), so its handler takes none.
        exc::NMI => {
            percpu::percpu()
                .nmis
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        }
        exc::DF => double_fault(regs),
        0..=31 if regs.from_user() => {
            // An I/O access faulting on the short TR limit a VT-x exit left runs again.
            if v != exc::GP || !super::gdt::tr_repair() {
                hooks::user_trap(regs)
            }
        }
        0..=31 => kernel_fault(regs),
        VEC_TIMER => {
            apic::eoi();
            let p = percpu::percpu();
            p.ticks.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            hooks::timer_tick(percpu::cpu_id());
        }
        VEC_GSI_BASE..=VEC_GSI_LAST => {
            apic::eoi();
            hooks::irq(v);
        }
        VEC_IPI_HALT => cr::halt_forever(),
        0xe0..=VEC_IPI_LAST => {
            apic::eoi();
            percpu::percpu()
                .ipis
                .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            hooks::ipi(v);
        }
        VEC_APIC_ERROR => {
            let esr = apic::read_esr();
            apic::eoi();
            crate::kprintln!("cpu {}: APIC error {:#x}", percpu::cpu_id(), esr);
        }
        VEC_SPURIOUS => {}
        _ => {
            apic::eoi();
            crate::kprintln!("cpu {}: unexpected vector {:#x}", percpu::cpu_id(), v);
        }
    }
    if user && v >= 32 {
        // An interrupt in user mode: the scheduler decides who runs next.
        hooks::user_interrupt(regs);
    }
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// Name of exception vector `v`.
pub fn exception_name(v: u8) -> &'static str {
    NAMES.get(usize::from(v)).copied().unwrap_or("interrupt")
}

/// A double fault: always a kernel bug. When the fault's address or the stack pointer
/// lies in a stack's guard, the #PF could not push its frame on an overflowed stack.
fn double_fault(regs: &Regs) -> ! {
    overflow_check(regs);
    kernel_fault(regs)
}

/// Panics naming the stack overflow when `regs` (a #DF or #PF) faulted on a guard page.
fn overflow_check(regs: &Regs) {
    let cr2 = cr::read_cr2();
    let hit = [cr2, regs.rsp, regs.rsp.wrapping_sub(8)]
        .into_iter()
        .find_map(super::stack::guard_of);
    if let Some((cpu, s)) = hit {
        panic!(
            "kernel stack overflow on cpu {} ({} stack; fault at {:#x}, rsp {:#x}, rip {:#x})",
            cpu,
            s.name(),
            cr2,
            regs.rsp,
            regs.rip
        );
    }
}

fn kernel_fault(regs: &Regs) -> ! {
    let cpu = percpu::cpu_id();
    if regs.vector == u64::from(exc::PF) {
        overflow_check(regs);
    }
    // Without the console lock: the fault may have hit while this CPU held it.
    crate::console::print_unlocked(format_args!(
        "cpu {}: kernel exception {} \n{}\n",
        cpu,
        exception_name(regs.vector as u8),
        regs
    ));
    panic!(
        "kernel exception {} at {:#x}",
        exception_name(regs.vector as u8),
        regs.rip
    );
}
