//! 16550A UART (the PC's COM ports: 0x3f8/IRQ 4, 0x2f8/IRQ 3).
//!
//! Register map and behaviour from the National Semiconductor / TI PC16550D datasheet
//! (section 8, "Registers": Table II register summary, 8.4 LCR, 8.5 LSR, 8.6 FCR,
//! 8.7 IIR/Table IV interrupt control functions, 8.8 IER, 8.9 MCR, 8.10 MSR, 8.11 SCR):
//!
//! | off | DLAB=0 read | DLAB=0 write | DLAB=1 |
//! |-----|-------------|--------------|--------|
//! | 0   | RBR         | THR          | DLL    |
//! | 1   | IER         | IER          | DLM    |
//! | 2   | IIR         | FCR          | (same) |
//! | 3   | LCR         | LCR          |        |
//! | 4   | MCR         | MCR          |        |
//! | 5   | LSR         | (ignored)    |        |
//! | 6   | MSR         | (ignored)    |        |
//! | 7   | SCR         | SCR          |        |
//!
//! The line is infinitely fast: a byte written to THR reaches the sink at once, so THR
//! and the transmitter are always empty again when the guest looks (LSR THRE|TEMT), and
//! the THR-empty interrupt is re-armed right after each write — Linux's 8250 driver
//! keeps feeding it until it runs out and disables ETBEI. Enabling ETBEI while THR is
//! empty raises the THR-empty interrupt (the check `serial8250_do_startup` makes).
//!
//! The INTR output reaches the interrupt controller only while MCR OUT2 is set and the
//! UART is not in loopback, as on PC boards (OUT2 gates the IRQ driver).

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::bus::{read_bytes, write_bytes, Action, BusDevice, IrqLine, IrqOut};

/// Register offsets (DLAB=0 names).
pub mod reg {
    /// Receiver buffer (read) / transmitter holding (write); DLL with DLAB.
    pub const DATA: u64 = 0;
    /// Interrupt enable; DLM with DLAB.
    pub const IER: u64 = 1;
    /// Interrupt identification (read) / FIFO control (write).
    pub const IIR_FCR: u64 = 2;
    /// Line control.
    pub const LCR: u64 = 3;
    /// Modem control.
    pub const MCR: u64 = 4;
    /// Line status.
    pub const LSR: u64 = 5;
    /// Modem status.
    pub const MSR: u64 = 6;
    /// Scratch.
    pub const SCR: u64 = 7;
}

/// IER bits.
pub mod ier {
    /// Received data available (and character timeout).
    pub const RDA: u8 = 1 << 0;
    /// Transmitter holding register empty.
    pub const THRE: u8 = 1 << 1;
    /// Receiver line status.
    pub const RLS: u8 = 1 << 2;
    /// Modem status.
    pub const MS: u8 = 1 << 3;
}

/// IIR values (bits 3:0) in priority order, and the FIFO-enabled bits 7:6.
pub mod iir {
    /// No interrupt pending.
    pub const NONE: u8 = 0x01;
    /// Receiver line status (highest).
    pub const RLS: u8 = 0x06;
    /// Received data at or above the trigger level.
    pub const RDA: u8 = 0x04;
    /// Character timeout: data below the trigger level waits in the FIFO.
    pub const TIMEOUT: u8 = 0x0c;
    /// Transmitter holding register empty.
    pub const THRE: u8 = 0x02;
    /// Modem status (lowest).
    pub const MS: u8 = 0x00;
    /// FIFOs enabled.
    pub const FIFO: u8 = 0xc0;
}

/// FCR bits.
pub mod fcr {
    /// Enable both FIFOs.
    pub const ENABLE: u8 = 1 << 0;
    /// Clear the receive FIFO (self-clearing).
    pub const CLEAR_RX: u8 = 1 << 1;
    /// Clear the transmit FIFO (self-clearing).
    pub const CLEAR_TX: u8 = 1 << 2;
}

