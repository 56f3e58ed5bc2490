//! The asynchronous virtio-blk device on a session, end to end: the guest driver's
//! side through the PCI transport, the device and [`SessionBackend`], and a fake disk
//! service on [`ServiceRing`] over an in-memory disk, driven step by step (and on a
//! thread), plus a raw hostile service that writes whatever it likes into the ring.

use super::*;
use crate::testutil::{Rng, SharedMem as Ram};
use crate::virtio::async_block::AsyncBlock;
use crate::virtio::block::{blk_status, features, req, MemDisk, VirtioBlock, QUEUE_SIZE};
use crate::virtio::pci::tests::Guest;
use crate::virtio::queue::tests::{put, Driver};
use crate::virtio::{feature, status, QueueError, VirtioError};
use peregrine_blkproto::ring::region;
use peregrine_blkproto::{Bounds, Request, ServiceRing, SessionLimits};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::vec::Vec;

/// Guest RAM: data-area bytes `0 .. RAM`.
const RAM: usize = 0x10_0000;
/// The bounce area right after it.
const BOUNCE_BASE: u64 = RAM as u64;
/// The session's first absolute LBA (the service translates; the disk below is the
/// session's blocks only).
const FIRST_LBA: u64 = 1000;
/// Session blocks (512 bytes).
const BLOCKS: u64 = 256;
/// Request headers: 16 bytes each from here.
const HDR: u64 = 0x8000;
/// Status bytes: one each from here.
const ST: u64 = 0x9800;
/// Data buffers from here up.
const DATA: u64 = 0x10000;
const FEATURES: u64 = feature::VERSION_1 | feature::RING_INDIRECT_DESC | features::FLUSH;

/// A doorbell that counts.
#[derive(Clone, Default)]
struct Bell(Arc<AtomicU32>);

impl Doorbell for Bell {
    fn ring_doorbell(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Bell {
    fn take(&self) -> u32 {
        self.0.swap(0, Ordering::SeqCst)
    }
}

/// A data buffer of a chain: (guest-physical address, length, device-writable).
type Buf = (u64, u32, bool);

type Backend<'m> = SessionBackend<'m, [AtomicU32], Bell, Ram>;
type Dev<'m> = AsyncBlock<Backend<'m>>;

fn image(blocks: u64, seed: u32) -> Vec<u8> {
    (0..(blocks * SECTOR_SIZE) as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) ^ (i >> 9)) as u8)
        .collect()
}

/// The fake disk service: takes descriptors through [`ServiceRing`] (which validates
/// them), holds them, and performs each when the test completes it, on `disk`
/// (session block `b` is `disk` sector `b`), moving data to and from the data area
/// (guest RAM, then the bounce area).
struct Service<'m> {
    ring: ServiceRing<'m, [AtomicU32]>,
    ram: Ram,
    bounce: Ram,
    disk: MemDisk,
    held: Vec<Request>,
    /// Every request taken, in order.
    log: Vec<Request>,
}

impl Service<'_> {
    /// Takes every descriptor the ring offers; how many.
    fn take(&mut self) -> usize {
        let mut n = 0;
        while let Some(r) = self.ring.next_request().unwrap() {
            assert!(r.op == Op::Flush || r.lba >= FIRST_LBA, "absolute LBAs");
            self.held.push(r);
            self.log.push(r);
            n += 1;
        }
        n
    }

    fn area(&self, off: u64, len: usize) -> Vec<u8> {
        if off < BOUNCE_BASE {
            assert!(off + len as u64 <= RAM as u64, "a buffer across RAM's end");
            self.ram.bytes(off, len)
        } else {
            self.bounce.bytes(off - BOUNCE_BASE, len)
        }
    }

    fn set_area(&mut self, off: u64, b: &[u8]) {
        use crate::vcpu::GuestMemory;
        if off < BOUNCE_BASE {
            assert!(
                off + b.len() as u64 <= RAM as u64,
                "a buffer across RAM's end"
            );
            self.ram.write(off, b).unwrap();
        } else {
            self.bounce.write(off - BOUNCE_BASE, b).unwrap();
        }
    }

    /// Does `r` on the disk.
    fn perform(&mut self, r: &Request) {
        let sector =
            r.lba.saturating_sub(FIRST_LBA) as usize * self.ring.limits().block_size as usize;
        let len = r.len as usize;
        match r.op {
            Op::Read => {
                let b = self.disk.data[sector..sector + len].to_vec();
                self.set_area(r.buf, &b);
            }
            Op::Write => {
                let b = self.area(r.buf, len);
                self.disk.data[sector..sector + len].copy_from_slice(&b);
            }
            Op::Flush => {
                self.disk.durable.copy_from_slice(&self.disk.data);
                self.disk.flushes += 1;
            }
            Op::Discard => unreachable!("not offered"),
        }
    }

    /// Performs and completes held request `i` (OK).
    fn complete(&mut self, i: usize) {
        let r = self.held.remove(i);
        self.perform(&r);
        assert!(self.ring.complete(r.tag, Status::Ok, r.count).unwrap());
    }

    /// Completes held request `i` with `st` without doing it.
    fn fail(&mut self, i: usize, st: Status) {
        let r = self.held.remove(i);
        assert!(self.ring.complete(r.tag, st, 0).unwrap());
    }

    fn complete_all(&mut self) {
        while !self.held.is_empty() {
            self.complete(0);
        }
    }

    /// Completes the held requests in a random order.
    fn complete_shuffled(&mut self, rng: &mut Rng) {
        while !self.held.is_empty() {
            let i = rng.below(self.held.len() as u64) as usize;
            self.complete(i);
        }
    }

    /// Publishes the completions: whether a completion signal is due.
    fn publish(&mut self) -> bool {
        self.ring.publish().unwrap() != 0
    }
}

/// Geometry of a rig.
#[derive(Clone, Copy)]
struct Geo {
    /// Bytes per session block.
    block: u32,
    entries: u32,
    max_blocks: u32,
    bounce_len: u64,
}

const GEO: Geo = Geo {
    block: 512,
    entries: 32,
    max_blocks: 64,
    bounce_len: 0x10000,
};

struct Rig<'m> {
    g: Guest<Dev<'m>>,
    d: Driver,
    ram: Ram,
    svc: Service<'m>,
    bell: Bell,
    /// Chain head → request slot (header/status index), for chains in flight.
    heads: BTreeMap<u16, usize>,
}

fn layout(geo: Geo) -> Layout {
    Layout::new(geo.entries).unwrap()
}

fn ring_mem(geo: Geo) -> Vec<AtomicU32> {
    region(layout(geo).bytes())
}

impl<'m> Rig<'m> {
    fn new(mem: &'m [AtomicU32], geo: Geo) -> Self {
        Self::with_disk(mem, geo, MemDisk::new(image(BLOCKS, 0x55)))
    }

    fn with_disk(mem: &'m [AtomicU32], geo: Geo, disk: MemDisk) -> Self {
        let blocks = disk.data.len() as u64 / u64::from(geo.block);
        let limits = SessionLimits::new(
            Bounds {
                first_lba: FIRST_LBA,
                blocks,
            },
            geo.block,
            BOUNCE_BASE + geo.bounce_len,
            geo.max_blocks,
        );
        let ring = ServiceRing::new(mem, layout(geo), limits).unwrap();
        let bell = Bell::default();
        let bounce = Ram::new(geo.bounce_len as usize);
        let area = DataArea {
            ram_len: RAM as u64,
            bounce_base: BOUNCE_BASE,
            bounce_len: geo.bounce_len,
            bounce: bounce.clone(),
        };
        let backend = SessionBackend::new(mem, layout(geo), area, bell.clone()).unwrap();
        let mut g = Guest::with_ram(AsyncBlock::new(backend, false, b"session-disk"), RAM);
        let d = g.up(FEATURES, &[QUEUE_SIZE]).remove(0);
        let ram = g.mem.clone();
        let svc = Service {
            ring,
            ram: ram.clone(),
            bounce,
            disk,
            held: Vec::new(),
            log: Vec::new(),
        };
        Self {
            g,
            d,
            ram,
            svc,
            bell,
            heads: BTreeMap::new(),
        }
    }

