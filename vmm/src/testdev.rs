//! The devices of the bare-metal test guest (`guests/README.md`, "The test guest's
//! contract"): pure state machines on the port and MMIO buses, like every other device.
//!
//! | where            | device            | what                                          |
//! |------------------|-------------------|-----------------------------------------------|
//! | port 0xe9        | [`DebugConsole`]  | one character per byte; a line per `\n`       |
//! | ports 0x80–0x87  | [`TestPorts`]     | 0x80 no-op, 0x81 reads [`MAGIC`], 0x82 echo,  |
//! |                  |                   | 0x83 #GP                                      |
//! | ports 0xf0–0xf7  | [`TestPorts`]     | 0xf1 start a vCPU, 0xf4 end of run            |
//! | MMIO 0xd0000000  | [`MmioRegister`]  | 8 bytes that read back the last value written |
//!
//! The 0x80 and 0xf0 blocks are one device each because the dword ports overlap (a
//! dword at 0x81 covers 0x81–0x84, one at 0x83 covers 0x83–0x86): the device decodes
//! the port an access starts at. The synthetic MSR and the hypercall are answered by
//! the exit handler ([`crate::exit`]).

use alloc::vec::Vec;

use guest_contract as contract;

use crate::bus::{Action, BusDevice};

/// The console port.
pub const CONSOLE_PORT: u64 = contract::PORT_CONSOLE as u64;
/// Base of the block with the no-op, magic and exception ports.
pub const LOW_BLOCK: u64 = 0x80;
/// Base of the block with the start and end ports.
pub const HIGH_BLOCK: u64 = 0xf0;
/// Ports per block.
pub const BLOCK_LEN: u64 = 8;
/// The no-op port (port-out test and benchmark).
pub const NOP_PORT: u64 = contract::PORT_NOP as u64;
/// The port that reads [`MAGIC`].
pub const MAGIC_PORT: u64 = contract::PORT_MAGIC as u64;
/// What [`MAGIC_PORT`] reads.
pub const MAGIC: u32 = contract::MAGIC_IN;
/// The echo port: reads the last dword written to it (initially 0).
pub const ECHO_PORT: u64 = contract::PORT_ECHO as u64;
/// Writing a value here asks for #GP with its low 16 bits as the error code.
pub const GP_PORT: u64 = contract::PORT_INJECT_GP as u64;
/// Writing n here asks for vCPU n to start.
pub const START_PORT: u64 = contract::PORT_START_CPU as u64;
/// Writing the result code here ends the run.
pub const DONE_PORT: u64 = contract::PORT_EXIT as u64;
/// The MMIO register's guest-physical address.
pub const MMIO_ADDR: u64 = contract::MMIO_REG;
/// The MMIO register's size.
pub const MMIO_LEN: u64 = 8;
/// The MMIO register's value at reset.
pub const MMIO_INIT: u64 = contract::MMIO_INIT;
/// The synthetic MSR the exit handler stores.
pub const TEST_MSR: u32 = contract::MSR_SYNTH;
/// `rax` of the test hypercall ("PERE"); the answer is `rbx + 1`.
pub const HYPERCALL: u64 = contract::HYPERCALL_NR;
/// The vector the host injects to wake the guest from HLT.
pub const WAKE_VECTOR: u8 = contract::VECTOR_WAKE;

/// What the guest runs (its `rsi` at entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The check list.
    Check,
    /// The exit benchmark.
    Bench,
    /// Random exits until a triple fault, from this seed (`rcx`).
    Hostile(u64),
    /// #AC and #DB, one at a time and as loops (two vCPUs for the loops), with flags
    /// (`rcx`; bit 0: leave out the #DB loop, which QEMU's nested SVM mishandles).
    Loops(u64),
}

impl Mode {
    /// The value of `rsi` at entry.
    pub fn rsi(self) -> u64 {
        match self {
            Mode::Check => contract::MODE_CHECK,
            Mode::Bench => contract::MODE_BENCH,
            Mode::Hostile(_) => contract::MODE_HOSTILE,
            Mode::Loops(_) => contract::MODE_LOOPS,
        }
    }

