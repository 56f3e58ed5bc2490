//! Local APIC, one per vCPU: xAPIC MMIO (0xfee00000) and x2APIC MSRs (0x800–0x8ff).
//!
//! Facts from the Intel SDM vol. 3A chapter 11 ("Advanced Programmable Interrupt
//! Controller"): table 11-1 (register offsets), §11.5.1 (LVT layout), §11.5.4 (timer,
//! divide configuration), §11.5.4.1 (TSC-deadline mode, MSR 0x6e0), §11.6.1 (ICR),
//! §11.8.3.1 (TPR/PPR), §11.8.4–5 (IRR/ISR/TMR, EOI, broadcast for level-triggered
//! vectors), §11.9 (SVR), §11.12 (x2APIC: MSR 0x800 + offset/16, 64-bit ICR, SELF IPI,
//! derived logical ID) and §11.4.4 (IA32_APIC_BASE, MSR 0x1b).
//!
//! Interrupts arrive through [`Lapic::deliver`] (from the I/O APIC or another vCPU's
//! ICR); the VMM asks [`Lapic::pending_vector`] whether to inject and tells
//! [`Lapic::accept`] when it did. IPIs and EOI broadcasts leave through [`ApicSink`];
//! the `intr` wire is high while a vector is pending (to wake a halted vCPU). The timer
//! counts at [`TIMER_HZ`] (a 1-GHz APIC bus, as KVM's) and the TSC-deadline timer reads
//! the guest TSC as `tsc_hz` ticks per second since the clock's origin.

use alloc::sync::Arc;

use crate::bus::{Action, BusDevice, IrqLine, IrqOut};
use crate::clock::{ns_to_ticks, ticks_to_ns, Clock};

/// Default MMIO base.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// MMIO window size.
pub const LAPIC_SIZE: u64 = 0x1000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First and last x2APIC MSR.
pub const X2APIC_MSRS: core::ops::RangeInclusive<u32> = 0x800..=0x8ff;
/// The timer's input clock before the divider.
pub const TIMER_HZ: u64 = 1_000_000_000;

/// IA32_APIC_BASE bits.
pub mod base {
    /// Bootstrap processor.
    pub const BSP: u64 = 1 << 8;
    /// x2APIC mode.
    pub const EXTD: u64 = 1 << 10;
    /// APIC globally enabled.
    pub const ENABLE: u64 = 1 << 11;
}

/// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
pub mod reg {
    pub const ID: u32 = 0x20;
    pub const VERSION: u32 = 0x30;
    pub const TPR: u32 = 0x80;
    pub const APR: u32 = 0x90;
    pub const PPR: u32 = 0xa0;
    pub const EOI: u32 = 0xb0;
    pub const LDR: u32 = 0xd0;
    pub const DFR: u32 = 0xe0;
    pub const SVR: u32 = 0xf0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const ICR_LO: u32 = 0x300;
    pub const ICR_HI: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
    pub const SELF_IPI: u32 = 0x3f0;
}

/// Version 0x14 (integrated APIC), six LVT entries (max LVT index 5).
const VERSION: u32 = 0x14 | (5 << 16);
const LVT_MASK: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
/// ESR "receive illegal vector" and "send illegal vector".
const ESR_SEND_ILLEGAL: u32 = 1 << 5;
const ESR_RECV_ILLEGAL: u32 = 1 << 6;

/// Delivery mode of an IPI (ICR bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiMode {
    /// Fixed vector.
    Fixed,
    /// Fixed vector to the lowest-priority destination.
    LowestPriority,
    /// SMI.
    Smi,
    /// NMI.
    Nmi,
    /// INIT (level assert).
    Init,
    /// Start-up IPI: the vCPU starts at `vector << 12` in real mode.
    Startup,
}

/// Destination of an IPI (ICR shorthand, destination mode and field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// APIC ID (0xff in xAPIC mode, 0xffffffff in x2APIC mode: broadcast).
    Physical(u32),
    /// Logical destination (flat xAPIC model or x2APIC cluster).
    Logical(u32),
    /// All APICs but the sender.
    AllExcludingSelf,
}

/// An IPI from one local APIC to others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    /// The sender's APIC ID.
    pub source: u32,
    /// Vector (start page for SIPI).
    pub vector: u8,
    /// Delivery mode.
    pub mode: IpiMode,
    /// Destination.
    pub dest: Destination,
    /// Level-triggered (fixed IPIs are normally edge).
    pub level: bool,
}

