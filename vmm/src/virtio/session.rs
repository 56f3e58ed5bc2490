//! The VMM's end of a disk-service session ([`peregrine_blkproto`]): an
//! [`AsyncBlockBackend`] for [`AsyncBlock`](super::async_block::AsyncBlock) that turns
//! virtio requests into session descriptors on a [`ClientRing`].
//!
//! # The data area is guest RAM
//!
//! The session's data area, the memory a descriptor's `buf` points into, is laid out by
//! the VMM as:
//!
//! | data-area bytes                          | what                                      |
//! |------------------------------------------|-------------------------------------------|
//! | `0 .. ram_len`                           | guest RAM: offset = guest-physical address |
//! | `bounce_base .. bounce_base + bounce_len` | the bounce area (VMM memory, not the guest's) |
//!
//! so the disk service (and the driver under it) moves data straight between the disk
//! and the guest's buffers: a request whose data segments all start and end on block
//! boundaries inside the first `ram_len` bytes goes out as descriptors whose `buf` is
//! the segment's guest-physical address, one descriptor per run of segments contiguous
//! in guest memory (split at the session's maximum transfer). Any other request (a
//! segment not block-aligned, or outside `0 .. ram_len`) goes through the bounce area:
//! it is cut into pieces of at most one bounce *slot* (the area divided evenly among the
//! ring's `N` tags, in whole blocks); a write's piece is copied from the guest into its
//! slot before the descriptor goes out, a read's piece is copied from its slot into
//! the guest when its completion arrives. One virtio request can thus become many
//! descriptors; it completes when all have completed, OK only if every one came back
//! OK with exactly its block count. A request with more pieces than free tags is fed
//! as tags come free (no new request is taken meanwhile).
//!
//! # Tags and a hostile service
//!
//! A tag is `slot | generation << 12`: `slot < N` names the piece's entry (and its
//! bounce slot), the 20-bit generation changes each time the slot is reused. A
//! completion whose tag names no piece in flight (unknown, stale or repeated) is
//! counted ([`SessionBackend::stray`]) and ignored; any status but OK, or an OK with the
//! wrong block count, fails the piece's request (IOERR). A completion tail that jumps
//! more than a ring ahead breaks the session: every request in flight fails and later
//! ones fail at once. Nothing the service writes can make the VMM panic, loop or
//! complete a request as OK that the service did not answer OK, piece by piece. (The
//! service can of course lie about data: it owns the disk and may write the data area.)
//! At most `N` pieces are in flight, so the completion ring never has to hold more than
//! the client can take, and each poll reads at most `N` completions.
//!
//! # What the bare-metal VMM provides (nul/vmm)
//!
//! - **The session**: the ring region mapped in the VMM as `&'static [AtomicU32]` (the
//!   service initialises it before the first doorbell; the VMM attaches with the same
//!   [`Layout`] the root gave both, and [`SessionBackend::new`] checks the header). The
//!   block size, maximum transfer and length come from the header.
//! - **The data area**, delegated to the disk service as one range: first guest RAM,
//!   the very pages the VM's RAM is delegated from (the VMM's pool at `POOL_ADDR`,
//!   `ram_len` = the VM's RAM size, data-area offset = guest-physical address), then
//!   the bounce area at data-area offset `bounce_base` (`>= ram_len`, a multiple of the
//!   block size, e.g. `ram_len` rounded up to a page): `bounce_len` bytes of the VMM's
//!   own memory, never mapped into the VM. The service is told `data_len =
//!   bounce_base + bounce_len`. A useful size: the ring's `N` times the largest piece
//!   worth bouncing at once (e.g. 64 × 16 KiB = 1 MiB); with 0, unaligned requests fail.
//! - **The bounce area's mapping in the VMM**, as a [`GuestMemory`] addressed from 0
//!   (nul/vmm's `GuestRam::new(bounce_va, bounce_len)` is one).
//! - **The doorbell** ([`Doorbell::ring_doorbell`]): `sem_up` on the service's
//!   doorbell semaphore. It is called with the disk's lock held (from a vCPU's notify
//!   exit or from the completion thread), at most once per batch, so it must not
//!   block.
//! - **The completion thread**: an EC (any CPU) that loops on `sem_down` of the
//!   service's completion semaphore (counting: a signal that comes while the thread is
//!   busy is not lost, and a spurious one costs one empty poll) and then calls
//!   [`Pc::disk_completions`](crate::pc::Pc::disk_completions), which locks the disk,
//!   reaps the completions (status bytes, used ring), starts the requests that waited
//!   for room and rings the doorbell for them, raises the disk's INTx through the
//!   I/O APIC if the driver wants it (the local APIC's wire then kicks the vCPU, as for
//!   any device interrupt) and returns whether it did. Without the PC it is
//!   `VirtioPci::process_queue(0)` on the disk's transport.
//! - **The device**: `Pc::new(.., Some(PcDisk::Device(Box::new(AsyncBlock::new(
//!   SessionBackend::new(ring, layout, area, doorbell)?, read_only, serial)))), ..)`
//!   instead of `Some(RamDisk(..))`; the type is
//!   `SessionBackend<'static, [AtomicU32], YourDoorbell, GuestRam>`.
//!
//! On a device reset the requests in flight are forgotten, not cancelled: the service
//! may still write into guest RAM for them (as a real disk's DMA would) and their
//! completions are dropped when they come.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use peregrine_blkproto::ring::Layout;
use peregrine_blkproto::{ClientRing, Descriptor, Op, RingError, SharedMem, Status};

