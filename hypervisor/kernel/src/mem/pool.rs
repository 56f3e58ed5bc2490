//! The kernel's physical frame pool: a bitmap over the frames the kernel took for itself.
//!
//! At boot the kernel takes a pool of RAM below 4 GiB (default: 1/8 of RAM, 16..256 MiB;
//! `kmem=<MiB>` on the command line overrides), avoiding the low 1 MiB, its own image,
//! the loader's info and the modules. Everything else stays for the root task. The pool's
//! ranges are recorded for the HIP (kind HYPERVISOR); a frame enters the pool only once
//! a range records it ([`poolranges::select`]), so the root never sees a pool frame as
//! free RAM however fragmented the memory map is.

use peregrine_core::poolranges::{self, PoolRanges};
use spin::Mutex;

use super::layout::phys_to_ptr;
use super::{align_down, align_up, PAGE_SIZE};
use crate::platform::multiboot::BootInfo;

/// Frames the pool can span: all of 0..4 GiB.
const MAX_FRAMES: usize = 1 << 20;
/// Maximum number of contiguous ranges recorded.
pub const MAX_POOL_RANGES: usize = 32;

struct Pool {
    /// One bit per frame: 1 = free.
    bits: [u64; MAX_FRAMES / 64],
    hint: usize,
    free: usize,
    total: usize,
    ranges: PoolRanges<MAX_POOL_RANGES>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    bits: [0; MAX_FRAMES / 64],
    hint: 0,
    free: 0,
    total: 0,
    ranges: PoolRanges::new(),
});

impl Pool {
    fn is_free(&self, f: usize) -> bool {
        self.bits[f / 64] & (1 << (f % 64)) != 0
    }
    fn set_free(&mut self, f: usize) {
        self.bits[f / 64] |= 1 << (f % 64);
    }
    fn set_used(&mut self, f: usize) {
        self.bits[f / 64] &= !(1 << (f % 64));
    }

    /// Puts a frame that [`poolranges::select`] took (and recorded) into the pool.
    fn add(&mut self, f: usize) {
        self.set_free(f);
        self.free += 1;
        self.total += 1;
    }

    /// Finds `n` free frames aligned to `align` frames, first fit from the hint.
    fn find(&mut self, n: usize, align: usize) -> Option<usize> {
        let limit = MAX_FRAMES;
        for pass in 0..2 {
            let (from, to) = if pass == 0 {
                (self.hint, limit)
            } else {
                (0, self.hint.min(limit))
            };
            let mut f = from.next_multiple_of(align);
            while f + n <= to {
                if n == 1 && f % 64 == 0 && self.bits[f / 64] == 0 {
                    f += 64;
                    continue;
                }
                match (f..f + n).find(|&g| !self.is_free(g)) {
                    None => return Some(f),
                    Some(busy) => f = (busy + 1).next_multiple_of(align),
                }
            }
        }
        None
    }
}

/// Sets up the pool from the memory map, avoiding `reserved` physical ranges.
pub fn init(bi: &BootInfo, reserved: &[(u64, u64)]) {
    let ram = bi.ram_bytes();
    let mut want = (ram / 8).clamp(16 << 20, 256 << 20);
    if let Some(mib) = bi
        .cmdline()
        .split_ascii_whitespace()
        .find_map(|a| a.strip_prefix("kmem="))
        .and_then(|v| v.parse::<u64>().ok())
    {
        want = mib << 20;
    }
    let want_frames = (want / PAGE_SIZE) as usize;
    let ram = bi.mmap().iter().filter(|e| e.kind == 1).map(|e| {
        (
            align_up(e.addr.max(0x10_0000), PAGE_SIZE),
            align_down((e.addr + e.len).min(1 << 32), PAGE_SIZE),
        )
    });
    let mut p = POOL.lock();
    let mut ranges = PoolRanges::new();
    poolranges::select(ram, reserved, want_frames, &mut ranges, |a| {
        p.add((a / PAGE_SIZE) as usize)
    });
    p.ranges = ranges;
}

/// Allocates `n` physically contiguous frames aligned to `align` frames (a power of
/// two); contents undefined. Returns the physical address of the first.
pub fn alloc_frames(n: usize, align: usize) -> Option<u64> {
    crate::arch::x86::cr::without_interrupts(|| {
        let mut p = POOL.lock();
        let f = p.find(n, align.max(1))?;
        for g in f..f + n {
            p.set_used(g);
        }
        p.free -= n;
        p.hint = f + n;
        Some(f as u64 * PAGE_SIZE)
    })
}

/// Allocates one frame; contents undefined.
pub fn alloc_frame() -> Option<u64> {
    alloc_frames(1, 1)
}

/// Allocates one zeroed frame.
pub fn alloc_frame_zeroed() -> Option<u64> {
    let f = alloc_frame()?;
    // SAFETY: the frame is ours and mapped in the physmap.
    unsafe { core::ptr::write_bytes(phys_to_ptr::<u8>(f), 0, PAGE_SIZE as usize) };
    Some(f)
}

/// Returns `n` frames starting at `phys` to the pool.
///
/// # Panics
/// On a frame outside the pool or one that is already free (a kernel bug).
pub fn free_frames(phys: u64, n: usize) {
    crate::arch::x86::cr::without_interrupts(|| {
        let mut p = POOL.lock();
        let f0 = (phys / PAGE_SIZE) as usize;
        for f in f0..f0 + n {
            let a = f as u64 * PAGE_SIZE;
            assert!(p.ranges.contains(a), "free_frame: {a:#x} not in pool");
            assert!(!p.is_free(f), "free_frame: {a:#x} double free");
            p.set_free(f);
        }
        p.free += n;
    })
}

/// Returns one frame to the pool.
pub fn free_frame(phys: u64) {
    free_frames(phys, 1)
}

/// (free, total) frames in the pool.
pub fn stats() -> (usize, usize) {
    let p = POOL.lock();
    (p.free, p.total)
}

/// Calls `f(start, end)` for each physical range of the pool (for the HIP).
pub fn for_each_range(mut f: impl FnMut(u64, u64)) {
    let p = POOL.lock();
    for &(s, e) in p.ranges.as_slice() {
        f(s, e);
    }
}