    /// Makes request `i` available (not notified): header `i`, `data`, status byte `i`.
    fn add(&mut self, i: usize, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> u16 {
        let hdr = HDR + 16 * i as u64;
        let st = ST + i as u64;
        put(&mut self.ram, hdr, &header(ty, sector));
        put(&mut self.ram, st, &[0xee]);
        let mut bufs = std::vec![(hdr, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((st, 1, true));
        let head = self.d.add_chain(&mut self.ram, &bufs);
        assert!(
            self.heads.insert(head, i).is_none(),
            "a head reused in flight"
        );
        head
    }

    fn notify(&mut self) {
        self.g.notify(0);
    }

    /// The completion signal: the VMM's completion thread's call. Whether the driver
    /// was interrupted.
    fn signal(&mut self) -> bool {
        self.g.dev.process_queue(0)
    }

    /// Publishes the service's completions and signals if any.
    fn deliver(&mut self) -> bool {
        self.svc.publish() && self.signal()
    }

    /// The requests used since the last call: (request slot, status byte, used length).
    fn used(&mut self) -> Vec<(usize, u8, u32)> {
        let used = self.d.take_used(&mut self.ram);
        used.into_iter()
            .map(|(head, len)| {
                let i = self.heads.remove(&(head as u16)).expect("a head in flight");
                (i, self.ram.bytes(ST + i as u64, 1)[0], len)
            })
            .collect()
    }

    /// One request alone: add, notify, service does it, deliver; (status, used length).
    fn one(&mut self, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.add(0, ty, sector, data);
        self.notify();
        self.svc.take();
        self.svc.complete_all();
        self.deliver();
        let u = self.used();
        assert_eq!(u.len(), 1, "one request, one used element");
        (u[0].1, u[0].2)
    }

    fn backend(&self) -> &Backend<'m> {
        self.g.dev.device().backend()
    }

    fn needs_reset(&mut self) -> bool {
        self.g.status() & status::DEVICE_NEEDS_RESET != 0
    }
}

fn header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn sectors(disk: &MemDisk, sector: u64, n: u64) -> Vec<u8> {
    disk.data[(sector * SECTOR_SIZE) as usize..((sector + n) * SECTOR_SIZE) as usize].to_vec()
}

#[test]
fn a_session_with_a_nonsense_header_or_layout_is_refused() {
    let l = layout(GEO);
    let limits = SessionLimits::new(
        Bounds {
            first_lba: 0,
            blocks: 8,
        },
        512,
        BOUNCE_BASE + 4096,
        8,
    );
    let area = |ram_len: u64, bounce_base: u64| DataArea {
        ram_len,
        bounce_base,
        bounce_len: 4096,
        bounce: Ram::new(4096),
    };
    let attach = |mem: &[AtomicU32], a: DataArea<Ram>| {
        SessionBackend::new(mem, l, a, Bell::default()).map(|_| ())
    };
    // Header words: 3 block size, 4 maximum blocks, 5 and 6 the length in blocks.
    for (word, val, want) in [
        (3, 0, SessionError::Geometry),
        (3, 256, SessionError::Geometry),
        (3, 3000, SessionError::Geometry),
        (4, 0, SessionError::Geometry),
        (6, u32::MAX, SessionError::Geometry),
        (0, 0, SessionError::Ring(RingError::BadHeader)),
        (2, 64, SessionError::Ring(RingError::BadHeader)),
    ] {
        let mem = ring_mem(GEO);
        ServiceRing::new(&mem[..], l, limits).unwrap();
        mem[word].store(val, Ordering::SeqCst);
        assert_eq!(
            attach(&mem, area(RAM as u64, BOUNCE_BASE)),
            Err(want),
            "word {word} = {val}"
        );
    }
    let mem = ring_mem(GEO);
    ServiceRing::new(&mem[..], l, limits).unwrap();
    assert_eq!(
        attach(&mem, area(RAM as u64, BOUNCE_BASE - 512)),
        Err(SessionError::BounceArea)
    );
    assert_eq!(
        attach(&mem, area(RAM as u64, BOUNCE_BASE + 100)),
        Err(SessionError::BounceArea)
    );
    assert_eq!(
        attach(&mem[..16], area(RAM as u64, BOUNCE_BASE)),
        Err(SessionError::Ring(RingError::TooSmall))
    );
    // A 4 KiB-block session is fine: its capacity is in 512-byte sectors.
    mem[3].store(4096, Ordering::SeqCst);
    let b =
        SessionBackend::new(&mem[..], l, area(RAM as u64, BOUNCE_BASE), Bell::default()).unwrap();
    assert_eq!((b.capacity(), b.block_size()), (64, 4096));
}

/// A session of 4 KiB blocks: the guest is told `blk_size` 4096, whole blocks go
/// through (straight or bounced, in 512-byte sectors on the virtio side), anything
/// else is an error that never reaches the service.
#[test]
fn a_session_of_4k_blocks() {
    let geo = Geo {
        block: 4096,
        entries: 8,
        max_blocks: 2,
        bounce_len: 8 * 4096,
    };
    let mem = ring_mem(geo);
    let mut r = Rig::with_disk(&mem, geo, MemDisk::new(image(64, 4)));
    use crate::virtio::block::config;
    use crate::virtio::pci::DEVICE_CFG;
    assert_eq!(r.g.r(DEVICE_CFG + config::CAPACITY, 8), 64);
    assert_eq!(r.g.r(DEVICE_CFG + config::BLK_SIZE, 4), 4096);
    // Sectors 16..40 (blocks 2..5) into three page-aligned buffers: block-sized runs.
    let bufs = [(DATA, 8192, true), (DATA + 0x4000, 4096, true)];
    assert_eq!(r.one(req::IN, 16, &bufs), (blk_status::OK, 12289));
    let shape: Vec<(u64, u32, u64)> = r
        .svc
        .log
        .iter()
        .map(|q| (q.lba - FIRST_LBA, q.count, q.buf))
        .collect();
    assert_eq!(shape, [(2, 2, DATA), (4, 1, DATA + 0x4000)]);
    assert_eq!(r.ram.bytes(DATA, 8192), sectors(&r.svc.disk, 16, 16));
    assert_eq!(
        r.ram.bytes(DATA + 0x4000, 4096),
        sectors(&r.svc.disk, 32, 8)
    );
    // A 512-aligned buffer that is not block-aligned is bounced.
    let data = image(8, 1);
    put(&mut r.ram, DATA + 0x200, &data);
    assert_eq!(
        r.one(req::OUT, 8, &[(DATA + 0x200, 4096, false)]),
        (blk_status::OK, 1)
    );
    assert!(r.svc.log.last().unwrap().buf >= BOUNCE_BASE);
    assert_eq!(sectors(&r.svc.disk, 8, 8), data);
    // Not on a block boundary, not whole blocks, past the end.
    let logged = r.svc.log.len();
    for (k, (sector, len)) in [(1, 4096), (8, 512), (8, 4608), (64, 4096)]
        .into_iter()
        .enumerate()
    {
        r.add(k, req::IN, sector, &[(DATA, len, true)]);
        r.notify();
        assert_eq!(
            r.used(),
            [(k, blk_status::IOERR, 1)],
            "sector {sector} len {len}"
        );
    }
    assert_eq!(r.svc.take(), 0);
    assert_eq!(r.svc.log.len(), logged);
}

#[test]
fn config_space_shows_the_session() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    use crate::virtio::block::config;
    use crate::virtio::pci::DEVICE_CFG;
    assert_eq!(r.g.r(DEVICE_CFG + config::CAPACITY, 8), BLOCKS);
    assert_eq!(r.g.r(DEVICE_CFG + config::BLK_SIZE, 4), 512);
    assert_ne!(r.g.device_features() & features::FLUSH, 0);
    assert_eq!(r.backend().block_size(), 512);
}

#[test]
fn a_read_lands_at_its_guest_addresses_without_a_copy() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    // Two page-aligned buffers apart from each other: two descriptors, each pointing
    // straight at its buffer.
    r.add(
        0,
        req::IN,
        8,
        &[(DATA, 1024, true), (DATA + 0x3000, 512, true)],
    );
    r.notify();
    assert_eq!(r.bell.take(), 1, "one doorbell for the batch");
    assert_eq!(r.svc.take(), 2);
    let bufs: Vec<(u64, u32, u64)> = r.svc.held.iter().map(|q| (q.lba, q.count, q.buf)).collect();
    assert_eq!(
        bufs,
        [(FIRST_LBA + 8, 2, DATA), (FIRST_LBA + 10, 1, DATA + 0x3000)]
    );
    assert!(
        r.used().is_empty(),
        "nothing is done before the service answers"
    );
    assert!(!r.signal(), "a signal with nothing done interrupts nobody");
    r.svc.complete_all();
    assert!(r.deliver(), "the completion interrupts the driver");
    assert_eq!(r.used(), [(0, blk_status::OK, 1537)]);
    assert_eq!(r.ram.bytes(DATA, 1024), sectors(&r.svc.disk, 8, 2));
    assert_eq!(r.ram.bytes(DATA + 0x3000, 512), sectors(&r.svc.disk, 10, 1));
    assert_eq!(r.g.isr(), crate::virtio::pci::isr::QUEUE);
    assert_eq!(r.backend().pieces_in_flight(), 0);
    assert_eq!(r.backend().requests(), 0);
}

