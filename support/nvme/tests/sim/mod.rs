//! A small simulated NVMe controller for the host tests: registers behind [`SimMmio`],
//! device memory shared with the driver's [`FakeDma`], admin commands (Identify, Set
//! Features Number of Queues, Create/Delete I/O queues) and NVM Read/Write/Flush on
//! namespace 1, backed by a `Vec<u8>`. Doorbell writes are processed at once.

#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use peregrine_nvme::cmd::{admin, io, Command, SQE_SIZE};
use peregrine_nvme::queue::{Completion, CQE_SIZE};
use peregrine_nvme::{regs, Clock, Dma, Error, Mmio, Status, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

/// Device memory: 4 KiB pages by device address.
#[derive(Default)]
pub struct Mem {
    pages: HashMap<u64, Box<[u8; PAGE_SIZE]>>,
    next: u64,
}

impl Mem {
    fn new_page(&mut self) -> u64 {
        let a = 0x10_0000 + self.next * P;
        self.next += 1;
        self.pages.insert(a, Box::new([0; PAGE_SIZE]));
        a
    }

    /// Device read of `out.len()` bytes at `addr`; false on unmapped memory.
    pub fn dev_read(&self, mut addr: u64, out: &mut [u8]) -> bool {
        let mut done = 0;
        while done < out.len() {
            let Some(page) = self.pages.get(&(addr & !(P - 1))) else {
                return false;
            };
            let off = (addr % P) as usize;
            let n = (PAGE_SIZE - off).min(out.len() - done);
            out[done..done + n].copy_from_slice(&page[off..off + n]);
            done += n;
            addr += n as u64;
        }
        true
    }

    /// Device write of `data` at `addr`; false on unmapped memory.
    pub fn dev_write(&mut self, mut addr: u64, data: &[u8]) -> bool {
        let mut done = 0;
        while done < data.len() {
            let Some(page) = self.pages.get_mut(&(addr & !(P - 1))) else {
                return false;
            };
            let off = (addr % P) as usize;
            let n = (PAGE_SIZE - off).min(data.len() - done);
            page[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
            addr += n as u64;
        }
        true
    }
}

/// One allocation: the device address of each page.
#[derive(Debug)]
pub struct Region {
    pages: Vec<u64>,
}

/// The driver's view of [`Mem`]. Allocations are followed by an unmapped hole, so an
/// overrun hits unmapped memory.
#[derive(Clone, Default)]
pub struct FakeDma(pub Rc<RefCell<Mem>>);

impl FakeDma {
    /// A buffer whose pages are scattered: in reverse order, one page apart.
    pub fn alloc_scattered(&self, len: usize) -> Region {
        let mut m = self.0.borrow_mut();
        let n = len.div_ceil(PAGE_SIZE).max(1);
        let mut pages: Vec<u64> = (0..2 * n).map(|_| m.new_page()).step_by(2).collect();
        pages.reverse();
        m.next += 1;
        Region { pages }
    }
}

impl Dma for FakeDma {
    type Region = Region;
    fn alloc(&self, len: usize) -> Result<Region, Error> {
        let mut m = self.0.borrow_mut();
        let pages = (0..len.div_ceil(PAGE_SIZE).max(1))
            .map(|_| m.new_page())
            .collect();
        m.next += 1;
        Ok(Region { pages })
    }
    fn len(&self, r: &Region) -> usize {
        r.pages.len() * PAGE_SIZE
    }
    fn iova(&self, r: &Region, off: usize) -> u64 {
        r.pages[off / PAGE_SIZE] + (off % PAGE_SIZE) as u64
    }
    fn read(&self, r: &Region, mut off: usize, out: &mut [u8]) {
        let m = self.0.borrow();
        let mut done = 0;
        while done < out.len() {
            let n = (PAGE_SIZE - off % PAGE_SIZE).min(out.len() - done);
            assert!(m.dev_read(self.iova(r, off), &mut out[done..done + n]));
            done += n;
            off += n;
        }
    }
    fn write(&self, r: &Region, mut off: usize, data: &[u8]) {
        let mut m = self.0.borrow_mut();
        let mut done = 0;
        while done < data.len() {
            let n = (PAGE_SIZE - off % PAGE_SIZE).min(data.len() - done);
            assert!(m.dev_write(self.iova(r, off), &data[done..done + n]));
            done += n;
            off += n;
        }
    }
}

/// A clock that advances 1 ms every time it is read.
#[derive(Default)]
pub struct FakeClock(pub Cell<u64>);

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        let t = self.0.get() + 1;
        self.0.set(t);
        t
    }
}

struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    cqid: u16,
}

struct Cq {
    base: u64,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
    vector: Option<u16>,
}

/// A hook that rewrites an I/O completion before it is posted.
pub type Corrupt = Box<dyn FnMut(&mut Completion)>;

/// What the simulated controller does wrong on purpose.
#[derive(Default)]
pub struct Faults {
    /// Never sets CSTS.RDY after CC.EN.
    pub never_ready: bool,
    /// Never clears CSTS.RDY after CC.EN is cleared.
    pub stuck_ready: bool,
    /// Sets CSTS.CFS instead of RDY on enable.
    pub fatal_on_enable: bool,
    /// Consumes I/O commands without completing them (kept in `dropped`).
    pub drop_io: bool,
    /// Applied to every I/O completion before it is posted.
    pub corrupt: Option<Corrupt>,
    /// Every register reads all ones.
    pub gone: bool,
    /// Delete I/O Submission Queue fails with Invalid Queue Identifier.
    pub refuse_delete_sq: bool,
}

/// The simulated controller's state.
pub struct Sim {
    pub mem: FakeDma,
    pub cap: u64,
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    asq: u64,
    acq: u64,
    sqs: HashMap<u16, Sq>,
    cqs: HashMap<u16, Cq>,
    pub disk: Vec<u8>,
    pub block: usize,
    pub max_queues: u16,
    pub mdts: u8,
    pub faults: Faults,
    /// I/O commands consumed but not completed (with their queue id).
    pub dropped: Vec<(u16, Command)>,
    pub io_commands: usize,
    pub flushes: usize,
    pub cq_wraps: usize,
}

/// The driver's register window onto a shared [`Sim`].
#[derive(Clone)]
pub struct SimMmio(pub Rc<RefCell<Sim>>);

impl Sim {
    /// A controller with MQES `mqes` (0-based), DSTRD `dstrd` and a disk of `blocks`
    /// 512-byte blocks.
    pub fn new(mem: FakeDma, mqes: u16, dstrd: u32, blocks: usize) -> Sim {
        Sim {
            mem,
            cap: mqes as u64 | (1 << 16) | (2 << 24) | ((dstrd as u64) << 32) | (1 << 37),
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: HashMap::new(),
            cqs: HashMap::new(),
            disk: vec![0; blocks * 512],
            block: 512,
            max_queues: 8,
            mdts: 0,
            faults: Faults::default(),
            dropped: Vec::new(),
            io_commands: 0,
            flushes: 0,
            cq_wraps: 0,
        }
    }

    fn stride(&self) -> usize {
        4 << ((self.cap >> 32) & 0xf)
    }

    /// Queue `qid`'s interrupt vector (None: polled), if the CQ exists.
    pub fn cq_vector(&self, qid: u16) -> Option<Option<u16>> {
        self.cqs.get(&qid).map(|c| c.vector)
    }

    pub fn has_queue(&self, qid: u16) -> bool {
        self.sqs.contains_key(&qid) && self.cqs.contains_key(&qid)
    }

