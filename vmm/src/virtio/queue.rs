//! Split virtqueues (virtio §2.7): a descriptor table, the driver's available ring and
//! the device's used ring, all in guest memory.
//!
//! | area                 | layout (little-endian)                                 | align |
//! |----------------------|--------------------------------------------------------|-------|
//! | descriptor table     | `size` × { addr u64, len u32, flags u16, next u16 }    | 16    |
//! | available ring       | flags u16, idx u16, ring\[size\] u16, used_event u16     | 2     |
//! | used ring            | flags u16, idx u16, ring\[size\] {id u32, len u32}, avail_event u16 | 4 |
//!
//! Every value the driver controls is checked before use: the available index may run
//! at most `size` ahead of the device (§2.7.13.3), heads and `next` fields must index the
//! table, a chain may not revisit a descriptor (it is at most as long as its table:
//! §2.7.5.3.1), an indirect table (§2.7.5.3) must be a whole number of descriptors, not
//! nested and not followed by NEXT, device-writable descriptors follow the readable
//! ones (§2.7.4.2), and no buffer wraps the address space. A descriptor's memory is
//! checked when it is read or written through [`Reader`] / [`Writer`] (guest memory
//! refuses what is not RAM). Any failure is a [`QueueError`]: the transport marks the
//! device DEVICE_NEEDS_RESET and stops using the queue.
//!
//! Ordering: the device reads `avail.idx` before the ring entries it covers, and
//! writes used elements before `used.idx` (fences between, §2.7.13 and §2.7.14), so the
//! same code is right when the guest runs on another CPU.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::vcpu::GuestMemory;

/// The largest queue size a split virtqueue may have (virtio §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The most descriptors an indirect table may hold (QEMU's `VIRTQUEUE_MAX_SIZE`; far
/// more than any driver's scatter list).
pub const MAX_INDIRECT: u32 = 1024;

/// Descriptor flags (virtio §2.7.5).
pub mod desc_flags {
    /// The buffer continues in the descriptor named by `next`.
    pub const NEXT: u16 = 1;
    /// The buffer is device-writable (otherwise device-readable).
    pub const WRITE: u16 = 2;
    /// The buffer holds a table of descriptors.
    pub const INDIRECT: u16 = 4;
}

/// `avail.flags`: the driver asks for no interrupts (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device asks for no notifications (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

const DESC_SIZE: u64 = 16;

/// How a driver broke a virtqueue. The doc comment of each variant is its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The queue is used before the driver enabled it.
    NotReady,
    /// Queue size zero, not a power of two, or above the device's maximum.
    BadSize(u16),
    /// A ring or table address is misaligned or wraps the address space.
    BadAddress(u64),
    /// The available index ran more than the queue size ahead of the device.
    AvailIndexJump {
        /// The driver's `avail.idx`.
        avail: u16,
        /// The next entry the device would use.
        next: u16,
    },
    /// A head or `next` index lies outside its descriptor table.
    BadIndex(u16),
    /// A chain is longer than its table: it loops.
    ChainLoop,
    /// An indirect table that is empty, not a multiple of 16 bytes or too large.
    BadIndirectTable(u32),
    /// An indirect descriptor inside an indirect table, or one with NEXT set.
    BadIndirectFlags,
    /// INDIRECT used without VIRTIO_F_INDIRECT_DESC negotiated.
    IndirectNotNegotiated,
    /// A device-readable descriptor follows a device-writable one.
    ReadableAfterWritable,
    /// A buffer wraps the end of the address space.
    BufferWraps {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Guest memory is not RAM at this address.
    Unbacked(u64),
    /// The device returned a head that is not a descriptor index.
    BadUsedHead(u16),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QueueError::NotReady => write!(f, "queue used before it was enabled"),
            QueueError::BadSize(s) => write!(f, "bad queue size {s}"),
            QueueError::BadAddress(a) => write!(f, "bad ring address {a:#x}"),
            QueueError::AvailIndexJump { avail, next } => {
                write!(f, "available index {avail} too far ahead of {next}")
            }
            QueueError::BadIndex(i) => write!(f, "descriptor index {i} out of range"),
            QueueError::ChainLoop => write!(f, "descriptor chain loops"),
            QueueError::BadIndirectTable(l) => write!(f, "bad indirect table length {l}"),
            QueueError::BadIndirectFlags => write!(f, "nested or chained indirect table"),
            QueueError::IndirectNotNegotiated => write!(f, "indirect descriptor not negotiated"),
            QueueError::ReadableAfterWritable => {
                write!(f, "device-readable descriptor after a writable one")
            }
            QueueError::BufferWraps { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} wraps the address space")
            }
            QueueError::Unbacked(a) => write!(f, "guest address {a:#x} is not RAM"),
            QueueError::BadUsedHead(h) => write!(f, "used head {h} out of range"),
        }
    }
}