/// Where a local APIC sends what leaves it: the VMM.
pub trait ApicSink: Send + Sync {
    /// Delivers an IPI to the destination APICs other than the sender (the sender
    /// already delivered to itself). Must not call back into the sending APIC.
    fn ipi(&self, ipi: Ipi);
    /// EOI broadcast of a level-triggered `vector` to the I/O APICs.
    fn eoi(&self, vector: u8);
}

#[derive(Clone, Copy, Default)]
struct Bits256([u32; 8]);

impl Bits256 {
    fn get(&self, v: u8) -> bool {
        self.0[v as usize / 32] & (1 << (v % 32)) != 0
    }
    fn set(&mut self, v: u8, on: bool) {
        let (w, b) = (v as usize / 32, 1u32 << (v % 32));
        if on {
            self.0[w] |= b;
        } else {
            self.0[w] &= !b;
        }
    }
    fn highest(&self) -> Option<u8> {
        (0..8)
            .rev()
            .find(|&w| self.0[w] != 0)
            .map(|w| (w * 32 + 31 - self.0[w].leading_zeros() as usize) as u8)
    }
}

/// Timer mode (LVT timer bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// One local APIC.
pub struct Lapic {
    id: u32,
    apic_base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits256,
    irr: Bits256,
    tmr: Bits256,
    esr: u32,
    esr_pending: u32,
    icr: u64,
    /// LVT timer, thermal, perf, LINT0, LINT1, error.
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    /// When the current one-shot or periodic count started (ns).
    timer_start: u64,
    /// The next expiry (ns) not yet signalled.
    timer_due: Option<u64>,
    tsc_deadline: u64,
    tsc_hz: u64,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn ApicSink>,
    intr: IrqOut,
}

impl Lapic {
    /// The local APIC with ID `id` (the BSP if `bsp`), in its reset state.
    pub fn new(
        id: u32,
        bsp: bool,
        tsc_hz: u64,
        clock: Arc<dyn Clock>,
        sink: Arc<dyn ApicSink>,
        intr: Arc<dyn IrqLine>,
    ) -> Self {
        let mut l = Self {
            id,
            apic_base: LAPIC_BASE | base::ENABLE | if bsp { base::BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xff,
            isr: Bits256::default(),
            irr: Bits256::default(),
            tmr: Bits256::default(),
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASK; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer_start: 0,
            timer_due: None,
            tsc_deadline: 0,
            tsc_hz: tsc_hz.max(1),
            clock,
            sink,
            intr: IrqOut::new(intr),
        };
        l.reset();
        l
    }

    /// INIT: everything but the APIC ID and base back to its power-on value.
    pub fn reset(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = 0xff;
        self.isr = Bits256::default();
        self.irr = Bits256::default();
        self.tmr = Bits256::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr = 0;
        self.lvt = [LVT_MASK; 6];
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer_due = None;
        self.tsc_deadline = 0;
        self.update_intr();
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether the guest switched this APIC to x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.apic_base & base::EXTD != 0
    }

    fn enabled(&self) -> bool {
        self.apic_base & base::ENABLE != 0 && self.svr & SVR_ENABLE != 0
    }

    /// An interrupt arrives (fixed or lowest-priority delivery): sets IRR, and TMR for
    /// a level-triggered one. Vectors below 16 are illegal and set the ESR instead.
    pub fn deliver(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.esr_pending |= ESR_RECV_ILLEGAL;
            return;
        }
        if self.apic_base & base::ENABLE == 0 {
            return;
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, level);
        self.update_intr();
    }

    /// The processor priority (SDM §11.8.3.1).
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// The vector to inject now, if any: the highest in IRR above the PPR's class.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The VMM injected `vector` (from [`pending_vector`](Self::pending_vector)): it
    /// moves from IRR to ISR.
    pub fn accept(&mut self, vector: u8) {
        if self.irr.get(vector) {
            self.irr.set(vector, false);
            self.isr.set(vector, true);
        }
        self.update_intr();
    }

    /// EOI: retires the highest in-service vector, broadcasting it if level-triggered.
    pub fn end_of_interrupt(&mut self) {
        if let Some(v) = self.isr.highest() {
            self.isr.set(v, false);
            if self.tmr.get(v) {
                self.sink.eoi(v);
            }
        }
        self.update_intr();
    }

