//! The shared ring region: its layout, the [`SharedMem`] access the two sides make,
//! the client's producer ([`ClientRing`]) and the service's consumer ([`ServiceRing`]).

use alloc::collections::BTreeSet;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::proto::{
    validate, Completion, Descriptor, Request, SessionLimits, Status, COMP_WORDS, DESC_WORDS,
};

/// Header word 0: `"PBLK"` little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PBLK");
/// Header word 1: the protocol version this crate speaks.
pub const VERSION: u32 = 1;
/// The most ring entries a session may have.
pub const MAX_ENTRIES: u32 = 4096;

/// Word index of the magic.
const W_MAGIC: usize = 0;
/// Word index of the version.
const W_VERSION: usize = 1;
/// Word index of the ring size.
const W_ENTRIES: usize = 2;
/// Word index of the block size.
const W_BLOCK_SIZE: usize = 3;
/// Word index of the maximum transfer in blocks.
const W_MAX_BLOCKS: usize = 4;
/// Word index of the session's length in blocks, low half (high half follows).
const W_BLOCKS_LO: usize = 5;
/// Word index of the submission tail (client writes): byte 64.
pub const W_SQ_TAIL: usize = 16;
/// Word index of the submission head (service writes): byte 128.
const W_SQ_HEAD: usize = 32;
/// Word index of the completion tail (service writes): byte 192.
const W_CQ_TAIL: usize = 48;
/// Word index of the completion head (client writes): byte 256.
pub const W_CQ_HEAD: usize = 64;
/// Bytes before the submission ring.
pub const HEADER_BYTES: usize = 512;

/// Memory both sides map, accessed as little-endian 32-bit words.
///
/// Index words are loaded with acquire and stored with release; descriptor and
/// completion words may be relaxed (see the crate docs' ordering rule). `word` is
/// always below [`SharedMem::words`]: the rings compute every index from their checked
/// [`Layout`] and masked counters, never from a value read from the region.
pub trait SharedMem {
    /// Size in 32-bit words.
    fn words(&self) -> usize;
    /// Loads word `word` (relaxed).
    fn load(&self, word: usize) -> u32;
    /// Loads word `word` with acquire ordering.
    fn load_acquire(&self, word: usize) -> u32;
    /// Stores word `word` (relaxed).
    fn store(&self, word: usize, val: u32);
    /// Stores word `word` with release ordering.
    fn store_release(&self, word: usize, val: u32);
}

/// The region as atomic words: sound even while the peer writes concurrently (the
/// component layer builds this slice over its mapping of the shared pages).
impl SharedMem for [AtomicU32] {
    fn words(&self) -> usize {
        self.len()
    }
    fn load(&self, word: usize) -> u32 {
        u32::from_le(self[word].load(Ordering::Relaxed))
    }
    fn load_acquire(&self, word: usize) -> u32 {
        u32::from_le(self[word].load(Ordering::Acquire))
    }
    fn store(&self, word: usize, val: u32) {
        self[word].store(val.to_le(), Ordering::Relaxed)
    }
    fn store_release(&self, word: usize, val: u32) {
        self[word].store(val.to_le(), Ordering::Release)
    }
}

/// A region of `bytes` bytes (rounded up to whole words), zeroed: the host tests'
/// shared memory.
pub fn region(bytes: usize) -> alloc::vec::Vec<AtomicU32> {
    (0..bytes.div_ceil(4)).map(|_| AtomicU32::new(0)).collect()
}

/// The geometry of a ring region with `entries` slots per ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    entries: u32,
}

impl Layout {
    /// The layout for `entries` slots: a power of two in `1..=MAX_ENTRIES`.
    pub const fn new(entries: u32) -> Option<Layout> {
        if entries.is_power_of_two() && entries <= MAX_ENTRIES {
            Some(Layout { entries })
        } else {
            None
        }
    }

    /// Slots per ring.
    pub const fn entries(&self) -> u32 {
        self.entries
    }

    /// Byte offset of the submission ring.
    pub const fn sq_offset(&self) -> usize {
        HEADER_BYTES
    }

    /// Byte offset of the completion ring.
    pub const fn cq_offset(&self) -> usize {
        HEADER_BYTES + self.entries as usize * crate::proto::DESC_SIZE
    }

    /// Bytes the region needs.
    pub const fn bytes(&self) -> usize {
        self.cq_offset() + self.entries as usize * crate::proto::COMP_SIZE
    }

