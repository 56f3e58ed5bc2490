//! The devices of the guest contract as one state machine: the console (port 0xE9), the
//! no-op port 0x80, port 0x81's answer, the echo port 0x82, the requests on ports 0x83 (#GP injection),
//! 0xF1 (start a vCPU) and 0xF4 (end of run), the MMIO register at 0xD000_0000 and the
//! synthetic MSR 0x4000_0200. Everything else reads as all ones and ignores writes, so a
//! hostile guest gets answers and no crash.

use std::io::Write;

pub use guest_contract::{
    MAGIC_IN, MMIO_INIT, MMIO_REG, MSR_SYNTH, PORT_CONSOLE, PORT_ECHO, PORT_EXIT, PORT_INJECT_GP,
    PORT_MAGIC, PORT_NOP, PORT_START_CPU, VECTOR_WAKE,
};

/// What the vCPU loop must do after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Nothing.
    None,
    /// Inject #GP with this error code before the next guest instruction.
    InjectGp(u32),
    /// Start vCPU number ….
    StartCpu(u32),
    /// End the run with this code.
    Exit(u32),
}

/// The platform's state; `out` receives the console's complete lines.
#[derive(Debug)]
pub struct Platform<W> {
    echo: u32,
    mmio: u64,
    msr: u64,
    line: Vec<u8>,
    out: W,
}

/// The little-endian value of up to 8 bytes.
fn value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | u64::from(*b) << (8 * i))
}

impl<W: Write> Platform<W> {
    /// A platform in its initial state, console lines to `out`.
    pub fn new(out: W) -> Self {
        Platform {
            echo: 0,
            mmio: MMIO_INIT,
            msr: 0,
            line: Vec::new(),
            out,
        }
    }

    /// The console sink.
    pub fn out(&mut self) -> &mut W {
        &mut self.out
    }

    fn console(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.line.push(b);
                let _ = self.out.write_all(&self.line);
                let _ = self.out.flush();
                self.line.clear();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
    }

    /// Writes any unfinished console line (at the end of a run).
    pub fn flush_console(&mut self) {
        if !self.line.is_empty() {
            self.console(b"\n");
        }
    }

    /// `out` of `data` (size × count bytes) to `port`, one element of `size` bytes.
    pub fn io_out(&mut self, port: u16, size: usize, data: &[u8]) -> Request {
        let first = &data[..size.min(data.len())];
        match port {
            PORT_CONSOLE => {
                // String output sends several elements; each is one character.
                let chars: Vec<u8> = data.chunks(size.max(1)).map(|c| c[0]).collect();
                self.console(&chars);
                Request::None
            }
            // The low 16 bits: a selector error code (VT-x injects no more).
            PORT_INJECT_GP => Request::InjectGp(value(first) as u32 & 0xffff),
            PORT_START_CPU => Request::StartCpu(value(first) as u32),
            PORT_EXIT => Request::Exit(value(first) as u32),
            PORT_ECHO => {
                // String output: the last element stays.
                let last = data.chunks(size.max(1)).last().unwrap_or(first);
                self.echo = value(last) as u32;
                Request::None
            }
            _ => Request::None,
        }
    }

    /// `in` from `port` into `data` (size × count bytes).
    pub fn io_in(&mut self, port: u16, size: usize, data: &mut [u8]) {
        let bytes = match port {
            PORT_MAGIC => MAGIC_IN.to_le_bytes(),
            PORT_ECHO => self.echo.to_le_bytes(),
            _ => [0xff; 4],
        };
        for element in data.chunks_mut(size.max(1)) {
            for (d, s) in element.iter_mut().zip(bytes.iter().cycle()) {
                *d = *s;
            }
        }
    }