#[test]
fn a_driver_that_wants_no_interrupt_gets_none() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let avail = r.d.avail;
    put(
        &mut r.ram,
        avail,
        &crate::virtio::queue::AVAIL_F_NO_INTERRUPT.to_le_bytes(),
    );
    r.add(0, req::IN, 0, &[(DATA, 512, true)]);
    r.notify();
    r.svc.take();
    r.svc.complete_all();
    assert!(!r.deliver(), "used, but not interrupted");
    assert_eq!(r.used(), [(0, blk_status::OK, 513)]);
    assert_eq!(r.g.isr(), 0);
}

#[test]
fn contiguous_segments_merge_and_long_runs_split_at_the_maximum() {
    let geo = Geo {
        max_blocks: 4,
        ..GEO
    };
    let mem = ring_mem(geo);
    let mut r = Rig::new(&mem, geo);
    let data = image(12, 9);
    put(&mut r.ram, DATA, &data);
    // Three segments, contiguous in guest memory: one run of 12 blocks, cut into 4s.
    let (st, len) = {
        r.add(
            0,
            req::OUT,
            20,
            &[
                (DATA, 2048, false),
                (DATA + 2048, 1024, false),
                (DATA + 3072, 3072, false),
            ],
        );
        r.notify();
        r.svc.take();
        let shape: Vec<(u64, u32, u64)> = r
            .svc
            .held
            .iter()
            .map(|q| (q.lba - FIRST_LBA, q.count, q.buf))
            .collect();
        assert_eq!(
            shape,
            [(20, 4, DATA), (24, 4, DATA + 2048), (28, 4, DATA + 4096)]
        );
        r.svc.complete_shuffled(&mut Rng::new(3));
        r.deliver();
        let u = r.used();
        (u[0].1, u[0].2)
    };
    assert_eq!((st, len), (blk_status::OK, 1));
    assert_eq!(sectors(&r.svc.disk, 20, 12), data);
}

#[test]
fn many_requests_in_flight_complete_out_of_order() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let mut rng = Rng::new(11);
    // 24 requests: even ones write 2 blocks at 4i, odd ones read 2 blocks at 4i.
    let payload: Vec<Vec<u8>> = (0..24).map(|i| image(2, 100 + i)).collect();
    for (i, p) in payload.iter().enumerate() {
        let buf = DATA + 0x1000 * i as u64;
        if i % 2 == 0 {
            put(&mut r.ram, buf, p);
            r.add(i, req::OUT, 4 * i as u64, &[(buf, 1024, false)]);
        } else {
            r.add(i, req::IN, 4 * i as u64, &[(buf, 1024, true)]);
        }
    }
    r.notify();
    assert_eq!(r.bell.take(), 1, "24 requests, one doorbell");
    assert_eq!(r.svc.take(), 24);
    assert_eq!(r.g.dev.device().in_flight(), 24);
    // Complete them a few at a time, in random order, one signal per batch.
    let mut seen = Vec::new();
    while !r.svc.held.is_empty() {
        for _ in 0..rng.below(5) + 1 {
            if r.svc.held.is_empty() {
                break;
            }
            let i = rng.below(r.svc.held.len() as u64) as usize;
            r.svc.complete(i);
        }
        r.deliver();
        seen.extend(r.used());
    }
    seen.sort();
    assert_eq!(seen.len(), 24);
    for (i, st, len) in seen {
        assert_eq!(st, blk_status::OK, "request {i}");
        let buf = DATA + 0x1000 * i as u64;
        let on_disk = sectors(&r.svc.disk, 4 * i as u64, 2);
        if i % 2 == 0 {
            assert_eq!(len, 1);
            assert_eq!(on_disk, payload[i]);
        } else {
            assert_eq!(len, 1025);
            assert_eq!(r.ram.bytes(buf, 1024), on_disk);
        }
    }
    assert_eq!(r.backend().stray(), 0);
}

#[test]
fn a_full_ring_makes_the_device_wait_and_retry() {
    let geo = Geo { entries: 4, ..GEO };
    let mem = ring_mem(geo);
    let mut r = Rig::new(&mem, geo);
    for i in 0..10usize {
        r.add(
            i,
            req::IN,
            i as u64,
            &[(DATA + 0x1000 * i as u64, 512, true)],
        );
    }
    r.notify();
    assert_eq!(r.bell.take(), 1);
    assert!(r.g.dev.device().stalled(), "a chain waits for room");
    assert_eq!(r.backend().pieces_in_flight(), 4);
    assert_eq!(r.svc.take(), 4);
    // The driver notifies again meanwhile: still no room, no doorbell for nothing.
    r.notify();
    assert_eq!(r.bell.take(), 0);
    let mut done = Vec::new();
    let mut rounds = 0;
    while done.len() < 10 {
        rounds += 1;
        assert!(rounds < 20);
        // Complete one at a time: each signal frees one tag for one more request.
        r.svc.complete(0);
        r.deliver();
        done.extend(r.used());
        r.svc.take();
    }
    assert!(!r.g.dev.device().stalled());
    done.sort();
    for (k, &(i, st, len)) in done.iter().enumerate() {
        assert_eq!((i, st, len), (k, blk_status::OK, 513));
        assert_eq!(
            r.ram.bytes(DATA + 0x1000 * i as u64, 512),
            sectors(&r.svc.disk, i as u64, 1)
        );
    }
}

