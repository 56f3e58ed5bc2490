//! Virtqueue tests, with the guest driver's side of a split queue ([`Driver`]) that the
//! device tests reuse.

use super::*;
use crate::testutil::{MockVcpu, Rng};
use std::vec;
use std::vec::Vec;

/// The driver side of a split virtqueue laid out from `base`.
pub struct Driver {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

pub fn put<M: GuestMemory + ?Sized>(mem: &mut M, gpa: u64, b: &[u8]) {
    mem.write(gpa, b).unwrap();
}

pub fn get<M: GuestMemory + ?Sized>(mem: &mut M, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    mem.read(gpa, &mut b).unwrap();
    b
}

pub fn get_u16<M: GuestMemory + ?Sized>(mem: &mut M, gpa: u64) -> u16 {
    u16::from_le_bytes(get(mem, gpa, 2).try_into().unwrap())
}

impl Driver {
    pub fn new(size: u16, base: u64) -> Self {
        let s = u64::from(size);
        let avail = base + 16 * s;
        let used = (avail + 6 + 2 * s + 3) & !3;
        Self {
            size,
            desc: base,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// A device-side queue configured like the transport would.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size);
        q.desc_table = self.desc;
        q.avail_ring = self.avail;
        q.used_ring = self.used;
        q.indirect = true;
        q.check().unwrap();
        q.ready = true;
        q
    }

    #[allow(clippy::too_many_arguments)]
    pub fn put_desc<M: GuestMemory + ?Sized>(
        &self,
        mem: &mut M,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        put(mem, table + 16 * u64::from(i), &d);
    }

    /// Writes a chain of `(addr, len, device-writable)` buffers into free descriptors
    /// and makes it available; its head.
    pub fn add_chain<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        bufs: &[(u64, u32, bool)],
    ) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = k + 1 == bufs.len();
            let flags =
                if write { desc_flags::WRITE } else { 0 } | if last { 0 } else { desc_flags::NEXT };
            self.put_desc(mem, self.desc, i, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the available ring and moves `avail.idx`.
    pub fn publish<M: GuestMemory + ?Sized>(&mut self, mem: &mut M, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        put(mem, self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put(mem, self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// The used elements the device added since the last call.
    pub fn take_used<M: GuestMemory + ?Sized>(&mut self, mem: &mut M) -> Vec<(u32, u32)> {
        let idx = get_u16(mem, self.used + 2);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let e = get(mem, self.used + 4 + 8 * slot, 8);
            out.push((
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Sets `used_event` (EVENT_IDX).
    pub fn set_used_event<M: GuestMemory + ?Sized>(&self, mem: &mut M, v: u16) {
        put(
            mem,
            self.avail + 4 + 2 * u64::from(self.size),
            &v.to_le_bytes(),
        );
    }

    /// Reads `avail_event` (EVENT_IDX).
    pub fn avail_event<M: GuestMemory + ?Sized>(&self, mem: &mut M) -> u16 {
        get_u16(mem, self.used + 4 + 8 * u64::from(self.size))
    }
}

const RAM: usize = 0x10000;

fn setup(size: u16) -> (MockVcpu, Driver, Queue) {
    let m = MockVcpu::new(RAM);
    let d = Driver::new(size, 0x1000);
    let q = d.queue();
    (m, d, q)
}

#[test]
fn chain_round_trip() {
    let (mut m, mut d, mut q) = setup(8);
    assert_eq!(q.pop(&mut m), Ok(None));
    m.put(0x4000, b"hello, ");
    m.put(0x5000, b"world");
    let head = d.add_chain(
        &mut m,
        &[
            (0x4000, 7, false),
            (0x5000, 5, false),
            (0x6000, 4, true),
            (0x7000, 8, true),
        ],
    );
    let c = q.pop(&mut m).unwrap().unwrap();
    assert_eq!(c.head, head);
    assert_eq!((c.readable_len(), c.writable_len()), (12, 12));
    let mut r = c.reader();
    let mut buf = [0u8; 20];
    assert_eq!(r.read(&mut m, &mut buf), Ok(12));
    assert_eq!(&buf[..12], b"hello, world");
    assert_eq!(r.remaining(), 0);
    let mut w = c.writer();
    assert_eq!(w.write(&mut m, b"0123456789abcdef"), Ok(12));
    assert_eq!(w.written(), 12);
    assert_eq!(&m.mem[0x6000..0x6004], b"0123");
    assert_eq!(&m.mem[0x7000..0x7008], b"456789ab");
    q.add_used(&mut m, c.head, w.written()).unwrap();
    assert_eq!(d.take_used(&mut m), [(u32::from(head), 12)]);
    assert_eq!(q.pop(&mut m), Ok(None));
    assert_eq!((q.next_avail(), q.next_used()), (1, 1));
}

#[test]
fn reader_crosses_descriptors_and_skips_empty_ones() {
    let (mut m, mut d, mut q) = setup(8);
    m.put(0x4000, b"abc");
    m.put(0x5000, b"defg");
    d.add_chain(
        &mut m,
        &[(0x4000, 3, false), (0x9000, 0, false), (0x5000, 4, false)],
    );
    let c = q.pop(&mut m).unwrap().unwrap();
    let mut r = c.reader();
    let mut b = [0u8; 2];
    let mut got = Vec::new();
    loop {
        let n = r.read(&mut m, &mut b).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(got, b"abcdefg");
    let mut r = c.reader();
    assert_eq!(r.skip(5), 5);
    assert_eq!(r.remaining(), 2);
    // No writable part: a writer writes nothing.
    assert_eq!(c.writer().write(&mut m, b"x"), Ok(0));
}

#[test]
fn queue_not_enabled_is_refused() {
    let (mut m, _, mut q) = setup(8);
    q.ready = false;
    assert_eq!(q.pop(&mut m), Err(QueueError::NotReady));
    assert_eq!(q.add_used(&mut m, 0, 0), Err(QueueError::NotReady));
}

#[test]
fn loops_are_detected() {
    let (mut m, mut d, mut q) = setup(4);
    // 0 -> 1 -> 2 -> 0 ...
    for i in 0..3 {
        d.put_desc(&mut m, d.desc, i, 0x4000, 1, desc_flags::NEXT, (i + 1) % 3);
    }
    d.publish(&mut m, 0);
    assert_eq!(q.pop(&mut m), Err(QueueError::ChainLoop));
    // A self-loop.
    let (mut m, mut d, mut q) = setup(4);
    d.put_desc(&mut m, d.desc, 2, 0x4000, 1, desc_flags::NEXT, 2);
    d.publish(&mut m, 2);
    assert_eq!(q.pop(&mut m), Err(QueueError::ChainLoop));
}

#[test]
fn a_chain_as_long_as_the_queue_is_fine() {
    let (mut m, mut d, mut q) = setup(4);
    d.add_chain(&mut m, &[(0x4000, 1, false); 4]);
    assert_eq!(q.pop(&mut m).unwrap().unwrap().descs.len(), 4);
}

#[test]
fn indices_out_of_range() {
    let (mut m, mut d, mut q) = setup(4);
    d.publish(&mut m, 4);
    assert_eq!(q.pop(&mut m), Err(QueueError::BadIndex(4)));
    let (mut m, mut d, mut q) = setup(4);
    d.put_desc(&mut m, d.desc, 0, 0x4000, 1, desc_flags::NEXT, 0xffff);
    d.publish(&mut m, 0);
    assert_eq!(q.pop(&mut m), Err(QueueError::BadIndex(0xffff)));
    let (mut m, _, mut q) = setup(4);
    assert_eq!(q.add_used(&mut m, 4, 0), Err(QueueError::BadUsedHead(4)));
}

#[test]
fn avail_index_may_not_run_ahead_by_more_than_the_size() {
    let (mut m, d, mut q) = setup(4);
    put(&mut m, d.avail + 2, &5u16.to_le_bytes());
    assert_eq!(
        q.pop(&mut m),
        Err(QueueError::AvailIndexJump { avail: 5, next: 0 })
    );
    put(&mut m, d.avail + 2, &4u16.to_le_bytes());
    assert!(q.pop(&mut m).is_ok());
}

#[test]
fn indirect_tables() {
    let (mut m, mut d, mut q) = setup(4);
    let table = 0x8000;
    m.put(0x4000, b"xy");
    d.put_desc(&mut m, table, 0, 0x4000, 2, desc_flags::NEXT, 2);
    d.put_desc(&mut m, table, 2, 0x5000, 3, desc_flags::WRITE, 0);
    let head = d.add_chain(&mut m, &[]);
    d.put_desc(&mut m, d.desc, head, table, 48, desc_flags::INDIRECT, 0);
    let c = q.pop(&mut m).unwrap().unwrap();
    assert_eq!(
        c.descs,
        [
            Descriptor {
                addr: 0x4000,
                len: 2,
                write: false
            },
            Descriptor {
                addr: 0x5000,
                len: 3,
                write: true
            },
        ]
    );

    let bad = |flags: u16, len: u32, inner: u16, indirect: bool| {
        let (mut m, d, mut q) = setup(4);
        q.indirect = indirect;
        d.put_desc(&mut m, 0x8000, 0, 0x4000, 2, inner, 0);
        d.put_desc(&mut m, d.desc, 0, 0x8000, len, flags, 1);
        d.put_desc(&mut m, d.desc, 1, 0x4000, 1, 0, 0);
        let mut d = d;
        d.publish(&mut m, 0);
        q.pop(&mut m)
    };
    let ind = desc_flags::INDIRECT;
    assert!(bad(ind, 16, 0, true).is_ok());
    assert_eq!(
        bad(ind, 16, 0, false),
        Err(QueueError::IndirectNotNegotiated)
    );
    assert_eq!(
        bad(ind | desc_flags::NEXT, 16, 0, true),
        Err(QueueError::BadIndirectFlags)
    );
    assert_eq!(bad(ind, 16, ind, true), Err(QueueError::BadIndirectFlags));
    assert_eq!(bad(ind, 0, 0, true), Err(QueueError::BadIndirectTable(0)));
    assert_eq!(bad(ind, 24, 0, true), Err(QueueError::BadIndirectTable(24)));
    assert_eq!(
        bad(ind, 16 * (MAX_INDIRECT + 1), 0, true),
        Err(QueueError::BadIndirectTable(16 * (MAX_INDIRECT + 1)))
    );
    // A loop inside the indirect table.
    assert_eq!(
        bad(ind, 16, desc_flags::NEXT, true),
        Err(QueueError::ChainLoop)
    );
    // Indirect table outside RAM.
    let (mut m, mut d, mut q) = setup(4);
    d.put_desc(&mut m, d.desc, 0, 0xffff_0000, 32, ind, 0);
    d.publish(&mut m, 0);
    assert!(matches!(q.pop(&mut m), Err(QueueError::Unbacked(_))));
}

#[test]
fn readable_after_writable_is_refused() {
    let (mut m, mut d, mut q) = setup(4);
    d.add_chain(&mut m, &[(0x4000, 1, true), (0x4000, 1, false)]);
    assert_eq!(q.pop(&mut m), Err(QueueError::ReadableAfterWritable));
}

#[test]
fn addresses_outside_ram_and_wrapping_buffers() {
    let (mut m, mut d, mut q) = setup(4);
    d.add_chain(&mut m, &[(u64::MAX - 1, 4, false)]);
    assert_eq!(
        q.pop(&mut m),
        Err(QueueError::BufferWraps {
            addr: u64::MAX - 1,
            len: 4
        })
    );
    let (mut m, mut d, mut q) = setup(4);
    d.add_chain(
        &mut m,
        &[(RAM as u64 - 2, 4, false), (0x1_0000_0000, 4, true)],
    );
    let c = q.pop(&mut m).unwrap().unwrap();
    let mut b = [0u8; 4];
    assert_eq!(
        c.reader().read(&mut m, &mut b),
        Err(QueueError::Unbacked(RAM as u64))
    );
    assert!(matches!(
        c.writer().write(&mut m, &b),
        Err(QueueError::Unbacked(_))
    ));
    // Rings outside RAM.
    let mut q = Queue::new(4);
    q.desc_table = 0x10_0000;
    q.avail_ring = 0x20_0000;
    q.used_ring = 0x30_0000;
    q.ready = true;
    assert!(matches!(q.pop(&mut m), Err(QueueError::Unbacked(_))));
    assert!(matches!(
        q.add_used(&mut m, 0, 0),
        Err(QueueError::Unbacked(_))
    ));
}

#[test]
fn configuration_checks() {
    let d = Driver::new(8, 0x1000);
    let mut q = d.queue();
    for size in [0, 3, 16] {
        q.size = size;
        assert_eq!(q.check(), Err(QueueError::BadSize(size)));
    }
    q.size = 4;
    assert!(q.check().is_ok());
    for (f, bad) in [(0usize, 0x1008u64), (1, 0x1001), (2, 0x1002)] {
        let mut q2 = q.clone();
        *[&mut q2.desc_table, &mut q2.avail_ring, &mut q2.used_ring][f] = bad;
        assert_eq!(q2.check(), Err(QueueError::BadAddress(bad)));
    }
    q.used_ring = u64::MAX - 3;
    assert_eq!(q.check(), Err(QueueError::BadAddress(u64::MAX - 3)));
    q.reset();
    assert!(!q.ready);
    assert_eq!((q.size, q.desc_table), (8, 0));
}

#[test]
fn need_event_matches_the_spec_formula() {
    // The driver wants an interrupt when the used index passes used_event.
    assert!(need_event(0, 1, 0));
    assert!(!need_event(1, 1, 0));
    assert!(need_event(1, 2, 0));
    assert!(!need_event(5, 3, 1));
    assert!(need_event(5, 6, 1));
    assert!(need_event(0xffff, 0, 0xfffe));
    assert!(!need_event(3, 3, 3));
}

#[test]
fn interrupt_suppression_without_event_idx() {
    let (mut m, mut d, mut q) = setup(4);
    d.add_chain(&mut m, &[(0x4000, 1, true)]);
    let c = q.pop(&mut m).unwrap().unwrap();
    q.add_used(&mut m, c.head, 0).unwrap();
    assert_eq!(q.needs_notification(&mut m), Ok(true));
    // Nothing new used: no interrupt.
    assert_eq!(q.needs_notification(&mut m), Ok(false));
    put(&mut m, d.avail, &AVAIL_F_NO_INTERRUPT.to_le_bytes());
    d.add_chain(&mut m, &[(0x4000, 1, true)]);
    let c = q.pop(&mut m).unwrap().unwrap();
    q.add_used(&mut m, c.head, 0).unwrap();
    assert_eq!(q.needs_notification(&mut m), Ok(false));
}

#[test]
fn event_idx_suppresses_and_publishes_avail_event() {
    let (mut m, mut d, mut q) = setup(8);
    q.event_idx = true;
    // The driver wants an interrupt only after the third used buffer.
    d.set_used_event(&mut m, 2);
    for i in 0..4u16 {
        d.add_chain(&mut m, &[(0x4000, 1, true)]);
        let c = q.pop(&mut m).unwrap().unwrap();
        q.add_used(&mut m, c.head, 1).unwrap();
        let want = i == 2;
        assert_eq!(q.needs_notification(&mut m), Ok(want), "buffer {i}");
    }
    // Batching: two used at once, crossing used_event, one interrupt.
    d.set_used_event(&mut m, 4);
    for _ in 0..2 {
        d.add_chain(&mut m, &[(0x4000, 1, true)]);
        let c = q.pop(&mut m).unwrap().unwrap();
        q.add_used(&mut m, c.head, 1).unwrap();
    }
    assert_eq!(q.needs_notification(&mut m), Ok(true));
    // An empty pop tells the driver where to notify next.
    assert_eq!(q.pop(&mut m), Ok(None));
    assert_eq!(d.avail_event(&mut m), 6);
    assert_eq!(d.take_used(&mut m).len(), 6);
}

#[test]
fn indices_wrap_at_65536() {
    let (mut m, mut d, mut q) = setup(4);
    m.put(0x4000, b"z");
    for i in 0..70_000u32 {
        d.add_chain(&mut m, &[(0x4000, 1, false), (0x4100, 1, true)]);
        let c = q.pop(&mut m).unwrap().unwrap();
        let mut w = c.writer();
        w.write(&mut m, &[i as u8]).unwrap();
        q.add_used(&mut m, c.head, w.written()).unwrap();
        let used = d.take_used(&mut m);
        assert_eq!(used, [(u32::from(c.head), 1)]);
    }
    assert_eq!(q.next_avail(), (70_000u32 % 65536) as u16);
}

#[test]
fn random_rings_never_panic_or_hang() {
    let mut rng = Rng::new(7);
    for _ in 0..3000 {
        let mut m = MockVcpu::new(0x2000);
        for b in m.mem.iter_mut() {
            // Mostly small values, so indices and lengths are often plausible.
            *b = if rng.chance(2) {
                rng.byte() & 7
            } else {
                rng.byte()
            };
        }
        let mut q = Queue::new(8);
        q.size = [1, 2, 4, 8][rng.below(4) as usize];
        q.desc_table = 0x100;
        q.avail_ring = 0x200;
        q.used_ring = 0x300;
        q.event_idx = rng.chance(2);
        q.indirect = rng.chance(2);
        q.ready = true;
        for _ in 0..16 {
            match q.pop(&mut m) {
                Ok(Some(c)) => {
                    let mut buf = [0u8; 64];
                    let _ = c.reader().read(&mut m, &mut buf);
                    let _ = c.writer().write(&mut m, &buf);
                    let _ = q.add_used(&mut m, c.head, 0);
                    let _ = q.needs_notification(&mut m);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}