fn read_u16<M: GuestMemory + ?Sized>(mem: &mut M, gpa: u64) -> Result<u16, QueueError> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b)
        .map_err(|e| QueueError::Unbacked(e.gpa))?;
    Ok(u16::from_le_bytes(b))
}

fn write_mem<M: GuestMemory + ?Sized>(mem: &mut M, gpa: u64, b: &[u8]) -> Result<(), QueueError> {
    mem.write(gpa, b).map_err(|e| QueueError::Unbacked(e.gpa))
}

/// One buffer of a chain, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub write: bool,
}

/// A descriptor chain popped from the available ring: its head (what goes back in the
/// used ring) and its buffers, readable ones first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    /// The head index.
    pub head: u16,
    /// The buffers, indirect tables resolved.
    pub descs: Vec<Descriptor>,
}

impl DescriptorChain {
    fn split(&self) -> usize {
        self.descs
            .iter()
            .position(|d| d.write)
            .unwrap_or(self.descs.len())
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.descs[..self.split()]
            .iter()
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.descs[self.split()..]
            .iter()
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// A cursor over the device-readable bytes.
    pub fn reader(&self) -> Reader<'_> {
        Reader::new(&self.descs[..self.split()])
    }

    /// A cursor over the device-writable bytes.
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            cur: Reader::new(&self.descs[self.split()..]),
            written: 0,
        }
    }
}

/// Reads a chain's readable buffers in order, across descriptor boundaries.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    descs: &'a [Descriptor],
    /// Offset into `descs[0]`.
    off: u32,
}

impl<'a> Reader<'a> {
    fn new(descs: &'a [Descriptor]) -> Self {
        let mut r = Self { descs, off: 0 };
        r.skip_empty();
        r
    }

    fn skip_empty(&mut self) {
        while let Some(d) = self.descs.first() {
            if self.off < d.len {
                break;
            }
            self.descs = &self.descs[1..];
            self.off = 0;
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.len)).sum::<u64>() - u64::from(self.off)
    }

    /// The next `len` bytes as (address, length) pieces, consuming them.
    fn take(
        &mut self,
        mut len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), QueueError>,
    ) -> Result<usize, QueueError> {
        let mut done = 0;
        while len > 0 {
            let Some(d) = self.descs.first() else { break };
            let n = ((d.len - self.off) as usize).min(len);
            f(d.addr + u64::from(self.off), done, n)?;
            self.off += n as u32;
            done += n;
            len -= n;
            self.skip_empty();
        }
        Ok(done)
    }

    /// Reads up to `buf.len()` bytes; how many (fewer only at the end of the buffers).
    pub fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        buf: &mut [u8],
    ) -> Result<usize, QueueError> {
        self.take(buf.len(), |gpa, at, n| {
            mem.read(gpa, &mut buf[at..at + n])
                .map_err(|e| QueueError::Unbacked(e.gpa))
        })
    }

    /// Skips up to `n` bytes; how many.
    pub fn skip(&mut self, n: usize) -> usize {
        self.take(n, |_, _, _| Ok(())).unwrap_or(0)
    }
}

/// Writes a chain's writable buffers in order, counting the bytes written (the used
/// length).
#[derive(Clone, Debug)]
pub struct Writer<'a> {
    cur: Reader<'a>,
    written: u32,
}

impl Writer<'_> {
    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.cur.remaining()
    }

    /// Bytes written so far.
    pub fn written(&self) -> u32 {
        self.written
    }

    /// Writes up to `buf.len()` bytes; how many (fewer only at the end of the buffers).
    pub fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        buf: &[u8],
    ) -> Result<usize, QueueError> {
        let n = self.cur.take(buf.len(), |gpa, at, n| {
            mem.write(gpa, &buf[at..at + n])
                .map_err(|e| QueueError::Unbacked(e.gpa))
        })?;
        self.written = self.written.saturating_add(n as u32);
        Ok(n)
    }

    /// Skips up to `n` bytes without writing them (they do not count as written).
    pub fn skip(&mut self, n: usize) -> usize {
        self.cur.skip(n)
    }
}

/// A split virtqueue, as the transport configures it and the device uses it.
#[derive(Clone, Debug)]
pub struct Queue {
    /// The largest size the device supports.
    pub max_size: u16,
    /// The size the driver chose (initially `max_size`).
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used (device) ring.
    pub used_ring: u64,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    next_avail: u16,
    next_used: u16,
    /// `next_used` when the driver was last interrupted.
    signalled_used: u16,
}