/// LCR bits.
pub mod lcr {
    /// Set break.
    pub const BREAK: u8 = 1 << 6;
    /// Divisor latch access.
    pub const DLAB: u8 = 1 << 7;
}

/// MCR bits.
pub mod mcr {
    /// Data terminal ready.
    pub const DTR: u8 = 1 << 0;
    /// Request to send.
    pub const RTS: u8 = 1 << 1;
    /// OUT1.
    pub const OUT1: u8 = 1 << 2;
    /// OUT2 (gates the IRQ on PCs).
    pub const OUT2: u8 = 1 << 3;
    /// Loopback.
    pub const LOOP: u8 = 1 << 4;
}

/// LSR bits.
pub mod lsr {
    /// Data ready.
    pub const DR: u8 = 1 << 0;
    /// Overrun error.
    pub const OE: u8 = 1 << 1;
    /// Parity error.
    pub const PE: u8 = 1 << 2;
    /// Framing error.
    pub const FE: u8 = 1 << 3;
    /// Break interrupt.
    pub const BI: u8 = 1 << 4;
    /// Transmitter holding register empty.
    pub const THRE: u8 = 1 << 5;
    /// Transmitter empty.
    pub const TEMT: u8 = 1 << 6;
    /// The error bits a read of LSR clears.
    pub const ERRORS: u8 = OE | PE | FE | BI;
}

/// MSR bits.
pub mod msr {
    /// Delta CTS.
    pub const DCTS: u8 = 1 << 0;
    /// Delta DSR.
    pub const DDSR: u8 = 1 << 1;
    /// Trailing edge ring indicator.
    pub const TERI: u8 = 1 << 2;
    /// Delta DCD.
    pub const DDCD: u8 = 1 << 3;
    /// Clear to send.
    pub const CTS: u8 = 1 << 4;
    /// Data set ready.
    pub const DSR: u8 = 1 << 5;
    /// Ring indicator.
    pub const RI: u8 = 1 << 6;
    /// Data carrier detect.
    pub const DCD: u8 = 1 << 7;
}

/// Receive FIFO depth of a 16550A.
pub const FIFO_SIZE: usize = 16;

/// The modem lines the outside world presents when not in loopback: a connected,
/// ready peer.
const MSR_CONNECTED: u8 = msr::DCD | msr::DSR | msr::CTS;

/// Where transmitted bytes go (the console).
pub trait SerialSink: Send {
    /// One byte the guest sent.
    fn put(&mut self, byte: u8);
}

impl SerialSink for Vec<u8> {
    fn put(&mut self, byte: u8) {
        self.push(byte);
    }
}

/// A 16550A UART.
pub struct Uart16550<S: SerialSink> {
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// LSR error bits (OE/PE/FE/BI); DR, THRE and TEMT are computed.
    lsr_errors: u8,
    /// MSR delta bits (3:0); in loopback also the status bits.
    msr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// Receive trigger level in bytes (1, 4, 8 or 14).
    rx_trigger: usize,
    rx: VecDeque<u8>,
    /// The THR-empty interrupt is latched (cleared by reading IIR or writing THR).
    thre_pending: bool,
    irq: IrqOut,
    sink: S,
}

impl<S: SerialSink> Uart16550<S> {
    /// A UART in its reset state, interrupting on `irq`, sending to `sink`.
    pub fn new(irq: Arc<dyn IrqLine>, sink: S) -> Self {
        Self {
            ier: 0,
            lcr: 0x03, // 8N1, as firmware leaves it
            mcr: 0,
            lsr_errors: 0,
            msr: MSR_CONNECTED,
            scr: 0,
            dll: 12, // 9600 baud at 1.8432 MHz
            dlm: 0,
            fifo_enabled: false,
            rx_trigger: 1,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            thre_pending: false,
            irq: IrqOut::new(irq),
            sink,
        }
    }

    /// The sink, e.g. to drain a buffer in tests.
    pub fn sink(&mut self) -> &mut S {
        &mut self.sink
    }