    /// First word of submission slot `counter` (masked).
    fn sq_word(&self, counter: u32) -> usize {
        (self.sq_offset() / 4) + (counter & (self.entries - 1)) as usize * DESC_WORDS
    }

    /// First word of completion slot `counter` (masked).
    fn cq_word(&self, counter: u32) -> usize {
        (self.cq_offset() / 4) + (counter & (self.entries - 1)) as usize * COMP_WORDS
    }
}

/// Why a ring cannot be used (any of these found by the service breaks the session
/// for good: every later call returns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The region is smaller than the layout needs.
    TooSmall,
    /// The header does not describe this layout (client side only).
    BadHeader,
    /// The peer's submission tail is more than a ring ahead of the consumer's head.
    SqJump,
    /// The peer's completion head moved backwards or past the completion tail.
    CqJump,
}

/// The service's end of one session's ring: takes descriptors, validates them,
/// answers the bad ones itself, and posts the completions of the good ones.
///
/// Its own counters (submission head, completion tail) live in private memory and are
/// only ever written to the region; from the region it reads only the client's
/// submission tail, completion head and descriptors, each once.
#[derive(Debug)]
pub struct ServiceRing<'m, M: SharedMem + ?Sized> {
    mem: &'m M,
    layout: Layout,
    limits: SessionLimits,
    sq_head: u32,
    cq_tail: u32,
    cq_published: u32,
    cq_head: u32,
    in_flight: BTreeSet<u32>,
    broken: Option<RingError>,
    rejected: u64,
}

