//! The disk service: sessions (`peregrine-blkproto`) on the NVMe namespace, each bound
//! by the root to one partition or range, served from one loop.
//!
//! One semaphore wakes the loop: the controller's MSI-X interrupt, every session's
//! doorbell and the root's "new session" all `up` it. Each turn the loop
//! 1. opens sessions the root set up and closes those it asks to close (once nothing of
//!    theirs is in flight);
//! 2. takes the controller's completions and answers their requests;
//! 3. fails everything in flight with IOERR when the controller stops answering (a
//!    command past its deadline, CSTS.CFS, registers reading all ones) — from then on
//!    every request gets IOERR, nothing hangs;
//! 4. takes new requests from every session's ring (validated by the ring: a session
//!    reaches its own blocks and its own data area, nothing else) and submits them, as
//!    many as the queue has room for — several per session in flight, no round trip
//!    per block;
//! 5. publishes each session's completions and signals it once per batch.
//!
//! Data moves by DMA straight between the disk and the session's data area (the VMM's
//! guest RAM); the service translates buffer offsets to physical addresses through
//! the runs it learnt with `lookup` when it opened the session.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use nul_rt::blk::{self, SessionSlot, MAX_SESSIONS};
use nul_rt::{hc, println};
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, PAGE_BITS};
use peregrine_blkproto::gpt::{BlockRead, IoError};
use peregrine_blkproto::{
    merge, Binding, Bounds, Layout, Op, Partition, Request, Runs, ServiceRing, SessionLimits,
    Status,
};
use peregrine_nvme::controller::{Controller, Namespace};
use peregrine_nvme::{cmd, prp, Dma};

use crate::hw::{Bar0, DmaPool, Region, TscClock};

/// The controller as the service drives it.
pub type Nvme = Controller<Bar0, DmaPool, TscClock>;

/// Commands in flight at most (the I/O queue has one entry more).
pub const QUEUE_DEPTH: usize = 63;
/// Milliseconds a command may take before the controller counts as stopped.
const COMMAND_DEADLINE_MS: u64 = 5_000;
/// The most bytes one request (and one command) moves (one PRP list page covers it).
const MAX_TRANSFER: u64 = 512 * 1024;
/// Pages one command's PRPs name at most: the first and one list page's entries.
const MAX_PAGES: usize = 1 + 511;
/// Whether consecutive requests join into one command (`blkproto::merge`).
const MERGE: bool = true;
/// Requests a session may have taken from its ring and not yet submitted.
const BACKLOG: usize = 512;

/// The disk: the controller, its I/O queue and namespace, and the GPT's partitions.
pub struct Disk {
    /// The controller.
    pub c: Nvme,
    /// The I/O queue.
    pub qid: u16,
    /// Namespace 1.
    pub ns: Namespace,
    /// The partitions (empty without a GPT).
    pub parts: Vec<Partition>,
}

/// Reads the disk through the controller for the GPT parser (synchronously, before
/// any session is served).
pub struct Reader<'a> {
    /// The disk.
    pub disk: &'a mut Nvme,
    /// Its I/O queue.
    pub qid: u16,
    /// Its namespace.
    pub ns: Namespace,
    /// A bounce buffer of [`Reader::BOUNCE`] bytes.
    pub bounce: &'a Region,
}

impl Reader<'_> {
    /// Bytes of the bounce buffer.
    pub const BOUNCE: usize = 64 * 1024;
}