    fn update_intr(&mut self) {
        let p = self.pending_vector().is_some();
        self.intr.set(p);
    }

    // The timer.

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[0] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    fn divisor(&self) -> u64 {
        let d = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        if d == 7 {
            1
        } else {
            2 << d
        }
    }

    fn period_ns(&self) -> u64 {
        ticks_to_ns(u64::from(self.timer_initial) * self.divisor(), TIMER_HZ).max(1)
    }

    fn start_count(&mut self, now: u64) {
        self.timer_start = now;
        self.timer_due = (self.timer_initial != 0 && self.timer_mode() != TimerMode::TscDeadline)
            .then(|| now.saturating_add(self.period_ns()));
    }

    fn current_count(&self, now: u64) -> u32 {
        if self.timer_initial == 0 || self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let elapsed = ns_to_ticks(now.saturating_sub(self.timer_start), TIMER_HZ) / self.divisor();
        let init = u64::from(self.timer_initial);
        match self.timer_mode() {
            TimerMode::Periodic => (init - elapsed % init) as u32,
            _ => init.saturating_sub(elapsed) as u32,
        }
    }

    /// The guest TSC at `ns`.
    fn tsc(&self, ns: u64) -> u64 {
        ns_to_ticks(ns, self.tsc_hz)
    }

    /// When the timer next fires (ns on the injected clock), if it will.
    pub fn next_event(&self) -> Option<u64> {
        self.timer_due
    }

    /// Brings the timer up to date with the clock: raises the timer interrupt if it
    /// expired (once, however many periods passed).
    pub fn update(&mut self) {
        let now = self.clock.now_ns();
        let Some(due) = self.timer_due else {
            return;
        };
        if now < due {
            return;
        }
        match self.timer_mode() {
            TimerMode::Periodic => {
                let p = self.period_ns();
                let periods = (now - due) / p + 1;
                self.timer_due = Some(due.saturating_add(periods.saturating_mul(p)));
            }
            TimerMode::TscDeadline => {
                self.tsc_deadline = 0;
                self.timer_due = None;
            }
            TimerMode::OneShot => self.timer_due = None,
        }
        let lvt = self.lvt[0];
        if lvt & LVT_MASK == 0 {
            self.deliver(lvt as u8, false);
        }
    }