impl<'m, M: SharedMem + ?Sized> ServiceRing<'m, M> {
    /// Initialises the region (header, counters zero) for a session with `limits`.
    pub fn new(
        mem: &'m M,
        layout: Layout,
        limits: SessionLimits,
    ) -> Result<ServiceRing<'m, M>, RingError> {
        if mem.words().saturating_mul(4) < layout.bytes() {
            return Err(RingError::TooSmall);
        }
        for w in 0..HEADER_BYTES / 4 {
            mem.store(w, 0);
        }
        mem.store(W_MAGIC, MAGIC);
        mem.store(W_VERSION, VERSION);
        mem.store(W_ENTRIES, layout.entries());
        mem.store(W_BLOCK_SIZE, limits.block_size);
        mem.store(W_MAX_BLOCKS, limits.max_blocks);
        mem.store(W_BLOCKS_LO, limits.blocks as u32);
        mem.store(W_BLOCKS_LO + 1, (limits.blocks >> 32) as u32);
        // Publishes the header and the zeroed counters.
        mem.store_release(W_CQ_HEAD, 0);
        Ok(ServiceRing {
            mem,
            layout,
            limits,
            sq_head: 0,
            cq_tail: 0,
            cq_published: 0,
            cq_head: 0,
            in_flight: BTreeSet::new(),
            broken: None,
            rejected: 0,
        })
    }

    /// The session's limits.
    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// Why the session is broken, if it is.
    pub fn broken(&self) -> Option<RingError> {
        self.broken
    }

    /// Requests taken and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Descriptors refused so far (each answered with its error status).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    fn check(&self) -> Result<(), RingError> {
        match self.broken {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: RingError) -> RingError {
        self.broken = Some(e);
        e
    }

    /// Descriptors the client has published and the service not yet taken (acquire
    /// load of the submission tail). A tail more than a ring ahead breaks the session.
    pub fn pending(&mut self) -> Result<u32, RingError> {
        self.check()?;
        let tail = self.mem.load_acquire(W_SQ_TAIL);
        let n = tail.wrapping_sub(self.sq_head);
        if n > self.layout.entries() {
            return Err(self.fail(RingError::SqJump));
        }
        Ok(n)
    }

    /// Free completion slots (acquire load of the completion head). The head may only
    /// move forward and never past the completion tail.
    fn cq_free(&mut self) -> Result<u32, RingError> {
        let head = self.mem.load_acquire(W_CQ_HEAD);
        let moved = head.wrapping_sub(self.cq_head);
        if moved > self.cq_tail.wrapping_sub(self.cq_head) {
            return Err(self.fail(RingError::CqJump));
        }
        self.cq_head = head;
        Ok(self.layout.entries() - self.cq_tail.wrapping_sub(head))
    }

    fn post(&mut self, c: Completion) {
        let w = self.layout.cq_word(self.cq_tail);
        for (i, v) in c.to_words().into_iter().enumerate() {
            self.mem.store(w + i, v);
        }
        self.cq_tail = self.cq_tail.wrapping_add(1);
    }

    /// The next valid request, or `None` when the ring is empty or every free
    /// completion slot is already promised to a request in flight (the service takes a
    /// descriptor only when it can answer it). A refused descriptor is answered here
    /// with its error status and skipped: it never reaches the disk.
    pub fn next_request(&mut self) -> Result<Option<Request>, RingError> {
        loop {
            if self.pending()? == 0 {
                return Ok(None);
            }
            if self.cq_free()? as usize <= self.in_flight.len() {
                return Ok(None);
            }
            let base = self.layout.sq_word(self.sq_head);
            let mut words = [0; DESC_WORDS];
            for (i, w) in words.iter_mut().enumerate() {
                *w = self.mem.load(base + i);
            }
            self.sq_head = self.sq_head.wrapping_add(1);
            self.mem.store_release(W_SQ_HEAD, self.sq_head);
            // From here on only the private copy is looked at.
            let d = Descriptor::from_words(words);
            let res = validate(&d, &self.limits).and_then(|r| {
                if self.in_flight.contains(&r.tag) {
                    Err(crate::proto::DescError::TagInUse)
                } else {
                    Ok(r)
                }
            });
            match res {
                Ok(r) => {
                    self.in_flight.insert(r.tag);
                    return Ok(Some(r));
                }
                Err(e) => {
                    self.rejected += 1;
                    self.post(Completion {
                        tag: d.tag,
                        status: e.status(),
                        blocks: 0,
                    });
                }
            }
        }
    }

    /// Completes the in-flight request `tag` (visible to the client at the next
    /// [`ServiceRing::publish`]). `Ok(false)` if `tag` is not in flight (a service bug;
    /// nothing is posted).
    pub fn complete(&mut self, tag: u32, status: Status, blocks: u32) -> Result<bool, RingError> {
        self.check()?;
        if !self.in_flight.remove(&tag) {
            return Ok(false);
        }
        // A slot was reserved when the request was taken and the head never moves back.
        let blocks = if status == Status::Ok { blocks } else { 0 };
        self.post(Completion {
            tag,
            status,
            blocks,
        });
        Ok(true)
    }

    /// Makes the completions posted since the last call visible (release store of the
    /// completion tail); how many, so one notification covers the batch (none needed
    /// at 0).
    pub fn publish(&mut self) -> Result<u32, RingError> {
        self.check()?;
        let n = self.cq_tail.wrapping_sub(self.cq_published);
        if n != 0 {
            self.mem.store_release(W_CQ_TAIL, self.cq_tail);
            self.cq_published = self.cq_tail;
        }
        Ok(n)
    }
}

/// The client's end of a session's ring.
#[derive(Debug)]
pub struct ClientRing<'m, M: SharedMem + ?Sized> {
    mem: &'m M,
    layout: Layout,
    block_size: u32,
    max_blocks: u32,
    blocks: u64,
    sq_tail: u32,
    sq_published: u32,
    cq_head: u32,
}

