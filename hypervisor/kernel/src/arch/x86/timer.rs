//! TSC and LAPIC-timer calibration.

use super::{apic, cpu, cr, pit};

/// Calibration window in milliseconds.
const WINDOW_MS: u64 = 25;

/// Measures the TSC and LAPIC bus frequencies (kHz) and records them in [`apic`].
/// The TSC comes from CPUID 0x15 when reported, else from the PIT (else CPUID 0x16).
pub fn calibrate() -> (u64, u64) {
    let (mut t0, mut t1, mut a0, mut a1) = (0u64, 0u64, 0u32, 0u32);
    let ok = pit::measure(
        WINDOW_MS,
        || {
            apic::calibration_start();
            a0 = apic::timer_current();
            t0 = cr::rdtsc();
        },
        || {
            t1 = cr::rdtsc();
            a1 = apic::timer_current();
        },
    );
    let info = cpu::info();
    let pit_tsc = ok.then(|| (t1 - t0) / WINDOW_MS);
    let tsc_khz = info
        .cpuid_tsc_khz
        .or(pit_tsc)
        .or(info.cpuid_base_khz)
        .unwrap_or(1_000_000);
    let bus_khz = if ok {
        u64::from(a0 - a1) * 16 / WINDOW_MS
    } else {
        100_000
    };
    apic::set_frequencies(tsc_khz, bus_khz.max(1));
    apic::timer_stop();
    (tsc_khz, bus_khz)
}
