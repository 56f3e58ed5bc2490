//! MC146818 real-time clock and CMOS RAM (index port 0x70, data port 0x71, IRQ 8).
//!
//! Facts from the Motorola MC146818A datasheet: "Address Map" (Figure 3: time, alarm and
//! control registers 0x00–0x0d, 114 bytes of RAM), "Time, Calendar and Alarm Data
//! Modes" (Table 3: binary or BCD, 12/24-hour with bit 7 = PM), "Update Cycle" (UIP
//! rises 244 µs before the update), "Register A" (DV2–0, RS3–0, Table 5 periodic
//! rates), "Register B" (SET PIE AIE UIE SQWE DM 24/12 DSE), "Register C" (IRQF PF AF
//! UF, cleared by reading), "Register D" (VRT). The PC conventions come from the IBM AT
//! BIOS and are what SeaBIOS and Linux read: 0x32 century, 0x15/0x16 base memory KiB,
//! 0x17/0x18 and 0x30/0x31 extended memory KiB, 0x34/0x35 memory above 16 MiB in 64 KiB
//! units, 0x5b–0x5d memory above 4 GiB in 64 KiB units, 0x5f CPU count − 1. Port 0x70
//! bit 7 is the NMI mask, kept but without effect here.
//!
//! Time is kept as seconds since the Unix epoch plus the injected clock, so any value
//! the guest writes is normalised (a 31st of February becomes the 3rd of March); the
//! day of week is computed, writes to it are ignored. The divider-chain bits of
//! register A are stored but do not stop the clock.

use alloc::sync::Arc;

use crate::bus::{read_bytes, write_bytes, Action, BusDevice, IrqLine, IrqOut};
use crate::clock::{ns_to_ticks, ticks_to_ns, Clock, NS_PER_SEC};

/// Index (0x70) and data (0x71) ports.
pub const RTC_BASE: u64 = 0x70;

/// Register indices.
pub mod reg {
    /// Seconds.
    pub const SECONDS: u8 = 0x00;
    /// Seconds alarm.
    pub const SECONDS_ALARM: u8 = 0x01;
    /// Minutes.
    pub const MINUTES: u8 = 0x02;
    /// Minutes alarm.
    pub const MINUTES_ALARM: u8 = 0x03;
    /// Hours.
    pub const HOURS: u8 = 0x04;
    /// Hours alarm.
    pub const HOURS_ALARM: u8 = 0x05;
    /// Day of week, 1 = Sunday.
    pub const WEEKDAY: u8 = 0x06;
    /// Day of month.
    pub const DAY: u8 = 0x07;
    /// Month.
    pub const MONTH: u8 = 0x08;
    /// Year within the century.
    pub const YEAR: u8 = 0x09;
    /// Status A.
    pub const A: u8 = 0x0a;
    /// Status B.
    pub const B: u8 = 0x0b;
    /// Status C (interrupt flags).
    pub const C: u8 = 0x0c;
    /// Status D (valid RAM and time).
    pub const D: u8 = 0x0d;
    /// Century (IBM PC convention, named in the ACPI FADT).
    pub const CENTURY: u8 = 0x32;
}

/// Status A bits.
pub mod a {
    /// Update in progress.
    pub const UIP: u8 = 1 << 7;
}

/// Status B bits.
pub mod b {
    /// Halt updates to set the time.
    pub const SET: u8 = 1 << 7;
    /// Periodic interrupt enable.
    pub const PIE: u8 = 1 << 6;
    /// Alarm interrupt enable.
    pub const AIE: u8 = 1 << 5;
    /// Update-ended interrupt enable.
    pub const UIE: u8 = 1 << 4;
    /// Binary (not BCD) data mode.
    pub const DM: u8 = 1 << 2;
    /// 24-hour mode.
    pub const H24: u8 = 1 << 1;
}

/// Status C bits.
pub mod c {
    /// An enabled flag is set: the IRQ line is asserted.
    pub const IRQF: u8 = 1 << 7;
    /// Periodic.
    pub const PF: u8 = 1 << 6;
    /// Alarm.
    pub const AF: u8 = 1 << 5;
    /// Update ended.
    pub const UF: u8 = 1 << 4;
}

