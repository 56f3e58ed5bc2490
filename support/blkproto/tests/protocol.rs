//! The session protocol end to end: a client ring, a service ring, and a service loop
//! over a simulated disk, with well-behaved and hostile clients.

use std::sync::atomic::AtomicU32;

use peregrine_blkproto::proto::{DESC_SIZE, FLAG_FUA};
use peregrine_blkproto::ring::region;
use peregrine_blkproto::{
    Bounds, ClientRing, Completion, Descriptor, Layout, Op, Request, RingError, ServiceRing,
    SessionLimits, SharedMem, Status,
};
use peregrine_rng::Rng;

const BS: usize = 512;
const DISK_BLOCKS: u64 = 256;
const PART: Bounds = Bounds {
    first_lba: 64,
    blocks: 32,
};
const DATA: usize = 16 * BS;

/// Byte offset of the submission tail, as the spec places it.
const SQ_TAIL: usize = 64;
/// Byte offset of the completion head.
const CQ_HEAD: usize = 256;

struct World {
    ring: Vec<AtomicU32>,
    layout: Layout,
    disk: Vec<u8>,
    data: Vec<u8>,
}

impl World {
    fn new(entries: u32) -> World {
        let layout = Layout::new(entries).unwrap();
        let disk = (0..DISK_BLOCKS as usize * BS)
            .map(|i| (i * 7 + i / BS) as u8)
            .collect();
        World {
            ring: region(layout.bytes()),
            layout,
            disk,
            data: vec![0; DATA],
        }
    }

    fn limits() -> SessionLimits {
        SessionLimits::new(PART, BS as u32, DATA as u64, 8)
    }
}

/// Executes one validated request on the simulated disk (slicing panics if the
/// validation let anything out of bounds through).
fn execute(r: &Request, disk: &mut [u8], data: &mut [u8]) -> Status {
    let at = r.lba as usize * BS;
    let (buf, len) = (r.buf as usize, r.len as usize);
    match r.op {
        Op::Read => data[buf..buf + len].copy_from_slice(&disk[at..at + len]),
        Op::Write => disk[at..at + len].copy_from_slice(&data[buf..buf + len]),
        Op::Flush => {}
        Op::Discard => disk[at..at + r.count as usize * BS].fill(0),
    }
    Status::Ok
}

/// Takes every request the service will take, executes them, completes them in
/// reverse order, publishes; the requests taken.
fn serve<M: SharedMem + ?Sized>(
    svc: &mut ServiceRing<'_, M>,
    disk: &mut [u8],
    data: &mut [u8],
) -> Result<Vec<Request>, RingError> {
    let mut taken = Vec::new();
    while let Some(r) = svc.next_request()? {
        taken.push(r);
    }
    for r in taken.iter().rev() {
        let st = execute(r, disk, data);
        assert!(svc.complete(r.tag, st, r.count)?);
    }
    svc.publish()?;
    Ok(taken)
}

fn drain<M: SharedMem + ?Sized>(c: &mut ClientRing<'_, M>) -> Vec<Completion> {
    let mut v = Vec::new();
    while let Some(x) = c.pop_completion().unwrap() {
        v.push(x);
    }
    v
}

fn write_word(ring: &[AtomicU32], byte: usize, v: u32) {
    ring.store_release(byte / 4, v);
}

#[test]
fn header_and_attach() {
    let w = World::new(8);
    let lim = World::limits();
    let _svc = ServiceRing::new(&w.ring[..], w.layout, lim).unwrap();
    let c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    assert_eq!((c.block_size(), c.max_blocks(), c.blocks()), (512, 8, 32));
    assert_eq!(c.free_slots(), 8);
    assert_eq!(
        ClientRing::attach(&w.ring[..], Layout::new(16).unwrap()).err(),
        Some(RingError::TooSmall)
    );
    assert_eq!(
        ClientRing::attach(&w.ring[..], Layout::new(4).unwrap()).err(),
        Some(RingError::BadHeader)
    );
    assert_eq!(
        ServiceRing::new(&w.ring[..4], w.layout, lim).err(),
        Some(RingError::TooSmall)
    );
    assert_eq!(Layout::new(0), None);
    assert_eq!(Layout::new(12), None);
    assert_eq!(Layout::new(8192), None);
    assert_eq!(Layout::new(8).unwrap().bytes(), 512 + 8 * 48);
}