    fn set_tsc_deadline(&mut self, v: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return; // writes are ignored outside TSC-deadline mode
        }
        self.tsc_deadline = v;
        self.timer_due = (v != 0).then(|| {
            // The first nanosecond at which the guest TSC reaches `v`.
            ticks_to_ns(v, self.tsc_hz)
        });
    }

    // Registers.

    fn read_reg(&self, off: u32) -> Option<u32> {
        let now = self.clock.now_ns();
        Some(match off {
            reg::ID => {
                if self.x2apic() {
                    self.id
                } else {
                    self.id << 24
                }
            }
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::APR => 0,
            reg::PPR => self.ppr(),
            reg::LDR => {
                if self.x2apic() {
                    ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
                } else {
                    self.ldr
                }
            }
            reg::DFR if !self.x2apic() => self.dfr,
            reg::SVR => self.svr,
            0x100..=0x170 => self.isr.0[((off - reg::ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr.0[((off - reg::TMR) >> 4) as usize],
            0x200..=0x270 => self.irr.0[((off - reg::IRR) >> 4) as usize],
            reg::ESR => self.esr,
            reg::ICR_LO => self.icr as u32,
            reg::ICR_HI if !self.x2apic() => (self.icr >> 32) as u32,
            reg::LVT_TIMER..=reg::LVT_ERROR if off & 0xf == 0 => {
                self.lvt[((off - reg::LVT_TIMER) >> 4) as usize]
            }
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => return None,
        })
    }

    /// A register write; false for a register that does not exist or is read-only
    /// (x2APIC: #GP).
    fn write_reg(&mut self, off: u32, v: u32) -> bool {
        let now = self.clock.now_ns();
        match off {
            reg::ID if !self.x2apic() => self.id = v >> 24,
            reg::TPR => self.tpr = v & 0xff,
            reg::EOI => self.end_of_interrupt(),
            reg::LDR if !self.x2apic() => self.ldr = v & 0xff00_0000,
            reg::DFR if !self.x2apic() => self.dfr = v | 0x0fff_ffff,
            reg::SVR => {
                self.svr = v & 0x13ff;
                if v & SVR_ENABLE == 0 {
                    self.lvt.iter_mut().for_each(|l| *l |= LVT_MASK);
                }
            }
            reg::ESR => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            reg::ICR_LO => {
                self.icr = (self.icr & !0xffff_ffff) | u64::from(v & !(1 << 12));
                self.send_ipi();
            }
            reg::ICR_HI if !self.x2apic() => {
                self.icr = (self.icr & 0xffff_ffff) | u64::from(v & 0xff00_0000) << 32
            }
            reg::LVT_TIMER..=reg::LVT_ERROR if off & 0xf == 0 => {
                let i = ((off - reg::LVT_TIMER) >> 4) as usize;
                let mut v = v & if i == 0 { 0x7_10ff } else { 0x1_a7ff };
                if self.svr & SVR_ENABLE == 0 {
                    v |= LVT_MASK;
                }
                let was = self.timer_mode();
                self.lvt[i] = v;
                if i == 0 && was != self.timer_mode() {
                    // A mode change stops the timer (SDM §11.5.4.1).
                    self.timer_initial = 0;
                    self.tsc_deadline = 0;
                    self.timer_due = None;
                }
            }
            reg::TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.timer_initial = v;
                    self.start_count(now);
                }
            }
            reg::TIMER_DIVIDE => {
                // Keep the current count going at the new rate.
                let cur = self.current_count(now);
                self.timer_divide = v & 0xb;
                if self.timer_due.is_some() && self.timer_mode() == TimerMode::OneShot {
                    let rest = ticks_to_ns(u64::from(cur) * self.divisor(), TIMER_HZ);
                    self.timer_due = Some(now.saturating_add(rest));
                    let spent = u64::from(self.timer_initial - cur) * self.divisor();
                    self.timer_start = now.saturating_sub(ticks_to_ns(spent, TIMER_HZ));
                }
            }
            reg::SELF_IPI if self.x2apic() => self.deliver(v as u8, false),
            _ => return false,
        }
        true
    }

    fn send_ipi(&mut self) {
        let icr = self.icr;
        let vector = icr as u8;
        let mode = match (icr >> 8) & 7 {
            0 => IpiMode::Fixed,
            1 => IpiMode::LowestPriority,
            2 => IpiMode::Smi,
            4 => IpiMode::Nmi,
            5 if icr & (1 << 14) == 0 && icr & (1 << 15) != 0 => return, // INIT level de-assert
            5 => IpiMode::Init,
            6 => IpiMode::Startup,
            _ => return,
        };
        let fixed = matches!(mode, IpiMode::Fixed | IpiMode::LowestPriority);
        if fixed && vector < 16 {
            self.esr_pending |= ESR_SEND_ILLEGAL;
            return;
        }
        let level = icr & (1 << 15) != 0;
        let dest_field = if self.x2apic() {
            (icr >> 32) as u32
        } else {
            (icr >> 56) as u32
        };
        let broadcast = if self.x2apic() { u32::MAX } else { 0xff };
        let logical = icr & (1 << 11) != 0;
        let (to_self, dest) = match (icr >> 18) & 3 {
            1 => (true, None),
            2 => (true, Some(Destination::AllExcludingSelf)),
            3 => (false, Some(Destination::AllExcludingSelf)),
            _ if logical => (
                self.logical_match(dest_field),
                Some(Destination::Logical(dest_field)),
            ),
            _ => (
                dest_field == self.id || dest_field == broadcast,
                Some(Destination::Physical(dest_field)),
            ),
        };
        if to_self && fixed {
            self.deliver(vector, level);
        }
        let to_self_other = to_self && !fixed;
        if let Some(dest) = dest {
            self.sink.ipi(Ipi {
                source: self.id,
                vector,
                mode,
                dest,
                level,
            });
        }
        if to_self_other {
            // NMI/INIT/SIPI to oneself: the VMM acts on the vCPU.
            self.sink.ipi(Ipi {
                source: self.id,
                vector,
                mode,
                dest: Destination::Physical(self.id),
                level,
            });
        }
    }

    /// Whether logical destination `dest` names this APIC.
    pub fn logical_match(&self, dest: u32) -> bool {
        if self.x2apic() {
            let ldr = ((self.id >> 4) << 16) | (1 << (self.id & 0xf));
            dest >> 16 == ldr >> 16 && dest & ldr & 0xffff != 0
        } else if self.dfr >> 28 == 0xf {
            (dest as u8) & (self.ldr >> 24) as u8 != 0 // flat model
        } else {
            // Cluster model: cluster in the high nibble, members in the low.
            let (d, l) = (dest as u8, (self.ldr >> 24) as u8);
            d >> 4 == l >> 4 && d & l & 0xf != 0
        }
    }

    /// RDMSR: `None` means #GP.
    pub fn read_msr(&self, msr: u32) -> Option<u64> {
        match msr {
            MSR_APIC_BASE => Some(self.apic_base),
            MSR_TSC_DEADLINE => Some(if self.timer_mode() == TimerMode::TscDeadline {
                self.tsc_deadline
            } else {
                0
            }),
            0x830 if self.x2apic() => Some(self.icr),
            0x800..=0x8ff if self.x2apic() => match (msr - 0x800) << 4 {
                reg::EOI | reg::SELF_IPI => None, // write-only
                off => self.read_reg(off).map(u64::from),
            },
            _ => None,
        }
    }

    /// WRMSR: false means #GP.
    pub fn write_msr(&mut self, msr: u32, v: u64) -> bool {
        match msr {
            MSR_APIC_BASE => {
                // Leaving x2APIC mode needs the APIC disabled first; reserved bits #GP.
                let to_x2 = v & base::EXTD != 0;
                if v & !(0xf_ffff_f000 | base::BSP | base::EXTD | base::ENABLE) != 0
                    || (to_x2 && v & base::ENABLE == 0)
                    || (self.x2apic() && !to_x2 && v & base::ENABLE != 0)
                {
                    return false;
                }
                let was_enabled = self.apic_base & base::ENABLE != 0;
                self.apic_base = (v & !base::BSP) | (self.apic_base & base::BSP);
                if was_enabled && v & base::ENABLE == 0 {
                    self.reset();
                }
                true
            }
            MSR_TSC_DEADLINE => {
                self.set_tsc_deadline(v);
                true
            }
            0x830 if self.x2apic() => {
                self.icr = v & !(1 << 12);
                self.send_ipi();
                true
            }
            0x800..=0x8ff if self.x2apic() => {
                let off = (msr - 0x800) << 4;
                if v >> 32 != 0 || matches!(off, reg::EOI) && v != 0 {
                    return false;
                }
                match off {
                    reg::ID | reg::VERSION | reg::PPR | reg::LDR | reg::TIMER_CURRENT => false,
                    0x100..=0x270 => false,
                    _ => self.write_reg(off, v as u32),
                }
            }
            _ => false,
        }
    }

    /// The guest TSC now, as the TSC-deadline timer sees it.
    pub fn guest_tsc(&self) -> u64 {
        self.tsc(self.clock.now_ns())
    }
}

