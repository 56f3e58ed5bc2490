//! The controller driver: bring-up, Identify, I/O queue pairs and synchronous
//! read/write/flush, over the injected [`Mmio`], [`Dma`] and [`Clock`].

use alloc::vec::Vec;

use crate::cmd::{self, Command, IdentifyController, IdentifyNamespace, IDENTIFY_SIZE};
use crate::queue::{Completion, Polled, QueuePair};
use crate::regs::{self, Cap};
use crate::{prp, Clock, DeviceError, Dma, Error, Mmio, Unsupported, Wait, PAGE_SIZE};

/// The largest logical block accepted (64 KiB), in pages.
const MAX_BLOCK_PAGES: usize = 16;

/// The largest transfer per command the driver ever sets up (32 MiB), in pages.
pub const MAX_TRANSFER_PAGES: usize = 8192;

/// Driver settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Admin queue entries (capped by CAP.MQES).
    pub admin_entries: u16,
    /// Deadline for one command, in milliseconds.
    pub command_timeout_ms: u64,
    /// The largest transfer one command carries, in pages (capped by MDTS and
    /// [`MAX_TRANSFER_PAGES`]); larger reads and writes are split.
    pub max_transfer_pages: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            admin_entries: 32,
            command_timeout_ms: 5_000,
            max_transfer_pages: 256,
        }
    }
}

/// A namespace as the I/O helpers need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
}

struct IoQueue<R> {
    qp: QueuePair<R>,
    /// PRP list pages for the synchronous helpers (one command at a time).
    prp_list: R,
}

/// An NVMe controller.
///
/// Queue id 0 is the admin queue; I/O queue pairs get ids from 1. The synchronous
/// helpers ([`Controller::read`], [`Controller::write`], [`Controller::flush`],
/// Identify, queue management) submit one command and poll for it with
/// [`Config::command_timeout_ms`]; [`Controller::submit`] and
/// [`Controller::poll_completions`] are the asynchronous path (an interrupt handler
/// calls the latter), where the caller builds the command and its PRPs.
///
/// After [`Error::Timeout`] or [`Error::Fatal`] the device may still write to the
/// buffers and queues of the commands involved: reset it ([`Controller::init`]) before
/// reusing or freeing that memory.
pub struct Controller<M: Mmio, D: Dma, C: Clock> {
    mmio: M,
    dma: D,
    clock: C,
    config: Config,
    cap: Cap,
    stride: usize,
    admin: Option<QueuePair<D::Region>>,
    /// I/O queue `qid` at index `qid - 1`.
    io: Vec<Option<IoQueue<D::Region>>>,
    scratch: Option<D::Region>,
    max_transfer_pages: usize,
    queues_granted: u16,
}

impl<M: Mmio, D: Dma, C: Clock> Controller<M, D, C> {
    /// A driver for the controller behind `mmio`; nothing is touched until
    /// [`Controller::init`].
    pub fn new(mmio: M, dma: D, clock: C, config: Config) -> Self {
        Controller {
            mmio,
            dma,
            clock,
            config,
            cap: Cap(0),
            stride: 4,
            admin: None,
            io: Vec::new(),
            scratch: None,
            max_transfer_pages: config.max_transfer_pages.clamp(1, MAX_TRANSFER_PAGES),
            queues_granted: 0,
        }
    }

    pub fn mmio(&self) -> &M {
        &self.mmio
    }
    pub fn dma(&self) -> &D {
        &self.dma
    }
    pub fn clock(&self) -> &C {
        &self.clock
    }
    /// The capabilities read by `init`.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// The largest transfer one command carries, in pages.
    pub fn max_transfer_pages(&self) -> usize {
        self.max_transfer_pages
    }

    /// Resets and enables the controller with fresh admin queues: reads CAP, clears
    /// CC.EN and waits for !RDY, programs AQA/ASQ/ACQ, sets CC.EN and waits for RDY (a
    /// set CSTS.CFS is [`Error::Fatal`]). Drops the old queues once the controller is
    /// disabled (not before: until then the device may still write to them); if it
    /// cannot be disabled they are kept.
    pub fn init(&mut self) -> Result<(), Error> {
        let cap = Cap(self.mmio.read64(regs::CAP));
        if cap.0 == u64::MAX {
            return Err(Error::Gone);
        }
        if !cap.supports_nvm() {
            return Err(Error::Unsupported(Unsupported::NvmCommandSet));
        }
        if cap.page_size_min() > PAGE_SIZE {
            return Err(Error::Unsupported(Unsupported::PageSize));
        }
        self.cap = cap;
        self.stride = cap.doorbell_stride();
        regs::disable(&self.mmio, &self.clock, cap)?;
        self.admin = None;
        self.io.clear();
        self.queues_granted = 0;
        let entries =
            (self.config.admin_entries as u32).clamp(2, cap.max_queue_entries().min(4096));
        let admin = QueuePair::new(&self.dma, 0, entries as u16)?;
        let asq = self.dma.iova(admin.sq(), 0);
        let acq = self.dma.iova(admin.cq(), 0);
        regs::enable(&self.mmio, &self.clock, cap, admin.entries(), asq, acq)?;
        self.admin = Some(admin);
        if self.scratch.is_none() {
            self.scratch = Some(self.dma.alloc(IDENTIFY_SIZE)?);
        }
        Ok(())
    }

