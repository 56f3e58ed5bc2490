//! Block device tests, end to end through the PCI transport on mock guest memory.

use super::*;
use crate::testutil::{Rng, SharedMem};
use crate::virtio::pci::tests::Guest;
use crate::virtio::pci::{isr, DEVICE_CFG};
use crate::virtio::queue::tests::{put, Driver};
use crate::virtio::{feature, status};
use std::vec::Vec;

const SECTORS: u64 = 64;
const FEATURES: u64 = feature::VERSION_1 | feature::RING_INDIRECT_DESC | features::FLUSH;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x21000;
const STATUS: u64 = 0x30000;

fn disk() -> MemDisk {
    let image: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8)
        .collect();
    MemDisk::new(image)
}

struct Rig {
    g: Guest<VirtioBlock<MemDisk>>,
    d: Driver,
    mem: SharedMem,
}

fn rig(read_only: bool) -> Rig {
    rig_on(disk(), read_only, 0)
}

/// A rig on `disk` with at least `ram` bytes of guest memory.
fn rig_on(disk: MemDisk, read_only: bool, ram: usize) -> Rig {
    let mut g = Guest::with_ram(VirtioBlock::new(disk, read_only, b"peregrine-disk-0"), ram);
    let d = g.up(
        FEATURES | if read_only { features::RO } else { 0 },
        &[QUEUE_SIZE],
    );
    let mem = g.mem.clone();
    Rig {
        g,
        d: d.into_iter().next().unwrap(),
        mem,
    }
}

fn header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

impl Rig {
    /// Submits header + `data` buffers + status; returns (status, used length).
    fn submit(&mut self, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mem = &mut self.mem;
        put(mem, HDR, &header(ty, sector));
        put(mem, STATUS, &[0xee]);
        let mut bufs = std::vec![(HDR, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS, 1, true));
        let head = self.d.add_chain(mem, &bufs);
        self.g.notify(0);
        let used = self.d.take_used(mem);
        assert_eq!(used.len(), 1, "one request, one used element");
        assert_eq!(used[0].0, u32::from(head));
        (self.mem.bytes(STATUS, 1)[0], used[0].1)
    }
}

#[test]
fn config_space_and_features() {
    let mut r = rig(false);
    assert_eq!(r.g.r(DEVICE_CFG + config::CAPACITY, 8), SECTORS);
    assert_eq!(r.g.r(DEVICE_CFG + config::SEG_MAX, 4), u64::from(SEG_MAX));
    assert_eq!(r.g.r(DEVICE_CFG + config::BLK_SIZE, 4), 512);
    let f = r.g.device_features();
    assert_eq!(f & features::RO, 0);
    assert_ne!(f & features::FLUSH, 0);
    let mut ro = Guest::new(VirtioBlock::new(disk(), true, b""));
    assert_ne!(ro.device_features() & features::RO, 0);
    assert_eq!(r.g.cfg(0, 4), 0x1042_1af4);
}

#[test]
fn read_sectors() {
    let mut r = rig(false);
    let (st, len) = r.submit(req::IN, 3, &[(DATA, 1024, true)]);
    assert_eq!((st, len), (blk_status::OK, 1025));
    let got = r.mem.bytes(DATA, 1024);
    assert!(got[..512].iter().all(|&b| b == 3));
    assert!(got[512..].iter().all(|&b| b == 4));
    assert_eq!(r.g.isr(), isr::QUEUE);
}

#[test]
fn write_then_read_back_across_scattered_buffers() {
    let mut r = rig(false);
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 1) as u8).collect();
    put(&mut r.mem, DATA, &pattern[..700]);
    put(&mut r.mem, DATA + 0x2000, &pattern[700..]);
    let (st, len) = r.submit(
        req::OUT,
        10,
        &[(DATA, 700, false), (DATA + 0x2000, 836, false)],
    );
    assert_eq!((st, len), (blk_status::OK, 1));
    assert_eq!(
        &r.g.dev.device().backend().data[10 * 512..13 * 512],
        pattern.as_slice()
    );
    // Read back into three buffers of odd sizes.
    let (st, len) = r.submit(
        req::IN,
        10,
        &[
            (0x24000, 100, true),
            (0x25000, 1000, true),
            (0x26000, 436, true),
        ],
    );
    assert_eq!((st, len), (blk_status::OK, 1537));
    let mut back = r.mem.bytes(0x24000, 100);
    back.extend(r.mem.bytes(0x25000, 1000));
    back.extend(r.mem.bytes(0x26000, 436));
    assert_eq!(back, pattern);
}

