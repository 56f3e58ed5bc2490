//! The PC's pair of 8259A programmable interrupt controllers, master at 0x20/0x21
//! (IRQ 0–7), slave at 0xa0/0xa1 (IRQ 8–15) cascaded on the master's IR2, and the
//! PIIX/ICH edge/level control registers (ELCR) at 0x4d0/0x4d1.
//!
//! Facts from the Intel 8259A datasheet (order no. 231468): "Interrupt Sequence"
//! (8086 mode INTA), "Programming the 8259A" (ICW1–ICW4, OCW1–OCW3, Figures 7–9),
//! "Fully Nested Mode", "End of Interrupt", "Automatic Rotation", "Special Mask Mode",
//! "Poll Command", "Edge and Level Triggered Modes" (a request that has gone away by
//! INTA yields IR7, the spurious vector, without setting ISR); ELCR from the Intel
//! 82371AB PIIX4 datasheet, "ELCR1/ELCR2—Edge/Level Control Registers" (ELCR1 bits
//! 0–2 and ELCR2 bits 0 and 5 are fixed at edge).
//!
//! | port       | read                       | write                          |
//! |------------|----------------------------|--------------------------------|
//! | 0x20/0xa0  | IRR or ISR (OCW3), poll    | ICW1 (bit 4), OCW2, OCW3 (bit 3) |
//! | 0x21/0xa1  | IMR                        | ICW2–4 during init, else OCW1  |
//! | 0x4d0/0x4d1| ELCR (1 = level)           | ELCR                           |
//!
//! The VMM drives input lines with [`PicPair::set_irq`], watches the INTR output (an
//! injected [`IrqLine`]), and on injection asks [`PicPair::pending_vector`] and runs the
//! INTA cycle with [`PicPair::acknowledge`].

use alloc::sync::Arc;

use crate::bus::{read_bytes, write_bytes, Action, BusDevice, IrqLine, IrqOut};

/// Master command/data ports.
pub const MASTER_BASE: u64 = 0x20;
/// Slave command/data ports.
pub const SLAVE_BASE: u64 = 0xa0;
/// ELCR1 (master) and ELCR2 (slave).
pub const ELCR_BASE: u64 = 0x4d0;
/// ELCR bits that may be set: IRQ 0, 1, 2 (master) and 8, 13 (slave) are always edge.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];
/// The master input the slave's INT drives.
const CASCADE_IRQ: u8 = 2;

/// ICW1 bits.
mod icw1 {
    pub const IC4: u8 = 1 << 0;
    pub const SNGL: u8 = 1 << 1;
    pub const LTIM: u8 = 1 << 3;
    pub const INIT: u8 = 1 << 4;
}

/// ICW4 bits.
mod icw4 {
    pub const AEOI: u8 = 1 << 1;
    pub const SFNM: u8 = 1 << 4;
}

/// OCW3 bits.
mod ocw3 {
    pub const RIS: u8 = 1 << 0;
    pub const RR: u8 = 1 << 1;
    pub const POLL: u8 = 1 << 2;
    pub const SMM: u8 = 1 << 5;
    pub const ESMM: u8 = 1 << 6;
}

/// Where the next write to the data port goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Clone, Debug)]
struct Pic {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input line levels, for edge detection.
    lines: u8,
    elcr: u8,
    elcr_mask: u8,
    ltim: bool,
    /// The IR with the lowest priority is `priority_add - 1` (rotation base).
    priority_add: u8,
    vector_base: u8,
    init: Init,
    icw4_expected: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    is_master: bool,
}