    fn queue(&mut self, qid: u16) -> Result<&mut QueuePair<D::Region>, Error> {
        if qid == 0 {
            return self.admin.as_mut().ok_or(Error::NotReady);
        }
        match self.io.get_mut(qid as usize - 1) {
            Some(Some(q)) => Ok(&mut q.qp),
            _ => Err(Error::InvalidArgument),
        }
    }

    /// Submits `cmd` on queue `qid` (0: admin) and rings the SQ tail doorbell; returns
    /// the command id.
    pub fn submit(&mut self, qid: u16, cmd: Command) -> Result<u16, Error> {
        let stride = self.stride;
        let dma = &self.dma;
        let q = match qid {
            0 => self.admin.as_mut().ok_or(Error::NotReady)?,
            _ => match self.io.get_mut(qid as usize - 1) {
                Some(Some(q)) => &mut q.qp,
                _ => return Err(Error::InvalidArgument),
            },
        };
        let (cid, tail) = q.submit(dma, cmd)?;
        self.mmio
            .write32(regs::sq_tail_doorbell(qid, stride), tail as u32);
        Ok(cid)
    }

    /// Consumes every new completion on queue `qid` and rings the CQ head doorbell;
    /// returns how many commands completed (their completions wait in
    /// [`Controller::take_completion`]). An invalid entry is consumed and reported.
    pub fn poll_completions(&mut self, qid: u16) -> Result<usize, Error> {
        let stride = self.stride;
        let dma = &self.dma;
        let q = match qid {
            0 => self.admin.as_mut().ok_or(Error::NotReady)?,
            _ => match self.io.get_mut(qid as usize - 1) {
                Some(Some(q)) => &mut q.qp,
                _ => return Err(Error::InvalidArgument),
            },
        };
        let head = q.cq_head();
        let mut done = 0;
        // At most one queue's worth per call, so a device that keeps flipping phases
        // cannot keep the caller here.
        let mut result = Ok(());
        for _ in 0..q.entries() {
            match q.poll(dma) {
                Ok(Polled::Empty) => break,
                Ok(Polled::Completed(_)) => done += 1,
                Ok(Polled::Late(_)) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if q.cq_head() != head {
            self.mmio
                .write32(regs::cq_head_doorbell(qid, stride), q.cq_head() as u32);
        }
        result.map(|()| done)
    }

    /// Gives up on command `cid` of queue `qid` (it timed out): its id becomes free once
    /// the device answers it, and a late completion is dropped. The device may still
    /// use the command's buffers until it is reset.
    pub fn abandon(&mut self, qid: u16, cid: u16) {
        if let Ok(q) = self.queue(qid) {
            q.abandon(cid);
        }
    }

    /// Takes command `cid`'s completion on queue `qid`, if it arrived.
    pub fn take_completion(&mut self, qid: u16, cid: u16) -> Option<Completion> {
        self.queue(qid).ok()?.take(cid)
    }

    /// Polls queue `qid` until command `cid` completes or `timeout_ms` passes (then
    /// the command is abandoned: [`Error::Timeout`], or [`Error::Fatal`]/[`Error::Gone`]
    /// if the controller failed). Does not check the completion's status.
    pub fn wait(&mut self, qid: u16, cid: u16, timeout_ms: u64) -> Result<Completion, Error> {
        let start = self.clock.now_ms();
        let mut turns = 0u32;
        loop {
            if let Some(c) = self.take_completion(qid, cid) {
                return Ok(c);
            }
            if let Err(e) = self.poll_completions(qid) {
                self.queue(qid)?.abandon(cid);
                return Err(e);
            }
            if let Some(c) = self.take_completion(qid, cid) {
                return Ok(c);
            }
            turns = turns.wrapping_add(1);
            // A failed controller completes nothing: look at CSTS now and then rather
            // than waiting out the whole deadline.
            if turns.is_multiple_of(64) {
                if let Err(e) = self.check_status() {
                    self.queue(qid)?.abandon(cid);
                    return Err(e);
                }
            }
            if self.clock.now_ms().saturating_sub(start) > timeout_ms {
                self.queue(qid)?.abandon(cid);
                self.check_status()?;
                return Err(Error::Timeout(Wait::Command { qid, cid }));
            }
            self.clock.relax();
        }
    }

    /// [`Error::Gone`] if the registers read all ones, [`Error::Fatal`] if CSTS.CFS is set.
    pub fn check_status(&self) -> Result<(), Error> {
        if regs::read_csts(&self.mmio)? & regs::csts::CFS != 0 {
            return Err(Error::Fatal);
        }
        Ok(())
    }

    /// Submits `cmd` on `qid` and waits for it; DW0 on success.
    pub fn execute(&mut self, qid: u16, cmd: Command) -> Result<u32, Error> {
        let cid = self.submit(qid, cmd)?;
        self.wait(qid, cid, self.config.command_timeout_ms)?
            .result()
    }

    fn identify(&mut self, cmd: impl FnOnce(u64) -> Command) -> Result<[u8; IDENTIFY_SIZE], Error> {
        let scratch = self.scratch.as_ref().ok_or(Error::NotReady)?;
        self.dma.write(scratch, 0, &[0; IDENTIFY_SIZE]);
        let addr = self.dma.iova(scratch, 0);
        self.execute(0, cmd(addr))?;
        let mut out = [0; IDENTIFY_SIZE];
        let scratch = self.scratch.as_ref().ok_or(Error::NotReady)?;
        self.dma.read(scratch, 0, &mut out);
        Ok(out)
    }

    /// Identify Controller; also applies MDTS to the transfer limit.
    pub fn identify_controller(&mut self) -> Result<IdentifyController, Error> {
        let data = self.identify(cmd::identify_controller)?;
        let id = IdentifyController::parse(&data)?;
        if let Some(bytes) = id.max_transfer(self.cap.page_size_min()) {
            let pages = (bytes / PAGE_SIZE).max(1);
            self.max_transfer_pages = self.max_transfer_pages.min(pages);
        }
        Ok(id)
    }

    /// Identify Namespace `nsid`.
    pub fn identify_namespace(&mut self, nsid: u32) -> Result<Namespace, Error> {
        if nsid == 0 || nsid == u32::MAX {
            return Err(Error::InvalidArgument);
        }
        let data = self.identify(|addr| cmd::identify_namespace(nsid, addr))?;
        let ns = IdentifyNamespace::parse(&data)?;
        Ok(Namespace {
            nsid,
            block_size: ns.lba_size,
            blocks: ns.nsze,
        })
    }

    /// Set Features (Number of Queues): asks for `n` I/O queue pairs, returns how many
    /// the controller granted (at most `n` are used).
    pub fn set_queue_count(&mut self, n: u16) -> Result<u16, Error> {
        if n == 0 || n == u16::MAX {
            return Err(Error::InvalidArgument);
        }
        let dw0 = self.execute(0, cmd::set_number_of_queues(n, n))?;
        let (sqs, cqs) = cmd::queues_granted(dw0);
        let granted = sqs.min(cqs).min(n as u32) as u16;
        if granted == 0 {
            return Err(Error::Device(DeviceError::NoQueuesGranted));
        }
        self.queues_granted = granted;
        Ok(granted)
    }

    /// Creates an I/O queue pair of `entries` entries (capped by CAP.MQES) with the
    /// lowest free queue id (within what [`Controller::set_queue_count`] granted, if it
    /// was called); with `vector` its completions raise that interrupt vector,
    /// otherwise it is polled. Returns the queue id.
    pub fn create_io_queue_pair(
        &mut self,
        entries: u16,
        vector: Option<u16>,
    ) -> Result<u16, Error> {
        if self.admin.is_none() {
            return Err(Error::NotReady);
        }
        let index = self
            .io
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.io.len());
        let qid = u16::try_from(index + 1).map_err(|_| Error::InvalidArgument)?;
        if self.queues_granted != 0 && qid > self.queues_granted {
            return Err(Error::InvalidArgument);
        }
        let entries = (entries as u32).clamp(2, self.cap.max_queue_entries().min(4096)) as u16;
        let qp = QueuePair::new(&self.dma, qid, entries)?;
        // A transfer touches one page more than it fills when it starts mid-page; one
        // block (up to 64 KiB) always goes, whatever the limit.
        let pages = self.max_transfer_pages.max(MAX_BLOCK_PAGES) + 1;
        let list_pages = prp::list_pages_needed(pages).max(1);
        let prp_list = self.dma.alloc(list_pages * PAGE_SIZE)?;
        let cq_addr = self.dma.iova(qp.cq(), 0);
        let sq_addr = self.dma.iova(qp.sq(), 0);
        self.execute(0, cmd::create_io_cq(qid, entries, cq_addr, vector))?;
        if let Err(e) = self.execute(0, cmd::create_io_sq(qid, entries, sq_addr, qid)) {
            // Best effort: the CQ is no use without its SQ.
            let _ = self.execute(0, cmd::delete_io_cq(qid));
            return Err(e);
        }
        if index == self.io.len() {
            self.io.push(None);
        }
        self.io[index] = Some(IoQueue { qp, prp_list });
        Ok(qid)
    }

    /// Deletes I/O queue pair `qid`: the SQ first (which aborts its outstanding
    /// commands), then the CQ. If the SQ deletion fails the pair is kept (the device may
    /// still use its memory) and the error returned; once the SQ is gone the pair is
    /// forgotten even if the CQ deletion fails (nothing completes into it any more).
    pub fn delete_io_queue_pair(&mut self, qid: u16) -> Result<(), Error> {
        if qid == 0 || !matches!(self.io.get(qid as usize - 1), Some(Some(_))) {
            return Err(Error::InvalidArgument);
        }
        self.execute(0, cmd::delete_io_sq(qid))?;
        let cq = self.execute(0, cmd::delete_io_cq(qid));
        self.io[qid as usize - 1] = None;
        cq.map(|_| ())
    }

    fn transfer(
        &mut self,
        qid: u16,
        write: bool,
        ns: &Namespace,
        mut lba: u64,
        buf: &D::Region,
        span: core::ops::Range<usize>,
    ) -> Result<(), Error> {
        let (mut offset, len) = (span.start, span.len());
        let block = ns.block_size as usize;
        if qid == 0
            || block == 0
            || !len.is_multiple_of(block)
            || !offset.is_multiple_of(4)
            || span.end < span.start
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.dma.len(buf))
        {
            return Err(Error::InvalidArgument);
        }
        // Whole blocks per command, within the transfer limit (MDTS counts bytes) and
        // NLB's 16 bits; at least one block.
        let per_cmd = (self.max_transfer_pages * PAGE_SIZE / block).clamp(1, 0xffff);
        let mut left = len / block;
        let mut pages = Vec::new();
        while left > 0 {
            let blocks = left.min(per_cmd);
            let bytes = blocks * block;
            pages.clear();
            pages.push(self.dma.iova(buf, offset));
            let first_end = (offset / PAGE_SIZE + 1) * PAGE_SIZE;
            let mut at = first_end;
            while at < offset + bytes {
                pages.push(self.dma.iova(buf, at));
                at += PAGE_SIZE;
            }
            let q = match self.io.get(qid as usize - 1) {
                Some(Some(q)) => q,
                _ => return Err(Error::InvalidArgument),
            };
            let list_len = self.dma.len(&q.prp_list);
            let list_pages: Vec<u64> = (0..list_len / PAGE_SIZE)
                .map(|i| self.dma.iova(&q.prp_list, i * PAGE_SIZE))
                .collect();
            let prps = prp::build(&pages, bytes, &list_pages)?;
            for (i, chunk) in prps.list.chunks(prp::ENTRIES_PER_LIST_PAGE).enumerate() {
                let mut raw = Vec::with_capacity(chunk.len() * 8);
                for e in chunk {
                    raw.extend_from_slice(&e.to_le_bytes());
                }
                self.dma.write(&q.prp_list, i * PAGE_SIZE, &raw);
            }
            let build = if write { cmd::write } else { cmd::read };
            self.execute(
                qid,
                build(ns.nsid, lba, blocks as u16, prps.prp1, prps.prp2),
            )?;
            left -= blocks;
            lba += blocks as u64;
            offset += bytes;
        }
        Ok(())
    }

