//! 8254 programmable interval timer: three 16-bit counters at 1.193182 MHz (ports
//! 0x40–0x42, control word at 0x43), channel 0 on IRQ 0, channel 2's gate and output on
//! port 0x61 (used by Linux to calibrate the TSC).
//!
//! Facts from the Intel 8254 datasheet (order no. 231164): "Control Word Format"
//! (SC/RW/M/BCD), "Counter Latch Command", "Read-Back Command" and the status byte,
//! "Mode Definitions" (modes 0–5 and Figure 20, gate behaviour per mode), and the port
//! 0x61 layout from the Intel ICH/PIIX4 datasheets ("NMI Status and Control Register":
//! bit 0 timer 2 gate, bit 1 speaker data enable, bit 4 refresh toggle, bit 5 timer 2
//! output).
//!
//! | port | read               | write                          |
//! |------|--------------------|--------------------------------|
//! | 0x40 | counter 0          | counter 0 initial count        |
//! | 0x41 | counter 1          | counter 1 initial count        |
//! | 0x42 | counter 2          | counter 2 initial count        |
//! | 0x43 | 0xff               | control word / read-back       |
//! | 0x61 | status (see above) | bits 0–3                       |
//!
//! Counting is computed from the injected clock, not ticked: a counter remembers when
//! its count was loaded. The VMM arms a host timer for [`Pit::next_event`] and calls
//! [`Pit::update`] when it fires; channel 0's rising output edges then reach IRQ 0 (if
//! the VMM was late, several periods collapse into one edge, as lost ticks do). The
//! one-clock delay between writing a count and the counter loading it is not modelled.

use alloc::sync::Arc;

use crate::bus::{read_bytes, write_bytes, Action, BusDevice, IrqLine, IrqOut};
use crate::clock::{ns_to_ticks, ticks_to_ns, Clock};

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// Counters and control word.
pub const PIT_BASE: u64 = 0x40;
/// NMI status and control (speaker gate).
pub const PORT61_BASE: u64 = 0x61;

/// Port 0x61 bits.
pub mod port61 {
    /// Timer 2 gate.
    pub const GATE2: u8 = 1 << 0;
    /// Speaker data enable.
    pub const SPEAKER: u8 = 1 << 1;
    /// Refresh cycle toggle (read-only).
    pub const REFRESH: u8 = 1 << 4;
    /// Timer 2 output (read-only).
    pub const OUT2: u8 = 1 << 5;
}

/// Half period of the refresh toggle, in ns (15.085 µs per cycle).
const REFRESH_HALF_NS: u64 = 15_085;

/// Counter access mode (control word bits 5:4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rw {
    Lsb = 1,
    Msb = 2,
    Word = 3,
}

#[derive(Clone, Debug)]
struct Channel {
    mode: u8,
    rw: Rw,
    bcd: bool,
    /// Initial count as a number of clocks (1..=65536, or 1..=10000 in BCD).
    count: u64,
    /// When counting (re)started at d = 0.
    load_ns: u64,
    /// A count has been written since the control word.
    armed: bool,
    /// Modes 1 and 5: a gate rising edge started the count.
    triggered: bool,
    /// Counting stopped by a low gate at this many clocks.
    frozen: Option<u64>,
    gate: bool,
    null_count: bool,
    /// Word mode: the LSB of a count being written.
    write_lsb: Option<u8>,
    /// Word mode: the next unlatched read returns the MSB.
    read_msb_next: bool,
    /// Counter latch: value and whether its LSB has been read.
    latch: Option<(u16, bool)>,
    status_latch: Option<u8>,
    /// Clocks up to which output edges have been reported.
    seen: u64,
}

impl Channel {
    fn new() -> Self {
        Self {
            mode: 0,
            rw: Rw::Word,
            bcd: false,
            count: 0x10000,
            load_ns: 0,
            armed: false,
            triggered: false,
            frozen: None,
            gate: true,
            null_count: true,
            write_lsb: None,
            read_msb_next: false,
            latch: None,
            status_latch: None,
            seen: 0,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x10000
        }
    }