/// How long UIP is high before each update.
const UIP_NS: u64 = 244_000;
/// The time base.
const RTC_HZ: u64 = 32_768;

/// A calendar time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        // Hinnant's `civil_from_days`.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8, // 1970-01-01 was a Thursday
        }
    }

    fn to_unix(self) -> i64 {
        let month = self.month.clamp(1, 12);
        let day = self.day.clamp(1, 31);
        days_from_civil(self.year.clamp(0, 9999), month, day) * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }
}

/// The RTC and its CMOS RAM.
pub struct Rtc {
    index: u8,
    nmi_masked: bool,
    /// RAM, alarms and registers A and B; the time registers are computed.
    cmos: [u8; 128],
    /// Guest time (Unix seconds) at `base_ns` on the clock.
    base_secs: i64,
    base_ns: u64,
    /// Time held while SET is on.
    frozen: Option<i64>,
    /// Register C.
    flags: u8,
    /// Clock reading up to which events have been evaluated.
    seen_ns: u64,
    clock: Arc<dyn Clock>,
    irq: IrqOut,
}

impl Rtc {
    /// An RTC showing `unix_secs` now, reading time from `clock`, interrupting on `irq`.
    pub fn new(clock: Arc<dyn Clock>, irq: Arc<dyn IrqLine>, unix_secs: i64) -> Self {
        let now = clock.now_ns();
        let mut cmos = [0u8; 128];
        cmos[usize::from(reg::A)] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        cmos[usize::from(reg::B)] = b::H24;
        Self {
            index: 0,
            nmi_masked: false,
            cmos,
            base_secs: unix_secs,
            base_ns: now,
            frozen: None,
            flags: 0,
            seen_ns: now,
            clock,
            irq: IrqOut::new(irq),
        }
    }

    /// A CMOS RAM byte (index taken modulo 128).
    pub fn cmos(&self, index: u8) -> u8 {
        self.cmos[usize::from(index & 0x7f)]
    }

    /// Sets a CMOS RAM byte for the firmware or guest to find (index modulo 128).
    pub fn set_cmos(&mut self, index: u8, value: u8) {
        self.cmos[usize::from(index & 0x7f)] = value;
    }

