//! Physical memory: the direct map, the kernel's frame pool and its heap.

pub mod heap;
pub mod layout;
pub mod pool;

pub use crate::arch::x86::paging::new_user_root;
pub use layout::{phys_to_ptr, virt_to_phys};
pub use pool::{alloc_frame, alloc_frame_zeroed, alloc_frames, free_frame, free_frames};

/// Direct-map pointer to physical address `phys` (see [`layout::phys_to_virt`] for the
/// address as a number).
#[inline]
pub fn phys_to_virt(phys: u64) -> *mut u8 {
    layout::phys_to_ptr(phys)
}

/// Physical page ranges `[first, end)` of write-back memory (the firmware's RAM, ACPI and
/// NVS ranges, merged); everything else is device memory.
static WB_RANGES: spin::Once<alloc::vec::Vec<(u64, u64)>> = spin::Once::new();

/// Records the write-back ranges (boot, once): page ranges `[first, end)`.
pub fn set_wb_ranges(mut r: alloc::vec::Vec<(u64, u64)>) {
    r.sort_unstable();
    let mut merged: alloc::vec::Vec<(u64, u64)> = alloc::vec::Vec::new();
    for (s, e) in r {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    WB_RANGES.call_once(|| merged);
}

/// Whether the `2^order` pages from physical page `ppage` are all write-back memory;
/// user mappings of anything else are uncacheable (device memory: MMIO, firmware).
#[inline]
pub fn is_wb(ppage: u64, order: u8) -> bool {
    let end = ppage + (1u64 << order);
    WB_RANGES
        .get()
        .is_none_or(|r| r.iter().any(|&(s, e)| s <= ppage && end <= e))
}

/// Size of a page/frame.
pub const PAGE_SIZE: u64 = 4096;

/// Rounds `x` up to a multiple of `a` (a power of two).
#[inline]
pub const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Rounds `x` down to a multiple of `a` (a power of two).
#[inline]
pub const fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}
