//! virtio console (virtio §5.3), device type 3, one port: queue 0 is the port's
//! receiveq (host to guest), queue 1 its transmitq (guest to host). No MULTIPORT, no
//! SIZE; with VIRTIO_CONSOLE_F_EMERG_WRITE a driver may also write single characters
//! to `emerg_wr` in the configuration space (Linux does so for early output).
//!
//! Output goes to a [`SerialSink`] (the same trait the UART writes to); input is fed by
//! the VMM with [`VirtioConsole::enqueue_input`], buffered up to [`INPUT_CAPACITY`]
//! bytes, and delivered into receive buffers when the driver has some: after feeding,
//! the VMM calls the transport's `process_queue(RX_QUEUE)`.

use alloc::collections::VecDeque;

use super::{device_type, Queue, VirtioDevice, VirtioError};
use crate::uart16550::SerialSink;
use crate::vcpu::GuestMemory;

/// The receive queue (host to guest).
pub const RX_QUEUE: u16 = 0;
/// The transmit queue (guest to host).
pub const TX_QUEUE: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 128;
/// Bytes of input held while the guest has no receive buffers.
pub const INPUT_CAPACITY: usize = 4096;
/// Feature: the `emerg_wr` register.
pub const F_EMERG_WRITE: u64 = 1 << 2;

/// Configuration space offsets.
pub mod config {
    /// `cols` (u16).
    pub const COLS: u64 = 0;
    /// `rows` (u16).
    pub const ROWS: u64 = 2;
    /// `max_nr_ports` (u32).
    pub const MAX_NR_PORTS: u64 = 4;
    /// `emerg_wr` (u32, write-only).
    pub const EMERG_WR: u64 = 8;
    /// Length of the configuration space.
    pub const LEN: u64 = 12;
}

/// Largest chunk moved per guest-memory access.
const CHUNK: usize = 512;

/// A virtio console with one port.
pub struct VirtioConsole<S: SerialSink> {
    sink: S,
    input: VecDeque<u8>,
    sizes: [u16; 2],
}

impl<S: SerialSink> VirtioConsole<S> {
    /// A console writing guest output to `sink`.
    pub fn new(sink: S) -> Self {
        Self {
            sink,
            input: VecDeque::new(),
            sizes: [QUEUE_SIZE; 2],
        }
    }

    /// The output sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The output sink, to drain it.
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Buffers input for the guest; how many bytes fit (the rest is the caller's to
    /// retry).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(INPUT_CAPACITY - self.input.len());
        self.input.extend(&bytes[..n]);
        n
    }