    /// The divisor latch value (baud = 115200 / divisor).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    /// How many more input bytes the receiver can take now.
    pub fn rx_space(&self) -> usize {
        self.rx_capacity().saturating_sub(self.rx.len())
    }

    /// Console input: queues as many of `bytes` as the receiver holds (16 with FIFOs
    /// enabled, 1 without) and raises the receive interrupt; returns how many it took.
    /// The VMM keeps the rest and offers it again once [`Self::rx_space`] grows.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.mcr & mcr::LOOP != 0 {
            return 0; // the receiver listens to the transmitter only
        }
        let n = bytes.len().min(self.rx_space());
        self.rx.extend(&bytes[..n]);
        self.update_irq();
        n
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            FIFO_SIZE
        } else {
            1
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & lcr::DLAB != 0
    }

    /// The interrupt identification, highest priority first (datasheet Table IV).
    fn iir(&self) -> u8 {
        let id = if self.ier & ier::RLS != 0 && self.lsr_errors != 0 {
            iir::RLS
        } else if self.ier & ier::RDA != 0 && !self.rx.is_empty() {
            if self.fifo_enabled && self.rx.len() < self.rx_trigger {
                iir::TIMEOUT
            } else {
                iir::RDA
            }
        } else if self.ier & ier::THRE != 0 && self.thre_pending {
            iir::THRE
        } else if self.ier & ier::MS != 0 && self.msr & 0x0f != 0 {
            iir::MS
        } else {
            iir::NONE
        };
        id | if self.fifo_enabled { iir::FIFO } else { 0 }
    }

    fn update_irq(&mut self) {
        let gate = self.mcr & (mcr::OUT2 | mcr::LOOP) == mcr::OUT2;
        let pending = self.iir() & iir::NONE == 0;
        self.irq.set(gate && pending);
    }

    /// The modem status inputs as seen in loopback (datasheet 8.9: CTS=RTS, DSR=DTR,
    /// RI=OUT1, DCD=OUT2).
    fn loopback_status(mcr: u8) -> u8 {
        let mut s = 0;
        if mcr & mcr::RTS != 0 {
            s |= msr::CTS;
        }
        if mcr & mcr::DTR != 0 {
            s |= msr::DSR;
        }
        if mcr & mcr::OUT1 != 0 {
            s |= msr::RI;
        }
        if mcr & mcr::OUT2 != 0 {
            s |= msr::DCD;
        }
        s
    }

    /// Sets the modem status inputs, recording deltas as the hardware does.
    fn set_modem_status(&mut self, new: u8) {
        let old = self.msr & 0xf0;
        let changed = old ^ new;
        let mut delta = self.msr & 0x0f;
        if changed & msr::CTS != 0 {
            delta |= msr::DCTS;
        }
        if changed & msr::DSR != 0 {
            delta |= msr::DDSR;
        }
        if changed & msr::DCD != 0 {
            delta |= msr::DDCD;
        }
        if old & msr::RI != 0 && new & msr::RI == 0 {
            delta |= msr::TERI;
        }
        self.msr = new | delta;
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        let v = match offset {
            reg::DATA if self.dlab() => self.dll,
            reg::DATA => self.rx.pop_front().unwrap_or(0),
            reg::IER if self.dlab() => self.dlm,
            reg::IER => self.ier,
            reg::IIR_FCR => {
                let v = self.iir();
                if v & 0x0f == iir::THRE {
                    self.thre_pending = false; // reading IIR clears a THRE source
                }
                v
            }
            reg::LCR => self.lcr,
            reg::MCR => self.mcr,
            reg::LSR => {
                let mut v = self.lsr_errors | lsr::THRE | lsr::TEMT;
                if !self.rx.is_empty() {
                    v |= lsr::DR;
                }
                self.lsr_errors = 0;
                v
            }
            reg::MSR => {
                let v = self.msr;
                self.msr &= 0xf0;
                v
            }
            reg::SCR => self.scr,
            _ => 0xff,
        };
        self.update_irq();
        v
    }

    fn write_reg(&mut self, offset: u64, v: u8) {
        match offset {
            reg::DATA if self.dlab() => self.dll = v,
            reg::DATA => {
                // Writing THR clears the THRE interrupt; the byte leaves at once and
                // THR is empty again, which raises it anew (a fresh edge).
                self.thre_pending = false;
                self.update_irq();
                if self.mcr & mcr::LOOP != 0 {
                    if self.rx.len() < self.rx_capacity() {
                        self.rx.push_back(v);
                    } else {
                        self.lsr_errors |= lsr::OE;
                    }
                } else {
                    self.sink.put(v);
                }
                self.thre_pending = true;
            }
            reg::IER if self.dlab() => self.dlm = v,
            reg::IER => {
                let old = self.ier;
                self.ier = v & 0x0f;
                if old & ier::THRE == 0 && self.ier & ier::THRE != 0 {
                    self.thre_pending = true; // THR is empty
                }
            }
            reg::IIR_FCR => {
                let enable = v & fcr::ENABLE != 0;
                if enable != self.fifo_enabled {
                    self.rx.clear(); // changing the FIFO mode clears the FIFOs
                }
                self.fifo_enabled = enable;
                if enable {
                    if v & fcr::CLEAR_RX != 0 {
                        self.rx.clear();
                    }
                    self.rx_trigger = [1, 4, 8, 14][usize::from(v >> 6)];
                } else {
                    self.rx_trigger = 1;
                    self.rx.truncate(1);
                }
            }
            reg::LCR => self.lcr = v,
            reg::MCR => {
                let old = self.mcr;
                self.mcr = v & 0x1f;
                if self.mcr & mcr::LOOP != 0 {
                    self.set_modem_status(Self::loopback_status(self.mcr));
                } else if old & mcr::LOOP != 0 {
                    self.set_modem_status(MSR_CONNECTED);
                }
            }
            reg::SCR => self.scr = v,
            _ => {} // LSR and MSR are read-only (factory test writes ignored)
        }
        self.update_irq();
    }
}