    /// Clocks since the count started, or None while it is not counting.
    fn elapsed(&self, now: u64) -> Option<u64> {
        if !self.armed || (matches!(self.mode, 1 | 5) && !self.triggered) {
            return None;
        }
        Some(
            self.frozen
                .unwrap_or_else(|| ns_to_ticks(now.saturating_sub(self.load_ns), PIT_HZ)),
        )
    }

    /// The counting element's value (binary).
    fn value(&self, now: u64) -> u64 {
        let n = self.count;
        let Some(d) = self.elapsed(now) else {
            return n % self.modulus();
        };
        match self.mode {
            2 => n - d % n,
            3 => n - (2 * d) % n,
            _ => (n + self.modulus() - d % self.modulus()) % self.modulus(),
        }
    }

    /// The OUT pin.
    fn out(&self, now: u64) -> bool {
        let n = self.count;
        let Some(d) = self.elapsed(now) else {
            return self.mode != 0; // mode 0 starts low; the others idle high
        };
        match self.mode {
            0 | 1 => d >= n,
            2 => self.frozen.is_some() || d % n != n - 1,
            3 => self.frozen.is_some() || d % n < n.div_ceil(2),
            _ => d != n, // 4, 5: one clock low at terminal count
        }
    }

    /// The first rising edge of OUT after `d0` clocks, in clocks.
    fn next_edge(&self, d0: u64) -> Option<u64> {
        if self.frozen.is_some() {
            return None;
        }
        let n = self.count;
        match self.mode {
            0 | 1 => (d0 < n).then_some(n),
            2 | 3 => Some((d0 / n + 1) * n),
            _ => (d0 < n + 1).then_some(n + 1),
        }
    }

    fn status(&self, now: u64) -> u8 {
        u8::from(self.out(now)) << 7
            | u8::from(self.null_count) << 6
            | (self.rw as u8) << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now: u64) {
        if self.latch.is_none() {
            self.latch = Some((encode(self.value(now), self.bcd), false));
        }
    }

    fn control(&mut self, cw: u8) {
        self.rw = match (cw >> 4) & 3 {
            1 => Rw::Lsb,
            2 => Rw::Msb,
            _ => Rw::Word,
        };
        self.mode = match (cw >> 1) & 7 {
            6 => 2,
            7 => 3,
            m => m,
        };
        self.bcd = cw & 1 != 0;
        self.armed = false;
        self.triggered = false;
        self.frozen = None;
        self.null_count = true;
        self.write_lsb = None;
        self.read_msb_next = false;
        self.latch = None;
        self.status_latch = None;
    }

    fn load(&mut self, raw: u16, now: u64) {
        let n = u64::from(decode(raw, self.bcd));
        let n = if n == 0 { self.modulus() } else { n };
        // Counts of 1 are illegal in modes 2 and 3; run them as 2.
        self.count = if matches!(self.mode, 2 | 3) {
            n.max(2)
        } else {
            n
        };
        self.load_ns = now;
        self.armed = true;
        self.null_count = false;
        self.seen = 0;
        self.frozen = (!self.gate && matches!(self.mode, 0 | 2 | 3 | 4)).then_some(0);
    }