impl BusDevice for Lapic {
    /// 32-bit registers at 16-byte strides; other sizes and offsets read zero. In x2APIC
    /// mode the page reads all-ones.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if self.x2apic() {
            data.fill(0xff);
            return;
        }
        let v = if offset & 0xf == 0 && data.len() == 4 {
            self.read_reg(offset as u32).unwrap_or(0)
        } else {
            0
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.to_le_bytes().get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        if !self.x2apic() && offset & 0xf == 0 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            if offset as u32 != reg::SELF_IPI {
                self.write_reg(offset as u32, v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::sync::SpinLock;
    use crate::testutil::TestIrq;
    use std::vec::Vec;

    #[derive(Default)]
    struct Sink {
        ipis: SpinLock<Vec<Ipi>>,
        eois: SpinLock<Vec<u8>>,
    }

    impl ApicSink for Sink {
        fn ipi(&self, ipi: Ipi) {
            self.ipis.lock().push(ipi);
        }
        fn eoi(&self, vector: u8) {
            self.eois.lock().push(vector);
        }
    }

    struct T {
        apic: Lapic,
        clock: Arc<ManualClock>,
        sink: Arc<Sink>,
        intr: Arc<TestIrq>,
    }

    const TSC_HZ: u64 = 2_000_000_000;

    fn lapic(id: u32) -> T {
        let clock = Arc::new(ManualClock::new(1000));
        let sink = Arc::new(Sink::default());
        let intr = TestIrq::new();
        let apic = Lapic::new(
            id,
            id == 0,
            TSC_HZ,
            clock.clone(),
            sink.clone(),
            intr.clone(),
        );
        T {
            apic,
            clock,
            sink,
            intr,
        }
    }

    fn rd(a: &mut Lapic, off: u32) -> u32 {
        let mut b = [0u8; 4];
        a.read(LAPIC_BASE, off as u64, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(a: &mut Lapic, off: u32, v: u32) {
        a.write(LAPIC_BASE, off as u64, &v.to_le_bytes());
    }

    fn enabled(id: u32) -> T {
        let mut t = lapic(id);
        wr(&mut t.apic, reg::SVR, 0x1ff);
        t
    }

    #[test]
    fn reset_state_and_identity() {
        let mut t = lapic(3);
        let a = &mut t.apic;
        assert_eq!(rd(a, reg::ID), 3 << 24);
        assert_eq!(rd(a, reg::VERSION), 0x5_0014);
        assert_eq!(rd(a, reg::SVR), 0xff);
        assert_eq!(rd(a, reg::DFR), u32::MAX);
        assert_eq!(rd(a, reg::LVT_LINT0), LVT_MASK);
        assert_eq!(a.read_msr(MSR_APIC_BASE), Some(LAPIC_BASE | base::ENABLE));
        assert_eq!(
            lapic(0).apic.read_msr(MSR_APIC_BASE).unwrap() & base::BSP,
            base::BSP
        );
        // Software-disabled: nothing is pending.
        a.deliver(0x40, false);
        assert_eq!(a.pending_vector(), None);
        // Unaligned or narrow accesses read zero.
        let mut b = [0xaa; 2];
        a.read(LAPIC_BASE, reg::VERSION as u64, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn priorities_accept_and_eoi() {
        let mut t = enabled(0);
        let a = &mut t.apic;
        a.deliver(0x31, false);
        a.deliver(0x52, true);
        assert!(t.intr.level());
        assert_eq!(a.pending_vector(), Some(0x52));
        assert_eq!(rd(a, reg::IRR + 0x20), 1 << 0x12);
        assert_eq!(rd(a, reg::TMR + 0x20), 1 << 0x12);
        a.accept(0x52);
        assert_eq!(rd(a, reg::ISR + 0x20), 1 << 0x12);
        assert_eq!(rd(a, reg::PPR), 0x50);
        // 0x31 is below the in-service class.
        assert_eq!(a.pending_vector(), None);
        assert!(!t.intr.level());
        // EOI retires 0x52 and broadcasts it (level-triggered).
        wr(a, reg::EOI, 0);
        assert_eq!(*t.sink.eois.lock(), [0x52]);
        assert_eq!(a.pending_vector(), Some(0x31));
        // TPR masks the class 3 and below.
        wr(a, reg::TPR, 0x35);
        assert_eq!(rd(a, reg::PPR), 0x35);
        assert_eq!(a.pending_vector(), None);
        wr(a, reg::TPR, 0x20);
        a.accept(0x31);
        wr(a, reg::EOI, 0);
        assert_eq!(
            t.sink.eois.lock().len(),
            1,
            "edge vectors are not broadcast"
        );
        // An illegal vector sets the ESR after a write to it.
        a.deliver(3, false);
        assert_eq!(rd(a, reg::ESR), 0);
        wr(a, reg::ESR, 0);
        assert_eq!(rd(a, reg::ESR), ESR_RECV_ILLEGAL);
    }

    #[test]
    fn disabling_masks_the_lvt() {
        let mut t = enabled(0);
        let a = &mut t.apic;
        wr(a, reg::LVT_LINT0, 0x700);
        assert_eq!(rd(a, reg::LVT_LINT0), 0x700);
        wr(a, reg::SVR, 0xff);
        assert_eq!(rd(a, reg::LVT_LINT0), 0x1_0700);
        wr(a, reg::LVT_LINT0, 0x700);
        assert_eq!(
            rd(a, reg::LVT_LINT0),
            0x1_0700,
            "stays masked while disabled"
        );
    }

    #[test]
    fn one_shot_timer_with_divider() {
        let mut t = enabled(0);
        let a = &mut t.apic;
        wr(a, reg::TIMER_DIVIDE, 0x3); // divide by 16
        wr(a, reg::LVT_TIMER, 0xec);
        wr(a, reg::TIMER_INITIAL, 1000);
        assert_eq!(a.next_event(), Some(1000 + 16_000));
        t.clock.advance(8000);
        assert_eq!(rd(a, reg::TIMER_CURRENT), 500);
        a.update();
        assert_eq!(a.pending_vector(), None);
        t.clock.advance(8000);
        a.update();
        assert_eq!(a.pending_vector(), Some(0xec));
        assert_eq!(rd(a, reg::TIMER_CURRENT), 0);
        assert_eq!(a.next_event(), None);
        // Divide by 1 (encoding 0xb).
        wr(a, reg::TIMER_DIVIDE, 0xb);
        wr(a, reg::TIMER_INITIAL, 10);
        assert_eq!(a.next_event(), Some(t.clock.now_ns() + 10));
        // Writing 0 stops it.
        wr(a, reg::TIMER_INITIAL, 0);
        assert_eq!(a.next_event(), None);
    }

    #[test]
    fn periodic_timer_reloads_and_masked_timer_is_silent() {
        let mut t = enabled(0);
        let a = &mut t.apic;
        wr(a, reg::TIMER_DIVIDE, 0xb);
        wr(a, reg::LVT_TIMER, (1 << 17) | 0x40);
        wr(a, reg::TIMER_INITIAL, 100);
        t.clock.advance(250);
        assert_eq!(rd(a, reg::TIMER_CURRENT), 50);
        a.update();
        assert_eq!(a.next_event(), Some(1000 + 300));
        a.accept(0x40);
        wr(a, reg::EOI, 0);
        wr(a, reg::LVT_TIMER, (1 << 17) | LVT_MASK | 0x40);
        t.clock.advance(100);
        a.update();
        assert_eq!(a.pending_vector(), None);
        assert_eq!(a.next_event(), Some(1000 + 400));
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut t = enabled(0);
        let a = &mut t.apic;
        // Ignored outside TSC-deadline mode.
        assert!(a.write_msr(MSR_TSC_DEADLINE, 5000));
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE), Some(0));
        wr(a, reg::LVT_TIMER, (2 << 17) | 0xef);
        let now_tsc = a.guest_tsc();
        assert_eq!(now_tsc, 2000);
        assert!(a.write_msr(MSR_TSC_DEADLINE, now_tsc + 4000));
        assert_eq!(a.next_event(), Some(1000 + 2000));
        // The initial-count register is ignored in this mode.
        wr(a, reg::TIMER_INITIAL, 5);
        assert_eq!(rd(a, reg::TIMER_INITIAL), 0);
        t.clock.advance(1999);
        a.update();
        assert_eq!(a.pending_vector(), None);
        t.clock.advance(1);
        a.update();
        assert_eq!(a.pending_vector(), Some(0xef));
        assert_eq!(a.read_msr(MSR_TSC_DEADLINE), Some(0), "cleared on expiry");
        // A deadline in the past fires at the next update.
        a.write_msr(MSR_TSC_DEADLINE, 1);
        assert!(a.next_event().unwrap() <= t.clock.now_ns());
        // Leaving the mode disarms.
        wr(a, reg::LVT_TIMER, 0xef);
        assert_eq!(a.next_event(), None);
    }

    #[test]
    fn icr_sends_fixed_init_and_sipi() {
        let mut t = enabled(1);
        let a = &mut t.apic;
        // INIT to APIC 2, then INIT de-assert (ignored), then SIPI to page 0x9f.
        wr(a, reg::ICR_HI, 2 << 24);
        wr(a, reg::ICR_LO, 0x4500);
        wr(a, reg::ICR_LO, 0x8500);
        wr(a, reg::ICR_LO, 0x469f);
        // Fixed 0x30 to all but self; fixed 0x31 to self.
        wr(a, reg::ICR_LO, (3 << 18) | 0x30);
        wr(a, reg::ICR_LO, (1 << 18) | 0x31);
        let ipis = t.sink.ipis.lock().clone();
        assert_eq!(
            ipis,
            [
                Ipi {
                    source: 1,
                    vector: 0,
                    mode: IpiMode::Init,
                    dest: Destination::Physical(2),
                    level: false
                },
                Ipi {
                    source: 1,
                    vector: 0x9f,
                    mode: IpiMode::Startup,
                    dest: Destination::Physical(2),
                    level: false
                },
                Ipi {
                    source: 1,
                    vector: 0x30,
                    mode: IpiMode::Fixed,
                    dest: Destination::AllExcludingSelf,
                    level: false
                },
            ]
        );
        assert_eq!(a.pending_vector(), Some(0x31));
        assert_eq!(rd(a, reg::ICR_LO) & (1 << 12), 0, "delivery status idle");
        // Physical to oneself: delivered locally and reported to the sink.
        wr(a, reg::ICR_HI, 1 << 24);
        wr(a, reg::ICR_LO, 0x41);
        assert_eq!(a.pending_vector(), Some(0x41));
        // Illegal vector: nothing sent, ESR.
        let n = t.sink.ipis.lock().len();
        wr(a, reg::ICR_LO, 0x05);
        assert_eq!(t.sink.ipis.lock().len(), n);
        wr(a, reg::ESR, 0);
        assert_eq!(rd(a, reg::ESR), ESR_SEND_ILLEGAL);
    }

    #[test]
    fn logical_destinations() {
        let mut t = enabled(1);
        let a = &mut t.apic;
        wr(a, reg::LDR, 0x02 << 24);
        assert!(a.logical_match(0x03));
        assert!(!a.logical_match(0x04));
        wr(a, reg::DFR, 0x0fff_ffff); // cluster model
        wr(a, reg::LDR, 0x21 << 24);
        assert!(a.logical_match(0x23));
        assert!(!a.logical_match(0x13));
    }

    #[test]
    fn x2apic_msrs() {
        let mut t = enabled(0x13);
        let a = &mut t.apic;
        assert_eq!(a.read_msr(0x802), None, "#GP before x2APIC mode");
        assert!(
            !a.write_msr(MSR_APIC_BASE, LAPIC_BASE | base::EXTD),
            "EXTD without EN"
        );
        assert!(a.write_msr(MSR_APIC_BASE, LAPIC_BASE | base::ENABLE | base::EXTD));
        assert!(a.x2apic());
        assert_eq!(a.read_msr(0x802), Some(0x13));
        assert_eq!(a.read_msr(0x80d), Some((1 << 16) | (1 << 3)), "derived LDR");
        assert!(a.logical_match((1 << 16) | 0x8));
        assert_eq!(a.read_msr(0x80e), None, "no DFR in x2APIC mode");
        assert_eq!(a.read_msr(0x80b), None, "EOI is write-only");
        assert!(!a.write_msr(0x802, 0), "ID is read-only");
        assert!(!a.write_msr(0x80b, 1), "EOI takes only 0");
        // The MMIO page is gone.
        assert_eq!(rd(a, reg::VERSION), u32::MAX);
        // Self IPI, TPR, EOI through MSRs.
        assert!(a.write_msr(0x83f, 0x66));
        assert_eq!(a.pending_vector(), Some(0x66));
        a.accept(0x66);
        assert_eq!(a.read_msr(0x80a), Some(0x60));
        assert!(a.write_msr(0x80b, 0));
        assert_eq!(a.read_msr(0x80a), Some(0));
        // 64-bit ICR with a 32-bit destination.
        assert!(a.write_msr(0x830, (0x1234u64 << 32) | 0x4fd));
        assert_eq!(
            t.sink.ipis.lock()[0],
            Ipi {
                source: 0x13,
                vector: 0xfd,
                mode: IpiMode::Nmi,
                dest: Destination::Physical(0x1234),
                level: false
            }
        );
        assert_eq!(a.read_msr(0x830), Some((0x1234u64 << 32) | 0x4fd));
        // Back to xAPIC directly is refused; via disabled it works (and resets).
        assert!(!a.write_msr(MSR_APIC_BASE, LAPIC_BASE | base::ENABLE));
        assert!(a.write_msr(MSR_APIC_BASE, LAPIC_BASE));
        assert!(a.write_msr(MSR_APIC_BASE, LAPIC_BASE | base::ENABLE));
        assert_eq!(rd(a, reg::SVR), 0xff);
        assert!(!a.write_msr(0x1234, 0));
    }
}