    /// An MMIO read: the register's bytes at their offset, all ones elsewhere.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        let reg = self.mmio.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = addr
                .wrapping_add(i as u64)
                .checked_sub(MMIO_REG)
                .and_then(|o| reg.get(o as usize))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// An MMIO write: the register's bytes at their offset; ignored elsewhere.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let mut reg = self.mmio.to_le_bytes();
        for (i, s) in data.iter().enumerate() {
            if let Some(o) = addr.wrapping_add(i as u64).checked_sub(MMIO_REG) {
                if let Some(r) = reg.get_mut(o as usize) {
                    *r = *s;
                }
            }
        }
        self.mmio = u64::from_le_bytes(reg);
    }

    /// `rdmsr` of an MSR sent to user space: `None` makes it raise #GP.
    pub fn msr_read(&self, index: u32) -> Option<u64> {
        (index == MSR_SYNTH).then_some(self.msr)
    }

    /// `wrmsr` of an MSR sent to user space: false makes it raise #GP.
    pub fn msr_write(&mut self, index: u32, value: u64) -> bool {
        if index == MSR_SYNTH {
            self.msr = value;
        }
        index == MSR_SYNTH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_prints_whole_lines() {
        let mut p = Platform::new(Vec::new());
        for b in b"check cpuid ok\nguest: do" {
            assert_eq!(p.io_out(PORT_CONSOLE, 1, &[*b]), Request::None);
        }
        assert_eq!(p.out().as_slice(), b"check cpuid ok\n");
        p.io_out(PORT_CONSOLE, 1, b"ne 0\n");
        assert_eq!(p.out().as_slice(), b"check cpuid ok\nguest: done 0\n");
        p.io_out(PORT_CONSOLE, 1, b"x");
        p.flush_console();
        assert!(p.out().ends_with(b"x\n"));
    }

    #[test]
    fn requests_carry_the_written_value() {
        let mut p = Platform::new(Vec::new());
        assert_eq!(p.io_out(PORT_NOP, 1, &[0]), Request::None);
        assert_eq!(
            p.io_out(PORT_INJECT_GP, 4, &0x5a8u32.to_le_bytes()),
            Request::InjectGp(0x5a8)
        );
        assert_eq!(
            p.io_out(PORT_START_CPU, 4, &[1, 0, 0, 0]),
            Request::StartCpu(1)
        );
        assert_eq!(p.io_out(PORT_EXIT, 4, &[3, 0, 0, 0]), Request::Exit(3));
        assert_eq!(p.io_out(PORT_EXIT, 1, &[0]), Request::Exit(0));
        assert_eq!(p.io_out(0x1234, 2, &[1, 2, 3, 4]), Request::None);
    }

    #[test]
    fn ports_answer() {
        let mut p = Platform::new(Vec::new());
        let mut d = [0u8; 4];
        p.io_in(PORT_MAGIC, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), MAGIC_IN);
        let mut d = [0u8; 4];
        p.io_in(0x3f8, 2, &mut d);
        assert_eq!(d, [0xff; 4]);
        p.io_in(PORT_ECHO, 4, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(
            p.io_out(PORT_ECHO, 4, &0x1357_9bdfu32.to_le_bytes()),
            Request::None
        );
        p.io_in(PORT_ECHO, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1357_9bdf);
    }

    #[test]
    fn mmio_register_reads_back_the_last_write() {
        let mut p = Platform::new(Vec::new());
        let mut d = [0u8; 8];
        p.mmio_read(MMIO_REG, &mut d);
        assert_eq!(u64::from_le_bytes(d), MMIO_INIT);
        let mut lo = [0u8; 4];
        p.mmio_read(MMIO_REG, &mut lo);
        assert_eq!(u32::from_le_bytes(lo), 0x5566_7788);
        p.mmio_write(MMIO_REG, &0x0123_4567_89ab_cdefu64.to_le_bytes());
        p.mmio_read(MMIO_REG, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0x0123_4567_89ab_cdef);
        // Partly outside, and elsewhere: all ones, writes ignored.
        let mut e = [0u8; 4];
        p.mmio_read(MMIO_REG + 6, &mut e);
        assert_eq!(e, [0x23, 0x01, 0xff, 0xff]);
        p.mmio_write(MMIO_REG - 2, &[9, 9, 0xaa, 0xbb]);
        p.mmio_read(MMIO_REG, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0x0123_4567_89ab_bbaa);
        p.mmio_write(0xfee0_0000, &[1]);
        p.mmio_read(0xfee0_0000, &mut e);
        assert_eq!(e, [0xff; 4]);
    }

    #[test]
    fn synthetic_msr_only() {
        let mut p = Platform::new(Vec::new());
        assert_eq!(p.msr_read(MSR_SYNTH), Some(0));
        assert!(p.msr_write(MSR_SYNTH, 7));
        assert_eq!(p.msr_read(MSR_SYNTH), Some(7));
        assert_eq!(p.msr_read(0x10), None);
        assert!(!p.msr_write(0x10, 1));
    }
}
