//! Local APIC (SDM vol. 3 ch. 10): x2APIC through MSRs when available, else xAPIC MMIO
//! through the physmap. EOI, IPIs, and the timer (periodic, one-shot, TSC deadline).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::idt::{VEC_APIC_ERROR, VEC_SPURIOUS, VEC_TIMER};
use super::msr::{rdmsr, rdmsr_raw, wrmsr, wrmsr_raw, Msr};
use crate::mem::layout::phys_to_virt;

/// xAPIC register offsets (x2APIC MSR = 0x800 + offset / 16).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Reg {
    Id = 0x20,
    Version = 0x30,
    Tpr = 0x80,
    Eoi = 0xb0,
    Ldr = 0xd0,
    Svr = 0xf0,
    Esr = 0x280,
    IcrLo = 0x300,
    IcrHi = 0x310,
    LvtTimer = 0x320,
    LvtThermal = 0x330,
    LvtPerf = 0x340,
    LvtLint0 = 0x350,
    LvtLint1 = 0x360,
    LvtError = 0x370,
    TimerInit = 0x380,
    TimerCurrent = 0x390,
    TimerDivide = 0x3e0,
}

const LVT_MASKED: u32 = 1 << 16;
const LVT_NMI: u32 = 4 << 8;
const TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_TSC_DEADLINE: u32 = 2 << 17;
const ICR_PENDING: u32 = 1 << 12;
/// Divide-by-16 encoding for TimerDivide.
const DIV_16: u32 = 0x3;

static X2APIC: AtomicBool = AtomicBool::new(false);
static TSC_DEADLINE: AtomicBool = AtomicBool::new(false);
static MMIO: AtomicU64 = AtomicU64::new(0);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BUS_KHZ: AtomicU64 = AtomicU64::new(0);

/// Whether x2APIC mode is in use.
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Reads a LAPIC register.
pub fn read(r: Reg) -> u32 {
    if x2apic() {
        // SAFETY: x2APIC mode is on, so the x2APIC MSR range exists.
        unsafe { rdmsr_raw(Msr::X2ApicBase as u32 + (r as u32 >> 4)) as u32 }
    } else {
        // SAFETY: MMIO holds the physmap address of this CPU's xAPIC page (uncached).
        unsafe { ((MMIO.load(Ordering::Relaxed) + r as u64) as *const u32).read_volatile() }
    }
}

/// Writes a LAPIC register.
pub fn write(r: Reg, v: u32) {
    if x2apic() {
        // SAFETY: as in read(); LAPIC writes affect only interrupt delivery.
        unsafe { wrmsr_raw(Msr::X2ApicBase as u32 + (r as u32 >> 4), u64::from(v)) }
    } else {
        // SAFETY: as in read().
        unsafe { ((MMIO.load(Ordering::Relaxed) + r as u64) as *mut u32).write_volatile(v) }
    }
}

/// Signals end of interrupt.
#[inline]
pub fn eoi() {
    write(Reg::Eoi, 0);
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    if x2apic() {
        read(Reg::Id)
    } else {
        read(Reg::Id) >> 24
    }
}

/// Reads (and clears) the error status.
pub fn read_esr() -> u32 {
    write(Reg::Esr, 0);
    read(Reg::Esr)
}

/// Chooses the mode; call on the BSP before [`init_cpu`].
pub fn setup(use_x2apic: bool, tsc_deadline: bool, mmio_phys: u64) {
    X2APIC.store(use_x2apic, Ordering::Relaxed);
    TSC_DEADLINE.store(tsc_deadline, Ordering::Relaxed);
    MMIO.store(phys_to_virt(mmio_phys), Ordering::Relaxed);
}

/// Enables and programs this CPU's LAPIC (all LVTs masked except LINT1 = NMI, error).
pub fn init_cpu() {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; we only set the enable bits
    // (xAPIC first, then x2APIC, as the architecture requires).
    unsafe {
        let base = rdmsr(Msr::ApicBase);
        wrmsr(Msr::ApicBase, base | (1 << 11));
        if x2apic() {
            wrmsr(Msr::ApicBase, base | (1 << 11) | (1 << 10));
        }
    }
    write(Reg::Tpr, 0);
    write(Reg::LvtTimer, LVT_MASKED);
    write(Reg::LvtLint0, LVT_MASKED);
    write(Reg::LvtLint1, LVT_NMI);
    write(Reg::LvtError, u32::from(VEC_APIC_ERROR));
    if (read(Reg::Version) >> 16) & 0xff >= 4 {
        write(Reg::LvtPerf, LVT_MASKED);
    }
    if (read(Reg::Version) >> 16) & 0xff >= 5 {
        write(Reg::LvtThermal, LVT_MASKED);
    }
    write(Reg::Svr, 0x100 | u32::from(VEC_SPURIOUS));
    let _ = read_esr();
    eoi();
}

// ---- IPIs ----------------------------------------------------------------------------

/// ICR destination shorthand.
#[derive(Debug, Clone, Copy)]
pub enum Dest {
    /// The APIC with this id.
    Apic(u32),
    /// Self.
    Myself,
    /// All including self.
    All,
    /// All excluding self.
    Others,
}