    fn write_cc(&mut self, v: u32) {
        let was = self.cc & regs::cc::EN != 0;
        let now = v & regs::cc::EN != 0;
        self.cc = v;
        if was && !now {
            self.sqs.clear();
            self.cqs.clear();
            if !self.faults.stuck_ready {
                self.csts &= !(regs::csts::RDY | regs::csts::CFS);
            }
        } else if !was && now {
            if self.faults.fatal_on_enable {
                self.csts |= regs::csts::CFS;
                return;
            }
            if self.faults.never_ready {
                return;
            }
            let sq_entries = (self.aqa & 0xfff) as u16 + 1;
            let cq_entries = ((self.aqa >> 16) & 0xfff) as u16 + 1;
            let sq = Sq {
                base: self.asq,
                entries: sq_entries,
                head: 0,
                cqid: 0,
            };
            self.sqs.insert(0, sq);
            let cq = Cq {
                base: self.acq,
                entries: cq_entries,
                tail: 0,
                head: 0,
                phase: true,
                vector: Some(0),
            };
            self.cqs.insert(0, cq);
            self.csts |= regs::csts::RDY;
        }
        if v & regs::cc::SHN_MASK != 0 {
            self.csts = (self.csts & !regs::csts::SHST_MASK) | regs::csts::SHST_COMPLETE;
        }
    }

    fn doorbell(&mut self, index: usize, value: u32) {
        let qid = (index / 2) as u16;
        if index % 2 == 1 {
            if let Some(cq) = self.cqs.get_mut(&qid) {
                assert!(value < cq.entries as u32, "CQ head doorbell out of range");
                cq.head = value as u16;
            }
            return;
        }
        let Some(sq) = self.sqs.get(&qid) else {
            return;
        };
        assert!(value < sq.entries as u32, "SQ tail doorbell out of range");
        let tail = value as u16;
        while let Some(sq) = self.sqs.get_mut(&qid) {
            if sq.head == tail {
                break;
            }
            let mut raw = [0u8; SQE_SIZE];
            let at = sq.base + sq.head as u64 * SQE_SIZE as u64;
            assert!(self.mem.0.borrow().dev_read(at, &mut raw));
            sq.head = (sq.head + 1) % sq.entries;
            let (head, cqid) = (sq.head, sq.cqid);
            let cmd = Command::from_bytes(&raw);
            let result = if qid == 0 {
                self.admin(&cmd)
            } else {
                self.io(qid, &cmd)
            };
            if let Some((status, dw0)) = result {
                self.post(cqid, qid, head, cmd.cid(), status, dw0);
            }
        }
    }

    /// Completes (successfully) the commands dropped earlier.
    pub fn complete_dropped(&mut self) {
        for (qid, cmd) in std::mem::take(&mut self.dropped) {
            let head = self.sqs[&qid].head;
            let cqid = self.sqs[&qid].cqid;
            self.post(cqid, qid, head, cmd.cid(), Status::SUCCESS, 0);
        }
    }

    fn post(&mut self, cqid: u16, sqid: u16, sq_head: u16, cid: u16, status: Status, dw0: u32) {
        let cq = self.cqs.get_mut(&cqid).expect("SQ bound to a missing CQ");
        assert_ne!(
            (cq.tail + 1) % cq.entries,
            cq.head,
            "CQ overflow: the driver overfilled"
        );
        let mut c = Completion {
            dw0,
            dw1: 0,
            sq_head,
            sqid,
            cid,
            phase: cq.phase,
            status,
        };
        if sqid != 0 {
            if let Some(f) = self.faults.corrupt.as_mut() {
                f(&mut c);
            }
        }
        let at = cq.base + cq.tail as u64 * CQE_SIZE as u64;
        cq.tail = (cq.tail + 1) % cq.entries;
        if cq.tail == 0 {
            cq.phase = !cq.phase;
            self.cq_wraps += 1;
        }
        assert!(self.mem.0.borrow_mut().dev_write(at, &c.to_bytes()));
    }

