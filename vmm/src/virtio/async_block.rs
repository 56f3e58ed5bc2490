//! virtio-blk on an asynchronous backend: requests go out, completions come back later.
//!
//! [`AsyncBlock`] is the virtio block device of [`super::block`] (same request format,
//! same statuses, same guest-visible results) for a backend that does not finish a
//! request inside the call that starts it: the disk service's session
//! ([`super::session::SessionBackend`]). The device parses each chain as the
//! synchronous [`VirtioBlock`](super::block::VirtioBlock) does, answers at once what
//! needs no disk (GET_ID, UNSUPP, requests that can only fail), and hands reads, writes
//! and flushes to the backend as a [`BlockIo`]: the request's op, first sector and data
//! segments (guest-physical, in order). The chain stays in the device until the
//! backend reports its [`Outcome`]; then the device writes the status byte, puts the
//! chain in the used ring and the transport interrupts the driver if it asks for it.
//!
//! # Driving it
//!
//! Everything happens in [`VirtioDevice::process`], which the transport runs
//! ([`VirtioPci::process_queue`](super::pci::VirtioPci::process_queue)) both when the
//! driver notifies the queue and when the VMM learns that completions arrived. One
//! call:
//!
//! 1. reaps: [`AsyncBlockBackend::poll`] returns the requests that finished; each gets
//!    its status byte and goes to the used ring;
//! 2. starts: the chain left over from a busy backend first, then new chains from the
//!    available ring, until the ring is empty or the backend says [`Submit::Busy`]. A
//!    busy chain is kept (popped, not yet started) and retried at the next call,
//!    which the next completion brings;
//! 3. kicks: [`AsyncBlockBackend::kick`] ends the batch (one doorbell for all the
//!    requests this call started).
//!
//! `process` returns whether chains were used; the transport then asks the queue
//! whether the driver wants an interrupt (`used_event` or `avail.flags`), raises INTx
//! if so and tells its caller (`process_queue` returns whether it interrupted). In the
//! PC the completion path is [`Pc::disk_completions`](crate::pc::Pc::disk_completions)
//! (the disk given as [`PcDisk::Device`](crate::pc::PcDisk::Device)).
//! [`AsyncBlock::complete`] is the same step for a caller that holds the queue itself.
//!
//! FLUSH is a request like the others: the backend completes it after the disk's
//! flush, which covers every write completed before it was sent. That is what virtio
//! asks (§5.2.6.1: a write becomes stable once completed and followed by a completed
//! FLUSH), and a write's chain is used only after all of it completed.
//!
//! # Rules the backend relies on
//!
//! - A started request is named by an id the device chose ([`AsyncBlockBackend::submit`]);
//!   the device never reuses an id while the backend holds it (ids come from a 32-bit
//!   counter that skips ids still in flight), so a driver that makes the same head
//!   available twice gets two independent requests.
//! - The device checks what the synchronous device checks before the backend sees a
//!   request: whole sectors, inside the disk, on block boundaries of the backend's
//!   [`block_size`](AsyncBlockBackend::block_size), the data buffers in the request's
//!   direction, writes on a writable disk. A read or write of zero bytes completes at
//!   once with OK.
//! - An [`Outcome::Fault`] (guest memory that is not RAM, found while the backend copied
//!   through a bounce buffer) marks the device DEVICE_NEEDS_RESET, as the synchronous
//!   device does for the same chain.
//! - On a device reset the device forgets its chains and calls
//!   [`AsyncBlockBackend::reset`]: the backend drops the requests' remaining work and
//!   never reports them (what the disk still does for them finishes unseen).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::block::{blk_status, features, req, ID_LEN, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use super::{device_type, DescriptorChain, Queue, QueueError, VirtioDevice, VirtioError};
use crate::vcpu::GuestMemory;

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Disk to guest memory.
    Read,
    /// Guest memory to disk.
    Write,
    /// Make every completed write durable.
    Flush,
}

/// One piece of guest memory a request moves data to or from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes (never 0).
    pub len: u32,
}