use super::async_block::{AsyncBlockBackend, BlockIo, IoOp, Outcome, Segment, Submit};
use super::block::SECTOR_SIZE;
use crate::vcpu::GuestMemory;

/// Bits of a tag that name the slot.
const SLOT_BITS: u32 = 12;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Generations wrap at 2^20.
const GEN_MASK: u32 = (1 << (32 - SLOT_BITS)) - 1;
/// Bytes copied through the bounce area at once.
const COPY_CHUNK: usize = 4096;

/// How the VMM tells the service that descriptors are waiting.
pub trait Doorbell: Send {
    /// Rings the service's doorbell (once per batch). Must not block for long: the
    /// device's lock is held.
    fn ring_doorbell(&mut self);
}

/// The data area as the VMM lays it out (see the module docs).
#[derive(Debug)]
pub struct DataArea<B: GuestMemory> {
    /// Data-area bytes `0 .. ram_len` are guest RAM at the same guest-physical address.
    pub ram_len: u64,
    /// Data-area offset of the bounce area: at least `ram_len`, a multiple of the block
    /// size.
    pub bounce_base: u64,
    /// Bytes of the bounce area (0: no bounce area; requests that need it fail).
    pub bounce_len: u64,
    /// The VMM's view of the bounce area, byte 0 = data-area byte `bounce_base`.
    pub bounce: B,
}

/// Why a session cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionError {
    /// The ring region does not hold a session of this layout.
    Ring(RingError),
    /// The service announced a block size that is not a power of two of at least 512,
    /// a maximum transfer of 0 or a size whose bytes overflow 64 bits.
    Geometry,
    /// The bounce area overlaps guest RAM or is not on a block boundary.
    BounceArea,
}

/// One descriptor in flight.
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// The request's key.
    req: u64,
    /// Blocks it moves (0 for a flush).
    blocks: u32,
    /// Where its data lies in the request's data (bytes).
    off: u64,
    /// Bytes.
    len: u64,
    /// Through its bounce slot.
    bounce: bool,
}

/// A request taken from the device.
#[derive(Debug)]
struct Req {
    /// The device's id.
    id: u32,
    op: IoOp,
    /// First session block.
    block: u64,
    segs: Vec<Segment>,
    total: u64,
    /// Bytes sent in descriptors so far.
    sent: u64,
    /// The next segment to send from, and the offset in it (direct requests).
    seg: usize,
    seg_off: u64,
    /// A flush's descriptor went out.
    flush_sent: bool,
    bounce: bool,
    /// Descriptors in flight.
    outstanding: u32,
    /// Why it failed, if it did: nothing more goes out for it.
    failed: Option<Outcome>,
    /// The device was reset: it is never reported.
    orphan: bool,
}

impl Req {
    fn all_sent(&self) -> bool {
        match self.op {
            IoOp::Flush => self.flush_sent,
            _ => self.sent == self.total,
        }
    }