    /// The value of `rcx` at entry.
    pub fn rcx(self) -> u64 {
        match self {
            Mode::Hostile(seed) | Mode::Loops(seed) => seed,
            _ => 0,
        }
    }

    /// Parses `check`, `bench`, `hostile` (which takes `seed`) or `loops` (which takes
    /// its flags in `seed`).
    pub fn parse(s: &str, seed: u64) -> Option<Mode> {
        match s {
            "check" => Some(Mode::Check),
            "bench" => Some(Mode::Bench),
            "hostile" => Some(Mode::Hostile(seed)),
            "loops" => Some(Mode::Loops(seed)),
            _ => None,
        }
    }
}

/// Where complete console lines go.
pub trait LineSink: Send {
    /// One line, without its `\n`.
    fn line(&mut self, line: &[u8]);
    /// The start of a line not yet ended, given up waiting for the rest (an
    /// interactive console's prompt); by default passed on as a line.
    fn partial(&mut self, bytes: &[u8]) {
        self.line(bytes);
    }
}

impl LineSink for Vec<Vec<u8>> {
    fn line(&mut self, line: &[u8]) {
        self.push(line.to_vec());
    }
}

/// The console port: collects bytes into lines.
pub struct DebugConsole<S: LineSink> {
    buf: Vec<u8>,
    sink: S,
}

/// Longest line the console keeps; longer ones are passed on in pieces.
pub const LINE_MAX: usize = 240;

impl<S: LineSink> DebugConsole<S> {
    /// A console writing lines to `sink`.
    pub fn new(sink: S) -> Self {
        Self {
            buf: Vec::with_capacity(LINE_MAX),
            sink,
        }
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    fn put(&mut self, b: u8) {
        match b {
            b'\n' => {
                self.sink.line(&self.buf);
                self.buf.clear();
            }
            b'\r' => {}
            _ => {
                self.buf.push(b);
                if self.buf.len() >= LINE_MAX {
                    self.sink.line(&self.buf);
                    self.buf.clear();
                }
            }
        }
    }
}

impl<S: LineSink> BusDevice for DebugConsole<S> {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Bochs' and QEMU's port-0xe9 hack reads 0xe9.
        data.fill(0xe9);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        // `out dx, ax/eax` to the port: each byte is a character of its own port; only
        // the byte that hits 0xe9 itself counts.
        if offset == 0 {
            if let Some(&b) = data.first() {
                self.put(b);
            }
        }
        None
    }
}

/// The test ports (both blocks).
#[derive(Debug, Default)]
pub struct TestPorts {
    /// The last value written to [`ECHO_PORT`].
    echo: u32,
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl BusDevice for TestPorts {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let value = match base + offset {
            MAGIC_PORT => MAGIC,
            ECHO_PORT => self.echo,
            _ => {
                data.fill(0xff);
                return;
            }
        };
        let v = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        let v = le_value(data) as u32;
        match base + offset {
            // #GP's error code is a selector's: 16 bits (VT-x refuses to inject one with
            // bits 16-31 set).
            GP_PORT => Some(Action::Exception {
                vector: crate::vcpu::vector::GP,
                error: Some(v & 0xffff),
            }),
            START_PORT => Some(Action::StartVcpu(v)),
            DONE_PORT => Some(Action::Done(v)),
            ECHO_PORT => {
                self.echo = v;
                None
            }
            _ => None,
        }
    }
}

/// The MMIO register: any access size up to its length, little-endian.
#[derive(Debug)]
pub struct MmioRegister {
    value: u64,
}

impl Default for MmioRegister {
    fn default() -> Self {
        Self { value: MMIO_INIT }
    }
}

impl MmioRegister {
    /// The current value.
    pub fn value(&self) -> u64 {
        self.value
    }
}