    fn write(&mut self, v: u8, now: u64) {
        match self.rw {
            Rw::Lsb => self.load(u16::from(v), now),
            Rw::Msb => self.load(u16::from(v) << 8, now),
            Rw::Word => match self.write_lsb.take() {
                Some(lsb) => self.load(u16::from_le_bytes([lsb, v]), now),
                None => {
                    self.write_lsb = Some(v);
                    if self.mode == 0 {
                        self.armed = false; // the first byte stops counting
                    }
                }
            },
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status_latch.take() {
            return s;
        }
        let (value, lsb_read) = match self.latch {
            Some(l) => l,
            None => (encode(self.value(now), self.bcd), false),
        };
        let [lo, hi] = value.to_le_bytes();
        let (byte, done) = match self.rw {
            Rw::Lsb => (lo, true),
            Rw::Msb => (hi, true),
            Rw::Word if self.latch.is_some() => {
                if lsb_read {
                    (hi, true)
                } else {
                    (lo, false)
                }
            }
            Rw::Word => {
                self.read_msb_next = !self.read_msb_next;
                return if self.read_msb_next { lo } else { hi };
            }
        };
        self.latch = if done { None } else { Some((value, true)) };
        byte
    }

    fn set_gate(&mut self, level: bool, now: u64) {
        if level == self.gate {
            return;
        }
        self.gate = level;
        let d = self.elapsed(now);
        match self.mode {
            0 | 4 | 2 | 3 if !level => self.frozen = d,
            0 | 4 => {
                if let Some(fd) = self.frozen.take() {
                    self.load_ns = now.saturating_sub(ticks_to_ns(fd, PIT_HZ));
                }
            }
            // A rising gate reloads the count.
            2 | 3 if self.frozen.is_some() => {
                self.frozen = None;
                self.load_ns = now;
                self.seen = 0;
            }
            2 | 3 => {}
            _ if level && self.armed => {
                self.triggered = true;
                self.load_ns = now;
                self.seen = 0;
            }
            _ => {}
        }
    }
}

/// The count as the guest reads it: binary, or four BCD digits.
fn encode(v: u64, bcd: bool) -> u16 {
    if bcd {
        let v = v % 10_000;
        (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
    } else {
        v as u16
    }
}

/// A count as the guest wrote it (BCD digits above 9 count as themselves).
fn decode(raw: u16, bcd: bool) -> u32 {
    if bcd {
        let d = |s: u16| u32::from((raw >> s) & 0xf);
        (d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)) % 10_000
    } else {
        u32::from(raw)
    }
}

/// The 8254 with port 0x61.
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0–3 as written.
    port61: u8,
    clock: Arc<dyn Clock>,
    irq0: IrqOut,
}

impl Pit {
    /// A PIT reading time from `clock`, channel 0 driving `irq0`.
    pub fn new(clock: Arc<dyn Clock>, irq0: Arc<dyn IrqLine>) -> Self {
        let mut pit = Self {
            channels: [Channel::new(), Channel::new(), Channel::new()],
            port61: 0,
            clock,
            irq0: IrqOut::new(irq0),
        };
        pit.channels[2].gate = false;
        pit
    }

    /// When channel 0's output next rises (ns on the injected clock), if it will.
    pub fn next_event(&self) -> Option<u64> {
        let c = &self.channels[0];
        c.elapsed(self.clock.now_ns())?;
        let edge = c.next_edge(c.seen)?;
        Some(c.load_ns.saturating_add(ticks_to_ns(edge, PIT_HZ)))
    }

    /// Brings IRQ 0 up to date with the clock: one edge for any rising edges of channel
    /// 0's output since the last update.
    pub fn update(&mut self) {
        let now = self.clock.now_ns();
        let c = &mut self.channels[0];
        let out = c.out(now);
        if let Some(d) = c.elapsed(now) {
            if c.next_edge(c.seen).is_some_and(|e| e <= d) {
                if self.irq0.level() {
                    self.irq0.set(false);
                }
                self.irq0.set(true);
            }
            c.seen = d;
        }
        self.irq0.set(out);
    }