    fn finished(&self) -> bool {
        self.outstanding == 0 && (self.failed.is_some() || self.all_sent())
    }

    fn outcome(&self) -> Outcome {
        self.failed.unwrap_or(Outcome::Ok)
    }
}

/// The client side of a session, as a block backend.
pub struct SessionBackend<'m, M: SharedMem + ?Sized + Sync, D: Doorbell, B: GuestMemory + Send> {
    ring: ClientRing<'m, M>,
    doorbell: D,
    area: DataArea<B>,
    block_size: u32,
    /// The most bytes one descriptor moves.
    max_bytes: u64,
    /// The disk in sectors.
    sectors: u64,
    /// Bytes of bounce area per slot (a multiple of the block size; 0 if none).
    slot_bytes: u64,
    slots: Vec<Option<Piece>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    reqs: BTreeMap<u64, Req>,
    next_key: u64,
    /// The request whose pieces did not all fit.
    partial: Option<u64>,
    broken: bool,
    doorbell_due: bool,
    stray: u64,
    doorbells: u64,
    scratch: Vec<u8>,
}

impl<'m, M, D, B> SessionBackend<'m, M, D, B>
where
    M: SharedMem + ?Sized + Sync,
    D: Doorbell,
    B: GuestMemory + Send,
{
    /// Attaches to the session ring in `mem` (initialised by the service with
    /// `layout`), with the data area laid out as `area` and `doorbell` to notify the
    /// service.
    pub fn new(
        mem: &'m M,
        layout: Layout,
        area: DataArea<B>,
        doorbell: D,
    ) -> Result<Self, SessionError> {
        let ring = ClientRing::attach(mem, layout).map_err(SessionError::Ring)?;
        let bs = ring.block_size();
        if bs < SECTOR_SIZE as u32 || !bs.is_power_of_two() || ring.max_blocks() == 0 {
            return Err(SessionError::Geometry);
        }
        let sectors = ring
            .blocks()
            .checked_mul(u64::from(bs) / SECTOR_SIZE)
            .filter(|s| s.checked_mul(SECTOR_SIZE).is_some())
            .ok_or(SessionError::Geometry)?;
        let bs64 = u64::from(bs);
        if area.bounce_base < area.ram_len
            || !area.bounce_base.is_multiple_of(bs64)
            || area.bounce_base.checked_add(area.bounce_len).is_none()
        {
            return Err(SessionError::BounceArea);
        }
        let n = layout.entries();
        let max_blocks = ring.max_blocks();
        let slot_bytes = area.bounce_len / u64::from(n) / bs64 * bs64;
        Ok(Self {
            ring,
            doorbell,
            area,
            block_size: bs,
            max_bytes: u64::from(max_blocks) * bs64,
            sectors,
            slot_bytes,
            slots: vec![None; n as usize],
            gens: vec![0; n as usize],
            free: (0..n).rev().collect(),
            reqs: BTreeMap::new(),
            next_key: 0,
            partial: None,
            broken: false,
            doorbell_due: false,
            stray: 0,
            doorbells: 0,
            scratch: Vec::new(),
        })
    }

    /// Completions that named no descriptor in flight (ignored).
    pub fn stray(&self) -> u64 {
        self.stray
    }

    /// Doorbells rung so far.
    pub fn doorbells(&self) -> u64 {
        self.doorbells
    }

    /// Whether the session is broken (every request fails).
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Descriptors in flight.
    pub fn pieces_in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Requests taken and not yet finished (reset ones included).
    pub fn requests(&self) -> usize {
        self.reqs.len()
    }

    /// The bounce area, to look at.
    pub fn bounce(&self) -> &B {
        &self.area.bounce
    }

    /// Whether `segs` can go to the service as they are: every segment on block
    /// boundaries inside guest RAM's part of the data area.
    fn direct(&self, segs: &[Segment]) -> bool {
        let bs = u64::from(self.block_size);
        segs.iter().all(|s| {
            s.gpa.is_multiple_of(bs)
                && u64::from(s.len).is_multiple_of(bs)
                && s.gpa
                    .checked_add(u64::from(s.len))
                    .is_some_and(|e| e <= self.area.ram_len)
        })
    }

    /// Sends what fits of request `key`: descriptors while tags and ring slots are
    /// free. Its outcome if it finished (it is then removed).
    fn feed(&mut self, key: u64, mem: &mut dyn GuestMemory) -> Option<(u32, Outcome, bool)> {
        let mut r = self.reqs.remove(&key)?;
        while !r.all_sent() && r.failed.is_none() {
            let Some(&slot) = self.free.last() else {
                break;
            };
            let (desc, piece) = match self.next_piece(&mut r, key, slot, mem) {
                Ok(p) => p,
                Err(fault) => {
                    r.failed = Some(fault);
                    break;
                }
            };
            if !self.ring.push(&desc) {
                // Only a service whose head is nonsense fills the ring before the tags
                // run out: wait (the piece is made again next time).
                self.undo_piece(&mut r, &piece);
                break;
            }
            self.free.pop();
            self.slots[slot as usize] = Some(piece);
            r.outstanding += 1;
        }
        if r.finished() {
            if self.partial == Some(key) {
                self.partial = None;
            }
            return Some((r.id, r.outcome(), r.orphan));
        }
        self.partial = (!r.all_sent() && r.failed.is_none()).then_some(key);
        self.reqs.insert(key, r);
        None
    }

    /// The next descriptor of `r`, its data copied into `slot`'s bounce buffer if it
    /// is a bounced write; `r`'s cursor moves past it.
    fn next_piece(
        &mut self,
        r: &mut Req,
        key: u64,
        slot: u32,
        mem: &mut dyn GuestMemory,
    ) -> Result<(Descriptor, Piece), Outcome> {
        let tag = slot | self.gens[slot as usize] << SLOT_BITS;
        let bs = u64::from(self.block_size);
        if r.op == IoOp::Flush {
            r.flush_sent = true;
            let piece = Piece {
                req: key,
                blocks: 0,
                off: 0,
                len: 0,
                bounce: false,
            };
            return Ok((Descriptor::new(tag, Op::Flush, 0, 0, 0), piece));
        }
        let off = r.sent;
        let (buf, len) = if r.bounce {
            let len = (r.total - off).min(self.slot_bytes).min(self.max_bytes);
            (
                self.area.bounce_base + u64::from(slot) * self.slot_bytes,
                len,
            )
        } else {
            // A run of segments contiguous in guest memory.
            let start = r.segs[r.seg].gpa + r.seg_off;
            let mut len = 0u64;
            let (mut i, mut at) = (r.seg, r.seg_off);
            while i < r.segs.len() && len < self.max_bytes {
                let s = r.segs[i];
                if s.gpa + at != start + len {
                    break;
                }
                let n = (u64::from(s.len) - at).min(self.max_bytes - len);
                len += n;
                at += n;
                if at == u64::from(s.len) {
                    i += 1;
                    at = 0;
                }
            }
            r.seg = i;
            r.seg_off = at;
            (start, len)
        };
        let piece = Piece {
            req: key,
            blocks: (len / bs) as u32,
            off,
            len,
            bounce: r.bounce,
        };
        r.sent += len;
        if r.bounce && r.op == IoOp::Write {
            self.copy_in(r, slot, off, len, mem)?;
        }
        let op = if r.op == IoOp::Read {
            Op::Read
        } else {
            Op::Write
        };
        let block = r.block + off / bs;
        Ok((Descriptor::new(tag, op, block, piece.blocks, buf), piece))
    }

    /// Puts `r`'s cursor back before `piece` (it did not go out).
    fn undo_piece(&mut self, r: &mut Req, piece: &Piece) {
        match r.op {
            IoOp::Flush => r.flush_sent = false,
            _ => {
                r.sent = piece.off;
                if !r.bounce {
                    // Find the segment and offset of `piece.off` again.
                    let mut at = 0u64;
                    r.seg = r.segs.len();
                    r.seg_off = 0;
                    for (i, s) in r.segs.iter().enumerate() {
                        let l = u64::from(s.len);
                        if piece.off < at + l {
                            r.seg = i;
                            r.seg_off = piece.off - at;
                            break;
                        }
                        at += l;
                    }
                }
            }
        }
    }

    /// Calls `f(gpa, at, n)` for the guest memory behind bytes `off .. off + len` of
    /// `segs`' data (`at` counts from `off`).
    fn walk(
        segs: &[Segment],
        off: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), Outcome>,
    ) -> Result<(), Outcome> {
        let (mut pos, mut done) = (0u64, 0u64);
        for s in segs {
            let l = u64::from(s.len);
            let (lo, hi) = (pos.max(off), (pos + l).min(off + len));
            if lo < hi {
                f(s.gpa + (lo - pos), lo - off, hi - lo)?;
                done += hi - lo;
            }
            pos += l;
            if done == len {
                break;
            }
        }
        Ok(())
    }

    /// Copies request bytes `off .. off + len` from the guest into `slot`'s bounce
    /// buffer.
    fn copy_in(
        &mut self,
        r: &Req,
        slot: u32,
        off: u64,
        len: u64,
        mem: &mut dyn GuestMemory,
    ) -> Result<(), Outcome> {
        let base = u64::from(slot) * self.slot_bytes;
        let mut buf = core::mem::take(&mut self.scratch);
        buf.resize(COPY_CHUNK, 0);
        let bounce = &mut self.area.bounce;
        let res = Self::walk(&r.segs, off, len, |gpa, at, n| {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(COPY_CHUNK as u64) as usize;
                mem.read(gpa + done, &mut buf[..k])
                    .map_err(|e| Outcome::Fault(e.gpa))?;
                bounce
                    .write(base + at + done, &buf[..k])
                    .map_err(|_| Outcome::IoErr)?;
                done += k as u64;
            }
            Ok(())
        });
        self.scratch = buf;
        res
    }

    /// Copies `slot`'s bounce buffer into the guest as request bytes `off .. off + len`.
    fn copy_out(
        &mut self,
        r: &Req,
        slot: u32,
        off: u64,
        len: u64,
        mem: &mut dyn GuestMemory,
    ) -> Result<(), Outcome> {
        let base = u64::from(slot) * self.slot_bytes;
        let mut buf = core::mem::take(&mut self.scratch);
        buf.resize(COPY_CHUNK, 0);
        let bounce = &mut self.area.bounce;
        let res = Self::walk(&r.segs, off, len, |gpa, at, n| {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(COPY_CHUNK as u64) as usize;
                bounce
                    .read(base + at + done, &mut buf[..k])
                    .map_err(|_| Outcome::IoErr)?;
                mem.write(gpa + done, &buf[..k])
                    .map_err(|e| Outcome::Fault(e.gpa))?;
                done += k as u64;
            }
            Ok(())
        });
        self.scratch = buf;
        res
    }

    /// Handles one completion.
    fn on_completion(
        &mut self,
        tag: u32,
        status: Status,
        blocks: u32,
        mem: &mut dyn GuestMemory,
        done: &mut Vec<(u32, Outcome)>,
    ) {
        let slot = tag & SLOT_MASK;
        let gen = tag >> SLOT_BITS;
        let live = self
            .slots
            .get(slot as usize)
            .is_some_and(|p| p.is_some() && self.gens[slot as usize] == gen);
        if !live {
            self.stray += 1;
            return;
        }
        let Some(piece) = self.slots[slot as usize].take() else {
            return;
        };
        let Some(mut r) = self.reqs.remove(&piece.req) else {
            // Cannot happen: a piece's request stays until its last piece is back.
            self.release(slot);
            return;
        };
        r.outstanding -= 1;
        let ok = status == Status::Ok && blocks == piece.blocks;
        if !ok {
            if r.failed.is_none() {
                r.failed = Some(Outcome::IoErr);
            }
        } else if piece.bounce && r.op == IoOp::Read && r.failed.is_none() && !r.orphan {
            if let Err(e) = self.copy_out(&r, slot, piece.off, piece.len, mem) {
                r.failed = Some(e);
            }
        }
        self.release(slot);
        if r.finished() {
            if self.partial == Some(piece.req) {
                self.partial = None;
            }
            if !r.orphan {
                done.push((r.id, r.outcome()));
            }
        } else {
            self.reqs.insert(piece.req, r);
        }
    }

    /// Frees `slot` for a new piece, under a new generation.
    fn release(&mut self, slot: u32) {
        self.gens[slot as usize] = (self.gens[slot as usize] + 1) & GEN_MASK;
        self.free.push(slot);
    }

    /// The session is broken: every request fails now, and later ones at once.
    fn break_session(&mut self, done: &mut Vec<(u32, Outcome)>) {
        self.broken = true;
        self.partial = None;
        for r in core::mem::take(&mut self.reqs).into_values() {
            if !r.orphan {
                done.push((r.id, Outcome::IoErr));
            }
        }
        for slot in 0..self.slots.len() as u32 {
            if self.slots[slot as usize].take().is_some() {
                self.release(slot);
            }
        }
    }
}

