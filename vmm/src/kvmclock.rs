//! kvmclock: the paravirtual clock behind KVM_FEATURE_CLOCKSOURCE2 (Linux
//! `Documentation/virt/kvm/x86/msr.rst`, `arch/x86/include/asm/pvclock-abi.h`).
//!
//! The guest writes a guest-physical address to MSR_KVM_SYSTEM_TIME_NEW (bit 0:
//! enable); the VMM keeps a `pvclock_vcpu_time_info` there:
//!
//! | offset | field               | meaning                                         |
//! |--------|---------------------|-------------------------------------------------|
//! | 0      | version u32         | odd while the VMM updates, even when consistent |
//! | 8      | tsc_timestamp u64   | guest TSC at the sample                         |
//! | 16     | system_time u64     | guest ns at the sample                          |
//! | 24     | tsc_to_system_mul u32 | ns per tick as a 32.32 fraction               |
//! | 28     | tsc_shift i8        | pre-shift of the tick delta                     |
//! | 29     | flags u8            | PVCLOCK_TSC_STABLE_BIT                          |
//!
//! and the guest computes `system_time + pvclock_scale_delta(tsc - tsc_timestamp, mul,
//! shift)`. MSR_KVM_WALL_CLOCK_NEW names a `pvclock_wall_clock` (version u32, sec u32,
//! nsec u32): the wall-clock time at which `system_time` was 0. The scale comes from the
//! TSC frequency the way KVM's `kvm_get_time_scale` computes it.

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::clock::NS_PER_SEC;
use crate::vcpu::{GuestMemory, Unbacked, PAGE_SIZE};

/// MSR: the wall clock's address (write-only effect).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// MSR: the per-vCPU time structure's address, bit 0 enable.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `flags`: the TSC is stable across vCPUs, so the guest need not keep the clock
/// monotonic across them by hand.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;
/// Size of `pvclock_vcpu_time_info`.
pub const TIME_INFO_SIZE: usize = 32;
/// Size of `pvclock_wall_clock`.
pub const WALL_CLOCK_SIZE: usize = 12;

/// Why the guest's kvmclock MSR write had no effect. The doc comment is the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmClockError {
    /// The structure crosses a page boundary.
    CrossesPage(u64),
    /// The structure is not in RAM.
    Unbacked(u64),
}

impl From<Unbacked> for KvmClockError {
    fn from(e: Unbacked) -> Self {
        KvmClockError::Unbacked(e.gpa)
    }
}

impl fmt::Display for KvmClockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KvmClockError::CrossesPage(a) => {
                write!(f, "kvmclock structure at {a:#x} crosses a page")
            }
            KvmClockError::Unbacked(a) => write!(f, "kvmclock structure at {a:#x} is not RAM"),
        }
    }
}

/// `pvclock_vcpu_time_info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeInfo {
    /// Odd while being updated.
    pub version: u32,
    /// Guest TSC at the sample.
    pub tsc_timestamp: u64,
    /// Guest nanoseconds at the sample.
    pub system_time: u64,
    /// 32.32 multiplier from (shifted) ticks to ns.
    pub tsc_to_system_mul: u32,
    /// Shift applied to the tick delta before multiplying.
    pub tsc_shift: i8,
    /// PVCLOCK_* flags.
    pub flags: u8,
}

impl TimeInfo {
    /// The guest-memory layout.
    pub fn to_bytes(&self) -> [u8; TIME_INFO_SIZE] {
        let mut b = [0u8; TIME_INFO_SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[8..16].copy_from_slice(&self.tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time.to_le_bytes());
        b[24..28].copy_from_slice(&self.tsc_to_system_mul.to_le_bytes());
        b[28] = self.tsc_shift as u8;
        b[29] = self.flags;
        b
    }

    /// Parses the guest-memory layout.
    pub fn from_bytes(b: &[u8; TIME_INFO_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        Self {
            version: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            tsc_timestamp: u64_at(8),
            system_time: u64_at(16),
            tsc_to_system_mul: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
            tsc_shift: b[28] as i8,
            flags: b[29],
        }
    }

    /// The guest's nanoseconds at guest TSC `tsc`, as the guest computes them.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        self.system_time.wrapping_add(scale_delta(
            tsc.wrapping_sub(self.tsc_timestamp),
            self.tsc_to_system_mul,
            self.tsc_shift,
        ))
    }
}

/// `pvclock_scale_delta`: `(delta << shift) * mul >> 32` (or `>> -shift` first).
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 {
        delta >> shift.unsigned_abs().min(63)
    } else {
        delta << shift.min(63)
    };
    ((u128::from(d) * u128::from(mul)) >> 32) as u64
}

