//! The global allocator: a linked-list heap over a static arena in `.bss`.
//!
//! `linked_list_allocator`'s own `LockedHeap` spins on its lock; the heap is behind a
//! [`Mutex`](crate::sync::Mutex) instead, because threads of different priorities
//! allocate (see `sync`).

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;

use linked_list_allocator::Heap;

use crate::sync::Mutex;

const HEAP_SIZE: usize = 2 << 20;

#[repr(align(4096))]
#[allow(dead_code)] // only its address is used
struct Arena([u8; HEAP_SIZE]);

static mut ARENA: Arena = Arena([0; HEAP_SIZE]);

/// The heap behind the component's lock.
struct RtHeap(Mutex<Heap>);

// SAFETY: `Heap` hands out disjoint blocks of the arena it was given and takes back only
// blocks it handed out with their layout (the `GlobalAlloc` contract of the callers);
// the mutex serializes every use of it.
unsafe impl GlobalAlloc for RtHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0
            .lock()
            .allocate_first_fit(layout)
            .map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(p) = NonNull::new(ptr) {
            // SAFETY: the caller's contract: `ptr` came from `alloc` with `layout`.
            unsafe { self.0.lock().deallocate(p, layout) }
        }
    }
}

#[cfg_attr(not(test), global_allocator)]
static HEAP: RtHeap = RtHeap(Mutex::new(Heap::empty()));

/// Bytes of the heap in use now (allocated blocks, with the allocator's rounding).
pub fn used() -> usize {
    HEAP.0.lock().used()
}

/// Hands the arena to the allocator; called once by the start-up code.
pub fn init() {
    // SAFETY: called once before any allocation (from `start`); ARENA is used by
    // nothing else, so the allocator owns it exclusively from here on.
    unsafe {
        let base = core::ptr::addr_of_mut!(ARENA) as *mut u8;
        HEAP.0.lock().init(base, HEAP_SIZE);
    }
}