/// Writes the ICR (delivery mode bits in `lo` included).
pub fn send_icr(dest: Dest, lo: u32) {
    let (short, id) = match dest {
        Dest::Apic(id) => (0, id),
        Dest::Myself => (1 << 18, 0),
        Dest::All => (2 << 18, 0),
        Dest::Others => (3 << 18, 0),
    };
    super::cr::without_interrupts(|| {
        if x2apic() {
            let v = (u64::from(id) << 32) | u64::from(lo | short);
            // SAFETY: x2APIC ICR (MSR 0x830) write sends the IPI; no memory effect.
            unsafe { wrmsr_raw(0x830, v) };
        } else {
            while read(Reg::IcrLo) & ICR_PENDING != 0 {
                core::hint::spin_loop();
            }
            write(Reg::IcrHi, id << 24);
            write(Reg::IcrLo, lo | short);
        }
    });
}

/// Sends fixed interrupt `vector` to the CPU with APIC id `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) {
    send_icr(Dest::Apic(apic_id), u32::from(vector) | (1 << 14));
}

/// Sends `vector` to all other CPUs.
pub fn send_ipi_others(vector: u8) {
    send_icr(Dest::Others, u32::from(vector) | (1 << 14));
}

/// Sends `vector` to all CPUs including this one.
pub fn send_ipi_all(vector: u8) {
    send_icr(Dest::All, u32::from(vector) | (1 << 14));
}

/// Sends an NMI to `apic_id`.
pub fn send_nmi(apic_id: u32) {
    send_icr(Dest::Apic(apic_id), (4 << 8) | (1 << 14));
}

/// Sends INIT (assert, level) to `apic_id`.
pub fn send_init(apic_id: u32) {
    send_icr(Dest::Apic(apic_id), (5 << 8) | (1 << 14) | (1 << 15));
}

/// Sends STARTUP with the page number `page` (entry at `page << 12`) to `apic_id`.
pub fn send_sipi(apic_id: u32, page: u8) {
    send_icr(Dest::Apic(apic_id), (6 << 8) | u32::from(page) | (1 << 14));
}

// ---- timer ---------------------------------------------------------------------------

/// Records the calibration: TSC and LAPIC bus (divide-by-1) frequencies in kHz.
pub fn set_frequencies(tsc_khz: u64, bus_khz: u64) {
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    BUS_KHZ.store(bus_khz, Ordering::Relaxed);
}

/// TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// LAPIC timer input (bus) frequency in kHz.
pub fn bus_khz() -> u64 {
    BUS_KHZ.load(Ordering::Relaxed)
}

/// Whether the TSC-deadline timer mode is in use.
pub fn has_tsc_deadline() -> bool {
    TSC_DEADLINE.load(Ordering::Relaxed)
}

/// Starts the timer in periodic mode at `hz` interrupts per second.
pub fn timer_periodic(hz: u32) {
    let count = (bus_khz() * 1000 / 16 / u64::from(hz.max(1))).clamp(1, u64::from(u32::MAX));
    write(Reg::TimerDivide, DIV_16);
    write(Reg::LvtTimer, u32::from(VEC_TIMER) | TIMER_PERIODIC);
    write(Reg::TimerInit, count as u32);
}

/// Arms a one-shot timer interrupt in `us` microseconds (0: stop the timer).
pub fn arm_timer_oneshot(us: u64) {
    write(Reg::TimerDivide, DIV_16);
    write(Reg::LvtTimer, u32::from(VEC_TIMER));
    let count = if us == 0 {
        0
    } else {
        (us * bus_khz() / 1000 / 16).clamp(1, u64::from(u32::MAX))
    };
    write(Reg::TimerInit, count as u32);
}

/// Arms a timer interrupt at absolute TSC value `deadline` (TSC-deadline mode where the
/// CPU has it, else a one-shot countdown; 0 stops the timer).
pub fn arm_timer_tsc_deadline(deadline: u64) {
    if has_tsc_deadline() {
        write(Reg::LvtTimer, u32::from(VEC_TIMER) | TIMER_TSC_DEADLINE);
        // SAFETY: the MSR exists when CPUID reports TSC-deadline; mfence orders the LVT
        // write (MMIO in xAPIC mode) before the MSR write as the SDM asks.
        unsafe {
            core::arch::asm!("mfence", options(nostack, preserves_flags));
            wrmsr(Msr::TscDeadline, deadline);
        }
    } else if deadline == 0 {
        arm_timer_oneshot(0);
    } else {
        let now = super::cr::rdtsc();
        let khz = tsc_khz().max(1);
        let us = deadline.saturating_sub(now) * 1000 / khz;
        arm_timer_oneshot(us.max(1));
    }
}

/// Stops the timer.
pub fn timer_stop() {
    write(Reg::LvtTimer, LVT_MASKED);
    write(Reg::TimerInit, 0);
    if has_tsc_deadline() {
        // SAFETY: as in arm_timer_tsc_deadline.
        unsafe { wrmsr(Msr::TscDeadline, 0) };
    }
}

/// Starts a masked one-shot countdown from `u32::MAX` at divide 16 (for calibration).
pub fn calibration_start() {
    write(Reg::TimerDivide, DIV_16);
    write(Reg::LvtTimer, LVT_MASKED);
    write(Reg::TimerInit, u32::MAX);
}

/// Current countdown value.
pub fn timer_current() -> u32 {
    read(Reg::TimerCurrent)
}
