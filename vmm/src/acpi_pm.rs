//! ACPI fixed hardware: the PM1a event and control blocks, the PM timer, and the reset
//! control register.
//!
//! Facts from the ACPI Specification 6.5: §4.8.3.1 PM1 Event Grouping (PM1_STS and
//! PM1_EN bits, write-1-to-clear status), §4.8.3.2 PM1 Control Grouping (SCI_EN,
//! SLP_TYPx, write-only SLP_EN), §4.8.3.3 Power Management Timer (3.579545 MHz, 24 bits
//! or 32 with TMR_VAL_EXT, TMR_STS on a change of the top bit), §7.4.2 \_Sx (the SLP_TYP
//! value comes from the DSDT's `\_S5` package); reset register at 0xcf9 from the Intel
//! ICH/PCH datasheets ("Reset Control Register": SYS_RST bit 1, RST_CPU bit 2, FULL_RST
//! bit 3; RST_CPU going to 1 resets).
//!
//! One I/O block in QEMU's PIIX4 layout, which the FADT then describes:
//!
//! | offset | width | register                 | FADT field      |
//! |--------|-------|--------------------------|-----------------|
//! | 0      | 2     | PM1_STS                  | PM1a_EVT_BLK    |
//! | 2      | 2     | PM1_EN                   | (PM1_EVT_LEN 4) |
//! | 4      | 2     | PM1_CNT                  | PM1a_CNT_BLK    |
//! | 8      | 4     | PM_TMR                   | PM_TMR_BLK      |
//!
//! The hardware is always in ACPI mode (SCI_EN reads 1; the FADT's SMI_CMD is 0): there
//! is no SMM to hand over from.

use alloc::sync::Arc;

use crate::bus::{read_bytes, write_bytes, Action, BusDevice, IrqLine, IrqOut};
use crate::clock::{ns_to_ticks, ticks_to_ns, Clock};

/// The PM timer's frequency.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// Default base of the PM block (PIIX4 `PMBA` as QEMU sets it).
pub const PM_BASE: u64 = 0x600;
/// Length of the PM block.
pub const PM_LEN: u64 = 12;
/// The reset control register.
pub const RESET_PORT: u64 = 0xcf9;
/// The value the FADT's RESET_VALUE should hold (SYS_RST | RST_CPU).
pub const RESET_VALUE: u8 = 0x06;

/// Register offsets in the PM block.
pub mod reg {
    /// PM1 status.
    pub const PM1_STS: u64 = 0;
    /// PM1 enable.
    pub const PM1_EN: u64 = 2;
    /// PM1 control.
    pub const PM1_CNT: u64 = 4;
    /// PM timer.
    pub const PM_TMR: u64 = 8;
}

/// PM1_STS / PM1_EN bits.
pub mod pm1 {
    /// Timer carry (status) / enable.
    pub const TMR: u16 = 1 << 0;
    /// Bus master status.
    pub const BM: u16 = 1 << 4;
    /// Global lock release.
    pub const GBL: u16 = 1 << 5;
    /// Power button.
    pub const PWRBTN: u16 = 1 << 8;
    /// Sleep button.
    pub const SLPBTN: u16 = 1 << 9;
    /// RTC alarm.
    pub const RTC: u16 = 1 << 10;
    /// Wake status.
    pub const WAK: u16 = 1 << 15;
    /// Status bits that can raise an SCI (through the same-numbered enable bit).
    pub const SCI_SOURCES: u16 = TMR | GBL | PWRBTN | SLPBTN | RTC;
}

/// PM1_CNT bits.
pub mod cnt {
    /// SCI (not SMI) routing of power-management events.
    pub const SCI_EN: u16 = 1 << 0;
    /// Bus master activity wakes from C3.
    pub const BM_RLD: u16 = 1 << 1;
    /// Global lock release (write-only).
    pub const GBL_RLS: u16 = 1 << 2;
    /// Sleep type field, bits 12:10.
    pub const SLP_TYP_SHIFT: u16 = 10;
    /// Sleep enable (write-only).
    pub const SLP_EN: u16 = 1 << 13;
}