impl<'m, M: SharedMem + ?Sized> ClientRing<'m, M> {
    /// Attaches to a region the service initialised with `layout`.
    pub fn attach(mem: &'m M, layout: Layout) -> Result<ClientRing<'m, M>, RingError> {
        if mem.words().saturating_mul(4) < layout.bytes() {
            return Err(RingError::TooSmall);
        }
        if mem.load_acquire(W_MAGIC) != MAGIC
            || mem.load(W_VERSION) != VERSION
            || mem.load(W_ENTRIES) != layout.entries()
        {
            return Err(RingError::BadHeader);
        }
        Ok(ClientRing {
            mem,
            layout,
            block_size: mem.load(W_BLOCK_SIZE),
            max_blocks: mem.load(W_MAX_BLOCKS),
            blocks: u64::from(mem.load(W_BLOCKS_LO)) | u64::from(mem.load(W_BLOCKS_LO + 1)) << 32,
            sq_tail: mem.load(W_SQ_TAIL),
            sq_published: mem.load(W_SQ_TAIL),
            cq_head: mem.load(W_CQ_HEAD),
        })
    }

    /// Bytes per block, as the service announced.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The most blocks per request, as the service announced.
    pub fn max_blocks(&self) -> u32 {
        self.max_blocks
    }

    /// The session's length in blocks, as the service announced.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Submission slots free (0 if the service's head is nonsense).
    pub fn free_slots(&self) -> u32 {
        let head = self.mem.load_acquire(W_SQ_HEAD);
        let used = self.sq_tail.wrapping_sub(head);
        self.layout.entries().saturating_sub(used)
    }

    /// Writes `d` into the next submission slot (not yet visible); `false` if the ring
    /// is full.
    pub fn push(&mut self, d: &Descriptor) -> bool {
        if self.free_slots() == 0 {
            return false;
        }
        let base = self.layout.sq_word(self.sq_tail);
        for (i, w) in d.to_words().into_iter().enumerate() {
            self.mem.store(base + i, w);
        }
        self.sq_tail = self.sq_tail.wrapping_add(1);
        true
    }

    /// Publishes the pushed descriptors (release store of the submission tail); how
    /// many, so the caller rings the doorbell once per batch (not at 0).
    pub fn publish(&mut self) -> u32 {
        let n = self.sq_tail.wrapping_sub(self.sq_published);
        if n != 0 {
            self.mem.store_release(W_SQ_TAIL, self.sq_tail);
            self.sq_published = self.sq_tail;
        }
        n
    }

    /// Whether published descriptors wait untaken (the service's head is behind the
    /// published tail): after reading completions, the client rings the doorbell again
    /// if so, since the service may have stopped for want of completion slots.
    pub fn needs_doorbell(&self) -> bool {
        self.mem.load_acquire(W_SQ_HEAD) != self.sq_published
    }

    /// The next completion, if the service published one; a completion tail more than
    /// a ring ahead is an error.
    pub fn pop_completion(&mut self) -> Result<Option<Completion>, RingError> {
        let tail = self.mem.load_acquire(W_CQ_TAIL);
        let n = tail.wrapping_sub(self.cq_head);
        if n > self.layout.entries() {
            return Err(RingError::CqJump);
        }
        if n == 0 {
            return Ok(None);
        }
        let base = self.layout.cq_word(self.cq_head);
        let mut w = [0; COMP_WORDS];
        for (i, v) in w.iter_mut().enumerate() {
            *v = self.mem.load(base + i);
        }
        self.cq_head = self.cq_head.wrapping_add(1);
        self.mem.store_release(W_CQ_HEAD, self.cq_head);
        Ok(Some(Completion::from_words(w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bounds, Op};

    /// The counters wrap at 2^32 without a hiccup (started just below it).
    #[test]
    fn counters_wrap_at_u32_max() {
        let layout = Layout::new(4).unwrap();
        let mem = region(layout.bytes());
        let lim = SessionLimits::new(
            Bounds {
                first_lba: 10,
                blocks: 10,
            },
            512,
            4096,
            4,
        );
        let mut svc = ServiceRing::new(&mem[..], layout, lim).unwrap();
        let start = u32::MAX - 5;
        svc.sq_head = start;
        svc.cq_tail = start;
        svc.cq_published = start;
        svc.cq_head = start;
        for w in [W_SQ_TAIL, W_SQ_HEAD, W_CQ_TAIL, W_CQ_HEAD] {
            mem.store_release(w, start);
        }
        let mut c = ClientRing::attach(&mem[..], layout).unwrap();
        let mut tag = 0;
        for round in 0..20 {
            let n = 1 + round % 4;
            for _ in 0..n {
                assert!(c.push(&Descriptor::new(tag, Op::Read, 9, 1, 0)));
                tag += 1;
            }
            assert_eq!(c.publish(), n);
            assert_eq!(svc.pending(), Ok(n));
            let mut taken = alloc::vec::Vec::new();
            while let Some(r) = svc.next_request().unwrap() {
                taken.push(r);
            }
            assert_eq!(taken.len() as u32, n);
            for r in &taken {
                assert_eq!(r.lba, 19);
                assert!(svc.complete(r.tag, Status::Ok, 1).unwrap());
            }
            assert_eq!(svc.publish(), Ok(n));
            let mut got = 0;
            while let Some(x) = c.pop_completion().unwrap() {
                assert_eq!(x.status, Status::Ok);
                got += 1;
            }
            assert_eq!(got, n);
        }
        assert!(svc.sq_head < start, "the counters wrapped");
    }
}
