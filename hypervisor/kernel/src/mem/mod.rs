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