#[test]
fn write_then_read_round_trip_touches_only_the_partition() {
    let mut w = World::new(8);
    let before = w.disk.clone();
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    for (i, b) in w.data[..2 * BS].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut d = Descriptor::new(7, Op::Write, 30, 2, 0);
    d.flags = FLAG_FUA;
    assert!(c.push(&d));
    assert_eq!(c.publish(), 1);
    assert_eq!(c.publish(), 0, "nothing new: no second doorbell");
    let taken = serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!((taken[0].lba, taken[0].fua), (94, true));
    assert_eq!(
        drain(&mut c),
        vec![Completion {
            tag: 7,
            status: Status::Ok,
            blocks: 2
        }]
    );
    let part = PART.first_lba as usize * BS..(PART.first_lba + PART.blocks) as usize * BS;
    for (i, (a, b)) in w.disk.iter().zip(&before).enumerate() {
        if !(94 * BS..96 * BS).contains(&i) {
            assert_eq!(a, b, "byte {i} changed");
        } else {
            assert!(part.contains(&i));
        }
    }
    // Read it back into another buffer.
    assert!(c.push(&Descriptor::new(8, Op::Read, 30, 2, 4 * BS as u64)));
    c.publish();
    serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
    assert_eq!(drain(&mut c)[0].status, Status::Ok);
    assert_eq!(w.data[..2 * BS], w.data[4 * BS..6 * BS]);
}

#[test]
fn a_batch_of_many_requests_one_doorbell_one_signal() {
    let mut w = World::new(64);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    for i in 0..64u32 {
        let d = Descriptor::new(
            1000 + i,
            Op::Read,
            u64::from(i % 32),
            1,
            (i as u64 % 16) * 512,
        );
        assert!(c.push(&d));
    }
    assert!(
        !c.push(&Descriptor::new(1, Op::Flush, 0, 0, 0)),
        "ring full"
    );
    assert_eq!(c.publish(), 64);
    assert_eq!(svc.pending(), Ok(64));
    let taken = serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
    assert_eq!(taken.len(), 64);
    let got = drain(&mut c);
    assert_eq!(got.len(), 64);
    // Completed in reverse: each tag exactly once, all OK.
    let tags: Vec<u32> = got.iter().map(|x| x.tag).collect();
    assert_eq!(tags, (1000..1064).rev().collect::<Vec<_>>());
    assert!(got.iter().all(|x| x.status == Status::Ok && x.blocks == 1));
    assert_eq!(svc.publish(), Ok(0), "nothing new: no second signal");
}

#[test]
fn ring_wraps_around_many_times() {
    let mut w = World::new(4);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    let mut next_tag = 0u32;
    let mut model = w.disk.clone();
    for round in 0..500u32 {
        let n = 1 + round % 4;
        for _ in 0..n {
            let block = u64::from(next_tag % 31);
            w.data[..BS].fill(next_tag as u8);
            // Every fourth a write, served at once so the data area still holds its bytes.
            if next_tag.is_multiple_of(4) {
                assert!(c.push(&Descriptor::new(next_tag, Op::Write, block, 1, 0)));
                let at = (PART.first_lba + block) as usize * BS;
                model[at..at + BS].fill(next_tag as u8);
            } else {
                assert!(c.push(&Descriptor::new(
                    next_tag,
                    Op::Read,
                    block,
                    2,
                    8 * BS as u64
                )));
            }
            next_tag += 1;
            if next_tag % 4 == 1 {
                // Publish and serve right after each write, so its data is current.
                c.publish();
                serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
            }
        }
        c.publish();
        serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
        for x in drain(&mut c) {
            assert_eq!(x.status, Status::Ok);
        }
        assert_eq!(svc.in_flight(), 0);
    }
    assert_eq!(w.disk, model);
}

/// Submits `d` among two good reads, serves, and checks that `d` alone failed with
/// `want`, the disk is unchanged and the data area changed only where the reads put
/// their bytes.
fn refused(d: Descriptor, want: Status) {
    let mut w = World::new(8);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    w.data.fill(0xee);
    let disk_before = w.disk.clone();
    assert!(c.push(&Descriptor::new(1, Op::Read, 0, 1, 0)));
    assert!(c.push(&d));
    assert!(c.push(&Descriptor::new(2, Op::Read, 31, 1, 15 * BS as u64)));
    c.publish();
    let taken = serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
    assert_eq!(taken.len(), 2, "{d:?}");
    assert_eq!(svc.rejected(), 1);
    assert!(svc.broken().is_none());
    let got = drain(&mut c);
    assert_eq!(got.len(), 3);
    let bad: Vec<_> = got.iter().filter(|x| x.status != Status::Ok).collect();
    assert_eq!(bad.len(), 1, "{got:?}");
    assert_eq!(
        *bad[0],
        Completion {
            tag: d.tag,
            status: want,
            blocks: 0
        }
    );
    assert_eq!(w.disk, disk_before, "{d:?} changed the disk");
    assert!(
        w.data[BS..15 * BS].iter().all(|b| *b == 0xee),
        "{d:?} changed the data area"
    );
}

