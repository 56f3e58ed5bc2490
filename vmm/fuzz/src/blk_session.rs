//! One disk-service session (`peregrine-blkproto`) driven by a hostile client: the
//! fuzzer writes descriptor bytes and ring counters into the shared ring region and
//! interleaves service steps. The service must never panic or hang, must execute only
//! requests inside the session's partition and data area (the simulated disk's slicing
//! would panic otherwise), and the blocks outside the partition must stay as they were.
//!
//! Input: byte 0 picks the ring size (1 << (b % 6)) and, bit 7, whether discard is
//! offered; then commands, each one byte `c` and its operands:
//! - `c % 5 == 0`: slot byte, then 32 bytes of descriptor written into that
//!   submission slot;
//! - `1`: a byte `k`: the submission tail advances by `k % 8` (anything above the ring
//!   size is a hostile jump);
//! - `2`: four bytes: the submission tail or (bit 0 of the command's high nibble) the
//!   completion head stored raw;
//! - `3`: a service step: take every request the service will, execute them, complete
//!   them in an order the next byte picks, publish;
//! - `4`: the client consumes every published completion.

use std::sync::atomic::AtomicU32;

use peregrine_blkproto::proto::DESC_SIZE;
use peregrine_blkproto::ring::{region, W_CQ_HEAD, W_SQ_TAIL};
use peregrine_blkproto::{
    Bounds, ClientRing, Layout, Op, Request, ServiceRing, SessionLimits, SharedMem, Status,
};

/// Block size.
const BS: usize = 512;
/// Blocks on the simulated disk.
const DISK_BLOCKS: usize = 64;
/// The session's extent.
const PART: Bounds = Bounds {
    first_lba: 16,
    blocks: 32,
};
/// The data area's size.
const DATA: usize = 8 * BS;

/// Executes a validated request on the simulated disk.
fn execute(r: &Request, disk: &mut [u8], data: &mut [u8]) {
    let at = r.lba as usize * BS;
    let (buf, len) = (r.buf as usize, r.len as usize);
    match r.op {
        Op::Read => data[buf..buf + len].copy_from_slice(&disk[at..at + len]),
        Op::Write => disk[at..at + len].copy_from_slice(&data[buf..buf + len]),
        Op::Flush => {}
        Op::Discard => disk[at..at + r.count as usize * BS].fill(0),
    }
}

/// One input.
pub fn run(input: &[u8]) {
    let Some((&first, mut rest)) = input.split_first() else {
        return;
    };
    let layout = Layout::new(1 << (first % 6)).expect("a power of two");
    let mut limits = SessionLimits::new(PART, BS as u32, DATA as u64, 4);
    limits.discard = first & 0x80 != 0;
    let ring: Vec<AtomicU32> = region(layout.bytes());
    let ring: &[AtomicU32] = &ring;
    let image: Vec<u8> = (0..DISK_BLOCKS * BS).map(|i| (i / 3) as u8).collect();
    let mut disk = image.clone();
    let mut data: Vec<u8> = (0..DATA).map(|i| i as u8).collect();
    let mut svc = ServiceRing::new(ring, layout, limits).expect("region sized by its layout");
    let mut client = ClientRing::attach(ring, layout).expect("initialised just now");
    let take = |n: usize, rest: &mut &[u8]| -> Option<Vec<u8>> {
        let (a, b) = rest.split_at_checked(n)?;
        *rest = b;
        Some(a.to_vec())
    };
    while let Some(c) = take(1, &mut rest) {
        let c = c[0];
        match c % 5 {
            0 => {
                let Some(slot) = take(1, &mut rest) else {
                    break;
                };
                let Some(d) = take(DESC_SIZE, &mut rest) else {
                    break;
                };
                let slot = usize::from(slot[0]) % layout.entries() as usize;
                let base = layout.sq_offset() / 4 + slot * DESC_SIZE / 4;
                for (i, w) in d.chunks_exact(4).enumerate() {
                    ring.store(base + i, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                }
            }
            1 => {
                let Some(k) = take(1, &mut rest) else { break };
                let t = ring.load(W_SQ_TAIL).wrapping_add(u32::from(k[0] % 8));
                ring.store_release(W_SQ_TAIL, t);
            }
            2 => {
                let Some(v) = take(4, &mut rest) else { break };
                let v = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                let word = if c & 0x10 != 0 { W_CQ_HEAD } else { W_SQ_TAIL };
                ring.store_release(word, v);
            }
            3 => {
                let order = take(1, &mut rest).map_or(0, |b| b[0]);
                let mut taken = Vec::new();
                let res = loop {
                    match svc.next_request() {
                        Ok(Some(r)) => taken.push(r),
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                if order & 1 != 0 {
                    taken.reverse();
                }
                for r in &taken {
                    if r.op == Op::Flush {
                        // A flush names no blocks (the protocol's FLUSH covers every
                        // completed write): it moves none.
                        assert!(r.count == 0 && r.len == 0);
                    } else {
                        let end = r.lba + u64::from(r.count);
                        assert!(r.lba >= PART.first_lba && end <= PART.first_lba + PART.blocks);
                    }
                    assert!(r.buf + r.len <= DATA as u64);
                    execute(r, &mut disk, &mut data);
                    let status = if order & 2 != 0 {
                        Status::IoErr
                    } else {
                        Status::Ok
                    };
                    assert!(matches!(
                        svc.complete(r.tag, status, r.count),
                        Ok(true) | Err(_)
                    ));
                }
                let _ = svc.publish();
                if res.is_err() {
                    assert!(svc.broken().is_some());
                }
            }
            _ => while let Ok(Some(_)) = client.pop_completion() {},
        }
    }
    let (lo, hi) = (
        PART.first_lba as usize * BS,
        (PART.first_lba + PART.blocks) as usize * BS,
    );
    assert!(disk[..lo] == image[..lo] && disk[hi..] == image[hi..]);
}