#[test]
fn flush_is_honoured() {
    let mut r = rig(false);
    put(&mut r.mem, DATA, &[0xab; 512]);
    assert_eq!(
        r.submit(req::OUT, 0, &[(DATA, 512, false)]).0,
        blk_status::OK
    );
    let disk = r.g.dev.device().backend();
    assert_eq!(disk.data[0], 0xab);
    assert_eq!(disk.durable[0], 0, "not durable before the flush");
    assert_eq!(r.submit(req::FLUSH, 0, &[]), (blk_status::OK, 1));
    let disk = r.g.dev.device().backend();
    assert_eq!(disk.durable[..512], [0xab; 512]);
    assert_eq!(disk.flushes, 1);
}

#[test]
fn get_id() {
    let mut r = rig(false);
    let (st, len) = r.submit(req::GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!((st, len), (blk_status::OK, 21));
    assert_eq!(&r.mem.bytes(DATA, 20)[..16], b"peregrine-disk-0");
    assert_eq!(&r.mem.bytes(DATA, 20)[16..], [0; 4]);
}

#[test]
fn bad_requests_get_an_error_status() {
    let mut r = rig(false);
    // Past the end of the disk, straddling the end, sector overflow.
    assert_eq!(
        r.submit(req::IN, SECTORS, &[(DATA, 512, true)]).0,
        blk_status::IOERR
    );
    assert_eq!(
        r.submit(req::IN, SECTORS - 1, &[(DATA, 1024, true)]).0,
        blk_status::IOERR
    );
    assert_eq!(
        r.submit(req::OUT, u64::MAX, &[(DATA, 512, false)]).0,
        blk_status::IOERR
    );
    // Not whole sectors.
    assert_eq!(
        r.submit(req::IN, 0, &[(DATA, 100, true)]).0,
        blk_status::IOERR
    );
    assert_eq!(
        r.submit(req::OUT, 0, &[(DATA, 513, false)]).0,
        blk_status::IOERR
    );
    // Unknown type (DISCARD is not offered).
    assert_eq!(r.submit(11, 0, &[]).0, blk_status::UNSUPP);
    assert_eq!(r.submit(0x1234, 0, &[]).0, blk_status::UNSUPP);
    // The disk is untouched and the device still works.
    assert_eq!(r.g.dev.device().backend().data, disk().data);
    assert_eq!(r.g.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(r.submit(req::IN, 0, &[(DATA, 512, true)]).0, blk_status::OK);
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut r = rig(true);
    put(&mut r.mem, DATA, &[0x55; 512]);
    assert_eq!(
        r.submit(req::OUT, 0, &[(DATA, 512, false)]).0,
        blk_status::IOERR
    );
    assert_eq!(r.g.dev.device().backend().data[0], 0);
    assert_eq!(r.submit(req::IN, 0, &[(DATA, 512, true)]).0, blk_status::OK);
    assert_eq!(r.submit(req::FLUSH, 0, &[]).0, blk_status::OK);
}

#[test]
fn unanswerable_chains_need_a_reset() {
    // No status byte.
    let mut r = rig(false);
    put(&mut r.mem, HDR, &header(req::IN, 0));
    r.d.add_chain(&mut r.mem, &[(HDR, 16, false)]);
    r.g.notify(0);
    assert_ne!(r.g.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(matches!(r.g.dev.error(), Some(VirtioError::BadRequest(_))));
    // Header too short.
    let mut r = rig(false);
    r.d.add_chain(&mut r.mem, &[(HDR, 8, false), (STATUS, 1, true)]);
    r.g.notify(0);
    assert_ne!(r.g.status() & status::DEVICE_NEEDS_RESET, 0);
    // Data buffer outside RAM.
    let mut r = rig(false);
    put(&mut r.mem, HDR, &header(req::IN, 0));
    r.d.add_chain(
        &mut r.mem,
        &[
            (HDR, 16, false),
            (0x8000_0000, 512, true),
            (STATUS, 1, true),
        ],
    );
    r.g.notify(0);
    assert!(matches!(
        r.g.dev.error(),
        Some(VirtioError::Queue(crate::virtio::QueueError::Unbacked(_)))
    ));
}

/// A byte pattern that differs from sector to sector and within each sector.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) ^ (i >> 9)) as u8)
        .collect()
}

/// Writes `data` at `sector` through buffers of the given `sizes` at `base`, `base +
/// stride`, ...; returns the status.
fn scattered_out(r: &mut Rig, sector: u64, data: &[u8], sizes: &[usize], base: u64) -> u8 {
    let mut bufs = Vec::new();
    let mut at = 0;
    for (i, &n) in sizes.iter().enumerate() {
        let gpa = base + i as u64 * BIG_STRIDE;
        put(&mut r.mem, gpa, &data[at..at + n]);
        bufs.push((gpa, n as u32, false));
        at += n;
    }
    assert_eq!(at, data.len());
    let (st, len) = r.submit(req::OUT, sector, &bufs);
    assert_eq!(len, 1, "a write's used length is the status byte");
    st
}

/// Reads `sizes.iter().sum()` bytes from `sector` into buffers of the given sizes;
/// returns the status and the bytes, concatenated.
fn scattered_in(r: &mut Rig, sector: u64, sizes: &[usize], base: u64) -> (u8, Vec<u8>) {
    let bufs: Vec<(u64, u32, bool)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (base + i as u64 * BIG_STRIDE, n as u32, true))
        .collect();
    for &(gpa, n, _) in &bufs {
        put(&mut r.mem, gpa, &std::vec![0xcc; n as usize]);
    }
    let total: usize = sizes.iter().sum();
    let (st, len) = r.submit(req::IN, sector, &bufs);
    if st == blk_status::OK {
        assert_eq!(len as usize, total + 1, "the data and the status written");
    }
    let mut back = Vec::new();
    for &(gpa, n, _) in &bufs {
        back.extend(r.mem.bytes(gpa, n as usize));
    }
    (st, back)
}

/// Guest-physical distance between the data buffers of the multi-chunk tests.
const BIG_STRIDE: u64 = 0x30000;
/// Where those buffers start (above the rings, header and status of the rig).
const BIG_DATA: u64 = 0x40000;
/// Sectors of the multi-chunk tests' disk: two whole chunks and two sectors more.
const BIG_SECTORS: u64 = (2 * CHUNK as u64) / SECTOR_SIZE + 2;

fn big_rig() -> Rig {
    let image = pattern((BIG_SECTORS * SECTOR_SIZE) as usize, 0x55);
    rig_on(
        MemDisk::new(image),
        false,
        (BIG_DATA + 4 * BIG_STRIDE) as usize,
    )
}

#[test]
fn whole_disk_write_and_read_across_chunk_boundaries() {
    let mut r = big_rig();
    let len = (BIG_SECTORS * SECTOR_SIZE) as usize;
    let data = pattern(len, 7);
    // Buffer boundaries fall neither on sectors nor on chunks: 70,000 + 60,000 + rest.
    let sizes = [70_000, 60_000, len - 130_000];
    assert_eq!(
        scattered_out(&mut r, 0, &data, &sizes, BIG_DATA),
        blk_status::OK
    );
    assert!(
        r.g.dev.device().backend().data == data,
        "the disk holds every byte of the multi-chunk write"
    );
    // Back through other buffer boundaries: one byte, then just over a chunk, then rest.
    let sizes = [1, CHUNK + 3, len - CHUNK - 4];
    let (st, back) = scattered_in(&mut r, 0, &sizes, BIG_DATA);
    assert_eq!(st, blk_status::OK);
    assert!(
        back == data,
        "the multi-chunk read returns what was written"
    );
}

#[test]
fn unaligned_multi_chunk_write_leaves_its_neighbours_alone() {
    let mut r = big_rig();
    let before = r.g.dev.device().backend().data.clone();
    // Sectors 3 .. 3 + 129 (a chunk and one sector) cross the first chunk boundary of the
    // request and of the disk at different places.
    let (sector, len) = (3u64, CHUNK + 512);
    let data = pattern(len, 99);
    assert_eq!(
        scattered_out(&mut r, sector, &data, &[CHUNK + 100, 412], BIG_DATA),
        blk_status::OK
    );
    let start = (sector * SECTOR_SIZE) as usize;
    let disk = &r.g.dev.device().backend().data;
    assert!(disk[start..start + len] == data[..], "the written range");
    assert!(disk[..start] == before[..start], "the sectors before");
    assert!(
        disk[start + len..] == before[start + len..],
        "the sectors after"
    );
    let (st, back) = scattered_in(&mut r, sector, &[len], BIG_DATA);
    assert_eq!(st, blk_status::OK);
    assert!(back == data, "read back in one buffer");
    // A multi-chunk request that ends one sector past the disk moves nothing.
    let tail = BIG_SECTORS - (CHUNK as u64 / SECTOR_SIZE);
    let (st, _) = scattered_in(&mut r, tail, &[CHUNK + 512], BIG_DATA);
    assert_eq!(st, blk_status::IOERR);
    let too_far = pattern(CHUNK + 512, 3);
    assert_eq!(
        scattered_out(&mut r, tail, &too_far, &[CHUNK + 512], BIG_DATA),
        blk_status::IOERR
    );
    let disk = &r.g.dev.device().backend().data;
    assert!(disk[start + len..] == before[start + len..]);
}

#[test]
fn data_buffers_in_the_wrong_direction_are_an_error() {
    let mut r = rig(false);
    put(&mut r.mem, DATA, &[0x77; 512]);
    // A write whose data the device could only write to: nothing to write from.
    assert_eq!(
        r.submit(req::OUT, 0, &[(DATA, 512, true)]).0,
        blk_status::IOERR,
        "OUT with device-writable data"
    );
    // A read whose data the device could only read: nowhere to read into.
    assert_eq!(
        r.submit(req::IN, 0, &[(DATA, 512, false)]).0,
        blk_status::IOERR,
        "IN with device-readable data"
    );
    // Mixed: right-direction data followed by wrong-direction data.
    assert_eq!(
        r.submit(
            req::OUT,
            0,
            &[(DATA, 512, false), (DATA + 0x1000, 512, true)]
        )
        .0,
        blk_status::IOERR,
        "OUT with writable data after its readable data"
    );
    assert_eq!(
        r.submit(
            req::IN,
            0,
            &[(DATA + 0x1000, 512, false), (DATA, 512, true)]
        )
        .0,
        blk_status::IOERR,
        "IN with readable data before its writable data"
    );
    assert_eq!(
        r.g.dev.device().backend().data,
        disk().data,
        "disk untouched"
    );
    assert_eq!(
        r.mem.bytes(DATA, 512),
        [0x77; 512],
        "guest buffer untouched"
    );
    assert_eq!(r.g.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn indirect_request() {
    let mut r = rig(false);
    let table = 0x28000;
    put(&mut r.mem, HDR, &header(req::IN, 5));
    r.d.put_desc(
        &mut r.mem,
        table,
        0,
        HDR,
        16,
        crate::virtio::queue::desc_flags::NEXT,
        1,
    );
    r.d.put_desc(&mut r.mem, table, 1, DATA, 512, 3, 2);
    r.d.put_desc(&mut r.mem, table, 2, STATUS, 1, 2, 0);
    let head = r.d.add_chain(&mut r.mem, &[(table, 48, false)]);
    r.d.put_desc(
        &mut r.mem,
        r.d.desc,
        head,
        table,
        48,
        crate::virtio::queue::desc_flags::INDIRECT,
        0,
    );
    r.g.notify(0);
    assert_eq!(r.d.take_used(&mut r.mem), [(u32::from(head), 513)]);
    assert_eq!(r.mem.bytes(STATUS, 1), [0]);
    assert_eq!(r.mem.bytes(DATA, 512), [5; 512]);
}

#[test]
fn random_requests_never_panic() {
    let mut rng = Rng::new(5);
    let mut r = rig(false);
    for _ in 0..2000 {
        if r.g.status() & status::DEVICE_NEEDS_RESET != 0 {
            r = rig(false);
        }
        let ty = [req::IN, req::OUT, req::FLUSH, req::GET_ID, 99][rng.below(5) as usize];
        let sector = if rng.chance(4) {
            rng.next_u64()
        } else {
            rng.below(SECTORS + 2)
        };
        let n = rng.below(4) as usize;
        let bufs: Vec<(u64, u32, bool)> = (0..n)
            .map(|i| {
                let len = if rng.chance(2) {
                    512 * rng.below(3) as u32
                } else {
                    rng.below(2000) as u32
                };
                (DATA + 0x1000 * i as u64, len, ty != req::OUT)
            })
            .collect();
        let mem = &mut r.mem;
        put(mem, HDR, &header(ty, sector));
        let mut all = std::vec![(HDR, 16, false)];
        all.extend(bufs);
        all.push((STATUS, 1, true));
        r.d.add_chain(mem, &all);
        r.g.notify(0);
        r.d.take_used(mem);
    }
}