impl Pic {
    fn new(is_master: bool) -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0xff,
            lines: 0,
            elcr: 0,
            elcr_mask: ELCR_MASK[usize::from(!is_master)],
            ltim: false,
            priority_add: 0,
            vector_base: if is_master { 0x08 } else { 0x70 },
            init: Init::Ready,
            icw4_expected: false,
            single: false,
            auto_eoi: false,
            rotate_on_aeoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            is_master,
        }
    }

    fn level_triggered(&self) -> u8 {
        if self.ltim {
            0xff
        } else {
            self.elcr
        }
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        if self.level_triggered() & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit; // rising edge
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Priority (0 highest) of the highest-priority bit in `mask`, 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IR this chip would present at INTA, if its INT output is high.
    fn highest(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        (p < self.priority(in_service)).then_some((p + self.priority_add) & 7)
    }

    /// INTA for `irq`: into service (or auto-EOI), edge request consumed.
    fn ack(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.level_triggered() & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn eoi(&mut self, irq: u8, rotate: bool) {
        self.isr &= !(1 << irq);
        if rotate {
            self.priority_add = (irq + 1) & 7;
        }
    }

    /// The in-service IR with the highest priority.
    fn highest_in_service(&self) -> Option<u8> {
        let p = self.priority(self.isr);
        (p < 8).then_some((p + self.priority_add) & 7)
    }

    fn write_command(&mut self, v: u8) {
        if v & icw1::INIT != 0 {
            // ICW1: IMR cleared, IR7 lowest priority, special mask cleared, IRR read.
            self.irr &= self.level_triggered() & self.lines;
            self.isr = 0;
            self.imr = 0;
            self.priority_add = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.auto_eoi = false;
            self.rotate_on_aeoi = false;
            self.special_fully_nested = false;
            self.icw4_expected = v & icw1::IC4 != 0;
            self.single = v & icw1::SNGL != 0;
            self.ltim = v & icw1::LTIM != 0;
            self.init = Init::Icw2;
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & ocw3::POLL != 0 {
                self.poll = true;
            }
            if v & ocw3::RR != 0 {
                self.read_isr = v & ocw3::RIS != 0;
            }
            if v & ocw3::ESMM != 0 {
                self.special_mask = v & ocw3::SMM != 0;
            }
        } else {
            // OCW2: R SL EOI in bits 7:5, level in 2:0.
            let level = v & 7;
            match v >> 5 {
                0b001 => {
                    if let Some(irq) = self.highest_in_service() {
                        self.eoi(irq, false);
                    }
                }
                0b101 => {
                    if let Some(irq) = self.highest_in_service() {
                        self.eoi(irq, true);
                    }
                }
                0b011 => self.eoi(level, false),
                0b111 => self.eoi(level, true),
                0b100 => self.rotate_on_aeoi = true,
                0b000 => self.rotate_on_aeoi = false,
                0b110 => self.priority_add = (level + 1) & 7,
                _ => {} // 0b010: no operation
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        self.init = match self.init {
            Init::Ready => {
                self.imr = v; // OCW1
                Init::Ready
            }
            Init::Icw2 => {
                self.vector_base = v & 0xf8;
                if !self.single {
                    Init::Icw3
                } else if self.icw4_expected {
                    Init::Icw4
                } else {
                    Init::Ready
                }
            }
            // ICW3 (cascade wiring) is fixed on a PC: slave on IR2, ID 2.
            Init::Icw3 if self.icw4_expected => Init::Icw4,
            Init::Icw3 => Init::Ready,
            Init::Icw4 => {
                self.auto_eoi = v & icw4::AEOI != 0;
                self.special_fully_nested = v & icw4::SFNM != 0;
                Init::Ready
            }
        };
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            self.poll = false;
            match self.highest() {
                Some(irq) => {
                    self.ack(irq);
                    0x80 | irq
                }
                None => 0,
            }
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The master/slave 8259A pair with ELCR.
pub struct PicPair {
    pics: [Pic; 2],
    intr: IrqOut,
}

impl PicPair {
    /// A pair in power-on state (all masked until the guest initializes it), driving
    /// `intr` (the CPU's INTR pin, or the I/O APIC's ExtINT / LINT0 path).
    pub fn new(intr: Arc<dyn IrqLine>) -> Self {
        Self {
            pics: [Pic::new(true), Pic::new(false)],
            intr: IrqOut::new(intr),
        }
    }

    /// Drives input line `irq` (0–15; others are ignored) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq < 16 {
            self.pics[usize::from(irq >> 3)].set_line(irq, level);
            self.update();
        }
    }

    /// Whether the INTR output is asserted.
    pub fn intr(&self) -> bool {
        self.pics[0].highest().is_some()
    }

    /// The vector an INTA cycle would return now, if INTR is asserted.
    pub fn pending_vector(&self) -> Option<u8> {
        let irq = self.pics[0].highest()?;
        Some(if irq == CASCADE_IRQ {
            let s = &self.pics[1];
            s.vector_base | s.highest().unwrap_or(7)
        } else {
            self.pics[0].vector_base | irq
        })
    }

    /// The INTA cycle: puts the highest request into service and returns its vector;
    /// with nothing to deliver, the spurious IRQ 7 (or IRQ 15) vector.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.pics[0].highest() {
            Some(CASCADE_IRQ) => {
                self.pics[0].ack(CASCADE_IRQ);
                let s = &mut self.pics[1];
                match s.highest() {
                    Some(irq) => {
                        s.ack(irq);
                        s.vector_base | irq
                    }
                    None => s.vector_base | 7,
                }
            }
            Some(irq) => {
                self.pics[0].ack(irq);
                self.pics[0].vector_base | irq
            }
            None => self.pics[0].vector_base | 7,
        };
        self.update();
        vector
    }

    /// Propagates the slave's INT to the master's IR2 and the master's INT to INTR.
    fn update(&mut self) {
        let slave_int = self.pics[1].highest().is_some();
        self.pics[0].set_line(CASCADE_IRQ, slave_int);
        if !slave_int {
            // A withdrawn request clears IRR (datasheet: the IR input must stay high
            // until INTA). Device inputs keep their edge latched, because the VMM's
            // devices may pulse a line; the cascade input follows the slave exactly.
            self.pics[0].irr &= !(1 << CASCADE_IRQ);
        }
        let intr = self.pics[0].highest().is_some();
        self.intr.set(intr);
    }

    fn read_reg(&mut self, base: u64, offset: u64) -> u8 {
        let v = match (base, offset) {
            (ELCR_BASE, 0 | 1) => self.pics[offset as usize].elcr,
            (MASTER_BASE | SLAVE_BASE, 0 | 1) => {
                let pic = &mut self.pics[usize::from(base == SLAVE_BASE)];
                if offset == 0 {
                    pic.read_command()
                } else {
                    pic.imr
                }
            }
            _ => 0xff,
        };
        self.update();
        v
    }

    fn write_reg(&mut self, base: u64, offset: u64, v: u8) {
        match (base, offset) {
            (ELCR_BASE, 0 | 1) => {
                let pic = &mut self.pics[offset as usize];
                pic.elcr = v & pic.elcr_mask;
            }
            (MASTER_BASE | SLAVE_BASE, 0) => {
                self.pics[usize::from(base == SLAVE_BASE)].write_command(v)
            }
            (MASTER_BASE | SLAVE_BASE, 1) => {
                self.pics[usize::from(base == SLAVE_BASE)].write_data(v)
            }
            _ => {}
        }
        self.update();
    }
}

impl BusDevice for PicPair {
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
    use crate::testutil::{Rng, TestIrq};

    fn out(p: &mut PicPair, port: u64, v: u8) {
        let (base, off) = match port {
            0x20 | 0x21 => (MASTER_BASE, port - 0x20),
            0xa0 | 0xa1 => (SLAVE_BASE, port - 0xa0),
            _ => (ELCR_BASE, port - 0x4d0),
        };
        p.write(base, off, &[v]);
    }

    fn inb(p: &mut PicPair, port: u64) -> u8 {
        let (base, off) = match port {
            0x20 | 0x21 => (MASTER_BASE, port - 0x20),
            0xa0 | 0xa1 => (SLAVE_BASE, port - 0xa0),
            _ => (ELCR_BASE, port - 0x4d0),
        };
        let mut v = [0];
        p.read(base, off, &mut v);
        v[0]
    }

    /// The sequence Linux's `init_8259A` (and every BIOS) uses.
    fn linux_init(p: &mut PicPair, auto_eoi: bool) {
        out(p, 0x21, 0xff);
        out(p, 0xa1, 0xff);
        out(p, 0x20, 0x11); // ICW1: edge, cascade, ICW4
        out(p, 0x21, 0x30); // ICW2: vectors 0x30–0x37
        out(p, 0x21, 0x04); // ICW3: slave on IR2
        out(p, 0x21, if auto_eoi { 0x03 } else { 0x01 }); // ICW4: 8086 (AEOI)
        out(p, 0xa0, 0x11);
        out(p, 0xa1, 0x38);
        out(p, 0xa1, 0x02);
        out(p, 0xa1, 0x01);
        out(p, 0x21, 0x00);
        out(p, 0xa1, 0x00);
    }

    fn pair() -> (PicPair, Arc<TestIrq>) {
        let irq = TestIrq::new();
        let mut p = PicPair::new(irq.clone());
        linux_init(&mut p, false);
        (p, irq)
    }

    #[test]
    fn power_on_is_masked() {
        let mut p = PicPair::new(TestIrq::new());
        p.set_irq(0, true);
        assert_eq!(p.pending_vector(), None);
        assert_eq!(inb(&mut p, 0x21), 0xff);
    }

    #[test]
    fn edge_irq_is_delivered_once_and_eoi_reopens() {
        let (mut p, intr) = pair();
        p.set_irq(1, true);
        assert!(intr.level());
        assert_eq!(p.pending_vector(), Some(0x31));
        assert_eq!(p.acknowledge(), 0x31);
        assert!(!intr.level());
        assert_eq!(inb(&mut p, 0x20), 0, "IRR consumed");
        out(&mut p, 0x20, 0x0b); // OCW3: read ISR
        assert_eq!(inb(&mut p, 0x20), 0x02);
        // Line still high: no new edge, no new request.
        out(&mut p, 0x20, 0x20);
        assert_eq!(p.pending_vector(), None);
        p.set_irq(1, false);
        p.set_irq(1, true);
        assert_eq!(p.pending_vector(), Some(0x31));
    }

    #[test]
    fn priorities_nest() {
        let (mut p, _) = pair();
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x34);
        p.set_irq(6, true);
        assert_eq!(p.pending_vector(), None, "lower priority waits");
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), 0x30, "higher priority preempts");
        out(&mut p, 0x20, 0x20); // EOI for IRQ0
        assert_eq!(p.pending_vector(), None);
        out(&mut p, 0x20, 0x64); // specific EOI for IRQ4
        assert_eq!(p.acknowledge(), 0x36);
    }

    #[test]
    fn mask_blocks_and_unmask_releases() {
        let (mut p, intr) = pair();
        out(&mut p, 0x21, 0x01);
        p.set_irq(0, true);
        assert!(!intr.level());
        out(&mut p, 0x21, 0x00);
        assert!(intr.level());
        assert_eq!(p.acknowledge(), 0x30);
    }

    #[test]
    fn slave_cascades_through_ir2() {
        let (mut p, intr) = pair();
        p.set_irq(12, true);
        assert!(intr.level());
        assert_eq!(p.pending_vector(), Some(0x3c));
        assert_eq!(p.acknowledge(), 0x3c);
        out(&mut p, 0xa0, 0x0b);
        assert_eq!(inb(&mut p, 0xa0), 1 << 4);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 1 << 2);
        // IRQ 3 (lower priority than IR2) waits for the master EOI.
        p.set_irq(3, true);
        assert_eq!(p.pending_vector(), None);
        out(&mut p, 0xa0, 0x20);
        out(&mut p, 0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x33);
        // A higher-priority slave request after its INTA still reaches the master.
        p.set_irq(9, true);
        assert_eq!(p.acknowledge(), 0x39);
        p.set_irq(8, true);
        out(&mut p, 0xa0, 0x20);
        out(&mut p, 0x20, 0x20);
        out(&mut p, 0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x38);
    }

    #[test]
    fn level_triggered_via_elcr_stays_until_line_drops() {
        let (mut p, intr) = pair();
        out(&mut p, 0x4d1, 0xff);
        assert_eq!(inb(&mut p, 0x4d1), 0xde, "IRQ 8 and 13 stay edge");
        out(&mut p, 0x4d0, 0xff);
        assert_eq!(inb(&mut p, 0x4d0), 0xf8);
        p.set_irq(11, true);
        assert_eq!(p.acknowledge(), 0x3b);
        out(&mut p, 0xa0, 0x20);
        out(&mut p, 0x20, 0x20);
        assert_eq!(p.pending_vector(), Some(0x3b), "still asserted");
        p.set_irq(11, false);
        assert_eq!(p.pending_vector(), None);
        assert!(!intr.level());
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let (mut p, _) = pair();
        assert_eq!(p.acknowledge(), 0x37);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0, "spurious IRQ7 does not set ISR");
        // Level request on the slave withdrawn between INTR and INTA.
        out(&mut p, 0x4d1, 0x08);
        p.set_irq(11, true);
        let _ = p.pending_vector();
        // Master sees IR2 (edge-latched) but the slave's request is gone.
        p.pics[1].irr = 0;
        assert_eq!(p.acknowledge(), 0x3f);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let irq = TestIrq::new();
        let mut p = PicPair::new(irq);
        linux_init(&mut p, true);
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x35);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), 0x36, "nothing in service blocks it");
    }

    #[test]
    fn rotation_commands_change_priority() {
        let (mut p, _) = pair();
        out(&mut p, 0x20, 0xc4); // set priority: IR4 lowest, IR5 highest
        p.set_irq(3, true);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), 0x36);
        out(&mut p, 0x20, 0xa0); // rotate on non-specific EOI: IR6 now lowest
        assert_eq!(p.pics[0].priority_add, 7);
        assert_eq!(p.acknowledge(), 0x33);
        out(&mut p, 0x20, 0xe3); // rotate on specific EOI 3
        assert_eq!(p.pics[0].priority_add, 4);
    }

    #[test]
    fn poll_mode_acknowledges() {
        let (mut p, _) = pair();
        out(&mut p, 0x20, 0x0c); // OCW3: poll
        assert_eq!(inb(&mut p, 0x20), 0);
        p.set_irq(5, true);
        out(&mut p, 0x20, 0x0c);
        assert_eq!(inb(&mut p, 0x20), 0x85);
        assert_eq!(p.pending_vector(), None, "in service");
        assert_eq!(inb(&mut p, 0x20), 0, "poll is one-shot: IRR now");
    }

    #[test]
    fn special_mask_mode_lets_lower_priorities_in() {
        let (mut p, _) = pair();
        p.set_irq(1, true);
        p.acknowledge();
        out(&mut p, 0x21, 0x02); // mask IR1 (in service)
        out(&mut p, 0x20, 0x68); // OCW3: set special mask
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x35);
        out(&mut p, 0x20, 0x48); // reset special mask
        p.set_irq(6, true);
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn reinit_clears_state_keeps_elcr() {
        let (mut p, _) = pair();
        out(&mut p, 0x4d0, 0x20);
        p.set_irq(5, true);
        p.set_irq(4, true);
        p.acknowledge();
        linux_init(&mut p, false);
        assert_eq!(inb(&mut p, 0x4d0), 0x20);
        assert_eq!(
            p.pending_vector(),
            Some(0x35),
            "level request survives ICW1"
        );
        assert_eq!(p.acknowledge(), 0x35);
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut p, intr) = pair();
        let mut rng = Rng::new(8259);
        let ports = [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1];
        for _ in 0..200_000 {
            let port = ports[rng.below(6) as usize];
            match rng.below(4) {
                0 => out(&mut p, port, rng.byte()),
                1 => {
                    inb(&mut p, port);
                }
                2 => p.set_irq(rng.below(20) as u8, rng.chance(2)),
                _ => {
                    if let Some(v) = p.pending_vector() {
                        assert_eq!(p.acknowledge(), v);
                    }
                }
            }
            assert_eq!(intr.level(), p.intr());
            assert_eq!(p.pending_vector().is_some(), p.intr());
        }
        // Wide and out-of-range accesses.
        let mut buf = [0u8; 8];
        p.read(MASTER_BASE, 0, &mut buf);
        p.write(ELCR_BASE, 5, &buf);
    }
}
