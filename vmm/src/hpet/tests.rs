//! The HPET driven the way Linux's `hpet.c` drives it, on a manual clock.

use super::*;
use crate::bus::Bus;
use crate::clock::ManualClock;
use crate::sync::SpinLock;
use std::sync::Mutex;
use std::vec::Vec;

/// Records every pin change.
#[derive(Default)]
struct Pins(Mutex<Vec<(u8, bool)>>);

impl IrqPins for Pins {
    fn set_pin(&self, pin: u8, level: bool) {
        self.0.lock().unwrap().push((pin, level));
    }
}

impl Pins {
    fn take(&self) -> Vec<(u8, bool)> {
        core::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Rig {
    clock: Arc<ManualClock>,
    pins: Arc<Pins>,
    hpet: Hpet,
}

impl Rig {
    fn new() -> Self {
        let clock = Arc::new(ManualClock::new(1_000));
        let pins = Arc::new(Pins::default());
        let hpet = Hpet::new(clock.clone(), pins.clone());
        Self { clock, pins, hpet }
    }

    fn r64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.hpet.read(HPET_BASE, off, &mut b);
        u64::from_le_bytes(b)
    }

    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.hpet.read(HPET_BASE, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.hpet.write(HPET_BASE, off, &v.to_le_bytes());
    }

    fn w64(&mut self, off: u64, v: u64) {
        self.hpet.write(HPET_BASE, off, &v.to_le_bytes());
    }

    /// Advances the clock by `ticks` counter ticks and lets the VMM's timer fire.
    fn run(&mut self, ticks: u64) {
        self.clock.advance(ticks * 10);
        self.hpet.update();
    }
}

#[test]
fn capabilities_describe_the_block() {
    let mut r = Rig::new();
    let cap = r.r64(reg::CAP);
    assert_eq!(cap & 0xff, 1, "REV_ID");
    assert_eq!((cap >> 8) & 0x1f, NUM_TIMERS as u64 - 1);
    assert_ne!(cap & (1 << 13), 0, "64-bit counter");
    assert_ne!(cap & (1 << 15), 0, "legacy replacement capable");
    assert_eq!((cap >> 16) & 0xffff, u64::from(VENDOR_ID));
    assert_eq!(cap >> 32, PERIOD_FS);
    assert!(cap >> 32 <= 100_000_000, "period at most 100 ns");
    assert_eq!(HZ, 100_000_000);
    // 32-bit halves read the same (Linux reads the period at 0x004).
    assert_eq!(r.r32(reg::CAP + 4), PERIOD_FS as u32);
    r.w64(reg::CAP, 0);
    assert_eq!(r.r64(reg::CAP), cap, "read-only");
    for n in 0..NUM_TIMERS {
        let c = r.r64(reg::timer_config(n));
        assert_eq!(c >> 32, u64::from(ROUTE_CAP));
        assert_ne!(c & tn::SIZE_CAP, 0);
        assert_eq!(
            c & tn::PER_INT_CAP != 0,
            n == 0,
            "timer 0 alone is periodic"
        );
        assert_eq!(c & (1 << 15), 0, "no FSB delivery");
    }
}

#[test]
fn counter_runs_only_when_enabled() {
    let mut r = Rig::new();
    r.clock.advance(1_000);
    assert_eq!(r.r64(reg::COUNTER), 0, "halted at reset");
    r.w32(reg::CONFIG, cnf::ENABLE as u32);
    r.clock.advance(1_000);
    assert_eq!(r.r64(reg::COUNTER), 100, "100 MHz");
    r.w32(reg::CONFIG, 0);
    r.clock.advance(5_000);
    assert_eq!(r.r64(reg::COUNTER), 100, "frozen");
    // Software sets it while halted, then restarts it.
    r.w64(reg::COUNTER, 0xffff_fff0);
    r.w32(reg::CONFIG, cnf::ENABLE as u32);
    r.clock.advance(300);
    assert_eq!(
        r.r64(reg::COUNTER),
        0x1_0000_000e,
        "64 bits, carries into the high half"
    );
    assert_eq!(r.r32(reg::COUNTER + 4), 1);
    assert_eq!(r.r32(reg::CONFIG), 1);
    r.w64(reg::CONFIG, u64::MAX);
    assert_eq!(
        r.r64(reg::CONFIG),
        cnf::ENABLE | cnf::LEG_RT,
        "reserved bits stay 0"
    );
}

/// Linux's one-shot clockevent: legacy replacement, 32-bit mode, comparator at
/// counter + delta.
#[test]
fn legacy_one_shot_edge_on_irq0() {
    let mut r = Rig::new();
    r.w32(reg::CONFIG, (cnf::ENABLE | cnf::LEG_RT) as u32);
    let cfg = r.r32(reg::timer_config(0));
    r.w32(
        reg::timer_config(0),
        cfg | (tn::INT_ENB | tn::MODE32) as u32,
    );
    let now = r.r32(reg::COUNTER);
    r.w32(reg::timer_cmp(0), now + 1_000);
    assert_eq!(r.hpet.next_event(), Some(1_000 + 10_000));
    r.run(999);
    assert!(r.pins.take().is_empty());
    r.run(1);
    assert_eq!(
        r.pins.take(),
        [(LEGACY_PIN_TIMER0, true), (LEGACY_PIN_TIMER0, false)]
    );
    // One-shot: nothing more until the 32-bit counter comes round again.
    r.run(1_000_000);
    assert!(r.pins.take().is_empty());
    assert_eq!(r.r32(reg::STATUS), 0, "edge mode sets no status");
    let next = r.hpet.next_event().unwrap();
    assert_eq!(next, 1_000 + 10 * (1_000 + (1 << 32)));
    // Timer 1 in legacy mode goes to IRQ 8.
    let cfg = r.r32(reg::timer_config(1));
    r.w32(reg::timer_config(1), cfg | tn::INT_ENB as u32);
    let now = r.r64(reg::COUNTER);
    r.w64(reg::timer_cmp(1), now + 5);
    r.run(5);
    assert_eq!(
        r.pins.take(),
        [(LEGACY_PIN_TIMER1, true), (LEGACY_PIN_TIMER1, false)]
    );
}

/// Linux's periodic clockevent: PERIODIC | VAL_SET, first deadline, then the period.
#[test]
fn periodic_reloads_from_the_last_write() {
    let mut r = Rig::new();
    r.w32(reg::CONFIG, (cnf::ENABLE | cnf::LEG_RT) as u32);
    let cfg = r.r32(reg::timer_config(0));
    let set = tn::INT_ENB | tn::PERIODIC | tn::VAL_SET | tn::MODE32;
    r.w32(reg::timer_config(0), cfg | set as u32);
    assert_ne!(r.r32(reg::timer_config(0)) & tn::VAL_SET as u32, 0);
    let now = r.r32(reg::COUNTER);
    r.w32(reg::timer_cmp(0), now + 500);
    r.w32(reg::timer_cmp(0), 1_000);
    assert_eq!(
        r.r32(reg::timer_config(0)) & tn::VAL_SET as u32,
        0,
        "VAL_SET clears"
    );
    assert_eq!(
        r.r32(reg::timer_cmp(0)),
        now + 500,
        "the period write kept the deadline"
    );
    r.run(500);
    assert_eq!(r.pins.take().len(), 2);
    assert_eq!(
        r.r32(reg::timer_cmp(0)),
        now + 1_500,
        "comparator advanced by the period"
    );
    for _ in 0..5 {
        r.run(999);
        assert!(r.pins.take().is_empty());
        r.run(1);
        assert_eq!(r.pins.take(), [(2, true), (2, false)]);
    }
    // A late update coalesces the missed periods into one edge and catches up.
    r.run(3_500);
    assert_eq!(r.pins.take().len(), 2);
    assert_eq!(r.r32(reg::timer_cmp(0)), now + 9_500);
    // Timer 1 cannot be periodic: the bit does not stick.
    r.w32(reg::timer_config(1), tn::PERIODIC as u32);
    assert_eq!(r.r32(reg::timer_config(1)) & tn::PERIODIC as u32, 0);
}

#[test]
fn level_interrupt_routed_to_an_ioapic_input_until_status_is_cleared() {
    let mut r = Rig::new();
    r.w32(reg::CONFIG, cnf::ENABLE as u32);
    // A route the timer cannot take does not stick.
    r.w32(reg::timer_config(2), (5 << tn::ROUTE_SHIFT) as u32);
    assert_eq!(r.r32(reg::timer_config(2)) & tn::ROUTE_MASK as u32, 0);
    let cfg = (21 << tn::ROUTE_SHIFT) | tn::INT_TYPE_LEVEL | tn::INT_ENB;
    r.w32(reg::timer_config(2), cfg as u32);
    assert_eq!(r.r32(reg::timer_config(2)) & tn::ROUTE_MASK as u32, 21 << 9);
    r.w64(reg::timer_cmp(2), 100);
    r.run(100);
    assert_eq!(r.pins.take(), [(21, true)]);
    assert_eq!(r.r32(reg::STATUS), 1 << 2);
    r.run(1_000);
    assert!(r.pins.take().is_empty(), "held, not re-raised");
    r.w32(reg::STATUS, 1 << 2);
    assert_eq!(r.pins.take(), [(21, false)]);
    assert_eq!(r.r32(reg::STATUS), 0);
    // Disabled: the status still sets, the input stays low.
    r.w32(reg::timer_config(2), (cfg & !tn::INT_ENB) as u32);
    let now = r.r64(reg::COUNTER);
    r.w64(reg::timer_cmp(2), now + 10);
    assert_eq!(r.hpet.next_event(), None, "nothing to wake the VMM for");
    r.run(10);
    assert!(r.pins.take().is_empty());
    assert_eq!(r.r32(reg::STATUS), 1 << 2);
    // Enabling it then asserts the input for the pending status.
    r.w32(reg::timer_config(2), cfg as u32);
    assert_eq!(r.pins.take(), [(21, true)]);
    // Legacy replacement takes timers 0 and 1 only: timer 2 keeps its route.
    r.w32(reg::CONFIG, (cnf::ENABLE | cnf::LEG_RT) as u32);
    assert!(r.pins.take().is_empty());
    r.w32(reg::STATUS, 1 << 2);
    assert_eq!(r.pins.take(), [(21, false)]);
}

#[test]
fn unrouted_and_halted_timers_stay_quiet() {
    let mut r = Rig::new();
    // Route 0 is not in INT_ROUTE_CAP: nothing is delivered.
    r.w32(reg::timer_config(1), tn::INT_ENB as u32);
    r.w64(reg::timer_cmp(1), 10);
    assert_eq!(r.hpet.next_event(), None, "halted");
    r.w32(reg::CONFIG, cnf::ENABLE as u32);
    assert_eq!(r.hpet.next_event(), None, "unrouted");
    r.run(100);
    assert!(r.pins.take().is_empty());
    // A comparator in the past fires only after the counter wraps (64-bit: never).
    r.w32(
        reg::timer_config(1),
        (tn::INT_ENB | (20 << tn::ROUTE_SHIFT)) as u32,
    );
    r.w64(reg::timer_cmp(1), 50);
    assert_eq!(r.hpet.next_event(), None);
    r.run(1 << 20);
    assert!(r.pins.take().is_empty());
}

#[test]
fn odd_accesses_do_not_panic() {
    let mut r = Rig::new();
    let mut rng = crate::testutil::Rng::new(7);
    for _ in 0..20_000 {
        let off = rng.below(HPET_SIZE + 16);
        let n = rng.size();
        let mut b = [0u8; 8];
        if rng.chance(2) {
            r.hpet.read(HPET_BASE, off, &mut b[..n]);
        } else {
            for x in &mut b {
                *x = rng.byte();
            }
            r.hpet.write(HPET_BASE, off, &b[..n]);
        }
        r.clock.advance(rng.below(100_000));
        r.hpet.update();
        let _ = r.hpet.next_event();
    }
}

#[test]
fn on_the_mmio_bus() {
    let clock = Arc::new(ManualClock::new(0));
    let pins = Arc::new(Pins::default());
    let hpet = Arc::new(SpinLock::new(Hpet::new(clock.clone(), pins)));
    let mut bus = Bus::new();
    bus.insert(HPET_BASE, HPET_SIZE, hpet.clone()).unwrap();
    let mut b = [0u8; 4];
    bus.read(HPET_BASE + 4, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), PERIOD_FS as u32);
    bus.write(HPET_BASE + reg::CONFIG, &1u32.to_le_bytes())
        .unwrap();
    clock.advance(1_000_000);
    bus.read(HPET_BASE + reg::COUNTER, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 100_000);
}