/// A service that takes one descriptor per doorbell (it may stop early, the protocol
/// says, and look again at the next doorbell): after reading completions while
/// descriptors wait untaken, the client rings again, even with nothing new to send.
#[test]
fn the_doorbell_rings_again_for_descriptors_left_untaken() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    for i in 0..4usize {
        r.add(
            i,
            req::IN,
            i as u64,
            &[(DATA + 0x1000 * i as u64, 512, true)],
        );
    }
    r.notify();
    assert_eq!(r.bell.take(), 1);
    let mut used = Vec::new();
    for round in 0..4 {
        let took = r.svc.ring.next_request().unwrap().unwrap();
        r.svc.held.push(took);
        r.svc.complete(0);
        r.deliver();
        used.extend(r.used());
        let want = u32::from(round < 3);
        assert_eq!(r.bell.take(), want, "round {round}: rang for the rest");
    }
    used.sort();
    assert_eq!(used.len(), 4);
    assert!(used
        .iter()
        .all(|&(_, st, len)| (st, len) == (blk_status::OK, 513)));
}

/// Guest memory that is not RAM, found while copying through the bounce area, needs a
/// reset, as the synchronous device's copy does; a write's bad buffer is found before
/// anything goes out.
#[test]
fn a_bounced_buffer_outside_ram_needs_a_reset() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    r.add(0, req::OUT, 0, &[(RAM as u64 - 512, 1024, false)]);
    r.notify();
    assert!(r.needs_reset());
    assert!(matches!(
        r.g.dev.error(),
        Some(VirtioError::Queue(QueueError::Unbacked(_)))
    ));
    assert_eq!(r.svc.take(), 0, "nothing went out");
    assert_eq!(r.backend().requests(), 0);
    assert_eq!(r.backend().pieces_in_flight(), 0);
}

#[test]
fn a_flush_completes_only_after_the_services_flush() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    put(&mut r.ram, DATA, &[0xab; 512]);
    assert_eq!(
        r.one(req::OUT, 3, &[(DATA, 512, false)]),
        (blk_status::OK, 1)
    );
    assert_eq!(r.svc.disk.data[3 * 512], 0xab);
    assert_ne!(
        r.svc.disk.durable[3 * 512],
        0xab,
        "not durable before the flush"
    );
    // The flush and a read behind it.
    r.add(1, req::FLUSH, 0, &[]);
    r.add(2, req::IN, 0, &[(DATA + 0x1000, 512, true)]);
    r.notify();
    assert_eq!(r.svc.take(), 2);
    assert_eq!(r.svc.held[0].op, Op::Flush);
    assert_eq!((r.svc.held[0].count, r.svc.held[0].buf), (0, 0));
    // The read finishes first; the flush is still the guest's to wait for.
    r.svc.complete(1);
    r.deliver();
    assert_eq!(r.used(), [(2, blk_status::OK, 513)]);
    assert_ne!(r.svc.disk.durable[3 * 512], 0xab);
    r.signal();
    assert!(
        r.used().is_empty(),
        "no flush completion without the service's"
    );
    r.svc.complete(0);
    r.deliver();
    assert_eq!(r.used(), [(1, blk_status::OK, 1)]);
    assert_eq!(r.svc.disk.durable[3 * 512..4 * 512], [0xab; 512]);
    assert_eq!(r.svc.disk.flushes, 1);
    // A failed flush is an error.
    r.add(3, req::FLUSH, 0, &[]);
    r.notify();
    r.svc.take();
    r.svc.fail(0, Status::IoErr);
    r.deliver();
    assert_eq!(r.used(), [(3, blk_status::IOERR, 1)]);
}

#[test]
fn every_service_error_is_an_ioerr() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    for (k, st) in [
        Status::IoErr,
        Status::Range,
        Status::BadDesc,
        Status::BadBuf,
        Status::BadTag,
        Status::Unsupported,
        Status::Unknown(77),
    ]
    .into_iter()
    .enumerate()
    {
        put(&mut r.ram, DATA, &[0x11; 512]);
        r.add(k, req::IN, 1, &[(DATA, 512, true)]);
        r.notify();
        r.svc.take();
        r.svc.fail(0, st);
        r.deliver();
        assert_eq!(r.used(), [(k, blk_status::IOERR, 1)], "{st:?}");
    }
    // One failed piece of three fails the request; the others still complete first.
    r.add(
        9,
        req::IN,
        0,
        &[
            (DATA, 512, true),
            (DATA + 0x2000, 512, true),
            (DATA + 0x4000, 512, true),
        ],
    );
    r.notify();
    assert_eq!(r.svc.take(), 3);
    r.svc.complete(0);
    r.svc.fail(0, Status::IoErr);
    r.deliver();
    assert!(r.used().is_empty(), "a piece is still out");
    r.svc.complete(0);
    r.deliver();
    assert_eq!(r.used(), [(9, blk_status::IOERR, 1)]);
    assert_eq!(r.backend().requests(), 0);
    assert!(!r.needs_reset());
}

#[test]
fn unaligned_segments_go_through_the_bounce_area() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let data = image(3, 42);
    // A write from buffers that split sectors (700 + 836 bytes), at odd addresses.
    put(&mut r.ram, DATA + 3, &data[..700]);
    put(&mut r.ram, DATA + 0x2001, &data[700..]);
    r.add(
        0,
        req::OUT,
        10,
        &[(DATA + 3, 700, false), (DATA + 0x2001, 836, false)],
    );
    r.notify();
    r.svc.take();
    assert!(r.svc.held.iter().all(|q| q.buf >= BOUNCE_BASE), "bounced");
    r.svc.complete_all();
    r.deliver();
    assert_eq!(r.used(), [(0, blk_status::OK, 1)]);
    assert_eq!(sectors(&r.svc.disk, 10, 3), data);
    // Read back into three odd buffers.
    let bufs = [
        (DATA + 0x5007, 100u32, true),
        (DATA + 0x6000, 1000, true),
        (DATA + 0x7003, 436, true),
    ];
    assert_eq!(r.one(req::IN, 10, &bufs), (blk_status::OK, 1537));
    let mut back = Vec::new();
    for (gpa, n, _) in bufs {
        back.extend(r.ram.bytes(gpa, n as usize));
    }
    assert_eq!(back, data);
    // A buffer aligned but past guest RAM's part of the data area is not RAM: the
    // device needs a reset, as the synchronous device does.
    r.add(1, req::IN, 0, &[(RAM as u64, 512, true)]);
    r.notify();
    r.svc.take();
    assert!(
        r.svc.held[0].buf >= BOUNCE_BASE,
        "never a descriptor past RAM"
    );
    r.svc.complete_all();
    r.deliver();
    assert!(r.needs_reset());
    assert!(matches!(
        r.g.dev.error(),
        Some(VirtioError::Queue(QueueError::Unbacked(_)))
    ));
}