    /// The data segments (device address, length) a command's PRPs describe (None: an
    /// unmapped list or a misaligned entry).
    fn prp_segments(&self, cmd: &Command, len: usize) -> Option<Vec<(u64, usize)>> {
        let mem = self.mem.0.borrow();
        let mut segs = Vec::new();
        let first = (PAGE_SIZE - (cmd.prp1() % P) as usize).min(len);
        segs.push((cmd.prp1(), first));
        let mut left = len - first;
        if left == 0 {
            return Some(segs);
        }
        if left <= PAGE_SIZE {
            segs.push((cmd.prp2(), left));
            return Some(segs);
        }
        let mut entry = cmd.prp2();
        while left > 0 {
            let mut raw = [0u8; 8];
            if !mem.dev_read(entry, &mut raw) {
                return None;
            }
            let addr = u64::from_le_bytes(raw);
            if addr % P != 0 {
                return None;
            }
            // The last entry of a list page chains to the next list page.
            if entry % P == P - 8 && left > PAGE_SIZE {
                entry = addr;
                continue;
            }
            let n = left.min(PAGE_SIZE);
            segs.push((addr, n));
            left -= n;
            entry += 8;
        }
        Some(segs)
    }

    fn admin(&mut self, cmd: &Command) -> Option<(Status, u32)> {
        let ok = Some((Status::SUCCESS, 0));
        let cs = |sc| {
            Some((
                Status {
                    sct: 1,
                    sc,
                    crd: 0,
                    more: false,
                    dnr: true,
                },
                0,
            ))
        };
        let mqes = (self.cap & 0xffff) as u16;
        match cmd.opcode() {
            admin::IDENTIFY => {
                let mut data = [0u8; 4096];
                match cmd.dw[10] & 0xff {
                    1 => {
                        data[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        data[4..24].copy_from_slice(b"PEREGRINE-SIM-0001  ");
                        data[24..64].copy_from_slice(b"Peregrine simulated NVMe                ");
                        data[64..72].copy_from_slice(b"1.0     ");
                        data[77] = self.mdts;
                        data[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
                        data[512] = 0x66;
                        data[513] = 0x44;
                        data[516..520].copy_from_slice(&1u32.to_le_bytes());
                    }
                    0 if cmd.nsid() == 1 => {
                        let blocks = (self.disk.len() / self.block) as u64;
                        data[0..8].copy_from_slice(&blocks.to_le_bytes());
                        data[8..16].copy_from_slice(&blocks.to_le_bytes());
                        data[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                    }
                    0 => return Some((Status::generic(0x0b), 0)),
                    _ => return Some((Status::generic(0x02), 0)),
                }
                if !self.mem.0.borrow_mut().dev_write(cmd.prp1(), &data) {
                    return Some((Status::generic(0x04), 0));
                }
                ok
            }
            admin::SET_FEATURES if cmd.dw[10] & 0xff == 7 => {
                let n = (self.max_queues - 1) as u32;
                Some((Status::SUCCESS, n | (n << 16)))
            }
            admin::CREATE_IO_CQ => {
                let qid = cmd.dw[10] as u16;
                let entries = (cmd.dw[10] >> 16) as u16;
                if qid == 0 || qid > self.max_queues || self.cqs.contains_key(&qid) {
                    return cs(0x01);
                }
                if entries == 0 || entries > mqes {
                    return cs(0x02);
                }
                let vector = (cmd.dw[11] & 2 != 0).then_some((cmd.dw[11] >> 16) as u16);
                let cq = Cq {
                    base: cmd.prp1(),
                    entries: entries + 1,
                    tail: 0,
                    head: 0,
                    phase: true,
                    vector,
                };
                self.cqs.insert(qid, cq);
                ok
            }
            admin::CREATE_IO_SQ => {
                let qid = cmd.dw[10] as u16;
                let entries = (cmd.dw[10] >> 16) as u16;
                let cqid = (cmd.dw[11] >> 16) as u16;
                if cqid == 0 || !self.cqs.contains_key(&cqid) {
                    return cs(0x00);
                }
                if qid == 0 || qid > self.max_queues || self.sqs.contains_key(&qid) {
                    return cs(0x01);
                }
                if entries == 0 || entries > mqes {
                    return cs(0x02);
                }
                let sq = Sq {
                    base: cmd.prp1(),
                    entries: entries + 1,
                    head: 0,
                    cqid,
                };
                self.sqs.insert(qid, sq);
                ok
            }
            admin::DELETE_IO_SQ => {
                let qid = cmd.dw[10] as u16;
                if qid == 0 || self.faults.refuse_delete_sq || self.sqs.remove(&qid).is_none() {
                    return cs(0x01);
                }
                ok
            }
            admin::DELETE_IO_CQ => {
                let qid = cmd.dw[10] as u16;
                if self.sqs.values().any(|s| s.cqid == qid) {
                    return cs(0x0c); // invalid queue deletion
                }
                if qid == 0 || self.cqs.remove(&qid).is_none() {
                    return cs(0x01);
                }
                ok
            }
            _ => Some((Status::generic(0x01), 0)),
        }
    }

    fn io(&mut self, qid: u16, cmd: &Command) -> Option<(Status, u32)> {
        self.io_commands += 1;
        if self.faults.drop_io {
            self.dropped.push((qid, *cmd));
            return None;
        }
        if cmd.nsid() != 1 {
            return Some((Status::generic(0x0b), 0));
        }
        match cmd.opcode() {
            io::FLUSH => {
                self.flushes += 1;
                Some((Status::SUCCESS, 0))
            }
            op @ (io::READ | io::WRITE) => {
                let slba = cmd.dw[10] as u64 | (cmd.dw[11] as u64) << 32;
                let blocks = (cmd.dw[12] & 0xffff) as u64 + 1;
                let disk_blocks = (self.disk.len() / self.block) as u64;
                if slba.checked_add(blocks).is_none_or(|end| end > disk_blocks) {
                    return Some((
                        Status {
                            dnr: true,
                            ..Status::generic(0x80)
                        },
                        0,
                    ));
                }
                let len = blocks as usize * self.block;
                let Some(segs) = self.prp_segments(cmd, len) else {
                    return Some((Status::generic(0x04), 0));
                };
                let mut at = slba as usize * self.block;
                for (addr, n) in segs {
                    let ok = if op == io::READ {
                        self.mem
                            .0
                            .borrow_mut()
                            .dev_write(addr, &self.disk[at..at + n])
                    } else {
                        self.mem
                            .0
                            .borrow()
                            .dev_read(addr, &mut self.disk[at..at + n])
                    };
                    if !ok {
                        return Some((Status::generic(0x04), 0));
                    }
                    at += n;
                }
                Some((Status::SUCCESS, 0))
            }
            _ => Some((Status::generic(0x01), 0)),
        }
    }
}

impl Mmio for SimMmio {
    fn read32(&self, off: usize) -> u32 {
        let s = self.0.borrow();
        if s.faults.gone {
            return u32::MAX;
        }
        match off {
            regs::CAP => s.cap as u32,
            0x04 => (s.cap >> 32) as u32,
            regs::VS => 0x0001_0400,
            regs::CC => s.cc,
            regs::CSTS => s.csts,
            regs::AQA => s.aqa,
            regs::ASQ => s.asq as u32,
            0x2c => (s.asq >> 32) as u32,
            regs::ACQ => s.acq as u32,
            0x34 => (s.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&self, off: usize, v: u32) {
        let mut s = self.0.borrow_mut();
        match off {
            regs::CC => s.write_cc(v),
            regs::AQA => s.aqa = v,
            regs::ASQ => s.asq = (s.asq & !0xffff_ffff) | v as u64,
            0x2c => s.asq = (s.asq & 0xffff_ffff) | (v as u64) << 32,
            regs::ACQ => s.acq = (s.acq & !0xffff_ffff) | v as u64,
            0x34 => s.acq = (s.acq & 0xffff_ffff) | (v as u64) << 32,
            o if o >= regs::DOORBELL_BASE => {
                let stride = s.stride();
                assert_eq!(
                    (o - regs::DOORBELL_BASE) % stride,
                    0,
                    "doorbell off the stride"
                );
                s.doorbell((o - regs::DOORBELL_BASE) / stride, v);
            }
            _ => {}
        }
    }
}