#[test]
fn hostile_descriptors_each_get_their_error_and_touch_nothing() {
    let base = Descriptor::new(99, Op::Write, 0, 1, 512);
    let cases = [
        (Descriptor { op: 0, ..base }, Status::BadDesc),
        (Descriptor { op: 9, ..base }, Status::BadDesc),
        (
            Descriptor {
                flags: 0x80,
                ..base
            },
            Status::BadDesc,
        ),
        (
            Descriptor {
                reserved0: 1,
                ..base
            },
            Status::BadDesc,
        ),
        (
            Descriptor {
                reserved1: 1,
                ..base
            },
            Status::BadDesc,
        ),
        (Descriptor { count: 0, ..base }, Status::BadDesc),
        (Descriptor { count: 9, ..base }, Status::BadDesc),
        (Descriptor { block: 32, ..base }, Status::Range),
        (
            Descriptor {
                block: 31,
                count: 2,
                ..base
            },
            Status::Range,
        ),
        (
            Descriptor {
                block: u64::MAX,
                ..base
            },
            Status::Range,
        ),
        (
            Descriptor {
                block: (DISK_BLOCKS - PART.first_lba) - 1,
                ..base
            },
            Status::Range,
        ),
        (Descriptor { buf: 100, ..base }, Status::BadBuf),
        (
            Descriptor {
                buf: DATA as u64,
                ..base
            },
            Status::BadBuf,
        ),
        (
            Descriptor {
                buf: DATA as u64 - 512,
                count: 2,
                ..base
            },
            Status::BadBuf,
        ),
        (
            Descriptor {
                buf: u64::MAX - 511,
                ..base
            },
            Status::BadBuf,
        ),
        (
            Descriptor::new(99, Op::Discard, 0, 1, 0),
            Status::Unsupported,
        ),
        (Descriptor::new(99, Op::Flush, 1, 0, 0), Status::BadDesc),
        (Descriptor { tag: 1, ..base }, Status::BadTag),
    ];
    for (d, want) in cases {
        refused(d, want);
    }
}

#[test]
fn duplicate_tag_in_flight_refused_then_reusable() {
    let mut w = World::new(8);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    c.push(&Descriptor::new(5, Op::Read, 0, 1, 0));
    c.push(&Descriptor::new(5, Op::Write, 1, 1, 0));
    c.publish();
    let r = svc.next_request().unwrap().unwrap();
    assert_eq!(r.op, Op::Read);
    assert_eq!(svc.next_request(), Ok(None));
    svc.publish().unwrap();
    let got = drain(&mut c);
    assert_eq!(got[0].status, Status::BadTag);
    assert!(svc.complete(5, Status::Ok, 1).unwrap());
    assert!(
        !svc.complete(5, Status::Ok, 1).unwrap(),
        "not in flight any more"
    );
    svc.publish().unwrap();
    assert_eq!(drain(&mut c)[0].status, Status::Ok);
    // Completed: the tag may be used again.
    c.push(&Descriptor::new(5, Op::Write, 1, 1, 0));
    c.publish();
    assert_eq!(serve(&mut svc, &mut w.disk, &mut w.data).unwrap().len(), 1);
}

#[test]
fn io_errors_report_no_blocks() {
    let w = World::new(8);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    c.push(&Descriptor::new(3, Op::Read, 0, 4, 0));
    c.publish();
    let r = svc.next_request().unwrap().unwrap();
    svc.complete(r.tag, Status::IoErr, 4).unwrap();
    svc.publish().unwrap();
    assert_eq!(
        drain(&mut c),
        vec![Completion {
            tag: 3,
            status: Status::IoErr,
            blocks: 0
        }]
    );
}