#[test]
fn a_large_bounced_request_is_fed_through_small_slots() {
    // 4 tags, 4 KiB bounce: 1 KiB (2 blocks) per slot. A 24-block unaligned request is
    // 12 pieces, at most 4 out at once.
    let geo = Geo {
        block: 512,
        entries: 4,
        max_blocks: 64,
        bounce_len: 4096,
    };
    let mem = ring_mem(geo);
    let mut r = Rig::new(&mem, geo);
    let mut rng = Rng::new(7);
    let data = image(24, 5);
    put(&mut r.ram, DATA + 1, &data);
    r.add(0, req::OUT, 40, &[(DATA + 1, 24 * 512, false)]);
    // A second request behind it waits until the first is all out.
    r.add(1, req::IN, 0, &[(DATA + 0x8000, 512, true)]);
    r.notify();
    let mut used = Vec::new();
    let mut most = 0;
    for _ in 0..40 {
        r.svc.take();
        most = most.max(r.svc.held.len());
        if r.svc.held.is_empty() {
            break;
        }
        let i = rng.below(r.svc.held.len() as u64) as usize;
        r.svc.complete(i);
        r.deliver();
        used.extend(r.used());
    }
    assert_eq!(most, 4);
    used.sort();
    assert_eq!(used, [(0, blk_status::OK, 1), (1, blk_status::OK, 513)]);
    assert_eq!(sectors(&r.svc.disk, 40, 24), data);
    assert_eq!(r.svc.log.len(), 13);
    assert!(r
        .svc
        .log
        .iter()
        .take(12)
        .all(|q| q.count <= 2 && q.buf >= BOUNCE_BASE));
    // And read back the same way.
    put(&mut r.ram, DATA + 0x10001, &[0; 24 * 512]);
    r.add(2, req::IN, 40, &[(DATA + 0x10001, 24 * 512, true)]);
    r.notify();
    for _ in 0..20 {
        r.svc.take();
        r.svc.complete_shuffled(&mut rng);
        r.deliver();
    }
    assert_eq!(r.used(), [(2, blk_status::OK, 24 * 512 + 1)]);
    assert_eq!(r.ram.bytes(DATA + 0x10001, 24 * 512), data);
}

#[test]
fn a_session_without_a_bounce_area_fails_unaligned_requests() {
    let geo = Geo {
        bounce_len: 0,
        ..GEO
    };
    let mem = ring_mem(geo);
    let mut r = Rig::new(&mem, geo);
    r.add(0, req::IN, 0, &[(DATA + 1, 512, true)]);
    r.notify();
    assert_eq!(r.used(), [(0, blk_status::IOERR, 1)]);
    assert_eq!(r.svc.take(), 0);
    assert_eq!(
        r.one(req::IN, 0, &[(DATA, 512, true)]),
        (blk_status::OK, 513)
    );
}

#[test]
fn requests_the_device_refuses_never_reach_the_service() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let cases: [(u32, u64, Vec<Buf>, u8); 7] = [
        (
            req::IN,
            BLOCKS,
            std::vec![(DATA, 512, true)],
            blk_status::IOERR,
        ),
        (
            req::IN,
            BLOCKS - 1,
            std::vec![(DATA, 1024, true)],
            blk_status::IOERR,
        ),
        (
            req::OUT,
            u64::MAX,
            std::vec![(DATA, 512, false)],
            blk_status::IOERR,
        ),
        (req::IN, 0, std::vec![(DATA, 100, true)], blk_status::IOERR),
        (req::OUT, 0, std::vec![(DATA, 512, true)], blk_status::IOERR),
        (11, 0, std::vec![], blk_status::UNSUPP),
        (req::IN, 0, std::vec![], blk_status::OK),
    ];
    for (k, (ty, sector, bufs, want)) in cases.iter().enumerate() {
        r.add(k, *ty, *sector, bufs);
        r.notify();
        assert_eq!(r.used(), [(k, *want, 1)], "case {k}");
    }
    r.add(9, req::GET_ID, 0, &[(DATA, 20, true)]);
    r.notify();
    assert_eq!(r.used(), [(9, blk_status::OK, 21)]);
    assert_eq!(&r.ram.bytes(DATA, 12), b"session-disk");
    assert_eq!(r.svc.take(), 0);
    assert_eq!(r.bell.take(), 0, "no doorbell without descriptors");
}

#[test]
fn a_reset_forgets_requests_in_flight() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    r.add(0, req::IN, 0, &[(DATA, 512, true)]);
    r.add(1, req::IN, 5, &[(DATA + 1, 512, true)]);
    r.notify();
    assert_eq!(r.svc.take(), 2);
    // The driver resets and starts over; the old requests finish afterwards.
    let d = r.g.up(FEATURES, &[QUEUE_SIZE]).remove(0);
    r.d = d;
    r.heads.clear();
    put(&mut r.ram, DATA + 0x2000, &[0; 512]);
    r.add(2, req::IN, 7, &[(DATA + 0x2000, 512, true)]);
    r.notify();
    assert_eq!(r.svc.take(), 1);
    r.svc.complete_all();
    r.deliver();
    assert_eq!(r.used(), [(2, blk_status::OK, 513)]);
    assert_eq!(r.ram.bytes(DATA + 0x2000, 512), sectors(&r.svc.disk, 7, 1));
    assert_eq!(r.backend().requests(), 0);
    assert_eq!(r.backend().pieces_in_flight(), 0);
}

#[test]
fn a_guest_that_reuses_a_head_in_flight_gets_two_requests() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let head = r.add(0, req::IN, 2, &[(DATA, 512, true)]);
    r.d.publish(&mut r.ram, head);
    r.notify();
    assert_eq!(r.svc.take(), 2);
    r.svc.complete_all();
    r.deliver();
    let used = r.d.take_used(&mut r.ram);
    assert_eq!(used, [(u32::from(head), 513), (u32::from(head), 513)]);
    assert!(!r.needs_reset());
}

/// A service that writes the ring by hand (after [`ServiceRing::new`] set the header
/// up): takes descriptors without checking them and posts whatever completions the
/// test asks for.
struct Raw<'m> {
    mem: &'m [AtomicU32],
    layout: Layout,
    sq_head: u32,
    cq_tail: u32,
}

/// Word indices of the counters (the protocol's byte offsets / 4).
const W_SQ_TAIL: usize = 16;
const W_SQ_HEAD: usize = 32;
const W_CQ_TAIL: usize = 48;

impl<'m> Raw<'m> {
    fn new(mem: &'m [AtomicU32], layout: Layout) -> Self {
        Self {
            mem,
            layout,
            sq_head: 0,
            cq_tail: 0,
        }
    }

    fn take(&mut self) -> Vec<Descriptor> {
        let n = self.layout.entries();
        let tail = self.mem.load_acquire(W_SQ_TAIL);
        let mut out = Vec::new();
        while self.sq_head != tail {
            let base = self.layout.sq_offset() / 4 + (self.sq_head % n) as usize * 8;
            let mut w = [0u32; 8];
            for (i, v) in w.iter_mut().enumerate() {
                *v = self.mem.load(base + i);
            }
            out.push(Descriptor::from_words(w));
            self.sq_head = self.sq_head.wrapping_add(1);
        }
        self.mem.store_release(W_SQ_HEAD, self.sq_head);
        out
    }

    /// Posts a completion (visible at [`Raw::publish`]).
    fn post(&mut self, tag: u32, status: u32, blocks: u32) {
        let n = self.layout.entries();
        let base = self.layout.cq_offset() / 4 + (self.cq_tail % n) as usize * 4;
        for (i, v) in [tag, status, blocks, 0].into_iter().enumerate() {
            self.mem.store(base + i, v);
        }
        self.cq_tail = self.cq_tail.wrapping_add(1);
    }

    fn publish(&mut self) {
        self.mem.store_release(W_CQ_TAIL, self.cq_tail);
    }
}

