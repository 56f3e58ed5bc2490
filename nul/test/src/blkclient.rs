//! `role=blkclient blk=BINDING mem=MiB seed=N [hostile] [fault]`: a disk-session client that
//! checks what the disk service promises a VMM, without a VM: its writes land in its
//! own blocks and read back after a flush, several requests are in flight at once, and
//! requests outside its blocks or its data area fail with RANGE / BADBUF. With
//! `hostile` it then breaks its ring (a submission tail far ahead of the head), which
//! ends its own session and nothing else; with `fault` it then dies, and the root
//! closes its session (the service finishes with its memory) before reusing it.
//!
//! Block `b` of its session holds [`pattern`]`(seed, b, i)` in word `i` after the run,
//! for `b < BLOCKS`; the host checks the image file against that.
//! Prints `BLK-CLIENT <seed> ok` or `BLK-CLIENT <seed> FAILED: …`.

use core::sync::atomic::AtomicU32;

use nul_rt::blk;
use nul_rt::start_info::{self, StartInfo, POOL_ADDR};
use nul_rt::{hc, println};
use peregrine_blkproto::{ClientRing, Completion, Descriptor, Layout, Op, Status};

/// Blocks the client writes (from its session's block 0).
pub const BLOCKS: u64 = 64;
/// Blocks per request.
const PER_REQ: u32 = 8;