#[test]
fn a_tail_jumping_more_than_a_ring_breaks_the_session() {
    for jump in [9u32, 100, u32::MAX, 0x8000_0000] {
        let mut w = World::new(8);
        let before = w.disk.clone();
        let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
        // Plausible descriptors in every slot: none may be executed.
        for slot in 0..8 {
            let d = Descriptor::new(slot, Op::Write, 0, 1, 0).to_bytes();
            for (i, chunk) in d.chunks(4).enumerate() {
                let v = u32::from_le_bytes(chunk.try_into().unwrap());
                write_word(&w.ring, 512 + slot as usize * DESC_SIZE + 4 * i, v);
            }
        }
        write_word(&w.ring, SQ_TAIL, jump);
        assert_eq!(svc.pending(), Err(RingError::SqJump));
        assert_eq!(svc.next_request(), Err(RingError::SqJump));
        // Sticky: a tail put back does not revive it.
        write_word(&w.ring, SQ_TAIL, 1);
        assert_eq!(svc.pending(), Err(RingError::SqJump));
        assert_eq!(svc.publish(), Err(RingError::SqJump));
        assert_eq!(svc.complete(0, Status::Ok, 1), Err(RingError::SqJump));
        assert_eq!(svc.broken(), Some(RingError::SqJump));
        assert_eq!(
            serve(&mut svc, &mut w.disk, &mut w.data).err(),
            Some(RingError::SqJump)
        );
        assert_eq!(w.disk, before);
    }
}

#[test]
fn a_completion_head_moving_backwards_or_past_the_tail_breaks_the_session() {
    for bogus in [1u32, u32::MAX, 5] {
        let mut w = World::new(4);
        let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
        let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
        c.push(&Descriptor::new(1, Op::Read, 0, 1, 0));
        c.publish();
        serve(&mut svc, &mut w.disk, &mut w.data).unwrap();
        drain(&mut c); // cq_head = 1
        c.push(&Descriptor::new(2, Op::Read, 0, 1, 0));
        c.publish();
        // Head 1 → bogus: 1 is fine (no move), u32::MAX is backwards, 5 is past tail 1.
        write_word(&w.ring, CQ_HEAD, bogus);
        let r = svc.next_request();
        if bogus == 1 {
            assert!(r.unwrap().is_some());
        } else {
            assert_eq!(r, Err(RingError::CqJump));
            assert_eq!(svc.broken(), Some(RingError::CqJump));
        }
    }
}

#[test]
fn a_client_that_does_not_read_completions_stalls_only_itself() {
    let mut w = World::new(4);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    for t in 0..4 {
        assert!(c.push(&Descriptor::new(t, Op::Read, 0, 1, 0)));
    }
    c.publish();
    assert_eq!(serve(&mut svc, &mut w.disk, &mut w.data).unwrap().len(), 4);
    // Completion ring full (4 unread); the submission ring has room again.
    for t in 4..8 {
        assert!(c.push(&Descriptor::new(t, Op::Read, 0, 1, 0)));
    }
    c.publish();
    assert_eq!(svc.next_request(), Ok(None));
    assert_eq!(svc.pending(), Ok(4));
    assert_eq!(drain(&mut c).len(), 4);
    assert!(c.needs_doorbell(), "the service stopped for want of slots");
    assert_eq!(serve(&mut svc, &mut w.disk, &mut w.data).unwrap().len(), 4);
    assert!(!c.needs_doorbell());
    assert_eq!(drain(&mut c).len(), 4);
}

#[test]
fn requests_in_flight_hold_their_completion_slots() {
    let w = World::new(4);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    for t in 0..4 {
        c.push(&Descriptor::new(t, Op::Read, 0, 1, 0));
    }
    c.publish();
    for _ in 0..4 {
        assert!(svc.next_request().unwrap().is_some());
    }
    // Four in flight, four completion slots promised: new descriptors (even bad ones,
    // whose error needs a slot) wait.
    c.push(&Descriptor::new(10, Op::Read, 1000, 1, 0));
    c.publish();
    assert_eq!(svc.next_request(), Ok(None));
    assert_eq!(svc.rejected(), 0);
    svc.complete(2, Status::Ok, 1).unwrap();
    svc.publish().unwrap();
    assert_eq!(
        svc.next_request(),
        Ok(None),
        "the completion is still unread"
    );
    assert_eq!(drain(&mut c).len(), 1);
    assert_eq!(
        svc.next_request(),
        Ok(None),
        "the bad one is answered instead"
    );
    assert_eq!(svc.rejected(), 1);
    for t in [0, 1, 3] {
        svc.complete(t, Status::Ok, 1).unwrap();
    }
    svc.publish().unwrap();
    let got = drain(&mut c);
    assert_eq!(got[0].status, Status::Range);
    assert_eq!(got.len(), 4);
}

