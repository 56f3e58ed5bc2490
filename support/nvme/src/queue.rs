//! A submission/completion queue pair over DMA memory: SQ tail and CQ head with the
//! phase tag, command id allocation, matching completions to outstanding commands and
//! validating what the device writes.
//!
//! The pair does not touch registers: [`QueuePair::submit`] returns the new SQ tail and
//! [`QueuePair::cq_head`] the head to write to the doorbells (see
//! [`crate::regs::sq_tail_doorbell`]); the controller rings them.

use alloc::vec::Vec;

use crate::cmd::{Command, SQE_SIZE};
use crate::{DeviceError, Dma, Error, Status};

/// Size of a completion queue entry.
pub const CQE_SIZE: usize = 16;

/// One completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command specific result (DW0).
    pub dw0: u32,
    /// DW1 (reserved for most commands).
    pub dw1: u32,
    /// SQ head pointer (DW2 15:0).
    pub sq_head: u16,
    /// SQ identifier (DW2 31:16).
    pub sqid: u16,
    /// Command identifier (DW3 15:0).
    pub cid: u16,
    /// Phase tag (DW3 bit 16).
    pub phase: bool,
    /// Status field (DW3 31:17).
    pub status: Status,
}

impl Completion {
    /// Parses the entry's bytes.
    pub fn from_bytes(b: &[u8; CQE_SIZE]) -> Completion {
        let dw =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (dw2, dw3) = (dw(2), dw(3));
        Completion {
            dw0: dw(0),
            dw1: dw(1),
            sq_head: dw2 as u16,
            sqid: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            phase: dw3 & (1 << 16) != 0,
            status: Status::from_field((dw3 >> 17) as u16),
        }
    }

    /// The entry's bytes (the simulator's side).
    pub fn to_bytes(&self) -> [u8; CQE_SIZE] {
        let dw3 =
            self.cid as u32 | (self.phase as u32) << 16 | (self.status.to_field() as u32) << 17;
        let dws = [
            self.dw0,
            self.dw1,
            self.sq_head as u32 | (self.sqid as u32) << 16,
            dw3,
        ];
        let mut out = [0; CQE_SIZE];
        for (chunk, d) in out.chunks_exact_mut(4).zip(dws) {
            chunk.copy_from_slice(&d.to_le_bytes());
        }
        out
    }