/// How the FADT and DSDT describe this block.
#[derive(Clone, Copy, Debug)]
pub struct PmConfig {
    /// The SLP_TYPa value of the DSDT's `\_S5` package.
    pub s5_slp_typ: u8,
    /// FADT flag TMR_VAL_EXT: a 32-bit timer (else 24-bit).
    pub timer_32bit: bool,
}

impl Default for PmConfig {
    fn default() -> Self {
        Self {
            s5_slp_typ: 5,
            timer_32bit: true,
        }
    }
}

/// PM1a event/control blocks and the PM timer.
pub struct AcpiPm {
    sts: u16,
    en: u16,
    /// PM1_CNT's stored bits (SLP_TYP, BM_RLD); SCI_EN is always 1.
    cnt: u16,
    config: PmConfig,
    /// Timer ticks up to which TMR_STS has been evaluated.
    tmr_seen: u64,
    clock: Arc<dyn Clock>,
    sci: IrqOut,
}

impl AcpiPm {
    /// The PM block, timing from `clock`, raising `sci` (the FADT's SCI_INT, usually 9).
    pub fn new(clock: Arc<dyn Clock>, sci: Arc<dyn IrqLine>, config: PmConfig) -> Self {
        let tmr_seen = ns_to_ticks(clock.now_ns(), PM_TIMER_HZ);
        Self {
            sts: 0,
            en: 0,
            cnt: 0,
            config,
            tmr_seen,
            clock,
            sci: IrqOut::new(sci),
        }
    }

    fn carry_bit(&self) -> u32 {
        if self.config.timer_32bit {
            31
        } else {
            23
        }
    }

    /// The PM timer's value now.
    pub fn timer(&self) -> u32 {
        let t = ns_to_ticks(self.clock.now_ns(), PM_TIMER_HZ);
        let mask = (1u64 << (self.carry_bit() + 1)) - 1;
        (t & mask) as u32
    }

    /// The power button was pressed: an ACPI guest will shut down.
    pub fn press_power_button(&mut self) {
        self.sts |= pm1::PWRBTN;
        self.update();
    }

    /// When the timer's top bit next changes, if that would raise the SCI.
    pub fn next_event(&self) -> Option<u64> {
        if self.en & pm1::TMR == 0 || self.sts & pm1::TMR != 0 {
            return None;
        }
        let shift = self.carry_bit();
        let next = ((self.tmr_seen >> shift) + 1) << shift;
        Some(ticks_to_ns(next, PM_TIMER_HZ))
    }