impl<M, D, B> AsyncBlockBackend for SessionBackend<'_, M, D, B>
where
    M: SharedMem + ?Sized + Sync,
    D: Doorbell,
    B: GuestMemory + Send,
{
    fn capacity(&self) -> u64 {
        self.sectors
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn submit(&mut self, id: u32, io: &BlockIo<'_>, mem: &mut dyn GuestMemory) -> Submit {
        if self.broken {
            return Submit::Done(Outcome::IoErr);
        }
        if self.partial.is_some() || self.free.is_empty() {
            return Submit::Busy;
        }
        let bs = u64::from(self.block_size);
        let total = io.len();
        let start = io.sector.checked_mul(SECTOR_SIZE);
        let in_range = start.is_some_and(|s| {
            s.is_multiple_of(bs)
                && total.is_multiple_of(bs)
                && s.checked_add(total)
                    .is_some_and(|e| e <= self.sectors * SECTOR_SIZE)
        });
        if io.op != IoOp::Flush && (!in_range || total == 0) {
            return Submit::Done(Outcome::IoErr);
        }
        let bounce = io.op != IoOp::Flush && !self.direct(io.segs);
        if bounce && self.slot_bytes == 0 {
            return Submit::Done(Outcome::IoErr);
        }
        let key = self.next_key;
        self.next_key += 1;
        self.reqs.insert(
            key,
            Req {
                id,
                op: io.op,
                block: start.unwrap_or(0) / bs,
                segs: io.segs.to_vec(),
                total,
                sent: 0,
                seg: 0,
                seg_off: 0,
                flush_sent: false,
                bounce,
                outstanding: 0,
                failed: None,
                orphan: false,
            },
        );
        match self.feed(key, mem) {
            Some((_, outcome, _)) => Submit::Done(outcome),
            None => Submit::Queued,
        }
    }

    fn kick(&mut self) {
        if self.broken {
            return;
        }
        let due = core::mem::take(&mut self.doorbell_due);
        if self.ring.publish() != 0 || due {
            self.doorbells += 1;
            self.doorbell.ring_doorbell();
        }
    }

    fn poll(&mut self, mem: &mut dyn GuestMemory, done: &mut Vec<(u32, Outcome)>) {
        if self.broken {
            return;
        }
        let mut reaped = false;
        // At most a ring's worth: a service that keeps moving its tail cannot hold us.
        for _ in 0..self.slots.len() {
            match self.ring.pop_completion() {
                Err(_) => {
                    self.break_session(done);
                    return;
                }
                Ok(None) => break,
                Ok(Some(c)) => {
                    reaped = true;
                    self.on_completion(c.tag, c.status, c.blocks, mem, done);
                }
            }
        }
        if let Some(key) = self.partial {
            if let Some((id, outcome, orphan)) = self.feed(key, mem) {
                if !orphan {
                    done.push((id, outcome));
                }
            }
        }
        // The service stops taking descriptors when completion slots run out; having
        // freed some, tell it to look again.
        if reaped && self.ring.needs_doorbell() {
            self.doorbell_due = true;
        }
    }

    fn reset(&mut self) {
        self.partial = None;
        let keys: Vec<u64> = self.reqs.keys().copied().collect();
        for k in keys {
            let Some(r) = self.reqs.get_mut(&k) else {
                continue;
            };
            r.orphan = true;
            r.failed.get_or_insert(Outcome::IoErr);
            if r.outstanding == 0 {
                self.reqs.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests;
