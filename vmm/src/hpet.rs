//! HPET (MMIO at 0xfed00000): a 64-bit main counter at 100 MHz and three timers with
//! comparators, one-shot or periodic, edge or level interrupts routed to I/O APIC
//! inputs, and the legacy replacement route.
//!
//! Facts from the IA-PC HPET Specification 1.0a: §2.3.1 register map (capabilities
//! 0x000, configuration 0x010, interrupt status 0x020, main counter 0x0f0, timer `n`
//! configuration 0x100 + 0x20n, comparator 0x108 + 0x20n, FSB route 0x110 + 0x20n);
//! §2.3.4 capabilities (REV_ID 7:0 non-zero, NUM_TIM_CAP 12:8 = last timer's number,
//! COUNT_SIZE_CAP 13, LEG_RT_CAP 15, VENDOR_ID 31:16, COUNTER_CLK_PERIOD 63:32 in
//! femtoseconds, at most 100 ns); §2.3.5 configuration (ENABLE_CNF 0: the main counter
//! runs and timers may interrupt; LEG_RT_CNF 1: timer 0 drives IRQ 0 / I/O APIC input 2
//! and timer 1 IRQ 8 / input 8, whatever their route fields say); §2.3.6 status (a
//! level-triggered timer's bit is set when it fires, whether or not its interrupt is
//! enabled, and cleared by writing 1; edge-triggered timers leave it alone); §2.3.8
//! timer configuration (INT_TYPE 1 level, INT_ENB 2, TYPE 3 periodic, PER_INT_CAP 4,
//! SIZE_CAP 5, VAL_SET 6, 32MODE 8, INT_ROUTE 13:9, FSB_EN 14, FSB_INT_DEL_CAP 15,
//! INT_ROUTE_CAP 63:32 — a route the timer cannot take does not stick); §2.3.9
//! comparators (a periodic timer adds the last value written to its comparator each
//! time it fires; with VAL_SET the write sets the comparator itself, then VAL_SET
//! clears); §2.3.9.2.4 (a 32-bit-mode timer compares the low 32 bits of the counter, so
//! it fires again when they wrap). The periodic-write sequence (VAL_SET, then the first
//! deadline, then the period) is what Linux's `hpet_clkevt_set_state_periodic` does.
//!
//! Time comes from the injected [`Clock`]: the VMM arms a host timer for
//! [`Hpet::next_event`] and calls [`Hpet::update`] when it fires; every guest access
//! brings the device up to date first. The main counter only moves while ENABLE_CNF
//! is set. No FSB (MSI) delivery: FSB_INT_DEL_CAP reads 0.

use alloc::sync::Arc;

use crate::bus::{read_bytes, Action, BusDevice};
use crate::clock::{ns_to_ticks, ticks_to_ns, Clock};

/// Default MMIO base.
pub const HPET_BASE: u64 = 0xfed0_0000;
/// Size of the register block.
pub const HPET_SIZE: u64 = 0x400;
/// Timers.
pub const NUM_TIMERS: usize = 3;
/// Counter period in femtoseconds (10 ns).
pub const PERIOD_FS: u64 = 10_000_000;
/// Counter frequency.
pub const HZ: u64 = 1_000_000_000_000_000 / PERIOD_FS;
/// The minimum period the ACPI table advertises for periodic mode, in ticks.
pub const MIN_PERIODIC_TICKS: u16 = 128;
/// The vendor ID in the capabilities register (Intel, as the common chipsets say).
pub const VENDOR_ID: u16 = 0x8086;
/// The I/O APIC inputs a timer may be routed to (INT_ROUTE_CAP): 20–23, clear of the
/// ISA IRQs and of the PCI INTx# inputs 16–19 ([`crate::pci::intx_gsi`]).
pub const ROUTE_CAP: u32 = 0x00f0_0000;
/// The I/O APIC input timer 0 drives in legacy replacement mode (IRQ 0, per the MADT's
/// interrupt source override).
pub const LEGACY_PIN_TIMER0: u8 = 2;
/// The I/O APIC input timer 1 drives in legacy replacement mode (IRQ 8).
pub const LEGACY_PIN_TIMER1: u8 = 8;