impl Queue {
    /// A disabled queue of at most `max_size` entries.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            event_idx: false,
            indirect: false,
            next_avail: 0,
            next_used: 0,
            signalled_used: 0,
        }
    }

    /// Back to the state after device reset.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// The next available-ring entry the device will take.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used-ring entry the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Checks the driver's configuration before the queue is enabled: size a power of
    /// two up to the maximum, rings aligned and not wrapping the address space.
    pub fn check(&self) -> Result<(), QueueError> {
        let s = u64::from(self.size);
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(QueueError::BadSize(self.size));
        }
        for (addr, align, len) in [
            (self.desc_table, 16, DESC_SIZE * s),
            (self.avail_ring, 2, 6 + 2 * s),
            (self.used_ring, 4, 6 + 8 * s),
        ] {
            if !addr.is_multiple_of(align) || addr.checked_add(len).is_none() {
                return Err(QueueError::BadAddress(addr));
            }
        }
        Ok(())
    }

    fn avail_idx<M: GuestMemory + ?Sized>(&self, mem: &mut M) -> Result<u16, QueueError> {
        read_u16(mem, self.avail_ring + 2)
    }

    /// Takes the next chain the driver made available, or `None` if there is none.
    ///
    /// With EVENT_IDX, an empty ring also publishes `avail_event` (so the driver
    /// notifies at its next buffer) and looks once more, closing the race with a driver
    /// that added one meanwhile.
    pub fn pop<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
    ) -> Result<Option<DescriptorChain>, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let mut avail = self.avail_idx(mem)?;
        if avail == self.next_avail && self.event_idx {
            let at = self.used_ring + 4 + 8 * u64::from(self.size);
            write_mem(mem, at, &self.next_avail.to_le_bytes())?;
            fence(Ordering::SeqCst);
            avail = self.avail_idx(mem)?;
        }
        let pending = avail.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndexJump {
                avail,
                next: self.next_avail,
            });
        }
        // The ring entry is read after the index that published it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = read_u16(mem, self.avail_ring + 4 + 2 * slot)?;
        let chain = self.walk(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Follows the chain at `head`, resolving an indirect table.
    fn walk<M: GuestMemory + ?Sized>(
        &self,
        mem: &mut M,
        head: u16,
    ) -> Result<DescriptorChain, QueueError> {
        let mut descs = Vec::new();
        let mut table = (self.desc_table, u32::from(self.size), false);
        let mut idx = head;
        let mut count = 0u32;
        loop {
            let (base, entries, nested) = table;
            if u32::from(idx) >= entries {
                return Err(QueueError::BadIndex(idx));
            }
            count += 1;
            if count > entries {
                return Err(QueueError::ChainLoop);
            }
            let mut raw = [0u8; 16];
            mem.read(base + DESC_SIZE * u64::from(idx), &mut raw)
                .map_err(|e| QueueError::Unbacked(e.gpa))?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::BufferWraps { addr, len });
            }
            if flags & desc_flags::INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if nested || flags & desc_flags::NEXT != 0 {
                    return Err(QueueError::BadIndirectFlags);
                }
                let n = len / DESC_SIZE as u32;
                if len == 0 || len % DESC_SIZE as u32 != 0 || n > MAX_INDIRECT {
                    return Err(QueueError::BadIndirectTable(len));
                }
                table = (addr, n, true);
                idx = 0;
                count = 0;
                continue;
            }
            let write = flags & desc_flags::WRITE != 0;
            if !write && descs.last().is_some_and(|d: &Descriptor| d.write) {
                return Err(QueueError::ReadableAfterWritable);
            }
            descs.push(Descriptor { addr, len, write });
            if flags & desc_flags::NEXT == 0 {
                return Ok(DescriptorChain { head, descs });
            }
            idx = next;
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written into it.
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if head >= self.size {
            return Err(QueueError::BadUsedHead(head));
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        write_mem(mem, self.used_ring + 4 + 8 * slot, &elem)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element is visible before the index that publishes it.
        fence(Ordering::Release);
        write_mem(mem, self.used_ring + 2, &self.next_used.to_le_bytes())
    }

    /// Whether the driver wants an interrupt for the buffers used since the last one
    /// (virtio §2.7.10: `avail.flags` without EVENT_IDX, `used_event` with it).
    /// Call after [`add_used`](Self::add_used); it records the interrupt as sent.
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
    ) -> Result<bool, QueueError> {
        let new = self.next_used;
        let old = core::mem::replace(&mut self.signalled_used, new);
        // The used index is written before the driver's event index is read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = read_u16(mem, self.avail_ring + 4 + 2 * u64::from(self.size))?;
            Ok(need_event(event, new, old))
        } else {
            let flags = read_u16(mem, self.avail_ring)?;
            Ok(new != old && flags & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

/// `vring_need_event`: whether moving the used index from `old` to `new` crossed the
/// driver's `event` index.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
pub(crate) mod tests;