/// KVM's `kvm_get_time_scale(scaled_hz, base_hz)`: the (mul, shift) that turn ticks of
/// `base_hz` into ticks of `scaled_hz`.
pub fn time_scale(scaled_hz: u64, base_hz: u64) -> (u32, i8) {
    let mut scaled = scaled_hz.max(1);
    let mut tps64 = base_hz.max(1);
    let mut shift: i32 = 0;
    while tps64 > scaled.saturating_mul(2) || tps64 & 0xffff_ffff_0000_0000 != 0 {
        tps64 >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps64 as u32;
    while u64::from(tps32) <= scaled || scaled & 0xffff_ffff_0000_0000 != 0 {
        if scaled & 0xffff_ffff_0000_0000 != 0 || tps32 & 0x8000_0000 != 0 {
            scaled >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
    }
    // div_frac: (scaled << 32) / tps32, which fits in 32 bits since scaled < tps32.
    let mul = ((u128::from(scaled) << 32) / u128::from(tps32.max(1))) as u32;
    (mul, shift as i8)
}

/// A moment read on both of the guest's clocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeSample {
    /// The guest's TSC.
    pub tsc: u64,
    /// The guest's monotonic nanoseconds (the VM's clock).
    pub ns: u64,
}

/// One vCPU's kvmclock.
#[derive(Clone, Debug)]
pub struct KvmClock {
    mul: u32,
    shift: i8,
    system_time_msr: u64,
    wall_clock_msr: u64,
    version: u32,
}

impl KvmClock {
    /// A disabled clock for a guest TSC running at `tsc_hz`.
    pub fn new(tsc_hz: u64) -> Self {
        let (mul, shift) = time_scale(NS_PER_SEC, tsc_hz);
        Self {
            mul,
            shift,
            system_time_msr: 0,
            wall_clock_msr: 0,
            version: 0,
        }
    }

    /// The scale the guest is told: (tsc_to_system_mul, tsc_shift).
    pub fn scale(&self) -> (u32, i8) {
        (self.mul, self.shift)
    }

    /// Whether the guest enabled the clock, and where its structure is.
    pub fn enabled_at(&self) -> Option<u64> {
        (self.system_time_msr & 1 != 0).then_some(self.system_time_msr & !1)
    }

    /// A guest RDMSR: the value last written, for the two kvmclock MSRs.
    pub fn rdmsr(&self, msr: u32) -> Option<u64> {
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW => Some(self.system_time_msr),
            MSR_KVM_WALL_CLOCK_NEW => Some(self.wall_clock_msr),
            _ => None,
        }
    }

    /// A guest WRMSR of `value` to `msr`: `Ok(false)` if `msr` is not a kvmclock MSR.
    /// `now` samples both guest clocks; `boot_wall_ns` is the wall-clock time (ns since
    /// the Unix epoch) at guest ns 0. A bad address leaves the clock disabled.
    pub fn wrmsr<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        msr: u32,
        value: u64,
        now: TimeSample,
        boot_wall_ns: u64,
    ) -> Result<bool, KvmClockError> {
        match msr {
            MSR_KVM_SYSTEM_TIME_NEW => {
                self.system_time_msr = value;
                if value & 1 != 0 {
                    if let Err(e) = self.update(mem, now) {
                        self.system_time_msr &= !1;
                        return Err(e);
                    }
                }
                Ok(true)
            }
            MSR_KVM_WALL_CLOCK_NEW => {
                self.wall_clock_msr = value;
                write_wall_clock(mem, value, boot_wall_ns)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Rewrites the structure for `now` (on enable, and whenever the VMM's view of the
    /// TSC changes, e.g. after the vCPU migrated or the VM was paused). Nothing to do
    /// while disabled.
    pub fn update<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        now: TimeSample,
    ) -> Result<(), KvmClockError> {
        let Some(gpa) = self.enabled_at() else {
            return Ok(());
        };
        check_page(gpa, TIME_INFO_SIZE)?;
        // Odd while the fields change; the guest retries a read that saw an odd or
        // changed version.
        self.version = self.version.wrapping_add(1) | 1;
        mem.write(gpa, &self.version.to_le_bytes())?;
        fence(Ordering::SeqCst);
        let info = TimeInfo {
            version: self.version,
            tsc_timestamp: now.tsc,
            system_time: now.ns,
            tsc_to_system_mul: self.mul,
            tsc_shift: self.shift,
            flags: PVCLOCK_TSC_STABLE_BIT,
        };
        mem.write(gpa + 4, &info.to_bytes()[4..])?;
        fence(Ordering::SeqCst);
        self.version = self.version.wrapping_add(1);
        mem.write(gpa, &self.version.to_le_bytes())?;
        Ok(())
    }
}

fn check_page(gpa: u64, len: usize) -> Result<(), KvmClockError> {
    let last = gpa
        .checked_add(len as u64 - 1)
        .ok_or(KvmClockError::CrossesPage(gpa))?;
    if gpa / PAGE_SIZE != last / PAGE_SIZE {
        return Err(KvmClockError::CrossesPage(gpa));
    }
    Ok(())
}

/// Writes `pvclock_wall_clock` at `gpa`: the wall time at guest ns 0, under the same
/// version protocol (continuing from the version the guest memory holds).
pub fn write_wall_clock<M: GuestMemory + ?Sized>(
    mem: &mut M,
    gpa: u64,
    boot_wall_ns: u64,
) -> Result<(), KvmClockError> {
    check_page(gpa, WALL_CLOCK_SIZE)?;
    let mut v = [0u8; 4];
    mem.read(gpa, &mut v)?;
    let version = u32::from_le_bytes(v).wrapping_add(1) | 1;
    mem.write(gpa, &version.to_le_bytes())?;
    fence(Ordering::SeqCst);
    let sec = (boot_wall_ns / NS_PER_SEC) as u32;
    let nsec = (boot_wall_ns % NS_PER_SEC) as u32;
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&sec.to_le_bytes());
    b[4..].copy_from_slice(&nsec.to_le_bytes());
    mem.write(gpa + 4, &b)?;
    fence(Ordering::SeqCst);
    mem.write(gpa, &version.wrapping_add(1).to_le_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests;