#[test]
fn garbage_completions_never_complete_a_request() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let mut raw = Raw::new(&mem, layout(GEO));
    put(&mut r.ram, DATA, &[0x5a; 512]);
    r.add(0, req::IN, 1, &[(DATA, 512, true)]);
    r.add(1, req::IN, 2, &[(DATA + 0x1000, 512, true)]);
    r.notify();
    let descs = raw.take();
    assert_eq!(descs.len(), 2);
    let (t0, t1) = (descs[0].tag, descs[1].tag);
    // Unknown tags, right slot with a wrong generation, a slot past the ring.
    for tag in [0xdead_beef, t0 ^ (1 << 12), t0 | 0xfff, u32::MAX] {
        raw.post(tag, 0, 1);
    }
    raw.publish();
    r.signal();
    assert!(r.used().is_empty());
    assert_eq!(r.backend().stray(), 4);
    // The right tag with the wrong block count, then the real answer again: one error,
    // then a stray.
    raw.post(t0, 0, 2);
    raw.post(t0, 0, 1);
    raw.publish();
    r.signal();
    assert_eq!(r.used(), [(0, blk_status::IOERR, 1)]);
    assert_eq!(r.backend().stray(), 5);
    // Request 1 completes for real; its tag repeated later is a stray and does not
    // complete the next request, which reuses the slot under a new generation.
    raw.post(t1, 0, 1);
    raw.publish();
    r.signal();
    assert_eq!(r.used(), [(1, blk_status::OK, 513)]);
    r.add(2, req::IN, 3, &[(DATA + 0x2000, 512, true)]);
    r.notify();
    let d2 = raw.take();
    assert_eq!(d2[0].tag & 0xfff, t1 & 0xfff, "slot reused");
    assert_ne!(d2[0].tag, t1);
    raw.post(t0, 0, 1);
    raw.post(t1, 0, 1);
    raw.post(d2[0].tag, 99, 1); // an unknown status
    raw.publish();
    r.signal();
    assert_eq!(r.used(), [(2, blk_status::IOERR, 1)]);
    assert_eq!(r.backend().stray(), 7);
    assert!(!r.needs_reset());
}

#[test]
fn a_completion_tail_that_jumps_breaks_the_session() {
    let mem = ring_mem(GEO);
    let mut r = Rig::new(&mem, GEO);
    let mut raw = Raw::new(&mem, layout(GEO));
    r.add(0, req::IN, 1, &[(DATA, 512, true)]);
    r.add(1, req::FLUSH, 0, &[]);
    r.notify();
    assert_eq!(raw.take().len(), 2);
    mem[W_CQ_TAIL].store(GEO.entries + 1, Ordering::SeqCst);
    r.signal();
    let mut u = r.used();
    u.sort();
    assert_eq!(u, [(0, blk_status::IOERR, 1), (1, blk_status::IOERR, 1)]);
    assert!(r.backend().broken());
    // Later requests fail at once; the device itself is fine.
    r.add(2, req::IN, 1, &[(DATA, 512, true)]);
    r.notify();
    assert_eq!(r.used(), [(2, blk_status::IOERR, 1)]);
    assert!(!r.needs_reset());
}

/// A raw service that answers some descriptors honestly (moving the data) and lies
/// about the others (an error or a wrong block count), and mixes in garbage: unknown
/// tags, repeated answers to finished tags, never an OK with the right count that it
/// did not earn. A request the guest sees OK holds the disk's data; the VMM never
/// breaks.
#[test]
fn random_garbage_from_the_service_is_harmless() {
    let geo = Geo {
        block: 512,
        entries: 8,
        max_blocks: 2,
        bounce_len: 8 * 1024,
    };
    let mem = ring_mem(geo);
    let mut r = Rig::new(&mem, geo);
    let mut raw = Raw::new(&mem, layout(geo));
    let mut rng = Rng::new(1234);
    // Request slot -> (sector, buffer, bytes).
    let mut reqs = BTreeMap::new();
    let mut pending: Vec<(Descriptor, bool)> = Vec::new();
    let mut answered: Vec<Descriptor> = Vec::new();
    let (mut next, mut oks, mut errs) = (0usize, 0, 0);
    for _round in 0..3000 {
        if r.heads.len() < 6 && rng.chance(2) {
            let i = next % 64;
            next += 1;
            let len = (rng.below(6) as u32 + 1) * 512;
            let gpa = DATA + 0x2000 * i as u64 + u64::from(rng.chance(3));
            let sector = rng.below(BLOCKS - 8);
            put(&mut r.ram, gpa, &std::vec![0xee; len as usize]);
            r.add(i, req::IN, sector, &[(gpa, len, true)]);
            reqs.insert(i, (sector, gpa, len as usize));
            r.notify();
        }
        for d in raw.take() {
            pending.push((d, !rng.chance(4)));
        }
        for _ in 0..rng.below(3) {
            let tag = match rng.below(3) {
                0 if !pending.is_empty() => pending[rng.below(pending.len() as u64) as usize].0.tag,
                1 if !answered.is_empty() => {
                    answered[rng.below(answered.len() as u64) as usize].tag
                }
                _ => rng.next_u64() as u32,
            };
            let (st, blocks) = match rng.chance(2) {
                true => (rng.below(10) as u32 + 1, rng.below(4) as u32),
                false => (0, 100 + rng.below(4) as u32),
            };
            raw.post(tag, st, blocks);
        }
        if !pending.is_empty() && rng.chance(2) {
            let (d, honest) = pending.remove(rng.below(pending.len() as u64) as usize);
            if honest {
                let at = (d.block * SECTOR_SIZE) as usize;
                let b = r.svc.disk.data[at..at + d.count as usize * 512].to_vec();
                r.svc.set_area(d.buf, &b);
                raw.post(d.tag, 0, d.count);
            } else {
                raw.post(d.tag, rng.below(8) as u32 + 1, 0);
            }
            answered.push(d);
        }
        // An old tag answered OK again, with its right count: a stray.
        if !answered.is_empty() && rng.chance(5) {
            let d = answered[rng.below(answered.len() as u64) as usize];
            raw.post(d.tag, 0, d.count);
        }
        raw.publish();
        r.signal();
        for (i, st, _) in r.used() {
            let (sector, gpa, len) = reqs.remove(&i).unwrap();
            if st == blk_status::OK {
                oks += 1;
                assert_eq!(
                    r.ram.bytes(gpa, len),
                    sectors(&r.svc.disk, sector, len as u64 / 512),
                    "an OK read holds the disk's data"
                );
            } else {
                assert_eq!(st, blk_status::IOERR);
                errs += 1;
            }
        }
        assert!(!r.needs_reset());
        assert!(!r.backend().broken());
    }
    assert!(oks > 50 && errs > 50, "{oks} OK, {errs} errors");
}

/// The synchronous device on a [`MemDisk`], the reference.
struct SyncRig {
    g: Guest<VirtioBlock<MemDisk>>,
    d: Driver,
    ram: Ram,
}

impl SyncRig {
    fn new(disk: MemDisk) -> Self {
        let mut g = Guest::with_ram(VirtioBlock::new(disk, false, b"session-disk"), RAM);
        let d = g.up(FEATURES, &[QUEUE_SIZE]).remove(0);
        let ram = g.mem.clone();
        Self { g, d, ram }
    }