impl BusDevice for MmioRegister {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| v.get(o as usize))
                .copied()
                .unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) -> Option<Action> {
        let mut v = self.value.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = offset
                .checked_add(i as u64)
                .and_then(|o| v.get_mut(o as usize))
            {
                *slot = b;
            }
        }
        self.value = u64::from_le_bytes(v);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::sync::SpinLock;
    use alloc::sync::Arc;
    use std::vec;

    #[test]
    fn console_collects_lines() {
        let mut c = DebugConsole::new(Vec::<Vec<u8>>::new());
        for &b in b"check cpuid ok\r\nhalf" {
            c.write(CONSOLE_PORT, 0, &[b]);
        }
        c.write(CONSOLE_PORT, 1, b"x"); // a byte at 0xea: not the console's
        assert_eq!(c.sink(), &vec![b"check cpuid ok".to_vec()]);
        for _ in 0..LINE_MAX {
            c.write(CONSOLE_PORT, 0, b"a");
        }
        assert_eq!(c.sink().len(), 2, "a long line is cut");
        let mut r = [0u8; 1];
        c.read(CONSOLE_PORT, 0, &mut r);
        assert_eq!(r, [0xe9]);
    }

    #[test]
    fn ports_decode_where_the_access_starts() {
        let mut bus = Bus::new();
        let p = Arc::new(SpinLock::new(TestPorts::default()));
        bus.insert(LOW_BLOCK, BLOCK_LEN, p.clone()).unwrap();
        bus.insert(HIGH_BLOCK, BLOCK_LEN, p).unwrap();
        let mut d = [0u8; 4];
        bus.read(MAGIC_PORT, &mut d).unwrap();
        assert_eq!(u32::from_le_bytes(d), MAGIC);
        let mut b = [0u8; 1];
        bus.read(MAGIC_PORT, &mut b).unwrap();
        assert_eq!(b, [0xa5]);
        assert_eq!(bus.write(NOP_PORT, &[1]), Ok(None));
        // The echo port returns what was written, nothing before.
        bus.read(ECHO_PORT, &mut d).unwrap();
        assert_eq!(d, [0; 4]);
        assert_eq!(
            bus.write(ECHO_PORT, &0x1357_9bdfu32.to_le_bytes()),
            Ok(None)
        );
        bus.read(ECHO_PORT, &mut d).unwrap();
        assert_eq!(u32::from_le_bytes(d), 0x1357_9bdf);
        assert_eq!(bus.write(ECHO_PORT, &[0x42]), Ok(None));
        bus.read(ECHO_PORT, &mut b).unwrap();
        assert_eq!(b, [0x42]);
        assert_eq!(
            bus.write(GP_PORT, &0xab_1234u32.to_le_bytes()),
            Ok(Some(Action::Exception {
                vector: 13,
                error: Some(0x1234)
            }))
        );
        assert_eq!(
            bus.write(START_PORT, &1u32.to_le_bytes()),
            Ok(Some(Action::StartVcpu(1)))
        );
        assert_eq!(
            bus.write(DONE_PORT, &7u32.to_le_bytes()),
            Ok(Some(Action::Done(7)))
        );
        // A dword at 0xf6 runs past the block: unmapped.
        assert!(bus.write(0xf6, &[0; 4]).is_err());
    }

    #[test]
    fn mmio_register_reads_back_any_size() {
        let mut r = MmioRegister::default();
        let mut q = [0u8; 8];
        r.read(MMIO_ADDR, 0, &mut q);
        assert_eq!(u64::from_le_bytes(q), MMIO_INIT);
        r.write(MMIO_ADDR, 0, &0xdead_beef_0bad_f00du64.to_le_bytes());
        assert_eq!(r.value(), 0xdead_beef_0bad_f00d);
        r.write(MMIO_ADDR, 2, &[0x11, 0x22]);
        assert_eq!(r.value(), 0xdead_beef_2211_f00d);
        let mut w = [0u8; 2];
        r.read(MMIO_ADDR, 6, &mut w);
        assert_eq!(w, [0xad, 0xde]);
        // Past the end (a device must not panic on odd lengths).
        let mut big = [0u8; 16];
        r.read(MMIO_ADDR, 4, &mut big);
        assert_eq!(big[4..], [0xff; 12]);
        r.write(MMIO_ADDR, u64::MAX, &[1, 2]);
        assert_eq!(r.value(), 0xdead_beef_2211_f00d);
        assert_eq!(Mode::parse("hostile", 5).map(Mode::rcx), Some(5));
        assert_eq!(Mode::parse("bench", 0).map(Mode::rsi), Some(2));
        assert_eq!(Mode::parse("x", 0), None);
    }
}