    /// DW0 on success, the status as [`Error::Command`] otherwise.
    pub fn result(&self) -> Result<u32, Error> {
        if self.status.is_success() {
            Ok(self.dw0)
        } else {
            Err(Error::Command(self.status))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Submitted, not completed.
    Pending,
    /// Submitted, then given up on (timed out): the id stays reserved until the device
    /// completes it after all.
    Abandoned,
    /// Completed, not yet taken.
    Done(Completion),
}

/// What [`QueuePair::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// No new entry (phase tag not flipped).
    Empty,
    /// Command `cid` completed; [`QueuePair::take`] returns its completion.
    Completed(u16),
    /// An abandoned command completed late; its id is free again.
    Late(u16),
}

/// A submission queue and its completion queue, of the same size and queue id.
pub struct QueuePair<R> {
    qid: u16,
    entries: u16,
    sq: R,
    cq: R,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    slots: Vec<Slot>,
    free: Vec<u16>,
}

impl<R> QueuePair<R> {
    /// Allocates zeroed queue memory for `entries` (2..=4096 here) entries each way.
    pub fn new<D: Dma<Region = R>>(dma: &D, qid: u16, entries: u16) -> Result<Self, Error> {
        if !(2..=4096).contains(&entries) {
            return Err(Error::InvalidArgument);
        }
        let sq = dma.alloc(entries as usize * SQE_SIZE)?;
        let cq = dma.alloc(entries as usize * CQE_SIZE)?;
        // One command id per entry but one: a full SQ has entries - 1 commands.
        let ids = entries - 1;
        Ok(QueuePair {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            slots: alloc::vec![Slot::Free; ids as usize],
            free: (0..ids).rev().collect(),
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// The submission queue memory.
    pub fn sq(&self) -> &R {
        &self.sq
    }
    /// The completion queue memory.
    pub fn cq(&self) -> &R {
        &self.cq
    }
    /// The SQ tail (the value last due to the SQ tail doorbell).
    pub fn sq_tail(&self) -> u16 {
        self.sq_tail
    }
    /// The CQ head (the value due to the CQ head doorbell).
    pub fn cq_head(&self) -> u16 {
        self.cq_head
    }
    /// The phase tag the next new completion carries.
    pub fn phase(&self) -> bool {
        self.phase
    }
    /// Commands submitted and not yet completed (abandoned ones included).
    pub fn outstanding(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Pending | Slot::Abandoned))
            .count()
    }

    fn next(&self, i: u16) -> u16 {
        if i + 1 == self.entries {
            0
        } else {
            i + 1
        }
    }

    /// Whether the SQ has no room for another command.
    pub fn is_full(&self) -> bool {
        self.next(self.sq_tail) == self.sq_head || self.free.is_empty()
    }

    /// Writes `cmd` (with a fresh command id) at the SQ tail; returns the id and the new
    /// tail for the doorbell.
    pub fn submit<D: Dma<Region = R>>(
        &mut self,
        dma: &D,
        mut cmd: Command,
    ) -> Result<(u16, u16), Error> {
        if self.is_full() {
            return Err(Error::QueueFull);
        }
        let cid = self.free.pop().ok_or(Error::QueueFull)?;
        cmd.set_cid(cid);
        dma.write(&self.sq, self.sq_tail as usize * SQE_SIZE, &cmd.to_bytes());
        self.slots[cid as usize] = Slot::Pending;
        self.sq_tail = self.next(self.sq_tail);
        Ok((cid, self.sq_tail))
    }

    /// Consumes at most one completion entry. An entry that is consumed but invalid (an
    /// unknown command id, a bad SQ id or head) is an error; the head still advances
    /// past it, so the caller must ring the CQ head doorbell whenever `cq_head` changed.
    pub fn poll<D: Dma<Region = R>>(&mut self, dma: &D) -> Result<Polled, Error> {
        let mut raw = [0u8; CQE_SIZE];
        let at = self.cq_head as usize * CQE_SIZE;
        // DW3 (with the phase tag) first, then the rest: the device writes the entry
        // before flipping the phase, so a stale phase means nothing else is read.
        dma.read(&self.cq, at + 12, &mut raw[12..]);
        if (raw[14] & 1 != 0) != self.phase {
            return Ok(Polled::Empty);
        }
        dma.read(&self.cq, at, &mut raw[..12]);
        let c = Completion::from_bytes(&raw);
        self.cq_head = self.next(self.cq_head);
        if self.cq_head == 0 {
            self.phase = !self.phase;
        }
        let qid = self.qid;
        if c.sqid != qid {
            return Err(Error::Device(DeviceError::BadSqId { qid, sqid: c.sqid }));
        }
        // The new head must lie between the old head and the tail (inclusive).
        let dist = |from: u16, to: u16| (to + self.entries - from) % self.entries;
        if c.sq_head >= self.entries
            || dist(self.sq_head, c.sq_head) > dist(self.sq_head, self.sq_tail)
        {
            return Err(Error::Device(DeviceError::BadSqHead {
                qid,
                head: c.sq_head,
            }));
        }
        self.sq_head = c.sq_head;
        let unknown = Error::Device(DeviceError::UnknownCid { qid, cid: c.cid });
        let slot = self.slots.get_mut(c.cid as usize).ok_or(unknown)?;
        match *slot {
            Slot::Pending => {
                *slot = Slot::Done(c);
                Ok(Polled::Completed(c.cid))
            }
            Slot::Abandoned => {
                *slot = Slot::Free;
                self.free.push(c.cid);
                Ok(Polled::Late(c.cid))
            }
            Slot::Free | Slot::Done(_) => Err(unknown),
        }
    }

    /// Takes command `cid`'s completion if it has arrived, freeing the id.
    pub fn take(&mut self, cid: u16) -> Option<Completion> {
        match self.slots.get(cid as usize) {
            Some(&Slot::Done(c)) => {
                self.slots[cid as usize] = Slot::Free;
                self.free.push(cid);
                Some(c)
            }
            _ => None,
        }
    }

    /// Gives up on pending command `cid` (after a timeout): its id stays reserved until
    /// the device completes it, if ever. A completion already there is dropped.
    pub fn abandon(&mut self, cid: u16) {
        match self.slots.get(cid as usize) {
            Some(Slot::Pending) => self.slots[cid as usize] = Slot::Abandoned,
            Some(Slot::Done(_)) => {
                self.slots[cid as usize] = Slot::Free;
                self.free.push(cid);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cmd;
    use core::cell::RefCell;

    /// Contiguous fake DMA memory: region i at device address (i + 1) << 24.
    #[derive(Default)]
    pub struct VecDma(pub RefCell<Vec<Vec<u8>>>);

    impl Dma for VecDma {
        type Region = usize;
        fn alloc(&self, len: usize) -> Result<usize, Error> {
            let mut r = self.0.borrow_mut();
            r.push(alloc::vec![0; len.div_ceil(4096) * 4096]);
            Ok(r.len() - 1)
        }
        fn len(&self, r: &usize) -> usize {
            self.0.borrow()[*r].len()
        }
        fn iova(&self, r: &usize, off: usize) -> u64 {
            ((*r as u64 + 1) << 24) + off as u64
        }
        fn read(&self, r: &usize, off: usize, out: &mut [u8]) {
            out.copy_from_slice(&self.0.borrow()[*r][off..off + out.len()]);
        }
        fn write(&self, r: &usize, off: usize, data: &[u8]) {
            self.0.borrow_mut()[*r][off..off + data.len()].copy_from_slice(data);
        }
    }

    fn post(dma: &VecDma, q: &QueuePair<usize>, slot: u16, c: Completion) {
        dma.write(q.cq(), slot as usize * CQE_SIZE, &c.to_bytes());
    }

    fn cqe(cid: u16, sq_head: u16, phase: bool) -> Completion {
        Completion {
            dw0: 0,
            dw1: 0,
            sq_head,
            sqid: 1,
            cid,
            phase,
            status: Status::SUCCESS,
        }
    }

    #[test]
    fn completion_round_trips() {
        let c = Completion {
            dw0: 0xdead_beef,
            dw1: 7,
            sq_head: 5,
            sqid: 3,
            cid: 0xabcd,
            phase: true,
            status: Status::from_field(0x4080),
        };
        assert_eq!(Completion::from_bytes(&c.to_bytes()), c);
        assert_eq!(c.result(), Err(Error::Command(Status::from_field(0x4080))));
    }

    #[test]
    fn fills_and_wraps_with_phase() {
        let dma = VecDma::default();
        let mut q = QueuePair::new(&dma, 1, 4).unwrap();
        let mut device_slot = 0u16;
        let mut device_phase = true;
        let mut device_head = 0u16;
        for round in 0..50 {
            // Three commands fill a four-entry queue.
            let mut cids = Vec::new();
            for _ in 0..3 {
                cids.push(q.submit(&dma, cmd::flush(1)).unwrap().0);
            }
            assert!(q.is_full());
            assert_eq!(q.submit(&dma, cmd::flush(1)), Err(Error::QueueFull));
            assert_eq!(q.poll(&dma), Ok(Polled::Empty));
            // Complete them in reverse order.
            for &cid in cids.iter().rev() {
                device_head = (device_head + 1) % 4;
                post(&dma, &q, device_slot, cqe(cid, device_head, device_phase));
                device_slot = (device_slot + 1) % 4;
                if device_slot == 0 {
                    device_phase = !device_phase;
                }
                assert_eq!(q.poll(&dma), Ok(Polled::Completed(cid)), "round {round}");
            }
            assert_eq!(q.poll(&dma), Ok(Polled::Empty));
            for cid in cids {
                assert!(q.take(cid).is_some());
                assert!(q.take(cid).is_none());
            }
            assert_eq!(q.outstanding(), 0);
        }
        assert_eq!(q.cq_head(), device_slot);
        assert_eq!(q.phase(), device_phase);
    }

    #[test]
    fn hostile_completions_are_errors() {
        let dma = VecDma::default();
        let mut q = QueuePair::new(&dma, 1, 8).unwrap();
        let (cid, _) = q.submit(&dma, cmd::flush(1)).unwrap();
        // Unknown command id.
        post(&dma, &q, 0, cqe(cid + 1, 1, true));
        assert!(matches!(
            q.poll(&dma),
            Err(Error::Device(DeviceError::UnknownCid { .. }))
        ));
        // Command id beyond the table.
        post(&dma, &q, 1, cqe(0xffff, 1, true));
        assert!(matches!(
            q.poll(&dma),
            Err(Error::Device(DeviceError::UnknownCid { .. }))
        ));
        // SQ head beyond the tail.
        post(&dma, &q, 2, cqe(cid, 5, true));
        assert!(matches!(
            q.poll(&dma),
            Err(Error::Device(DeviceError::BadSqHead { .. }))
        ));
        // Wrong SQ id.
        let mut c = cqe(cid, 1, true);
        c.sqid = 9;
        post(&dma, &q, 3, c);
        assert!(matches!(
            q.poll(&dma),
            Err(Error::Device(DeviceError::BadSqId { .. }))
        ));
        // The real completion still matches; a duplicate is refused.
        post(&dma, &q, 4, cqe(cid, 1, true));
        assert_eq!(q.poll(&dma), Ok(Polled::Completed(cid)));
        post(&dma, &q, 5, cqe(cid, 1, true));
        assert!(q.poll(&dma).is_err());
        assert!(q.take(cid).is_some());
    }

    #[test]
    fn abandoned_ids_stay_reserved_until_late_completion() {
        let dma = VecDma::default();
        let mut q = QueuePair::new(&dma, 1, 2).unwrap();
        let (cid, _) = q.submit(&dma, cmd::flush(1)).unwrap();
        q.abandon(cid);
        assert_eq!(q.outstanding(), 1);
        assert_eq!(q.submit(&dma, cmd::flush(1)), Err(Error::QueueFull));
        post(&dma, &q, 0, cqe(cid, 1, true));
        assert_eq!(q.poll(&dma), Ok(Polled::Late(cid)));
        assert!(q.take(cid).is_none());
        assert_eq!(q.outstanding(), 0);
        assert!(q.submit(&dma, cmd::flush(1)).is_ok());
    }
}