    /// Reads `len` bytes (whole blocks) from namespace `ns` at `lba` into `buf` at
    /// `offset` (dword aligned), on I/O queue `qid`; large reads are split.
    pub fn read(
        &mut self,
        qid: u16,
        ns: &Namespace,
        lba: u64,
        buf: &D::Region,
        offset: usize,
        len: usize,
    ) -> Result<(), Error> {
        self.transfer(qid, false, ns, lba, buf, offset..offset.saturating_add(len))
    }

    /// Writes `len` bytes (whole blocks) from `buf` at `offset` to namespace `ns` at
    /// `lba`, on I/O queue `qid`; large writes are split.
    pub fn write(
        &mut self,
        qid: u16,
        ns: &Namespace,
        lba: u64,
        buf: &D::Region,
        offset: usize,
        len: usize,
    ) -> Result<(), Error> {
        self.transfer(qid, true, ns, lba, buf, offset..offset.saturating_add(len))
    }

    /// Flushes namespace `nsid` on I/O queue `qid`.
    pub fn flush(&mut self, qid: u16, nsid: u32) -> Result<(), Error> {
        if qid == 0 {
            return Err(Error::InvalidArgument);
        }
        self.execute(qid, cmd::flush(nsid)).map(|_| ())
    }

    /// Normal shutdown (CC.SHN), waiting up to CAP.TO for it to complete.
    pub fn shutdown(&mut self) -> Result<(), Error> {
        regs::shutdown(&self.mmio, &self.clock, self.cap.timeout_ms())
    }
}