/// Register offsets.
pub mod reg {
    /// General capabilities and ID.
    pub const CAP: u64 = 0x000;
    /// General configuration.
    pub const CONFIG: u64 = 0x010;
    /// General interrupt status.
    pub const STATUS: u64 = 0x020;
    /// Main counter.
    pub const COUNTER: u64 = 0x0f0;
    /// Timer `n`'s configuration and capabilities.
    pub const fn timer_config(n: usize) -> u64 {
        0x100 + 0x20 * n as u64
    }
    /// Timer `n`'s comparator.
    pub const fn timer_cmp(n: usize) -> u64 {
        0x108 + 0x20 * n as u64
    }
    /// Timer `n`'s FSB interrupt route.
    pub const fn timer_fsb(n: usize) -> u64 {
        0x110 + 0x20 * n as u64
    }
}

/// General configuration bits.
pub mod cnf {
    /// The main counter runs; timers may interrupt.
    pub const ENABLE: u64 = 1 << 0;
    /// Legacy replacement routing.
    pub const LEG_RT: u64 = 1 << 1;
}

/// Timer configuration bits.
pub mod tn {
    /// Level-triggered (else edge).
    pub const INT_TYPE_LEVEL: u64 = 1 << 1;
    /// Interrupt enabled.
    pub const INT_ENB: u64 = 1 << 2;
    /// Periodic (else one-shot).
    pub const PERIODIC: u64 = 1 << 3;
    /// Periodic mode is available (read-only).
    pub const PER_INT_CAP: u64 = 1 << 4;
    /// The comparator is 64 bits wide (read-only).
    pub const SIZE_CAP: u64 = 1 << 5;
    /// The next comparator write sets a periodic timer's comparator directly.
    pub const VAL_SET: u64 = 1 << 6;
    /// The timer works on the low 32 bits of the counter.
    pub const MODE32: u64 = 1 << 8;
    /// The I/O APIC input, bits 13:9.
    pub const ROUTE_SHIFT: u32 = 9;
    /// Mask of the route field.
    pub const ROUTE_MASK: u64 = 0x1f << ROUTE_SHIFT;
}

/// The general capabilities and ID register.
pub const fn capabilities() -> u64 {
    1 // REV_ID
        | ((NUM_TIMERS as u64 - 1) << 8)
        | (1 << 13) // COUNT_SIZE_CAP: 64-bit
        | (1 << 15) // LEG_RT_CAP
        | ((VENDOR_ID as u64) << 16)
        | (PERIOD_FS << 32)
}

/// I/O APIC inputs, by number: what the HPET's interrupts drive.
///
/// The VMM implements it on its I/O APIC (input 2 is where the MADT puts IRQ 0; the VMM
/// may also drive the PIC's IRQ 0 and 8 for legacy replacement). It must not call back
/// into the HPET.
pub trait IrqPins: Send + Sync {
    /// Drives input `pin` to `level` (true: asserted).
    fn set_pin(&self, pin: u8, level: bool);
}

#[derive(Clone, Copy)]
struct Timer {
    config: u64,
    cmp: u64,
    period: u64,
}

impl Timer {
    fn new(n: usize) -> Self {
        let per = if n == 0 { tn::PER_INT_CAP } else { 0 };
        Self {
            config: (u64::from(ROUTE_CAP) << 32) | tn::SIZE_CAP | per,
            cmp: u64::MAX,
            period: 0,
        }
    }

    /// The counter bits the timer compares.
    fn mask(&self) -> u64 {
        if self.config & tn::MODE32 != 0 {
            u64::from(u32::MAX)
        } else {
            u64::MAX
        }
    }

    fn level(&self) -> bool {
        self.config & tn::INT_TYPE_LEVEL != 0
    }

    fn enabled(&self) -> bool {
        self.config & tn::INT_ENB != 0
    }

    fn periodic(&self) -> bool {
        self.config & tn::PERIODIC != 0
    }

    /// Ticks from counter value `from` until the comparator matches (0: never, for a
    /// 64-bit timer whose comparator is `from`).
    fn ticks_until(&self, from: u64) -> u128 {
        let d = self.cmp.wrapping_sub(from) & self.mask();
        if d == 0 {
            if self.mask() == u64::MAX {
                0
            } else {
                1 << 32
            }
        } else {
            u128::from(d)
        }
    }