/// Random descriptor words and ring counters: the service never panics, executes only
/// requests inside the partition and the data area (the simulated disk's slicing
/// would panic otherwise, and everything outside the partition is compared), and
/// either stays healthy or is broken for good.
#[test]
fn random_hostile_clients() {
    let mut rng = Rng::new(0x5e55_10e5);
    for round in 0..300 {
        let mut w = World::new(1 << rng.below(5));
        let before = w.disk.clone();
        let mut lim = World::limits();
        lim.discard = rng.chance(2);
        let mut svc = ServiceRing::new(&w.ring[..], w.layout, lim).unwrap();
        let ring: &[AtomicU32] = &w.ring;
        let n_words = ring.len();
        let mut broken = None;
        for _ in 0..40 {
            // Scribble: random words anywhere in the rings, sometimes near-valid
            // descriptors, sometimes the counters.
            for _ in 0..rng.below(12) {
                let word = 128 + rng.below((n_words - 128) as u64) as usize;
                let v = match rng.below(4) {
                    0 => rng.next_u64() as u32,
                    1 => rng.below(5) as u32,
                    2 => rng.below(40) as u32,
                    _ => (rng.below(20) * 512) as u32,
                };
                ring.store(word, v);
            }
            match rng.below(6) {
                0 => ring.store_release(16, rng.next_u64() as u32),
                1 | 2 => {
                    let t = ring.load(16).wrapping_add(rng.below(4) as u32);
                    ring.store_release(16, t);
                }
                3 => ring.store_release(64, ring.load(48).wrapping_sub(rng.below(3) as u32)),
                _ => {}
            }
            let mut taken = Vec::new();
            let res = (|| {
                while let Some(r) = svc.next_request()? {
                    taken.push(r);
                }
                Ok::<(), RingError>(())
            })();
            for r in &taken {
                assert!(r.lba >= PART.first_lba);
                assert!(r.lba + u64::from(r.count) <= PART.first_lba + PART.blocks);
                assert!(r.buf + r.len <= DATA as u64);
                execute(r, &mut w.disk, &mut w.data);
                let _ = svc.complete(r.tag, Status::Ok, r.count);
            }
            let _ = svc.publish();
            if let Err(e) = res {
                if let Some(prev) = broken {
                    assert_eq!(prev, e);
                }
                broken = Some(e);
                assert_eq!(svc.broken(), Some(e));
            }
        }
        let part = PART.first_lba as usize * BS..(PART.first_lba + PART.blocks) as usize * BS;
        assert_eq!(w.disk[..part.start], before[..part.start], "round {round}");
        assert_eq!(w.disk[part.end..], before[part.end..], "round {round}");
    }
}

#[test]
fn a_descriptor_rewritten_after_it_was_taken_changes_nothing() {
    let w = World::new(4);
    let mut svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let mut c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    c.push(&Descriptor::new(1, Op::Write, 3, 1, 0));
    c.publish();
    let r = svc.next_request().unwrap().unwrap();
    // The client rewrites slot 0 to aim past its partition: the service read it once.
    let evil = Descriptor::new(1, Op::Write, 1 << 40, 8, 0).to_bytes();
    for (i, chunk) in evil.chunks(4).enumerate() {
        write_word(
            &w.ring,
            512 + 4 * i,
            u32::from_le_bytes(chunk.try_into().unwrap()),
        );
    }
    assert_eq!((r.lba, r.count), (PART.first_lba + 3, 1));
    assert_eq!(svc.next_request(), Ok(None));
    assert_eq!(svc.pending(), Ok(0));
}

#[test]
fn the_service_rewrites_a_dirty_header() {
    let w = World::new(4);
    for word in w.ring.iter() {
        word.store(0xffff_ffff, std::sync::atomic::Ordering::Relaxed);
    }
    let _svc = ServiceRing::new(&w.ring[..], w.layout, World::limits()).unwrap();
    let c = ClientRing::attach(&w.ring[..], w.layout).unwrap();
    assert_eq!(c.free_slots(), 4);
    for word in 5..128 {
        let v = w.ring.load(word);
        if word == 5 {
            assert_eq!(v, 32, "session blocks");
        } else {
            assert_eq!(v, 0, "header word {word}");
        }
    }
}