    fn read_reg(&mut self, base: u64, offset: u64) -> u8 {
        let now = self.clock.now_ns();
        match (base, offset) {
            (PIT_BASE, 0..=2) => self.channels[offset as usize].read(now),
            (PORT61_BASE, 0) => {
                let refresh = (now / REFRESH_HALF_NS) & 1 != 0;
                let out2 = self.channels[2].out(now);
                self.port61
                    | if refresh { port61::REFRESH } else { 0 }
                    | if out2 { port61::OUT2 } else { 0 }
            }
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, base: u64, offset: u64, v: u8) {
        let now = self.clock.now_ns();
        match (base, offset) {
            (PIT_BASE, 0..=2) => self.channels[offset as usize].write(v, now),
            (PIT_BASE, 3) => self.control_word(v, now),
            (PORT61_BASE, 0) => {
                self.port61 = v & 0x0f;
                self.channels[2].set_gate(v & port61::GATE2 != 0, now);
            }
            _ => {}
        }
        self.update();
    }

    fn control_word(&mut self, v: u8, now: u64) {
        let sc = usize::from(v >> 6);
        if sc == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for (i, c) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                if v & 0x10 == 0 && c.status_latch.is_none() {
                    c.status_latch = Some(c.status(now));
                }
                if v & 0x20 == 0 {
                    c.latch_count(now);
                }
            }
        } else if (v >> 4) & 3 == 0 {
            self.channels[sc].latch_count(now);
        } else {
            self.channels[sc].control(v);
        }
    }
}