impl<S: SerialSink> BusDevice for Uart16550<S> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        read_bytes(offset, data, |o| self.read_reg(o));
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        write_bytes(offset, data, |o, v| {
            self.write_reg(o, v);
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, TestIrq};

    fn uart() -> (Uart16550<Vec<u8>>, Arc<TestIrq>) {
        let irq = TestIrq::new();
        (Uart16550::new(irq.clone(), Vec::new()), irq)
    }

    fn rd(u: &mut Uart16550<Vec<u8>>, off: u64) -> u8 {
        let mut v = [0];
        u.read(0x3f8, off, &mut v);
        v[0]
    }

    fn wr(u: &mut Uart16550<Vec<u8>>, off: u64, v: u8) {
        assert_eq!(u.write(0x3f8, off, &[v]), None);
    }

    #[test]
    fn reset_state() {
        let (mut u, irq) = uart();
        assert_eq!(rd(&mut u, reg::IER), 0);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::NONE);
        assert_eq!(rd(&mut u, reg::LSR), lsr::THRE | lsr::TEMT);
        assert_eq!(rd(&mut u, reg::MSR), MSR_CONNECTED);
        assert!(!irq.level());
    }

    #[test]
    fn transmit_goes_to_the_sink() {
        let (mut u, _) = uart();
        for b in b"hi\n" {
            wr(&mut u, reg::DATA, *b);
        }
        assert_eq!(u.sink(), b"hi\n");
        assert_eq!(rd(&mut u, reg::LSR) & lsr::TEMT, lsr::TEMT);
    }

    #[test]
    fn divisor_latch_shadows_data_and_ier() {
        let (mut u, _) = uart();
        wr(&mut u, reg::IER, 0x05);
        wr(&mut u, reg::LCR, lcr::DLAB | 0x03);
        wr(&mut u, reg::DATA, 0x01);
        wr(&mut u, reg::IER, 0x00);
        assert_eq!(u.divisor(), 1);
        assert_eq!(rd(&mut u, reg::DATA), 1);
        wr(&mut u, reg::LCR, 0x03);
        assert_eq!(rd(&mut u, reg::IER), 0x05);
        assert!(u.sink().is_empty());
    }

    #[test]
    fn scratch_register_holds_a_value() {
        let (mut u, _) = uart();
        for v in [0x55, 0xaa, 0] {
            wr(&mut u, reg::SCR, v);
            assert_eq!(rd(&mut u, reg::SCR), v);
        }
    }

    #[test]
    fn linux_thre_test_sees_the_interrupt() {
        // serial8250_do_startup: IER=THRI, read IIR, IER=0, IER=THRI, read IIR.
        let (mut u, irq) = uart();
        wr(&mut u, reg::MCR, mcr::OUT2);
        wr(&mut u, reg::IER, ier::THRE);
        assert!(irq.level());
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::THRE);
        assert!(!irq.level(), "reading IIR clears THRE");
        wr(&mut u, reg::IER, 0);
        wr(&mut u, reg::IER, ier::THRE);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::THRE);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::NONE);
    }

    #[test]
    fn each_thr_write_gives_a_fresh_thre_edge() {
        let (mut u, irq) = uart();
        wr(&mut u, reg::MCR, mcr::OUT2);
        wr(&mut u, reg::IER, ier::THRE);
        assert_eq!(irq.take_rises(), 1);
        wr(&mut u, reg::DATA, b'a');
        wr(&mut u, reg::DATA, b'b');
        assert_eq!(irq.take_rises(), 2);
        assert!(irq.level());
        wr(&mut u, reg::IER, 0);
        assert!(!irq.level());
    }

    #[test]
    fn receive_raises_rda_until_drained() {
        let (mut u, irq) = uart();
        wr(&mut u, reg::MCR, mcr::OUT2);
        wr(&mut u, reg::IER, ier::RDA);
        assert_eq!(u.enqueue_input(b"xyz"), 1, "no FIFO: one byte");
        assert!(irq.level());
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::RDA);
        assert_eq!(rd(&mut u, reg::LSR) & lsr::DR, lsr::DR);
        assert_eq!(rd(&mut u, reg::DATA), b'x');
        assert!(!irq.level());
        assert_eq!(rd(&mut u, reg::LSR) & lsr::DR, 0);
        assert_eq!(rd(&mut u, reg::DATA), 0, "empty RBR");
    }

    #[test]
    fn fifo_mode_takes_sixteen_and_reports_trigger_levels() {
        let (mut u, irq) = uart();
        wr(&mut u, reg::MCR, mcr::OUT2);
        wr(&mut u, reg::IIR_FCR, fcr::ENABLE | fcr::CLEAR_RX | 0x80); // trigger 8
        wr(&mut u, reg::IER, ier::RDA);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::FIFO | iir::NONE);
        assert_eq!(u.enqueue_input(&[1; 4]), 4);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::FIFO | iir::TIMEOUT);
        assert_eq!(u.enqueue_input(&[2; 20]), 12);
        assert_eq!(u.rx_space(), 0);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::FIFO | iir::RDA);
        let got: Vec<u8> = (0..16).map(|_| rd(&mut u, reg::DATA)).collect();
        assert_eq!(&got[..5], &[1, 1, 1, 1, 2]);
        assert!(!irq.level());
        // Disabling the FIFO clears it.
        u.enqueue_input(&[3; 3]);
        wr(&mut u, reg::IIR_FCR, 0);
        assert_eq!(rd(&mut u, reg::LSR) & lsr::DR, 0);
    }

    #[test]
    fn out2_gates_the_interrupt() {
        let (mut u, irq) = uart();
        wr(&mut u, reg::IER, ier::THRE);
        assert!(!irq.level());
        wr(&mut u, reg::MCR, mcr::OUT2);
        assert!(irq.level());
        wr(&mut u, reg::MCR, 0);
        assert!(!irq.level());
    }

    #[test]
    fn loopback_echoes_and_mirrors_modem_lines() {
        // Linux autoconfig: MCR = LOOP|0x0a must read back MSR & 0xf0 == 0x90.
        let (mut u, irq) = uart();
        wr(&mut u, reg::MCR, mcr::LOOP | 0x0a);
        assert_eq!(rd(&mut u, reg::MSR) & 0xf0, 0x90);
        wr(&mut u, reg::IER, ier::RDA);
        wr(&mut u, reg::DATA, 0x5a);
        assert!(u.sink().is_empty());
        assert_eq!(u.enqueue_input(b"q"), 0, "outside input is disconnected");
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::RDA);
        assert!(!irq.level(), "no IRQ out in loopback");
        // Second byte overruns a FIFO-less receiver.
        wr(&mut u, reg::DATA, 0x5b);
        assert_eq!(
            rd(&mut u, reg::LSR) & (lsr::OE | lsr::DR),
            lsr::OE | lsr::DR
        );
        assert_eq!(rd(&mut u, reg::LSR) & lsr::OE, 0, "read clears OE");
        assert_eq!(rd(&mut u, reg::DATA), 0x5a);
        wr(&mut u, reg::MCR, 0);
        assert_eq!(rd(&mut u, reg::MSR) & 0xf0, MSR_CONNECTED);
    }

    #[test]
    fn modem_status_interrupt_from_loopback_deltas() {
        let (mut u, _) = uart();
        wr(&mut u, reg::MCR, mcr::LOOP);
        rd(&mut u, reg::MSR);
        wr(&mut u, reg::IER, ier::MS);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::NONE);
        wr(&mut u, reg::MCR, mcr::LOOP | mcr::RTS | mcr::OUT1);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::MS);
        assert_eq!(rd(&mut u, reg::MSR), msr::CTS | msr::RI | msr::DCTS);
        wr(&mut u, reg::MCR, mcr::LOOP | mcr::RTS);
        assert_eq!(rd(&mut u, reg::MSR), msr::CTS | msr::TERI);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::NONE);
    }

    #[test]
    fn line_status_interrupt_has_priority() {
        let (mut u, _) = uart();
        wr(&mut u, reg::MCR, mcr::LOOP);
        wr(&mut u, reg::IER, ier::RLS | ier::RDA | ier::THRE);
        wr(&mut u, reg::DATA, 1);
        wr(&mut u, reg::DATA, 2);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::RLS);
        rd(&mut u, reg::LSR);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::RDA);
        rd(&mut u, reg::DATA);
        assert_eq!(rd(&mut u, reg::IIR_FCR), iir::THRE);
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let (mut u, _) = uart();
        let mut v = [0u8; 2];
        u.read(0x3f8, reg::LSR, &mut v);
        assert_eq!(v, [lsr::THRE | lsr::TEMT, MSR_CONNECTED]);
        u.write(0x3f8, reg::DATA, b"ab");
        assert_eq!(u.sink(), b"a", "second byte went to IER");
        assert_eq!(rd(&mut u, reg::IER), b'b' & 0x0f);
    }

    #[test]
    fn random_accesses_never_panic_and_stay_consistent() {
        let (mut u, irq) = uart();
        let mut rng = Rng::new(16550);
        for _ in 0..200_000 {
            let off = rng.below(10);
            let mut buf = [0u8; 8];
            let n = rng.size();
            match rng.below(3) {
                0 => u.read(0x3f8, off, &mut buf[..n]),
                1 => {
                    buf[..n].iter_mut().for_each(|b| *b = rng.byte());
                    u.write(0x3f8, off, &buf[..n]);
                }
                _ => {
                    let k = rng.below(20) as usize;
                    u.enqueue_input(&buf[..k.min(8)]);
                }
            }
            assert!(u.rx.len() <= FIFO_SIZE);
            let gate = u.mcr & (mcr::OUT2 | mcr::LOOP) == mcr::OUT2;
            assert_eq!(irq.level(), gate && u.iir() & 1 == 0);
            u.sink().clear();
        }
    }
}