    /// Bytes of input not yet delivered.
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    fn transmit(&mut self, q: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, VirtioError> {
        let mut used = false;
        while let Some(c) = q.pop(mem)? {
            let mut r = c.reader();
            let mut buf = [0u8; CHUNK];
            loop {
                let n = r.read(mem, &mut buf)?;
                if n == 0 {
                    break;
                }
                buf[..n].iter().for_each(|&b| self.sink.put(b));
            }
            q.add_used(mem, c.head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn receive(&mut self, q: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, VirtioError> {
        let mut used = false;
        while !self.input.is_empty() {
            let Some(c) = q.pop(mem)? else { break };
            let mut w = c.writer();
            while !self.input.is_empty() && w.remaining() > 0 {
                let (a, b) = self.input.as_slices();
                let chunk = if a.is_empty() { b } else { a };
                let n = w.write(mem, &chunk[..chunk.len().min(CHUNK)])?;
                self.input.drain(..n);
            }
            q.add_used(mem, c.head, w.written())?;
            used = true;
        }
        Ok(used)
    }
}

impl<S: SerialSink> VirtioDevice for VirtioConsole<S> {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_EMERG_WRITE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols and rows 0 (unknown), max_nr_ports 1 (only meaningful with MULTIPORT),
        // emerg_wr reads 0.
        let mut image = [0u8; config::LEN as usize];
        image[config::MAX_NR_PORTS as usize] = 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| image.get(o.wrapping_add(i)))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == config::EMERG_WR {
            if let Some(&b) = data.first() {
                self.sink.put(b);
            }
        }
    }

    fn process(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError> {
        match (index, queues.get_mut(index as usize)) {
            (RX_QUEUE, Some(q)) => self.receive(q, mem),
            (TX_QUEUE, Some(q)) => self.transmit(q, mem),
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::pci::tests::Guest;
    use crate::virtio::pci::{isr, DEVICE_CFG};
    use crate::virtio::queue::tests::put;
    use crate::virtio::{feature, status};
    use std::vec::Vec;

    const FEATURES: u64 = feature::VERSION_1 | F_EMERG_WRITE;

    fn guest() -> Guest<VirtioConsole<Vec<u8>>> {
        Guest::new(VirtioConsole::new(Vec::new()))
    }

    #[test]
    fn output_reaches_the_sink() {
        let mut g = guest();
        let mut d = g.up(FEATURES, &[QUEUE_SIZE, QUEUE_SIZE]);
        let mem = &mut g.mem.clone();
        put(mem, 0x10000, b"Linux version ");
        put(mem, 0x11000, b"6.1\n");
        let head = d[1].add_chain(mem, &[(0x10000, 14, false), (0x11000, 4, false)]);
        g.notify(TX_QUEUE);
        assert_eq!(g.dev.device().sink().as_slice(), b"Linux version 6.1\n");
        assert_eq!(d[1].take_used(mem), [(u32::from(head), 0)]);
        assert_eq!(g.isr(), isr::QUEUE);
        // A long buffer in chunks.
        let long: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
        put(mem, 0x20000, &long);
        d[1].add_chain(mem, &[(0x20000, 3000, false)]);
        g.notify(TX_QUEUE);
        assert_eq!(&g.dev.device().sink()[18..], long.as_slice());
    }

    #[test]
    fn input_waits_for_receive_buffers() {
        let mut g = guest();
        let mut d = g.up(FEATURES, &[QUEUE_SIZE, QUEUE_SIZE]);
        let mem = &mut g.mem.clone();
        assert_eq!(g.dev.device_mut().enqueue_input(b"ls -l\n"), 6);
        // No buffers yet: the input stays buffered.
        g.dev.process_queue(RX_QUEUE);
        assert_eq!(g.dev.device().pending_input(), 6);
        assert_eq!(g.isr(), 0);
        // The driver adds two 4-byte buffers and notifies: both fill.
        let h0 = d[0].add_chain(mem, &[(0x10000, 4, true)]);
        let h1 = d[0].add_chain(mem, &[(0x10100, 4, true)]);
        g.notify(RX_QUEUE);
        assert_eq!(
            d[0].take_used(mem),
            [(u32::from(h0), 4), (u32::from(h1), 2)]
        );
        assert_eq!(g.mem.bytes(0x10000, 4), b"ls -");
        assert_eq!(g.mem.bytes(0x10100, 2), b"l\n");
        assert_eq!(g.isr(), isr::QUEUE);
        // More input, with a buffer already waiting: the VMM kicks the queue.
        let h2 = d[0].add_chain(mem, &[(0x10200, 64, true)]);
        g.dev.device_mut().enqueue_input(b"q");
        g.dev.process_queue(RX_QUEUE);
        assert_eq!(d[0].take_used(mem), [(u32::from(h2), 1)]);
        assert_eq!(g.mem.bytes(0x10200, 1), b"q");
    }

    #[test]
    fn input_is_bounded() {
        let mut c = VirtioConsole::new(Vec::new());
        let big = std::vec![b'x'; INPUT_CAPACITY + 10];
        assert_eq!(c.enqueue_input(&big), INPUT_CAPACITY);
        assert_eq!(c.enqueue_input(b"y"), 0);
    }

    #[test]
    fn config_space_and_emergency_write() {
        let mut g = guest();
        assert_eq!(g.r(DEVICE_CFG + config::MAX_NR_PORTS, 4), 1);
        assert_eq!(g.r(DEVICE_CFG + config::COLS, 4), 0);
        assert_eq!(g.r(DEVICE_CFG + 0x100, 4), 0);
        g.w(DEVICE_CFG + config::EMERG_WR, u64::from(b'!'), 4);
        assert_eq!(g.dev.device().sink().as_slice(), b"!");
    }

    #[test]
    fn a_bad_transmit_buffer_breaks_the_device() {
        let mut g = guest();
        let mut d = g.up(FEATURES, &[QUEUE_SIZE, QUEUE_SIZE]);
        let mem = &mut g.mem.clone();
        d[1].add_chain(mem, &[(0x7fff_0000, 16, false)]);
        g.notify(TX_QUEUE);
        assert_ne!(g.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(g.isr(), isr::CONFIG);
    }
}