impl BlockRead for Reader<'_> {
    fn block_size(&self) -> u32 {
        self.ns.block_size
    }
    fn blocks(&self) -> u64 {
        self.ns.blocks
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let bs = self.ns.block_size as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(Self::BOUNCE);
            if n % bs != 0 {
                return Err(IoError);
            }
            let at = lba + (done / bs) as u64;
            self.disk
                .read(self.qid, &self.ns, at, self.bounce, 0, n)
                .map_err(|_| IoError)?;
            self.disk
                .dma()
                .read(self.bounce, 0, &mut buf[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

/// An open session.
struct Session {
    ring: ServiceRing<'static, [AtomicU32]>,
    /// Requests taken from the ring, not yet submitted.
    backlog: VecDeque<Request>,
    runs: Runs,
    completion: u64,
    client: u64,
    closing: bool,
    signal: bool,
    broken_reported: bool,
}

/// A command in flight.
#[derive(Debug, Clone)]
struct InFlight {
    session: usize,
    /// The requests the command answers: tag and blocks.
    members: Vec<(u32, u32)>,
    list: usize,
    since_ms: u64,
}

/// The service's state.
pub struct Service {
    disk: Disk,
    wake: u64,
    poll: bool,
    sessions: [Option<Session>; MAX_SESSIONS],
    refused: [bool; MAX_SESSIONS],
    lists: Vec<Region>,
    free_lists: Vec<usize>,
    in_flight: BTreeMap<u16, InFlight>,
    failed: Option<&'static str>,
    khz: u64,
}

impl Service {
    /// A service on `disk`, woken by semaphore `wake` (`poll`: the controller raises no
    /// interrupts, so the loop looks at it every 100 µs while commands are in flight).
    pub fn new(disk: Disk, wake: u64, poll: bool, khz: u64) -> Result<Service, &'static str> {
        let mut lists = Vec::new();
        for _ in 0..QUEUE_DEPTH {
            lists.push(
                disk.c
                    .dma()
                    .alloc(4096)
                    .map_err(|_| "no DMA memory for PRP lists")?,
            );
        }
        Ok(Service {
            disk,
            wake,
            poll,
            sessions: [const { None }; MAX_SESSIONS],
            refused: [false; MAX_SESSIONS],
            lists,
            free_lists: (0..QUEUE_DEPTH).rev().collect(),
            in_flight: BTreeMap::new(),
            failed: None,
            khz: khz.max(1),
        })
    }

    fn now_ms(&self) -> u64 {
        hc::rdtsc() / self.khz
    }

    /// Serves for good.
    pub fn run(mut self) -> ! {
        // SAFETY: the root maps the sessions page for a `role=disk` component before it
        // starts it (the caller checked the role).
        let slots = unsafe { blk::sessions() };
        loop {
            let wait = if self.poll && !self.in_flight.is_empty() {
                self.khz / 10
            } else {
                self.khz * 50
            };
            let _ = hc::sm_down(self.wake, true, hc::rdtsc() + wait);
            self.sessions_page(slots);
            self.completions();
            self.deadlines();
            self.submissions();
            self.publish();
        }
    }

    /// Opens new sessions and closes those the root asks to close.
    fn sessions_page(&mut self, slots: &'static [SessionSlot; MAX_SESSIONS]) {
        for (i, s) in slots.iter().enumerate() {
            match s.state.load(Ordering::Acquire) {
                blk::SLOT_READY if self.sessions[i].is_none() && !self.refused[i] => {
                    match self.open(s) {
                        Ok(sess) => {
                            println!(
                                "disk: session {} for component {} open ({}: {} blocks)",
                                i,
                                sess.client,
                                s.binding(),
                                sess.ring.limits().blocks
                            );
                            self.sessions[i] = Some(sess);
                        }
                        Err(e) => {
                            println!("disk: session {} ({}) refused: {}", i, s.binding(), e);
                            self.refused[i] = true;
                        }
                    }
                }
                blk::SLOT_CLOSING => {
                    let busy = self.in_flight.values().any(|f| f.session == i);
                    // Its client is gone: what it queued and we did not start is dropped.
                    if let Some(sess) = self.sessions[i].as_mut() {
                        sess.backlog.clear();
                    }
                    if let Some(sess) = self.sessions[i].as_mut() {
                        sess.closing = true;
                    }
                    if !busy {
                        let was_open = self.sessions[i].take().is_some();
                        self.refused[i] = false;
                        // First the answer: the root waits for it in its service EC,
                        // which also serves this component's console.
                        s.state.store(blk::SLOT_CLOSED, Ordering::Release);
                        if was_open {
                            println!("disk: session {} closed", i);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Opens the session in slot `s`: resolves its binding, learns where its data area
    /// lies in physical memory, and initialises its ring.
    fn open(&self, s: &SessionSlot) -> Result<Session, &'static str> {
        let binding = Binding::parse(s.binding()).map_err(|_| "the binding does not parse")?;
        if binding.disk != 0 {
            return Err("no such disk");
        }
        let bounds: Bounds = binding
            .resolve(&self.disk.parts, self.disk.ns.blocks)
            .map_err(|_| "the binding names nothing on the disk")?;
        let layout = Layout::new(s.entries as u32).ok_or("bad ring size")?;
        if (s.ring_bytes as usize) < layout.bytes() || s.ring & 0xfff != 0 {
            return Err("the ring region is too small");
        }
        let runs = data_runs(s.data, s.data_len).ok_or("the data area is not mapped")?;
        let bs = self.disk.ns.block_size;
        let max_bytes = MAX_TRANSFER.min(self.disk.c.max_transfer_pages() as u64 * 4096);
        let limits = SessionLimits::new(bounds, bs, s.data_len, (max_bytes / u64::from(bs)) as u32);
        // SAFETY: the root maps the ring region read-write at `ring` for as long as the
        // slot is not closed (it closes it through us before revoking); AtomicU32 words
        // are sound under a concurrent hostile writer.
        let mem: &'static [AtomicU32] = unsafe {
            core::slice::from_raw_parts(s.ring as *const AtomicU32, s.ring_bytes as usize / 4)
        };
        let ring = ServiceRing::new(mem, layout, limits).map_err(|_| "the ring is unusable")?;
        Ok(Session {
            ring,
            backlog: VecDeque::new(),
            runs,
            completion: s.completion_sel,
            client: s.client,
            closing: false,
            signal: false,
            broken_reported: false,
        })
    }

    /// Takes the controller's completions.
    fn completions(&mut self) {
        if self.in_flight.is_empty() || self.failed.is_some() {
            return;
        }
        if self.disk.c.poll_completions(self.disk.qid).is_err() {
            self.fail("the NVMe controller sent an invalid completion");
            return;
        }
        let cids: Vec<u16> = self.in_flight.keys().copied().collect();
        for cid in cids {
            let Some(c) = self.disk.c.take_completion(self.disk.qid, cid) else {
                continue;
            };
            let Some(f) = self.in_flight.remove(&cid) else {
                continue;
            };
            self.free_lists.push(f.list);
            let status = if c.status.is_success() {
                Status::Ok
            } else {
                println!(
                    "disk: command for session {} failed: {:?}",
                    f.session, c.status
                );
                Status::IoErr
            };
            for (tag, blocks) in f.members {
                self.answer(f.session, tag, status, blocks);
            }
        }
    }

    fn answer(&mut self, session: usize, tag: u32, status: Status, blocks: u32) {
        if let Some(s) = self.sessions[session].as_mut() {
            let _ = s.ring.complete(tag, status, blocks);
            s.signal = true;
        }
    }

    /// Stops trusting the controller: everything in flight fails with IOERR.
    fn fail(&mut self, why: &'static str) {
        if self.failed.is_none() {
            println!("disk: {}; every request now fails with an I/O error", why);
        }
        self.failed = Some(why);
        let all: Vec<(u16, InFlight)> = core::mem::take(&mut self.in_flight).into_iter().collect();
        for (cid, f) in all {
            self.disk.c.abandon(self.disk.qid, cid);
            for (tag, _) in f.members {
                self.answer(f.session, tag, Status::IoErr, 0);
            }
        }
    }

    /// A command past its deadline, or a controller that reports a fatal status.
    fn deadlines(&mut self) {
        if self.in_flight.is_empty() || self.failed.is_some() {
            return;
        }
        let now = self.now_ms();
        if self
            .in_flight
            .values()
            .any(|f| now.saturating_sub(f.since_ms) > COMMAND_DEADLINE_MS)
        {
            self.fail("the NVMe controller stopped answering (a command is 5 s old)");
        } else if self.disk.c.check_status().is_err() {
            self.fail("the NVMe controller failed (fatal status or gone)");
        }
    }

    /// Takes new requests from every session and submits them, joining consecutive
    /// ones into one command (`peregrine_blkproto::merge`).
    fn submissions(&mut self) {
        let max_bytes = MAX_TRANSFER.min(self.disk.c.max_transfer_pages() as u64 * 4096);
        for i in 0..MAX_SESSIONS {
            let Some(s) = self.sessions[i].as_mut() else {
                continue;
            };
            if s.closing {
                continue;
            }
            while s.backlog.len() < BACKLOG {
                match s.ring.next_request() {
                    Ok(Some(r)) => s.backlog.push_back(r),
                    Ok(None) => {
                        // Refused descriptors were answered by the ring itself.
                        if s.ring.rejected() != 0 {
                            s.signal = true;
                        }
                        break;
                    }
                    Err(e) => {
                        if !s.broken_reported {
                            println!("disk: session {} broken by its client: {:?}", i, e);
                            s.broken_reported = true;
                        }
                        break;
                    }
                }
            }
            if s.backlog.is_empty() {
                continue;
            }
            s.signal = true;
            if self.failed.is_some() {
                let tags: Vec<u32> = s.backlog.drain(..).map(|r| r.tag).collect();
                for t in tags {
                    self.answer(i, t, Status::IoErr, 0);
                }
                continue;
            }
            while !self.free_lists.is_empty() {
                let Some(s) = self.sessions[i].as_mut() else {
                    break;
                };
                match merge::take(
                    &mut s.backlog,
                    &s.runs,
                    if MERGE { max_bytes } else { 0 },
                    MAX_PAGES,
                ) {
                    None => break,
                    Some(Err(tag)) => self.answer(i, tag, Status::BadBuf, 0),
                    Some(Ok(c)) => {
                        if let Err(st) = self.submit(i, &c) {
                            for (tag, _) in c.members {
                                self.answer(i, tag, st, 0);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The NVMe command for `c`, its PRP list (if it needs one) in list page `list`.
    fn command(&self, c: &merge::Command, list: usize) -> Result<cmd::Command, Status> {
        let ns = self.disk.ns;
        if c.op == Op::Flush {
            return Ok(cmd::flush(ns.nsid));
        }
        let bytes = c.blocks as usize * ns.block_size as usize;
        let dma = self.disk.c.dma();
        let lp = [dma.iova(&self.lists[list], 0)];
        let prps = prp::build(&c.pages, bytes, &lp).map_err(|_| Status::IoErr)?;
        if !prps.list.is_empty() {
            let mut raw = Vec::with_capacity(prps.list.len() * 8);
            for e in &prps.list {
                raw.extend_from_slice(&e.to_le_bytes());
            }
            dma.write(&self.lists[list], 0, &raw);
        }
        let build = if c.op == Op::Read {
            cmd::read
        } else {
            cmd::write
        };
        let blocks = u16::try_from(c.blocks).map_err(|_| Status::IoErr)?;
        let command = build(ns.nsid, c.lba, blocks, prps.prp1, prps.prp2);
        Ok(if c.fua { command.with_fua() } else { command })
    }

    /// Builds and submits the NVMe command `c` for session `i`.
    fn submit(&mut self, i: usize, c: &merge::Command) -> Result<(), Status> {
        if c.op == Op::Discard {
            return Err(Status::Unsupported);
        }
        let Some(list) = self.free_lists.pop() else {
            return Err(Status::IoErr);
        };
        let command = match self.command(c, list) {
            Ok(command) => command,
            Err(st) => {
                self.free_lists.push(list);
                return Err(st);
            }
        };
        match self.disk.c.submit(self.disk.qid, command) {
            Ok(cid) => {
                let since_ms = self.now_ms();
                self.in_flight.insert(
                    cid,
                    InFlight {
                        session: i,
                        members: c.members.clone(),
                        list,
                        since_ms,
                    },
                );
                Ok(())
            }
            Err(_) => {
                self.free_lists.push(list);
                Err(Status::IoErr)
            }
        }
    }

    /// Publishes completions and signals each session that got some.
    fn publish(&mut self) {
        for s in self.sessions.iter_mut().flatten() {
            if !core::mem::take(&mut s.signal) {
                continue;
            }
            if let Ok(n) = s.ring.publish() {
                if n > 0 {
                    let _ = hc::sm_up(s.completion);
                }
            }
        }
    }
}

/// The physically contiguous runs of the data area mapped at `[addr, addr + len)`,
/// from the mapping nodes `lookup` names and their physical addresses.
fn data_runs(addr: u64, len: u64) -> Option<Runs> {
    let mut runs = Runs::new();
    let end = addr.checked_add(len)?;
    let mut at = addr;
    while at < end {
        let page = Crd::mem(at >> PAGE_BITS, 0, MemPerm::R);
        let node = hc::lookup(page).ok()?;
        if node.kind() == peregrine_abi::CrdKind::Null {
            return None;
        }
        let first = node.base() << PAGE_BITS;
        let size = 1u64 << (node.order() as u32 + PAGE_BITS);
        let stop = (first + size).min(end);
        runs.push(stop - at, hc::lookup_phys(page).ok()?);
        at = stop;
    }
    Some(runs)
}