    /// Whether the comparator matched in the counter span `(last, now]`; a periodic
    /// timer moves its comparator on past `now`.
    fn check(&mut self, last: u64, now: u64) -> bool {
        let to_cmp = self.ticks_until(last);
        let span = u128::from(now.wrapping_sub(last));
        if to_cmp == 0 || to_cmp > span {
            return false;
        }
        if self.periodic() && self.period != 0 {
            let period = u128::from(self.period & self.mask());
            let k = (span - to_cmp) / period.max(1) + 1;
            let next = u128::from(self.cmp) + k * period;
            self.cmp = (next as u64) & self.mask();
        }
        true
    }
}

/// The HPET block.
pub struct Hpet {
    config: u64,
    status: u64,
    /// The counter's value at `start_ns` (or its frozen value while halted).
    base: u64,
    start_ns: u64,
    /// The counter value timers were last checked at.
    seen: u64,
    timers: [Timer; NUM_TIMERS],
    /// Inputs this device holds asserted.
    pins_high: u32,
    clock: Arc<dyn Clock>,
    irq: Arc<dyn IrqPins>,
}

impl Hpet {
    /// An HPET (halted, every timer disabled) reading time from `clock`, driving `irq`.
    pub fn new(clock: Arc<dyn Clock>, irq: Arc<dyn IrqPins>) -> Self {
        Self {
            config: 0,
            status: 0,
            base: 0,
            start_ns: 0,
            seen: 0,
            timers: core::array::from_fn(Timer::new),
            pins_high: 0,
            clock,
            irq,
        }
    }

    fn running(&self) -> bool {
        self.config & cnf::ENABLE != 0
    }

    /// The main counter now.
    pub fn counter(&self) -> u64 {
        if self.running() {
            let ns = self.clock.now_ns().saturating_sub(self.start_ns);
            self.base.wrapping_add(ns_to_ticks(ns, HZ))
        } else {
            self.base
        }
    }

    /// The I/O APIC input timer `n` drives, if any.
    fn pin(&self, n: usize) -> Option<u8> {
        if self.config & cnf::LEG_RT != 0 && n < 2 {
            return Some([LEGACY_PIN_TIMER0, LEGACY_PIN_TIMER1][n]);
        }
        let route = ((self.timers[n].config & tn::ROUTE_MASK) >> tn::ROUTE_SHIFT) as u8;
        (ROUTE_CAP & (1 << route) != 0).then_some(route)
    }

    /// When a timer with its interrupt enabled next fires (ns on the injected clock).
    pub fn next_event(&self) -> Option<u64> {
        if !self.running() {
            return None;
        }
        (0..NUM_TIMERS)
            .filter(|&n| self.timers[n].enabled() && self.pin(n).is_some())
            .filter_map(|n| {
                let d = self.timers[n].ticks_until(self.seen);
                let target = u128::from(self.seen.wrapping_sub(self.base)) + d;
                let ns = u64::try_from(target).ok().map(|t| ticks_to_ns(t, HZ))?;
                (d != 0).then(|| self.start_ns.saturating_add(ns))
            })
            .min()
    }

    /// Brings the timers up to date with the clock: fires those whose comparator the
    /// counter passed since the last update.
    pub fn update(&mut self) {
        if !self.running() {
            return;
        }
        let now = self.counter();
        let last = core::mem::replace(&mut self.seen, now);
        for n in 0..NUM_TIMERS {
            if !self.timers[n].check(last, now) {
                continue;
            }
            let t = self.timers[n];
            if t.level() {
                self.status |= 1 << n;
            } else if let Some(p) = self.pin(n).filter(|_| t.enabled()) {
                self.irq.set_pin(p, true);
                self.irq.set_pin(p, false);
                self.pins_high &= !(1 << p);
            }
        }
        self.drive();
    }