    /// Request `i` alone: (status, used length).
    fn one(&mut self, i: usize, ty: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
        let hdr = HDR + 16 * i as u64;
        let st = ST + i as u64;
        put(&mut self.ram, hdr, &header(ty, sector));
        put(&mut self.ram, st, &[0xee]);
        let mut bufs = std::vec![(hdr, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((st, 1, true));
        let head = self.d.add_chain(&mut self.ram, &bufs);
        self.g.notify(0);
        let used = self.d.take_used(&mut self.ram);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        (self.ram.bytes(st, 1)[0], used[0].1)
    }
}

/// Bytes of guest memory each request of a batch may use for its data.
const REQ_AREA: u64 = 0x8000;
/// Sectors each request of a batch may touch.
const REQ_SECTORS: u64 = 32;

/// A random request for batch slot `k`: (type, sector, buffers). Its data lie in
/// `DATA + k * REQ_AREA ..` and its sectors in `k * REQ_SECTORS ..` (or past the disk),
/// so a batch's requests never overlap.
fn random_request(rng: &mut Rng, k: usize) -> (u32, u64, Vec<Buf>) {
    let ty = match rng.below(20) {
        0..=7 => req::IN,
        8..=15 => req::OUT,
        16 | 17 => req::FLUSH,
        18 => req::GET_ID,
        _ => 0x4242,
    };
    let aligned = rng.chance(2);
    let sectors = rng.below(REQ_SECTORS / 2) + 1;
    let mut total = sectors * SECTOR_SIZE;
    if rng.chance(15) {
        total += rng.below(511) + 1; // not whole sectors
    }
    let base = k as u64 * REQ_SECTORS;
    let sector = match rng.below(20) {
        0 => BLOCKS - rng.below(4),           // at or straddling the end
        1 => rng.next_u64() >> rng.below(64), // anywhere
        _ => base + rng.below(REQ_SECTORS - sectors + 1),
    };
    // Cut `total` into segments inside the request's area, with gaps between them.
    let area = DATA + k as u64 * REQ_AREA;
    let mut bufs = Vec::new();
    let mut at = area + if aligned { 0 } else { rng.below(600) };
    let mut left = total;
    let wrong_dir = rng.chance(25);
    while left > 0 {
        let n = if aligned {
            (rng.below(4) + 1) * SECTOR_SIZE
        } else {
            rng.below(1500) + 1
        }
        .min(left);
        let write = (ty != req::OUT) ^ wrong_dir;
        bufs.push((at, n as u32, write));
        left -= n;
        at += n;
        if rng.chance(2) {
            at += if aligned { SECTOR_SIZE } else { rng.below(300) };
        }
    }
    assert!(at <= area + REQ_AREA);
    if ty == req::FLUSH || ty == req::GET_ID {
        bufs.truncate(1);
        for b in &mut bufs {
            b.1 = b.1.min(64);
            b.2 = true;
        }
    }
    (ty, sector, bufs)
}

/// What [`compare_with_sync`] saw: (OK, IOERR, UNSUPP) statuses, batches that left a
/// chain waiting, descriptors bounced, descriptors straight to guest memory.
struct Mix {
    statuses: [u32; 3],
    stalls: u32,
    bounced: usize,
    direct: usize,
}

/// Runs `batches` batches of random requests on the synchronous device and on a
/// session of geometry `geo`; the service completes each batch's descriptors in random
/// order and in random groups. The guest must see the same statuses, used lengths,
/// memory and disk.
fn compare_with_sync(geo: Geo, seed: u64, batches: u32) -> Mix {
    let mem = ring_mem(geo);
    let disk = MemDisk::new(image(BLOCKS, 0x77));
    let mut a = Rig::with_disk(&mem, geo, disk.clone());
    let mut s = SyncRig::new(disk);
    let mut rng = Rng::new(seed);
    let mut statuses = [0u32; 3];
    let mut stalls = 0;
    for batch in 0..batches {
        let k = rng.below(8) as usize + 1;
        let reqs: Vec<(u32, u64, Vec<Buf>)> = (0..k).map(|i| random_request(&mut rng, i)).collect();
        // Same guest memory on both sides.
        let fill: Vec<u8> = (0..k as u64 * REQ_AREA).map(|_| rng.byte()).collect();
        put(&mut a.ram, DATA, &fill);
        put(&mut s.ram, DATA, &fill);
        let want: Vec<(u8, u32)> = reqs
            .iter()
            .enumerate()
            .map(|(i, (ty, sector, bufs))| s.one(i, *ty, *sector, bufs))
            .collect();
        for (i, (ty, sector, bufs)) in reqs.iter().enumerate() {
            a.add(i, *ty, *sector, bufs);
        }
        a.notify();
        stalls += u32::from(a.g.dev.device().stalled());
        let mut got = BTreeMap::new();
        for _ in 0..10_000 {
            for (i, st, len) in a.used() {
                assert!(got.insert(i, (st, len)).is_none());
            }
            if got.len() == k {
                break;
            }
            a.svc.take();
            for _ in 0..rng.below(4) + 1 {
                if a.svc.held.is_empty() {
                    break;
                }
                let i = rng.below(a.svc.held.len() as u64) as usize;
                a.svc.complete(i);
            }
            a.deliver();
        }
        let got: Vec<(u8, u32)> = got.into_values().collect();
        assert_eq!(got, want, "batch {batch}: {reqs:?}");
        for (st, _) in want {
            statuses[st as usize] += 1;
        }
        let (ga, gs) = (a.ram.bytes(DATA, fill.len()), s.ram.bytes(DATA, fill.len()));
        assert!(ga == gs, "batch {batch}: guest memory");
        assert!(
            a.svc.disk.data == s.g.dev.device().backend().data,
            "batch {batch}: disk"
        );
        assert!(!a.needs_reset());
        assert_eq!(a.backend().requests(), 0);
        assert_eq!(a.backend().stray(), 0);
    }
    // Everything was flushed alike at the end.
    assert_eq!(a.one(req::FLUSH, 0, &[]), s.one(0, req::FLUSH, 0, &[]));
    assert!(a.svc.disk.durable == s.g.dev.device().backend().durable);
    let bounced = a.svc.log.iter().filter(|q| q.buf >= BOUNCE_BASE).count();
    let flushes = a.svc.log.iter().filter(|q| q.op == Op::Flush).count();
    Mix {
        statuses,
        stalls,
        bounced,
        direct: a.svc.log.len() - bounced - flushes,
    }
}

/// The same random requests on the synchronous device and on a session with a small
/// ring, a small maximum transfer and a bounce area of a few slots.
#[test]
fn random_requests_match_the_synchronous_device() {
    let geo = Geo {
        block: 512,
        entries: 8,
        max_blocks: 4,
        bounce_len: 8 * 1024,
    };
    let m = compare_with_sync(geo, 2026, 300);
    // The mix covered what it is for.
    assert!(
        m.statuses.iter().all(|&n| n > 50) && m.stalls > 20 && m.bounced > 200 && m.direct > 200,
        "statuses {:?}, {} stalls, {} bounced, {} direct",
        m.statuses,
        m.stalls,
        m.bounced,
        m.direct
    );
}

/// The same comparison on other geometries: one tag and one block per descriptor (every
/// request fed piece by piece), an odd maximum, a large ring with a large bounce area.
#[test]
fn random_requests_match_on_other_geometries() {
    for (i, (entries, max_blocks, bounce_len)) in [(1, 1, 512), (2, 3, 2048), (64, 64, 0x10000)]
        .into_iter()
        .enumerate()
    {
        let geo = Geo {
            block: 512,
            entries,
            max_blocks,
            bounce_len,
        };
        compare_with_sync(geo, 40 + i as u64, 80);
    }
}

/// The session on threads, as the bare-metal VMM runs it: the guest's vCPU (this
/// thread) notifies under the device's lock, the disk service (a thread) wakes on the
/// doorbell and answers in its own time and order, the VMM's completion thread wakes
/// on the completion signal and runs the device's step.
#[test]
fn the_session_on_threads() {
    use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    enum Msg {
        Bell,
        Stop,
    }
    struct ChanBell(Sender<Msg>);
    impl Doorbell for ChanBell {
        fn ring_doorbell(&mut self) {
            let _ = self.0.send(Msg::Bell);
        }
    }

    let geo = Geo {
        block: 512,
        entries: 16,
        max_blocks: 8,
        bounce_len: 0x4000,
    };
    let layout = layout(geo);
    let mem = ring_mem(geo);
    let limits = SessionLimits::new(
        Bounds {
            first_lba: FIRST_LBA,
            blocks: BLOCKS,
        },
        512,
        BOUNCE_BASE + geo.bounce_len,
        geo.max_blocks,
    );
    let ring = ServiceRing::new(&mem[..], layout, limits).unwrap();
    let (bell_tx, bell_rx) = channel();
    let (done_tx, done_rx) = channel();
    let bounce = Ram::new(geo.bounce_len as usize);
    let area = DataArea {
        ram_len: RAM as u64,
        bounce_base: BOUNCE_BASE,
        bounce_len: geo.bounce_len,
        bounce: bounce.clone(),
    };
    let backend = SessionBackend::new(&mem[..], layout, area, ChanBell(bell_tx.clone())).unwrap();
    let mut g = Guest::with_ram(AsyncBlock::new(backend, false, b"threads"), RAM);
    let mut d = g.up(FEATURES, &[QUEUE_SIZE]).remove(0);
    let mut ram = g.mem.clone();
    let g = Mutex::new(g);
    let disk = MemDisk::new(image(BLOCKS, 3));
    let mut model = disk.clone();

    std::thread::scope(|sc| {
        // The disk service.
        let svc_ram = ram.clone();
        let service = sc.spawn(move || {
            let mut svc = Service {
                ring,
                ram: svc_ram,
                bounce,
                disk,
                held: Vec::new(),
                log: Vec::new(),
            };
            let mut rng = Rng::new(77);
            loop {
                match bell_rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(Msg::Stop) => break,
                    Ok(Msg::Bell) => {}
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                svc.take();
                // Answer some of what it holds, in random order.
                let n = rng.below(svc.held.len() as u64 + 1);
                for _ in 0..n {
                    let i = rng.below(svc.held.len() as u64) as usize;
                    svc.complete(i);
                }
                if svc.publish() {
                    let _ = done_tx.send(Msg::Bell);
                }
            }
            let _ = done_tx.send(Msg::Stop);
            svc.disk
        });
        // The VMM's completion thread.
        let dev = &g;
        let completer = sc.spawn(move || {
            let mut signals = 0u32;
            while let Ok(Msg::Bell) = done_rx.recv() {
                dev.lock().unwrap().dev.process_queue(0);
                signals += 1;
            }
            signals
        });
        // The guest: batches of writes and reads, disjoint within a batch.
        let mut rng = Rng::new(5);
        let mut heads = BTreeMap::new();
        for batch in 0..60 {
            let k = rng.below(12) as usize + 1;
            let mut expect = Vec::new();
            for i in 0..k {
                let sector = i as u64 * 16 + rng.below(8);
                let n = rng.below(8) + 1;
                let len = (n * SECTOR_SIZE) as usize;
                let buf = DATA + 0x4000 * i as u64 + if rng.chance(3) { 5 } else { 0 };
                let hdr = HDR + 16 * i as u64;
                let st = ST + i as u64;
                let write = rng.chance(2);
                put(&mut ram, st, &[0xee]);
                if write {
                    let data: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
                    put(&mut ram, buf, &data);
                    put(&mut ram, hdr, &header(req::OUT, sector));
                    let at = (sector * SECTOR_SIZE) as usize;
                    model.data[at..at + len].copy_from_slice(&data);
                } else {
                    put(&mut ram, hdr, &header(req::IN, sector));
                }
                let bufs = [(hdr, 16, false), (buf, len as u32, !write), (st, 1, true)];
                let head = d.add_chain(&mut ram, &bufs);
                heads.insert(head, i);
                expect.push((sector, buf, len, write));
            }
            g.lock().unwrap().notify(0);
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut used = Vec::new();
            while used.len() < k {
                assert!(
                    Instant::now() < deadline,
                    "batch {batch}: {} of {k} used",
                    used.len()
                );
                used.extend(d.take_used(&mut ram));
                std::thread::yield_now();
            }
            for (head, len) in used {
                let i = heads.remove(&(head as u16)).unwrap();
                let (sector, buf, n, write) = expect[i];
                assert_eq!(
                    ram.bytes(ST + i as u64, 1),
                    [blk_status::OK],
                    "batch {batch} request {i}"
                );
                assert_eq!(len as usize, if write { 1 } else { n + 1 });
                if !write {
                    let at = (sector * SECTOR_SIZE) as usize;
                    assert_eq!(
                        ram.bytes(buf, n),
                        model.data[at..at + n],
                        "batch {batch} request {i}"
                    );
                }
            }
        }
        bell_tx.send(Msg::Stop).unwrap();
        let disk = service.join().unwrap();
        let signals = completer.join().unwrap();
        assert!(signals > 0);
        assert!(disk.data == model.data, "the disk holds every write");
    });
}

/// A service that scribbles over the whole ring region (header, counters, completion
/// ring) while the guest keeps reading: the VMM never panics, loops or needs a reset,
/// and every request ends OK (which a lying service can forge: a zeroed completion slot
/// nudged by one is an OK for tag 0) or IOERR, with the used length its status gives.
#[test]
fn a_scribbling_service_breaks_nothing_but_its_session() {
    let geo = Geo {
        block: 512,
        entries: 8,
        max_blocks: 2,
        bounce_len: 8 * 512,
    };
    let mem = ring_mem(geo);
    let mut r = Rig::new(&mem, geo);
    let mut rng = Rng::new(99);
    let words = mem.len() as u64;
    let mut lens = BTreeMap::new();
    let mut next = 0usize;
    let mut seen = [0u32; 2];
    let mut broke_at = None;
    for round in 0..5000 {
        if r.heads.len() < 6 && rng.chance(2) {
            let i = next % 64;
            next += 1;
            let len = (rng.below(4) as u32 + 1) * 512;
            let gpa = DATA + 0x1000 * i as u64 + u64::from(rng.chance(2));
            r.add(i, req::IN, rng.below(BLOCKS - 4), &[(gpa, len, true)]);
            lens.insert(i, len);
            r.notify();
        }
        for _ in 0..rng.below(4) {
            let w = match rng.below(4) {
                0 => W_SQ_HEAD,
                1 => W_CQ_TAIL,
                _ => match rng.below(words) as usize {
                    W_SQ_HEAD | W_CQ_TAIL => 0,
                    w => w,
                },
            };
            // The counters move a little (in the last rounds, sometimes anyhow: that
            // breaks the session), anything else anyhow.
            let counter = w == W_SQ_HEAD || w == W_CQ_TAIL;
            let v = if counter && (round < 4000 || !rng.chance(50)) {
                mem[w]
                    .load(Ordering::SeqCst)
                    .wrapping_add(rng.below(3) as u32)
            } else {
                rng.next_u64() as u32
            };
            mem[w].store(v, Ordering::SeqCst);
        }
        r.signal();
        for (i, st, len) in r.used() {
            let data = lens.remove(&i).unwrap();
            match st {
                blk_status::OK => assert_eq!(len, data + 1),
                _ => assert_eq!((st, len), (blk_status::IOERR, 1)),
            }
            seen[usize::from(st != blk_status::OK)] += 1;
        }
        assert!(!r.needs_reset());
        if r.backend().broken() && broke_at.is_none() {
            broke_at = Some(round);
        }
    }
    assert!(seen[1] > 100, "{seen:?}");
    assert!(broke_at.is_some_and(|n| n >= 4000), "broke at {broke_at:?}");
}