/// Word `i` (of 64) of block `b` for `seed` (the host computes the same).
pub fn pattern(seed: u64, b: u64, i: u64) -> u64 {
    let mut x =
        seed ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 30;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fail(seed: u64, why: &str) -> ! {
    println!("BLK-CLIENT {} FAILED: {}", seed, why);
    crate::block_forever()
}

/// Runs the checks.
pub fn run(si: &StartInfo) -> ! {
    let args = si.args();
    let seed = start_info::arg_u64(args, "seed").unwrap_or(1);
    if si.blk_ring_bytes == 0 || si.pool_size < 2 * BLOCKS * 512 {
        fail(seed, "no disk session (blk=) or no data area (mem=)");
    }
    // SAFETY: the root maps the ring region read-write at VMM_RING_ADDR for
    // `blk_ring_bytes` bytes for our lifetime; atomics tolerate the service's writes.
    let mem: &[AtomicU32] = unsafe {
        core::slice::from_raw_parts(
            blk::VMM_RING_ADDR as *const AtomicU32,
            si.blk_ring_bytes as usize / 4,
        )
    };
    let Some(layout) = Layout::new(blk::RING_ENTRIES) else {
        fail(seed, "ring layout")
    };
    // The service initialises the ring once it has the disk up.
    let sleep = nul_rt::sel::alloc();
    let _ = hc::create_sm(sleep, nul_rt::sel::OWN_PD, 0);
    let mut ring = None;
    for _ in 0..400 {
        if let Ok(r) = ClientRing::attach(mem, layout) {
            ring = Some(r);
            break;
        }
        crate::sleep_ms(si, sleep, 50);
    }
    let Some(mut ring) = ring else {
        fail(seed, "the service never set up the session")
    };
    let (bs, blocks) = (ring.block_size() as u64, ring.blocks());
    println!(
        "blkclient {}: session of {} blocks of {} bytes",
        seed, blocks, bs
    );
    if bs != 512 || blocks < BLOCKS + 8 {
        fail(seed, "unexpected session geometry");
    }
    if start_info::flag(args, "ioerr") {
        io_errors(si, &mut ring, seed, sleep);
    }
    let data = POOL_ADDR as *mut u64;
    let words = bs / 8;
    // The pattern into the first half of the data area, zeros into the second.
    for b in 0..BLOCKS {
        for i in 0..words {
            // SAFETY: inside the pool the root mapped at POOL_ADDR (checked size above).
            unsafe {
                data.add((b * words + i) as usize)
                    .write_volatile(pattern(seed, b, i))
            };
        }
    }
    let back = BLOCKS * bs;
    // SAFETY: as above; the second half.
    unsafe { core::ptr::write_bytes((POOL_ADDR + back) as *mut u8, 0, back as usize) };

    // Every write in flight at once, one doorbell.
    let mut tag = 0;
    for first in (0..BLOCKS).step_by(PER_REQ as usize) {
        tag += 1;
        if !ring.push(&Descriptor::new(tag, Op::Write, first, PER_REQ, first * bs)) {
            fail(seed, "ring full");
        }
    }
    let n = tag;
    submit(&mut ring);
    expect_all(si, &mut ring, n, seed, Status::Ok);
    tag += 1;
    ring.push(&Descriptor::new(tag, Op::Flush, 0, 0, 0));
    submit(&mut ring);
    expect_all(si, &mut ring, 1, seed, Status::Ok);
    for first in (0..BLOCKS).step_by(PER_REQ as usize) {
        tag += 1;
        ring.push(&Descriptor::new(
            tag,
            Op::Read,
            first,
            PER_REQ,
            back + first * bs,
        ));
    }
    submit(&mut ring);
    expect_all(si, &mut ring, n, seed, Status::Ok);
    for b in 0..BLOCKS {
        for i in 0..words {
            // SAFETY: the second half of the pool, as above.
            let v = unsafe {
                data.add(((BLOCKS + b) * words + i) as usize)
                    .read_volatile()
            };
            if v != pattern(seed, b, i) {
                fail(seed, "read back differs from what was written");
            }
        }
    }
    println!(
        "blkclient {}: {} blocks written, flushed, read back",
        seed, BLOCKS
    );
    // Outside the session: the last block and one more; a buffer past the data area.
    tag += 1;
    ring.push(&Descriptor::new(tag, Op::Write, blocks - 1, 2, 0));
    submit(&mut ring);
    expect_all(si, &mut ring, 1, seed, Status::Range);
    tag += 1;
    ring.push(&Descriptor::new(tag, Op::Read, 0, 1, si.pool_size));
    submit(&mut ring);
    expect_all(si, &mut ring, 1, seed, Status::BadBuf);
    tag += 1;
    ring.push(&Descriptor::new(tag, Op::Write, u64::MAX - 1, 4, 0));
    submit(&mut ring);
    expect_all(si, &mut ring, 1, seed, Status::Range);
    println!("blkclient {}: requests outside the session refused", seed);
    if let Some(n) = start_info::arg_u64(args, "lat") {
        // `lat=N`: N one-block reads one after another: the service's and the disk's
        // latency without a VM.
        let t0 = hc::rdtsc();
        for k in 0..n {
            tag += 1;
            ring.push(&Descriptor::new(tag, Op::Read, (k * 8) % BLOCKS, 8, back));
            submit(&mut ring);
            expect_all(si, &mut ring, 1, seed, Status::Ok);
        }
        let us = (hc::rdtsc() - t0) * 1000 / si.tsc_khz.max(1) / n.max(1);
        println!(
            "blkclient {}: 4 KiB read at queue depth 1: {} us each",
            seed, us
        );
    }
    println!("BLK-CLIENT {} ok", seed);
    // `delay=MS` before the last act (lets another client's end come first).
    crate::sleep_ms(si, sleep, start_info::arg_u64(args, "delay").unwrap_or(0));
    if start_info::flag(args, "hostile") {
        // A submission tail more than a ring ahead: the service must drop the session.
        let w = &mem[peregrine_blkproto::ring::W_SQ_TAIL];
        let tail = w.load(core::sync::atomic::Ordering::Acquire);
        w.store(
            tail.wrapping_add(blk::RING_ENTRIES * 3),
            core::sync::atomic::Ordering::Release,
        );
        let _ = hc::sm_up(blk::VMM_DOORBELL_SEL);
        println!("blkclient {}: ring broken on purpose", seed);
    }
    if start_info::flag(args, "fault") {
        // Dies (the root removes it and closes its session before reusing its memory).
        println!("blkclient {}: faulting on purpose", seed);
        // SAFETY: none needed for correctness: the read of an unmapped address is the
        // point (a page fault ends this component).
        let _ = unsafe { core::ptr::read_volatile(core::ptr::dangling::<u64>()) };
    }
    crate::block_forever()
}

/// `ioerr`: the disk fails (a controller that stops answering): a write, a flush and a
/// read each end with IOERR (within the service's deadline), and later requests are
/// answered at once, also with IOERR.
fn io_errors<M: peregrine_blkproto::SharedMem + ?Sized>(
    si: &StartInfo,
    ring: &mut ClientRing<'_, M>,
    seed: u64,
    sleep: u64,
) -> ! {
    let mut tag = 100;
    for op in [Op::Write, Op::Flush, Op::Read] {
        tag += 1;
        let (count, buf) = if op == Op::Flush { (0, 0) } else { (8, 0) };
        ring.push(&Descriptor::new(tag, op, 0, count, buf));
        submit(ring);
        expect_within(si, ring, 1, seed, Status::IoErr, 20_000);
        println!("blkclient {}: {:?} failed with IOERR", seed, op);
    }
    crate::sleep_ms(si, sleep, 200);
    let start = hc::rdtsc();
    tag += 1;
    ring.push(&Descriptor::new(tag, Op::Read, 8, 8, 0));
    submit(ring);
    expect_within(si, ring, 1, seed, Status::IoErr, 1_000);
    println!(
        "blkclient {}: a later read failed at once ({} ms)",
        seed,
        (hc::rdtsc() - start) / si.tsc_khz.max(1)
    );
    println!("BLK-CLIENT {} ioerr ok", seed);
    crate::block_forever()
}

fn submit<M: peregrine_blkproto::SharedMem + ?Sized>(ring: &mut ClientRing<'_, M>) {
    ring.publish();
    let _ = hc::sm_up(blk::VMM_DOORBELL_SEL);
}

/// Waits for `n` completions (10 s), each with `want`.
fn expect_all<M: peregrine_blkproto::SharedMem + ?Sized>(
    si: &StartInfo,
    ring: &mut ClientRing<'_, M>,
    n: u32,
    seed: u64,
    want: Status,
) {
    expect_within(si, ring, n, seed, want, 10_000)
}

/// Waits for `n` completions (`ms` milliseconds), each with `want`.
fn expect_within<M: peregrine_blkproto::SharedMem + ?Sized>(
    si: &StartInfo,
    ring: &mut ClientRing<'_, M>,
    n: u32,
    seed: u64,
    want: Status,
    ms: u64,
) {
    let deadline = hc::rdtsc() + ms * si.tsc_khz.max(1);
    let mut got = 0;
    while got < n {
        match ring.pop_completion() {
            Ok(Some(Completion { status, tag, .. })) => {
                if status != want {
                    println!(
                        "blkclient {}: tag {} answered {:?}, not {:?}",
                        seed, tag, status, want
                    );
                    fail(seed, "unexpected completion status");
                }
                got += 1;
            }
            Ok(None) => {
                if hc::rdtsc() > deadline {
                    fail(seed, "no completion in time");
                }
                let _ = hc::sm_down(blk::VMM_COMPLETION_SEL, false, hc::rdtsc() + si.tsc_khz);
            }
            Err(_) => fail(seed, "the completion ring is inconsistent"),
        }
    }
}