    /// Drives the inputs of level-triggered timers: asserted while their status bit is
    /// set and their interrupt enabled.
    fn drive(&mut self) {
        let mut want = 0u32;
        for n in 0..NUM_TIMERS {
            let t = self.timers[n];
            if t.level() && t.enabled() && self.status & (1 << n) != 0 {
                if let Some(p) = self.pin(n) {
                    want |= 1 << p;
                }
            }
        }
        let changed = want ^ self.pins_high;
        for p in 0..32u8 {
            if changed & (1 << p) != 0 {
                self.irq.set_pin(p, want & (1 << p) != 0);
            }
        }
        self.pins_high = want;
    }

    fn read_reg(&self, r: u64) -> u64 {
        match r {
            reg::CAP => capabilities(),
            reg::CONFIG => self.config,
            reg::STATUS => self.status,
            reg::COUNTER => self.counter(),
            0x100..=0x15f => {
                let t = &self.timers[((r - 0x100) / 0x20) as usize];
                match (r - 0x100) % 0x20 {
                    0x00 => t.config,
                    0x08 => t.cmp,
                    _ => 0, // FSB route: no FSB delivery
                }
            }
            _ => 0,
        }
    }

    /// Writes the bits `mask` of register `r` with `v`.
    fn write_reg(&mut self, r: u64, v: u64, mask: u64) {
        let merge = |old: u64| (old & !mask) | (v & mask);
        match r {
            reg::CONFIG => {
                let now = self.clock.now_ns();
                let was = self.running();
                let counter = self.counter();
                self.config = merge(self.config) & (cnf::ENABLE | cnf::LEG_RT);
                match (was, self.running()) {
                    (false, true) => {
                        self.start_ns = now;
                        self.seen = self.base;
                    }
                    (true, false) => self.base = counter,
                    _ => {}
                }
            }
            reg::STATUS => self.status &= !(v & mask),
            reg::COUNTER => {
                self.base = merge(self.counter());
                self.start_ns = self.clock.now_ns();
                self.seen = self.base;
            }
            0x100..=0x15f => {
                let n = ((r - 0x100) / 0x20) as usize;
                match (r - 0x100) % 0x20 {
                    0x00 => self.write_timer_config(n, merge(self.timers[n].config)),
                    0x08 => {
                        let t = &mut self.timers[n];
                        let m = t.mask();
                        if !t.periodic() || t.config & tn::VAL_SET != 0 {
                            t.cmp = merge(t.cmp) & m;
                        }
                        if t.periodic() {
                            t.period = merge(t.period) & m;
                        }
                        t.config &= !tn::VAL_SET;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn write_timer_config(&mut self, n: usize, v: u64) {
        let t = &mut self.timers[n];
        let mut writable = tn::INT_TYPE_LEVEL | tn::INT_ENB | tn::VAL_SET | tn::MODE32;
        if t.config & tn::PER_INT_CAP != 0 {
            writable |= tn::PERIODIC;
        }
        let route = ((v & tn::ROUTE_MASK) >> tn::ROUTE_SHIFT) as u32;
        if ROUTE_CAP & (1 << route) != 0 {
            writable |= tn::ROUTE_MASK;
        }
        t.config = (t.config & !writable) | (v & writable);
        if t.config & tn::MODE32 != 0 {
            t.cmp &= u64::from(u32::MAX);
            t.period &= u64::from(u32::MAX);
        }
        if !t.level() {
            // Edge mode has no status.
            self.status &= !(1 << n);
        }
    }
}

impl BusDevice for Hpet {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.update();
        read_bytes(offset, data, |o| {
            (self.read_reg(o & !7) >> (8 * (o & 7))) as u8
        });
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        self.update();
        // Split into the 64-bit registers the access touches.
        let mut i = 0;
        while i < data.len() {
            let o = offset.wrapping_add(i as u64);
            let (r, shift) = (o & !7, o & 7);
            let n = (8 - shift as usize).min(data.len() - i);
            let (mut v, mut mask) = (0u64, 0u64);
            for (k, &b) in data[i..i + n].iter().enumerate() {
                let s = 8 * (shift + k as u64);
                v |= u64::from(b) << s;
                mask |= 0xff << s;
            }
            self.write_reg(r, v, mask);
            i += n;
        }
        self.update();
        self.drive();
        None
    }
}

#[cfg(test)]
mod tests;