/// A request the device hands to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockIo<'a> {
    /// What to do.
    pub op: IoOp,
    /// The first sector (512 bytes), on a block boundary; 0 for a flush.
    pub sector: u64,
    /// The data, in disk order: a whole number of blocks in all, inside the disk. Empty
    /// for a flush; never empty for a read or write.
    pub segs: &'a [Segment],
}

impl BlockIo<'_> {
    /// Bytes the request moves.
    pub fn len(&self) -> u64 {
        self.segs.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Whether it moves none (a flush).
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: every byte moved (the guest sees VIRTIO_BLK_S_OK).
    Ok,
    /// The disk, the session or the service failed it (VIRTIO_BLK_S_IOERR).
    IoErr,
    /// A data buffer is not guest RAM at this address: the driver broke the rules and
    /// the device needs a reset.
    Fault(u64),
}

/// What [`AsyncBlockBackend::submit`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// Started: its outcome comes from a later [`AsyncBlockBackend::poll`].
    Queued,
    /// Finished at once (e.g. refused, or the session is gone).
    Done(Outcome),
    /// Not taken: no room now. The device keeps the request and offers it again after
    /// the next poll.
    Busy,
}

/// A disk that finishes requests later.
pub trait AsyncBlockBackend: Send {
    /// Size in sectors (512 bytes).
    fn capacity(&self) -> u64;
    /// Bytes per block, a power of two of at least 512: every request starts and ends
    /// on a block boundary (the device advertises it as `blk_size`).
    fn block_size(&self) -> u32;
    /// Starts request `id`; `mem` is guest memory, for data the backend copies.
    fn submit(&mut self, id: u32, io: &BlockIo<'_>, mem: &mut dyn GuestMemory) -> Submit;
    /// Ends a batch of submissions: makes them visible to the disk (one notification).
    /// Called after every [`AsyncBlock`] step, whether it submitted anything or not.
    fn kick(&mut self);
    /// Appends the requests that finished since the last call, with their outcomes,
    /// to `done`; each id appears once, and only for a request submitted (and not
    /// reset) since.
    fn poll(&mut self, mem: &mut dyn GuestMemory, done: &mut Vec<(u32, Outcome)>);
    /// The driver reset the device: forget every request (never report them).
    fn reset(&mut self);
}

/// A chain the backend holds.
#[derive(Debug)]
struct InFlight {
    chain: DescriptorChain,
    /// Writable bytes before the status byte.
    data_len: u64,
    /// A read: an OK answer wrote every data byte.
    read: bool,
}

/// How starting a chain went.
enum Start {
    /// Answered now: (head, used length).
    Done(u16, u32),
    /// The backend holds it.
    Queued,
    /// The backend is busy: keep the chain for later.
    Busy(DescriptorChain),
}

/// A virtio block device over an [`AsyncBlockBackend`].
pub struct AsyncBlock<B: AsyncBlockBackend> {
    backend: B,
    read_only: bool,
    id: [u8; ID_LEN],
    sizes: [u16; 1],
    /// Chains the backend holds, by id.
    in_flight: BTreeMap<u32, InFlight>,
    next_id: u32,
    /// The chain the backend had no room for.
    stalled: Option<DescriptorChain>,
    /// Scratch for [`AsyncBlockBackend::poll`].
    done: Vec<(u32, Outcome)>,
}

impl<B: AsyncBlockBackend> AsyncBlock<B> {
    /// A disk on `backend`; `id` is the serial GET_ID returns (cut to 20 bytes).
    pub fn new(backend: B, read_only: bool, id: &[u8]) -> Self {
        let mut serial = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id[..n]);
        Self {
            backend,
            read_only,
            id: serial,
            sizes: [QUEUE_SIZE],
            in_flight: BTreeMap::new(),
            next_id: 0,
            stalled: None,
            done: Vec::new(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Requests the backend holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a chain waits for room in the backend.
    pub fn stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// One step on the request queue `q` (what [`VirtioDevice::process`] does for queue
    /// 0): reap finished requests into the used ring, start the waiting and the newly
    /// available chains, end the batch. Whether chains were used (the caller then asks
    /// [`Queue::needs_notification`] whether to interrupt the driver).
    pub fn complete(
        &mut self,
        q: &mut Queue,
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError> {
        let r = self.step(q, mem);
        // Whatever happened, what was submitted is published: the disk may already
        // hold data for it (a bounce copy), and the doorbell is owed.
        self.backend.kick();
        r
    }

    fn step(&mut self, q: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, VirtioError> {
        let mut used = self.reap(q, mem)?;
        loop {
            let chain = match self.stalled.take() {
                Some(c) => c,
                None => match q.pop(mem)? {
                    Some(c) => c,
                    None => break,
                },
            };
            match self.start(chain, mem)? {
                Start::Done(head, len) => {
                    q.add_used(mem, head, len)?;
                    used = true;
                }
                Start::Queued => {}
                Start::Busy(c) => {
                    self.stalled = Some(c);
                    break;
                }
            }
        }
        Ok(used)
    }

    /// Puts the chains of the finished requests into the used ring.
    fn reap(&mut self, q: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, VirtioError> {
        let mut done = core::mem::take(&mut self.done);
        done.clear();
        self.backend.poll(mem, &mut done);
        let mut used = false;
        let mut fault = None;
        let mut r = Ok(());
        for &(id, outcome) in &done {
            // An id the device does not hold (a backend bug) is ignored.
            let Some(f) = self.in_flight.remove(&id) else {
                continue;
            };
            if r.is_err() {
                continue;
            }
            let (status, len) = match outcome {
                Outcome::Ok if f.read => (blk_status::OK, f.data_len.saturating_add(1)),
                Outcome::Ok => (blk_status::OK, 1),
                Outcome::IoErr => (blk_status::IOERR, 1),
                Outcome::Fault(gpa) => {
                    fault.get_or_insert(gpa);
                    continue;
                }
            };
            r = Self::finish(q, mem, &f.chain, f.data_len, status, len);
            used |= r.is_ok();
        }
        self.done = done;
        r?;
        match fault {
            Some(gpa) => Err(QueueError::Unbacked(gpa).into()),
            None => Ok(used),
        }
    }

    /// Writes `status` as the chain's last writable byte and returns the chain to the
    /// driver with `len` bytes written.
    fn finish(
        q: &mut Queue,
        mem: &mut dyn GuestMemory,
        c: &DescriptorChain,
        data_len: u64,
        status: u8,
        len: u64,
    ) -> Result<(), VirtioError> {
        put_status(c, data_len, status, mem)?;
        q.add_used(mem, c.head, used_len(len))?;
        Ok(())
    }

    /// Whether `len` bytes from `sector` are whole blocks inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> bool {
        let bs = u64::from(self.backend.block_size().max(SECTOR_SIZE as u32));
        len.is_multiple_of(bs)
            && sector
                .checked_mul(SECTOR_SIZE)
                .is_some_and(|b| b.is_multiple_of(bs))
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.backend.capacity())
    }

    /// Parses a chain and answers it or hands it to the backend.
    fn start(
        &mut self,
        c: DescriptorChain,
        mem: &mut dyn GuestMemory,
    ) -> Result<Start, VirtioError> {
        let mut r = c.reader();
        let mut hdr = [0u8; 16];
        if r.read(mem, &mut hdr)? != hdr.len() {
            return Err(VirtioError::BadRequest("block request header too short"));
        }
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let writable = c.writable_len();
        if writable == 0 {
            return Err(VirtioError::BadRequest(
                "block request without a status byte",
            ));
        }
        let data_len = writable - 1;
        let (op, segs) = match ty {
            req::IN if r.remaining() == 0 && self.check_range(sector, data_len) => {
                (IoOp::Read, segments(&c, true, 0, data_len))
            }
            req::OUT
                if data_len == 0 && !self.read_only && self.check_range(sector, r.remaining()) =>
            {
                (IoOp::Write, segments(&c, false, 16, r.remaining()))
            }
            req::IN | req::OUT => return self.answer(&c, data_len, blk_status::IOERR, 0, mem),
            req::FLUSH => (IoOp::Flush, Vec::new()),
            req::GET_ID => {
                let n = (data_len as usize).min(ID_LEN);
                let mut w = c.writer();
                w.write(mem, &self.id[..n])?;
                return self.answer(&c, data_len, blk_status::OK, n as u64, mem);
            }
            _ => return self.answer(&c, data_len, blk_status::UNSUPP, 0, mem),
        };
        if op != IoOp::Flush && segs.is_empty() {
            // Nothing to move: done, as the synchronous device is.
            return self.answer(&c, data_len, blk_status::OK, 0, mem);
        }
        let sector = if op == IoOp::Flush { 0 } else { sector };
        let mut id = self.next_id;
        while self.in_flight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        let io = BlockIo {
            op,
            sector,
            segs: &segs,
        };
        match self.backend.submit(id, &io, mem) {
            Submit::Busy => Ok(Start::Busy(c)),
            Submit::Done(Outcome::Fault(gpa)) => Err(QueueError::Unbacked(gpa).into()),
            Submit::Done(o) => {
                let (st, len) = match o {
                    Outcome::Ok if op == IoOp::Read => (blk_status::OK, data_len + 1),
                    Outcome::Ok => (blk_status::OK, 1),
                    _ => (blk_status::IOERR, 1),
                };
                put_status(&c, data_len, st, mem)?;
                Ok(Start::Done(c.head, used_len(len)))
            }
            Submit::Queued => {
                self.next_id = id.wrapping_add(1);
                self.in_flight.insert(
                    id,
                    InFlight {
                        chain: c,
                        data_len,
                        read: op == IoOp::Read,
                    },
                );
                Ok(Start::Queued)
            }
        }
    }

    /// Answers a chain now: the status byte after `data_len` bytes; `written` data
    /// bytes were written before it.
    fn answer(
        &self,
        c: &DescriptorChain,
        data_len: u64,
        status: u8,
        written: u64,
        mem: &mut dyn GuestMemory,
    ) -> Result<Start, VirtioError> {
        put_status(c, data_len, status, mem)?;
        Ok(Start::Done(c.head, used_len(written + 1)))
    }
}

/// Writes `status` after the first `data_len` writable bytes of `c` (its last byte).
fn put_status(
    c: &DescriptorChain,
    data_len: u64,
    status: u8,
    mem: &mut dyn GuestMemory,
) -> Result<(), VirtioError> {
    let mut w = c.writer();
    w.skip(usize::try_from(data_len).unwrap_or(usize::MAX));
    w.write(mem, &[status])?;
    Ok(())
}

/// A used length: the bytes written, as the ring's 32-bit field holds them.
fn used_len(n: u64) -> u32 {
    n.min(u64::from(u32::MAX)) as u32
}

/// The data segments of a chain: `len` bytes of its writable (`write`) or readable
/// buffers from byte `skip` on, zero-length pieces left out.
fn segments(c: &DescriptorChain, write: bool, skip: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut skip = skip;
    let mut left = len;
    for d in c.descs.iter().filter(|d| d.write == write) {
        if left == 0 {
            break;
        }
        let dl = u64::from(d.len);
        if skip >= dl {
            skip -= dl;
            continue;
        }
        let n = (dl - skip).min(left);
        out.push(Segment {
            gpa: d.addr + skip,
            len: n as u32,
        });
        left -= n;
        skip = 0;
    }
    out
}

impl<B: AsyncBlockBackend> VirtioDevice for AsyncBlock<B> {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { features::RO } else { 0 };
        features::SEG_MAX | features::BLK_SIZE | features::FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        use super::block::config;
        let mut image = [0u8; config::LEN as usize];
        let mut put =
            |off: u64, v: &[u8]| image[off as usize..off as usize + v.len()].copy_from_slice(v);
        put(config::CAPACITY, &self.backend.capacity().to_le_bytes());
        put(config::SEG_MAX, &SEG_MAX.to_le_bytes());
        put(config::BLK_SIZE, &self.backend.block_size().to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| image.get(o.wrapping_add(i)))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        self.in_flight.clear();
        self.stalled = None;
        self.backend.reset();
    }

    fn process(
        &mut self,
        index: u16,
        queues: &mut [Queue],
        mem: &mut dyn GuestMemory,
    ) -> Result<bool, VirtioError> {
        let Some(q) = queues.get_mut(index as usize).filter(|_| index == 0) else {
            return Ok(false);
        };
        self.complete(q, mem)
    }
}