impl BusDevice for Pit {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| self.read_reg(base, o));
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        write_bytes(offset, data, |o, v| {
            self.write_reg(base, o, v);
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::testutil::{Rng, TestIrq};

    struct T {
        pit: Pit,
        clock: Arc<ManualClock>,
        irq: Arc<TestIrq>,
    }

    impl T {
        fn new() -> Self {
            let clock = Arc::new(ManualClock::new(1_000_000));
            let irq = TestIrq::new();
            Self {
                pit: Pit::new(clock.clone(), irq.clone()),
                clock,
                irq,
            }
        }
        fn out(&mut self, port: u64, v: u8) {
            let (b, o) = if port == 0x61 {
                (PORT61_BASE, 0)
            } else {
                (PIT_BASE, port - 0x40)
            };
            self.pit.write(b, o, &[v]);
        }
        fn inb(&mut self, port: u64) -> u8 {
            let (b, o) = if port == 0x61 {
                (PORT61_BASE, 0)
            } else {
                (PIT_BASE, port - 0x40)
            };
            let mut v = [0];
            self.pit.read(b, o, &mut v);
            v[0]
        }
        fn ticks(&self, t: u64) {
            self.clock.advance(ticks_to_ns(t, PIT_HZ));
        }
        fn latch_read(&mut self, ch: u8) -> u16 {
            self.out(0x43, ch << 6);
            let lo = self.inb(0x40 + u64::from(ch));
            let hi = self.inb(0x40 + u64::from(ch));
            u16::from_le_bytes([lo, hi])
        }
    }

    #[test]
    fn mode2_rate_generator_interrupts_every_period() {
        let mut t = T::new();
        t.out(0x43, 0x34); // ch0, lohi, mode 2
        t.out(0x40, 0x9c);
        t.out(0x40, 0x2e); // 11932: 100 Hz
        assert_eq!(t.irq.take_rises(), 1, "mode 2 output idles high");
        let start = t.clock.now_ns();
        let ev = t.pit.next_event().unwrap();
        assert_eq!(ev - start, ticks_to_ns(11932, PIT_HZ));
        t.clock.set(ev - 1);
        t.pit.update();
        assert_eq!(t.irq.take_rises(), 0);
        t.clock.set(ev);
        t.pit.update();
        assert_eq!(t.irq.take_rises(), 1);
        // Five periods late: one edge, next event in the future.
        t.ticks(5 * 11932);
        t.pit.update();
        assert_eq!(t.irq.take_rises(), 1);
        assert!(t.pit.next_event().unwrap() > t.clock.now_ns());
    }

    #[test]
    fn counter_counts_down_and_latches() {
        let mut t = T::new();
        t.out(0x43, 0x34);
        t.out(0x40, 0x00);
        t.out(0x40, 0x10); // 4096
        t.ticks(100);
        assert_eq!(t.latch_read(0), 4096 - 100);
        // A latched value holds while time passes.
        t.out(0x43, 0x00);
        t.ticks(50);
        assert_eq!(t.inb(0x40), (3996 & 0xff) as u8);
        t.ticks(50);
        assert_eq!(t.inb(0x40), (3996 >> 8) as u8);
        // Reload at the end of the period.
        t.ticks(4096);
        assert_eq!(t.latch_read(0), 4096 - 200);
    }

    #[test]
    fn mode0_one_shot_for_oneshot_clockevents() {
        let mut t = T::new();
        t.out(0x43, 0x30); // ch0, lohi, mode 0
        t.pit.update();
        assert!(!t.irq.level(), "mode 0 output starts low");
        t.out(0x40, 100);
        t.out(0x40, 0);
        t.ticks(99);
        t.pit.update();
        assert!(!t.irq.level());
        t.ticks(1);
        t.pit.update();
        assert_eq!(t.irq.take_rises(), 1);
        assert!(t.irq.level(), "stays high until reprogrammed");
        assert_eq!(t.pit.next_event(), None);
        // The counter wraps past zero.
        t.ticks(10);
        assert_eq!(t.latch_read(0), 0xffff - 9);
        t.out(0x43, 0x30);
        assert!(!t.irq.level());
    }

    #[test]
    fn mode3_square_wave_duty_cycle() {
        let mut t = T::new();
        t.out(0x43, 0xb6); // ch2, lohi, mode 3
        t.out(0x42, 10);
        t.out(0x42, 0);
        t.out(0x61, port61::GATE2);
        let mut highs = 0;
        for _ in 0..10 {
            if t.inb(0x61) & port61::OUT2 != 0 {
                highs += 1;
            }
            t.ticks(1);
        }
        assert_eq!(highs, 5);
        // Odd counts: high one clock longer.
        t.out(0x42, 7);
        t.out(0x42, 0);
        let highs = (0..7)
            .filter(|_| {
                let h = t.inb(0x61) & port61::OUT2 != 0;
                t.ticks(1);
                h
            })
            .count();
        assert_eq!(highs, 4);
    }

    #[test]
    fn linux_tsc_calibration_on_channel2() {
        // pit_calibrate_tsc: gate high, speaker off, mode 0, wait for OUT2.
        let mut t = T::new();
        let v = (t.inb(0x61) & !port61::SPEAKER) | port61::GATE2;
        t.out(0x61, v);
        t.out(0x43, 0xb0);
        let latch = (PIT_HZ / 20) as u16; // 50 ms
        t.out(0x42, latch as u8);
        t.out(0x42, (latch >> 8) as u8);
        assert_eq!(t.inb(0x61) & port61::OUT2, 0);
        t.clock.advance(49_900_000);
        assert_eq!(t.inb(0x61) & port61::OUT2, 0);
        t.clock.advance(200_000);
        assert_ne!(t.inb(0x61) & port61::OUT2, 0);
        assert_eq!(t.inb(0x61) & 0x0f, port61::GATE2);
        // Channel 2 never interrupts.
        t.pit.update();
        assert_eq!(t.irq.take_rises(), 0);
    }

    #[test]
    fn quick_calibrate_reads_msb_only() {
        // quick_pit_calibrate: mode 0 on ch2 with 0xffff, reads lsb then msb (word).
        let mut t = T::new();
        t.out(0x61, port61::GATE2);
        t.out(0x43, 0xb0);
        t.out(0x42, 0xff);
        t.out(0x42, 0xff);
        t.ticks(256 * 3);
        let _lsb = t.inb(0x42);
        assert_eq!(t.inb(0x42), 0xff - 3);
    }

    #[test]
    fn gate_low_pauses_mode0() {
        let mut t = T::new();
        t.out(0x61, port61::GATE2);
        t.out(0x43, 0xb0);
        t.out(0x42, 0x00);
        t.out(0x42, 0x01); // 256
        t.ticks(100);
        t.out(0x61, 0);
        t.ticks(1000);
        assert_eq!(t.latch_read(2), 156);
        t.out(0x61, port61::GATE2);
        t.ticks(6);
        assert_eq!(t.latch_read(2), 150);
    }

    #[test]
    fn mode1_waits_for_a_gate_trigger() {
        let mut t = T::new();
        t.out(0x43, 0xb2); // ch2, lohi, mode 1
        t.out(0x42, 50);
        t.out(0x42, 0);
        assert_ne!(t.inb(0x61) & port61::OUT2, 0, "idle high");
        t.ticks(100);
        t.out(0x61, port61::GATE2);
        assert_eq!(t.inb(0x61) & port61::OUT2, 0, "triggered: low");
        t.ticks(50);
        assert_ne!(t.inb(0x61) & port61::OUT2, 0);
    }

    #[test]
    fn mode4_strobe_and_status_readback() {
        let mut t = T::new();
        t.out(0x43, 0x28); // ch0, msb only, mode 4
        t.out(0x43, 0xe2); // read-back status of ch0
        assert_eq!(
            t.inb(0x40),
            0x80 | 0x40 | 0x20 | 0x08,
            "out high, null count"
        );
        t.out(0x40, 0x01); // count 256
        t.irq.take_rises();
        t.ticks(256);
        t.out(0x43, 0xe2);
        assert_eq!(t.inb(0x40) & 0xc0, 0x00, "strobe low, count loaded");
        t.ticks(1);
        t.pit.update();
        assert_eq!(t.irq.take_rises(), 1);
        // Read-back of count and status together: status first.
        t.out(0x43, 0xc2);
        assert_eq!(t.inb(0x40) & 0x3f, 0x28);
        assert_eq!(t.inb(0x40), 0xff, "msb of 0xffff");
    }

    #[test]
    fn bcd_counting() {
        let mut t = T::new();
        t.out(0x43, 0x31); // ch0, lohi, mode 0, BCD
        t.out(0x40, 0x00);
        t.out(0x40, 0x10); // 1000 decimal
        t.ticks(1);
        assert_eq!(t.latch_read(0), 0x0999);
        t.ticks(1000);
        assert_eq!(t.latch_read(0), 0x9999, "wraps at 10000");
    }

    #[test]
    fn word_reads_alternate_bytes() {
        let mut t = T::new();
        t.out(0x43, 0x74); // ch1, lohi, mode 2
        t.out(0x41, 0x34);
        t.out(0x41, 0x12);
        assert_eq!(t.inb(0x41), 0x34);
        assert_eq!(t.inb(0x41), 0x12);
        t.out(0x43, 0x54); // ch1, lsb only
        t.out(0x41, 0x80);
        assert_eq!(t.inb(0x41), 0x80);
        assert_eq!(t.inb(0x41), 0x80);
        assert_eq!(t.inb(0x43), 0xff);
    }

    #[test]
    fn random_accesses_never_panic() {
        let mut t = T::new();
        let mut rng = Rng::new(8254);
        for _ in 0..200_000 {
            let port = [0x40, 0x41, 0x42, 0x43, 0x61][rng.below(5) as usize];
            match rng.below(5) {
                0 | 1 => t.out(port, rng.byte()),
                2 => {
                    t.inb(port);
                }
                3 => {
                    let span = 1 << rng.below(40);
                    t.clock.advance(rng.below(span));
                    t.pit.update();
                }
                _ => {
                    if let Some(ev) = t.pit.next_event() {
                        t.clock.set(ev);
                        t.pit.update();
                        assert!(t.pit.next_event().is_none_or(|n| n > ev));
                    }
                }
            }
        }
        let mut buf = [0u8; 8];
        t.pit.read(PIT_BASE, 0, &mut buf);
        t.pit.write(PORT61_BASE, 0, &buf);
    }
}