    /// Whether the guest has masked NMIs through port 0x70 bit 7.
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    /// Records the VM's RAM in the fields SeaBIOS and Linux read: `below_4g` bytes
    /// from 0, `above_4g` bytes from 4 GiB, and `cpus` processors.
    pub fn set_memory_layout(&mut self, below_4g: u64, above_4g: u64, cpus: u8) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let put16 = |s: &mut Self, i: u8, v: u64| {
            let [lo, hi] = (v.min(0xffff) as u16).to_le_bytes();
            s.set_cmos(i, lo);
            s.set_cmos(i + 1, hi);
        };
        put16(self, 0x15, (below_4g / KIB).min(640));
        let ext = below_4g.saturating_sub(MIB) / KIB;
        put16(self, 0x17, ext);
        put16(self, 0x30, ext);
        put16(self, 0x34, below_4g.saturating_sub(16 * MIB) >> 16);
        let high = (above_4g >> 16).min(0xff_ffff);
        self.set_cmos(0x5b, high as u8);
        self.set_cmos(0x5c, (high >> 8) as u8);
        self.set_cmos(0x5d, (high >> 16) as u8);
        self.set_cmos(0x5f, cpus.saturating_sub(1));
    }

    /// The guest's time now, in Unix seconds.
    pub fn unix_time(&self) -> i64 {
        self.secs_at(self.clock.now_ns())
    }

    fn secs_at(&self, now: u64) -> i64 {
        self.frozen.unwrap_or_else(|| {
            self.base_secs
                .saturating_add((now.saturating_sub(self.base_ns) / NS_PER_SEC) as i64)
        })
    }

    fn reg_a(&self) -> u8 {
        self.cmos[usize::from(reg::A)]
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(reg::B)]
    }

    /// Periodic interrupt period in 32.768 kHz ticks (Table 5), if the rate is set.
    fn period_ticks(&self) -> Option<u64> {
        match self.reg_a() & 0x0f {
            0 => None,
            rs @ 1..=2 => Some(1 << (rs + 6)),
            rs => Some(1 << (rs - 1)),
        }
    }

    /// When the next interrupt could assert the IRQ line (ns on the clock), if any:
    /// the VMM arms a timer for it and calls [`Rtc::update`].
    pub fn next_event(&self) -> Option<u64> {
        if self.flags & c::IRQF != 0 {
            return None; // the line stays asserted until register C is read
        }
        let now = self.clock.now_ns();
        let rb = self.reg_b();
        let periodic = self
            .period_ticks()
            .filter(|_| rb & b::PIE != 0)
            .map(|p| ticks_to_ns((ns_to_ticks(now, RTC_HZ) / p + 1) * p, RTC_HZ));
        let second = (rb & (b::UIE | b::AIE) != 0 && self.frozen.is_none()).then(|| {
            let n = now.saturating_sub(self.base_ns) / NS_PER_SEC + 1;
            self.base_ns.saturating_add(n.saturating_mul(NS_PER_SEC))
        });
        match (periodic, second) {
            (Some(p), Some(s)) => Some(p.min(s)),
            (p, s) => p.or(s),
        }
    }

    /// Brings the interrupt flags and the IRQ line up to date with the clock.
    pub fn update(&mut self) {
        let now = self.clock.now_ns();
        let last = self.seen_ns;
        if now > last {
            if let Some(p) = self.period_ticks() {
                if ns_to_ticks(now, RTC_HZ) / p > ns_to_ticks(last, RTC_HZ) / p {
                    self.flags |= c::PF;
                }
            }
            if self.frozen.is_none() && self.secs_at(now) > self.secs_at(last) {
                self.flags |= c::UF;
                if self.alarm_matches(now) {
                    self.flags |= c::AF;
                }
            }
            self.seen_ns = now;
        }
        let enabled = self.reg_b() & (b::PIE | b::AIE | b::UIE);
        if self.flags & enabled & (c::PF | c::AF | c::UF) != 0 {
            self.flags |= c::IRQF;
        }
        self.irq.set(self.flags & c::IRQF != 0);
    }

    fn alarm_matches(&self, now: u64) -> bool {
        [
            (reg::SECONDS_ALARM, reg::SECONDS),
            (reg::MINUTES_ALARM, reg::MINUTES),
            (reg::HOURS_ALARM, reg::HOURS),
        ]
        .iter()
        .all(|&(alarm, field)| {
            let want = self.cmos[usize::from(alarm)];
            want >= 0xc0 || want == self.time_reg(field, now)
        })
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & b::DM != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & b::DM != 0 {
            v
        } else {
            (v >> 4).saturating_mul(10).saturating_add(v & 0x0f)
        }
    }

    fn time_reg(&self, index: u8, now: u64) -> u8 {
        let t = DateTime::from_unix(self.secs_at(now));
        match index {
            reg::SECONDS => self.encode(t.second),
            reg::MINUTES => self.encode(t.minute),
            reg::HOURS if self.reg_b() & b::H24 != 0 => self.encode(t.hour),
            reg::HOURS => {
                let h12 = match t.hour % 12 {
                    0 => 12,
                    h => h,
                };
                self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
            }
            reg::WEEKDAY => self.encode(t.weekday + 1),
            reg::DAY => self.encode(t.day),
            reg::MONTH => self.encode(t.month),
            reg::YEAR => self.encode(t.year.rem_euclid(100) as u8),
            _ => self.encode((t.year.div_euclid(100)).clamp(0, 99) as u8), // CENTURY
        }
    }

    fn set_time_reg(&mut self, index: u8, v: u8, now: u64) {
        let mut t = DateTime::from_unix(self.secs_at(now));
        let f = self.decode(v & 0x7f);
        match index {
            reg::SECONDS => t.second = f,
            reg::MINUTES => t.minute = f,
            reg::HOURS if self.reg_b() & b::H24 != 0 => t.hour = self.decode(v),
            reg::HOURS => t.hour = f % 12 + if v & 0x80 != 0 { 12 } else { 0 },
            reg::DAY => t.day = self.decode(v),
            reg::MONTH => t.month = self.decode(v),
            reg::YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(v) % 100),
            reg::CENTURY => {
                t.year = i64::from(self.decode(v)) * 100 + t.year.rem_euclid(100);
            }
            _ => return, // day of week: computed
        }
        let secs = t.to_unix();
        if self.frozen.is_some() {
            self.frozen = Some(secs);
        } else {
            // Keep the sub-second phase of the running clock.
            let sub = now.saturating_sub(self.base_ns) % NS_PER_SEC;
            self.base_secs = secs;
            self.base_ns = now - sub;
        }
    }

    fn read_data(&mut self, now: u64) -> u8 {
        match self.index {
            reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::WEEKDAY
            | reg::DAY
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY => self.time_reg(self.index, now),
            reg::A => {
                let sub = now.saturating_sub(self.base_ns) % NS_PER_SEC;
                let uip = self.frozen.is_none() && sub >= NS_PER_SEC - UIP_NS;
                self.reg_a() | if uip { a::UIP } else { 0 }
            }
            reg::C => {
                let v = self.flags;
                self.flags = 0;
                v
            }
            reg::D => 0x80, // VRT: RAM and time valid
            i => self.cmos[usize::from(i)],
        }
    }

    fn write_data(&mut self, v: u8, now: u64) {
        match self.index {
            reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::WEEKDAY
            | reg::DAY
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY => self.set_time_reg(self.index, v, now),
            reg::A => self.cmos[usize::from(reg::A)] = v & 0x7f,
            reg::B => {
                let mut v = v;
                if v & b::SET != 0 {
                    v &= !b::UIE; // SET clears UIE
                    if self.frozen.is_none() {
                        self.frozen = Some(self.secs_at(now));
                    }
                } else if let Some(secs) = self.frozen.take() {
                    self.base_secs = secs;
                    self.base_ns = now;
                }
                self.cmos[usize::from(reg::B)] = v;
            }
            reg::C | reg::D => {} // read-only
            i => self.cmos[usize::from(i)] = v,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| {
            self.update();
            let v = match o {
                1 => self.read_data(self.clock.now_ns()),
                _ => 0xff, // the index port is write-only
            };
            self.update();
            v
        });
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        write_bytes(offset, data, |o, v| {
            self.update();
            match o {
                0 => {
                    self.index = v & 0x7f;
                    self.nmi_masked = v & 0x80 != 0;
                }
                1 => self.write_data(v, self.clock.now_ns()),
                _ => {}
            }
            self.update();
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::testutil::{Rng, TestIrq};

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_NIGHT: i64 = 1_709_251_198;

    struct T {
        rtc: Rtc,
        clock: Arc<ManualClock>,
        irq: Arc<TestIrq>,
    }

    impl T {
        fn new(secs: i64) -> Self {
            let clock = Arc::new(ManualClock::new(0));
            let irq = TestIrq::new();
            Self {
                rtc: Rtc::new(clock.clone(), irq.clone(), secs),
                clock,
                irq,
            }
        }
        fn get(&mut self, index: u8) -> u8 {
            self.rtc.write(RTC_BASE, 0, &[index]);
            let mut v = [0];
            self.rtc.read(RTC_BASE, 1, &mut v);
            v[0]
        }
        fn set(&mut self, index: u8, v: u8) {
            self.rtc.write(RTC_BASE, 0, &[index]);
            self.rtc.write(RTC_BASE, 1, &[v]);
        }
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [
            0i64,
            LEAP_NIGHT,
            951_782_400,
            4_102_444_800,
            -86_400,
            253_402_300_799,
        ] {
            let t = DateTime::from_unix(secs);
            assert_eq!(t.to_unix(), secs, "{t:?}");
        }
        let t = DateTime::from_unix(LEAP_NIGHT);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 2, 29, 23, 59, 58)
        );
        assert_eq!(t.weekday, 4);
    }

    #[test]
    fn reads_bcd_24h_time_and_rolls_over_a_leap_day() {
        let mut t = T::new(LEAP_NIGHT);
        let regs = [
            reg::SECONDS,
            reg::MINUTES,
            reg::HOURS,
            reg::DAY,
            reg::MONTH,
            reg::YEAR,
        ];
        let now: Vec<u8> = regs.iter().map(|&r| t.get(r)).collect();
        assert_eq!(now, [0x58, 0x59, 0x23, 0x29, 0x02, 0x24]);
        assert_eq!(t.get(reg::CENTURY), 0x20);
        assert_eq!(t.get(reg::WEEKDAY), 5, "Thursday, 1 = Sunday");
        t.clock.advance(2 * NS_PER_SEC);
        let later: Vec<u8> = regs.iter().map(|&r| t.get(r)).collect();
        assert_eq!(later, [0x00, 0x00, 0x00, 0x01, 0x03, 0x24]);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut t = T::new(LEAP_NIGHT);
        t.set(reg::B, b::DM);
        assert_eq!(t.get(reg::HOURS), 0x80 | 11, "11 PM, binary");
        assert_eq!(t.get(reg::SECONDS), 58);
        t.set(reg::B, 0);
        assert_eq!(t.get(reg::HOURS), 0x80 | 0x11, "11 PM, BCD");
        t.clock.advance(2 * NS_PER_SEC);
        assert_eq!(t.get(reg::HOURS), 0x12, "midnight is 12 AM");
    }

    #[test]
    fn set_mode_freezes_and_writes_take_effect() {
        let mut t = T::new(LEAP_NIGHT);
        t.set(reg::B, b::SET | b::H24);
        t.set(reg::YEAR, 0x99);
        t.set(reg::CENTURY, 0x19);
        t.set(reg::MONTH, 0x12);
        t.set(reg::DAY, 0x31);
        t.set(reg::HOURS, 0x23);
        t.set(reg::MINUTES, 0x59);
        t.set(reg::SECONDS, 0x59);
        t.clock.advance(5 * NS_PER_SEC);
        assert_eq!(t.get(reg::SECONDS), 0x59, "frozen while SET");
        assert_eq!(t.get(reg::A) & a::UIP, 0);
        t.set(reg::B, b::H24);
        t.clock.advance(NS_PER_SEC);
        assert_eq!(t.rtc.unix_time(), 946_684_800, "2000-01-01 00:00:00");
        assert_eq!(t.get(reg::CENTURY), 0x20);
    }

    #[test]
    fn writes_while_running_keep_the_phase() {
        let mut t = T::new(0);
        t.clock.advance(NS_PER_SEC / 2);
        t.set(reg::MINUTES, 0x30);
        assert_eq!(t.rtc.unix_time(), 30 * 60);
        t.clock.advance(NS_PER_SEC / 2);
        assert_eq!(t.rtc.unix_time(), 30 * 60 + 1);
    }

    #[test]
    fn uip_before_each_update() {
        let mut t = T::new(0);
        assert_eq!(t.get(reg::A), 0x26);
        t.clock.set(NS_PER_SEC - UIP_NS - 1);
        assert_eq!(t.get(reg::A) & a::UIP, 0);
        t.clock.set(NS_PER_SEC - UIP_NS);
        assert_eq!(t.get(reg::A) & a::UIP, a::UIP);
        t.clock.set(NS_PER_SEC);
        assert_eq!(t.get(reg::A) & a::UIP, 0);
        assert_eq!(t.get(reg::D), 0x80);
    }

    #[test]
    fn periodic_interrupt_at_1024_hz() {
        let mut t = T::new(0);
        assert_eq!(t.rtc.next_event(), None);
        t.set(reg::B, b::H24 | b::PIE);
        let ev = t.rtc.next_event().unwrap();
        assert_eq!(ev, ticks_to_ns(32, RTC_HZ));
        t.clock.set(ev - 1);
        t.rtc.update();
        assert!(!t.irq.level());
        t.clock.set(ev);
        t.rtc.update();
        assert!(t.irq.level());
        assert_eq!(t.rtc.next_event(), None, "held until C is read");
        assert_eq!(t.get(reg::C), c::IRQF | c::PF);
        assert!(!t.irq.level());
        assert_eq!(t.get(reg::C), 0);
        // Rate 15: 500 ms.
        t.set(reg::A, 0x2f);
        assert_eq!(t.rtc.next_event(), Some(NS_PER_SEC / 2));
    }

    #[test]
    fn update_and_alarm_interrupts() {
        let mut t = T::new(LEAP_NIGHT);
        t.set(reg::SECONDS_ALARM, 0x00);
        t.set(reg::MINUTES_ALARM, 0xff);
        t.set(reg::HOURS_ALARM, 0xc0);
        t.set(reg::B, b::H24 | b::AIE);
        assert_eq!(t.rtc.next_event(), Some(NS_PER_SEC));
        t.clock.set(NS_PER_SEC);
        t.rtc.update();
        assert!(!t.irq.level(), "59 s: no alarm");
        // PF runs at the periodic rate whether or not PIE is set.
        assert_eq!(
            t.get(reg::C),
            c::UF | c::PF,
            "flags set even when not enabled"
        );
        t.clock.set(2 * NS_PER_SEC);
        t.rtc.update();
        assert!(t.irq.level());
        assert_eq!(t.get(reg::C), c::IRQF | c::AF | c::UF | c::PF);
        t.set(reg::B, b::H24 | b::UIE);
        t.clock.set(3 * NS_PER_SEC);
        t.rtc.update();
        assert_eq!(t.irq.take_rises(), 2);
    }

    #[test]
    fn cmos_ram_and_memory_fields() {
        let mut t = T::new(0);
        t.set(0x40, 0xab);
        assert_eq!(t.get(0x40), 0xab);
        t.set(0xc0, 0xcd); // index bit 7 is the NMI mask
        assert!(t.rtc.nmi_masked());
        assert_eq!(t.get(0x40), 0xcd);
        t.rtc.set_memory_layout(0xc000_0000, 0x1_4000_0000, 2);
        assert_eq!(t.get(0x15) as u16 | (t.get(0x16) as u16) << 8, 640);
        assert_eq!(t.get(0x17) as u16 | (t.get(0x18) as u16) << 8, 0xffff);
        assert_eq!(t.get(0x34) as u16 | (t.get(0x35) as u16) << 8, 0xbf00);
        assert_eq!([t.get(0x5b), t.get(0x5c), t.get(0x5d)], [0x00, 0x40, 0x01]);
        assert_eq!(t.get(0x5f), 1);
        t.set(reg::D, 0);
        assert_eq!(t.get(reg::D), 0x80);
        let mut v = [0];
        t.rtc.read(RTC_BASE, 0, &mut v);
        assert_eq!(v, [0xff]);
    }

    #[test]
    fn random_accesses_never_panic() {
        let mut t = T::new(LEAP_NIGHT);
        let mut rng = Rng::new(146818);
        for _ in 0..100_000 {
            match rng.below(5) {
                0 => {
                    let data = [rng.byte(), rng.byte()];
                    let n = rng.size().min(2);
                    t.rtc.write(RTC_BASE, rng.below(3), &data[..n]);
                }
                1 => {
                    let mut v = [0u8; 8];
                    let n = rng.size();
                    t.rtc.read(RTC_BASE, rng.below(3), &mut v[..n]);
                }
                2 => {
                    let span = 1 << rng.below(34);
                    t.clock.advance(rng.below(span));
                    t.rtc.update();
                }
                3 => {
                    if let Some(ev) = t.rtc.next_event() {
                        t.clock.set(ev);
                        t.rtc.update();
                    }
                }
                _ => {
                    let idx = rng.byte();
                    t.set(idx & 0x0f, rng.byte());
                }
            }
            assert_eq!(t.irq.level(), t.rtc.flags & c::IRQF != 0);
        }
    }
}