    /// Brings TMR_STS and the SCI up to date with the clock.
    pub fn update(&mut self) {
        let t = ns_to_ticks(self.clock.now_ns(), PM_TIMER_HZ);
        let shift = self.carry_bit();
        if t >> shift != self.tmr_seen >> shift {
            self.sts |= pm1::TMR;
        }
        self.tmr_seen = t;
        self.sci.set(self.sts & self.en & pm1::SCI_SOURCES != 0);
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        let word = |v: u16, hi: bool| v.to_le_bytes()[usize::from(hi)];
        match offset {
            0 | 1 => word(self.sts, offset == 1),
            2 | 3 => word(self.en, offset == 3),
            4 | 5 => word(self.cnt | cnt::SCI_EN, offset == 5),
            8..=11 => self.timer().to_le_bytes()[(offset - 8) as usize],
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u8) -> Option<Action> {
        let shift = if offset & 1 == 0 { 0 } else { 8 };
        let v = u16::from(v) << shift;
        match offset {
            0 | 1 => self.sts &= !v, // write 1 to clear
            2 | 3 => {
                let keep = self.en & !(0xff << shift);
                self.en = keep | (v & (pm1::SCI_SOURCES | pm1::WAK));
            }
            4 | 5 => {
                let keep = self.cnt & !(0xff << shift);
                self.cnt = keep | (v & (cnt::BM_RLD | 7 << cnt::SLP_TYP_SHIFT));
                if v & cnt::SLP_EN != 0 {
                    let typ = (self.cnt >> cnt::SLP_TYP_SHIFT) & 7;
                    if typ == u16::from(self.config.s5_slp_typ) {
                        return Some(Action::PowerOff);
                    }
                    // Other sleep states are not supported: the write has no effect.
                }
            }
            _ => {}
        }
        None
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.update();
        read_bytes(offset, data, |o| self.read_reg(o));
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        self.update();
        let action = write_bytes(offset, data, |o, v| self.write_reg(o, v));
        self.update();
        action
    }
}

/// The reset control register (0xcf9). A byte write with RST_CPU set resets the VM.
///
/// On PCs 0xcf9 sits inside the PCI configuration address register (0xcf8, dword); a PCI
/// host bridge that owns 0xcf8–0xcff should hand byte accesses to 0xcf9 to this.
#[derive(Clone, Debug, Default)]
pub struct ResetControl {
    /// SYS_RST and FULL_RST as written (RST_CPU does not stay set: the reset happens).
    value: u8,
}

impl ResetControl {
    /// Bits: SYS_RST (hard reset), RST_CPU (go), FULL_RST.
    const SYS_RST: u8 = 1 << 1;
    const RST_CPU: u8 = 1 << 2;
    const FULL_RST: u8 = 1 << 3;

    /// A guest read.
    pub fn read_byte(&self) -> u8 {
        self.value
    }

