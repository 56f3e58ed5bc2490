//! Architecture support (x86_64 only).

pub mod x86;

// The small interface the kernel objects use (thin wrappers over `x86`).

use core::sync::atomic::Ordering;

use x86::{apic, cr, gdt, idt, ioapic, paging};

pub use cr::{rdtsc, read_cr2};
pub use gdt::{close_iopb, load_iopb, open_iopb, set_rsp0, USER_CS, USER_DS};

/// Signals end of interrupt at the local APIC.
pub fn eoi() {
    apic::eoi();
}

/// TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    apic::tsc_khz()
}

/// Number of CPUs found at boot (indices `0..online_cpus()`).
pub fn online_cpus() -> usize {
    crate::platform::percpu::num_cpus()
}

/// Whether CPU index `cpu` exists and finished bring-up.
pub fn cpu_online(cpu: u64) -> bool {
    (cpu as usize) < crate::platform::percpu::num_cpus()
        && crate::platform::percpu::get(cpu as usize)
            .online
            .load(Ordering::Acquire)
}

fn apic_id(cpu: usize) -> u32 {
    crate::platform::percpu::get(cpu)
        .apic_id
        .load(Ordering::Relaxed)
}

/// Sends the reschedule IPI to CPU index `cpu`.
pub fn send_resched_ipi(cpu: usize) {
    apic::send_ipi(apic_id(cpu), idt::VEC_IPI_RESCHED);
}

/// Sends the recall IPI to CPU index `cpu`.
pub fn send_recall_ipi(cpu: usize) {
    apic::send_ipi(apic_id(cpu), idt::VEC_IPI_RECALL);
}

/// Sends the TLB-shootdown IPI to CPU index `cpu`.
pub fn send_tlb_ipi(cpu: usize) {
    apic::send_ipi(apic_id(cpu), idt::VEC_IPI_TLB);
}

/// Sends the TLB-shootdown IPI to all other CPUs.
pub fn send_tlb_ipi_all_but_self() {
    apic::send_ipi_others(idt::VEC_IPI_TLB);
}

/// Flushes this CPU's non-global TLB entries (reloads CR3).
pub fn flush_tlb() {
    // SAFETY: rewriting CR3 with its own value only flushes the TLB.
    unsafe { cr::write_cr3(cr::read_cr3()) };
}

/// Waits for an interrupt with interrupts enabled, then disables them again (the idle
/// loop's body; the kernel otherwise runs with interrupts off).
pub fn idle_wait() {
    cr::enable_and_hlt();
    cr::cli();
}

/// Switches to the kernel's own page table.
pub fn load_kernel_space() {
    crate::tlb::loading(0);
    // SAFETY: the kernel's table maps the kernel half like every user table.
    unsafe { paging::activate(paging::kernel_root()) };
}

/// Switches to page table `root` (from `mem::new_user_root`).
///
/// # Safety
/// `root` must share the kernel half (entries 256..511) with the kernel's table.
pub unsafe fn load_cr3(root: u64) {
    x86::spec::host_space_switch();
    // SAFETY: forwarded to the caller.
    unsafe { paging::activate(root) };
}

/// The polarity of `gsi` when the caller asks for the default: ISA IRQs 0..15 as the
/// MADT overrides say (else edge, active high), other GSIs level, active low (PCI).
/// Returns (level, active_low).
pub fn gsi_default_mode(gsi: u32) -> (bool, bool) {
    for irq in 0..16u8 {
        if let Some(r) = ioapic::isa_irq_to_gsi(irq) {
            if r.gsi == gsi {
                return (r.level, r.active_low);
            }
        }
    }
    if gsi < 16 {
        (false, false)
    } else {
        (true, true)
    }
}

/// Routes `gsi` to `vector` on CPU index `cpu` and unmasks it.
pub fn ioapic_route(
    gsi: u32,
    vector: u8,
    cpu: usize,
    level: bool,
    active_low: bool,
) -> Result<(), RouteError> {
    if cpu >= crate::platform::percpu::num_cpus() {
        return Err(RouteError::BadCpu);
    }
    ioapic::route_gsi(gsi, vector, apic_id(cpu), level, active_low)
        .then_some(())
        .ok_or(RouteError::BadGsi)
}

/// The MSI address and data (packed as `assign_gsi` answers them) that deliver `vector`
/// to CPU index `cpu`: fixed delivery, physical destination, edge-triggered (SDM 10.11).
/// The address names the destination by its 8-bit APIC id; a CPU above 255 cannot be
/// reached without interrupt remapping.
pub fn msi_route(vector: u8, cpu: usize) -> Result<u64, RouteError> {
    if cpu >= crate::platform::percpu::num_cpus() {
        return Err(RouteError::BadCpu);
    }
    let id = apic_id(cpu);
    if id > 0xff {
        return Err(RouteError::BadCpu);
    }
    Ok(peregrine_abi::hypercall::msi_result(
        0xfee0_0000 | id << 12,
        vector as u32,
    ))
}

/// Why [`ioapic_route`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// No such CPU.
    BadCpu,
    /// No I/O APIC pin for this GSI.
    BadGsi,
}

/// Masks `gsi` at its I/O APIC.
pub fn ioapic_mask(gsi: u32) {
    ioapic::mask(gsi);
}

/// Unmasks `gsi` at its I/O APIC.
pub fn ioapic_unmask(gsi: u32) {
    ioapic::unmask(gsi);
}