    /// A guest write; [`Action::Reset`] when RST_CPU is set.
    pub fn write_byte(&mut self, v: u8) -> Option<Action> {
        self.value = v & (Self::SYS_RST | Self::FULL_RST);
        (v & Self::RST_CPU != 0).then_some(Action::Reset)
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        read_bytes(
            offset,
            data,
            |o| if o == 0 { self.read_byte() } else { 0xff },
        );
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        write_bytes(
            offset,
            data,
            |o, v| if o == 0 { self.write_byte(v) } else { None },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, NS_PER_SEC};
    use crate::testutil::{Rng, TestIrq};

    fn pm(config: PmConfig) -> (AcpiPm, Arc<ManualClock>, Arc<TestIrq>) {
        let clock = Arc::new(ManualClock::new(0));
        let sci = TestIrq::new();
        (AcpiPm::new(clock.clone(), sci.clone(), config), clock, sci)
    }

    fn r16(p: &mut AcpiPm, off: u64) -> u16 {
        let mut v = [0u8; 2];
        p.read(PM_BASE, off, &mut v);
        u16::from_le_bytes(v)
    }

    fn w16(p: &mut AcpiPm, off: u64, v: u16) -> Option<Action> {
        p.write(PM_BASE, off, &v.to_le_bytes())
    }

    #[test]
    fn timer_counts_at_3_58_mhz() {
        let (mut p, clock, _) = pm(PmConfig::default());
        clock.set(NS_PER_SEC);
        let mut v = [0u8; 4];
        p.read(PM_BASE, reg::PM_TMR, &mut v);
        assert_eq!(u32::from_le_bytes(v), 3_579_545);
        // 24-bit timers wrap at 2^24.
        let (p24, clock, _) = pm(PmConfig {
            timer_32bit: false,
            ..PmConfig::default()
        });
        clock.set(ticks_to_ns(0x100_0005, PM_TIMER_HZ));
        assert_eq!(p24.timer(), 5);
    }

    #[test]
    fn s5_sleep_powers_off() {
        let (mut p, _, _) = pm(PmConfig::default());
        assert_eq!(r16(&mut p, reg::PM1_CNT), cnt::SCI_EN);
        // Another sleep type: nothing.
        assert_eq!(w16(&mut p, reg::PM1_CNT, 1 << 10 | cnt::SLP_EN), None);
        assert_eq!(
            w16(&mut p, reg::PM1_CNT, 5 << 10),
            None,
            "type without SLP_EN"
        );
        assert_eq!(
            r16(&mut p, reg::PM1_CNT),
            5 << 10 | cnt::SCI_EN,
            "SLP_EN reads 0"
        );
        assert_eq!(
            w16(&mut p, reg::PM1_CNT, 5 << 10 | cnt::SLP_EN),
            Some(Action::PowerOff)
        );
        // A byte write to the high half, as some guests do.
        let (mut p, _, _) = pm(PmConfig {
            s5_slp_typ: 0,
            ..PmConfig::default()
        });
        assert_eq!(p.write(PM_BASE, 5, &[0x20]), Some(Action::PowerOff));
    }

    #[test]
    fn power_button_raises_sci_until_cleared() {
        let (mut p, _, sci) = pm(PmConfig::default());
        p.press_power_button();
        assert!(!sci.level(), "not enabled");
        w16(&mut p, reg::PM1_EN, pm1::PWRBTN);
        assert!(sci.level());
        assert_eq!(r16(&mut p, reg::PM1_STS), pm1::PWRBTN);
        w16(&mut p, reg::PM1_STS, 0);
        assert!(sci.level(), "writing 0 keeps it");
        w16(&mut p, reg::PM1_STS, pm1::PWRBTN);
        assert!(!sci.level());
        assert_eq!(r16(&mut p, reg::PM1_STS), 0);
    }

    #[test]
    fn timer_carry_raises_sci() {
        let (mut p, clock, sci) = pm(PmConfig {
            timer_32bit: false,
            ..PmConfig::default()
        });
        assert_eq!(p.next_event(), None);
        w16(&mut p, reg::PM1_EN, pm1::TMR);
        let ev = p.next_event().unwrap();
        assert_eq!(ev, ticks_to_ns(1 << 23, PM_TIMER_HZ));
        clock.set(ev - 1);
        p.update();
        assert!(!sci.level());
        clock.set(ev);
        p.update();
        assert!(sci.level());
        assert_eq!(p.next_event(), None);
        w16(&mut p, reg::PM1_STS, pm1::TMR);
        assert!(!sci.level());
        assert_eq!(p.next_event(), Some(ticks_to_ns(2 << 23, PM_TIMER_HZ)));
    }

    #[test]
    fn reset_register() {
        let mut r = ResetControl::default();
        assert_eq!(r.write(RESET_PORT, 0, &[0x02]), None);
        assert_eq!(r.read_byte(), 0x02);
        assert_eq!(r.write(RESET_PORT, 0, &[RESET_VALUE]), Some(Action::Reset));
        assert_eq!(r.write(RESET_PORT, 0, &[0x0e]), Some(Action::Reset));
        let mut v = [0u8; 2];
        r.read(RESET_PORT, 0, &mut v);
        assert_eq!(v, [0x0a, 0xff]);
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut p, clock, sci) = pm(PmConfig {
            s5_slp_typ: 7,
            timer_32bit: false,
        });
        let mut rng = Rng::new(0xac91);
        for _ in 0..100_000 {
            let off = rng.below(PM_LEN + 2);
            let mut buf = [0u8; 8];
            let n = rng.size();
            match rng.below(4) {
                0 => {
                    buf.iter_mut().for_each(|b| *b = rng.byte());
                    // Keep clear of S5 so the loop keeps going.
                    if let Some(a) = p.write(PM_BASE, off, &buf[..n]) {
                        assert_eq!(a, Action::PowerOff);
                    }
                }
                1 => p.read(PM_BASE, off, &mut buf[..n]),
                2 => clock.advance(rng.below(1 << 32)),
                _ => {
                    if let Some(ev) = p.next_event() {
                        clock.set(ev);
                        p.update();
                        assert!(sci.level());
                    }
                }
            }
            p.update();
            assert_eq!(sci.level(), p.sts & p.en & pm1::SCI_SOURCES != 0);
        }
    }
}
