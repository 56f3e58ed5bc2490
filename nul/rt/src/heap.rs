//! The global allocator: a linked-list heap over a static arena in `.bss`.

use linked_list_allocator::LockedHeap;

const HEAP_SIZE: usize = 2 << 20;

#[repr(align(4096))]
#[allow(dead_code)] // only its address is used
struct Arena([u8; HEAP_SIZE]);

static mut ARENA: Arena = Arena([0; HEAP_SIZE]);

#[cfg_attr(not(test), global_allocator)]
static HEAP: LockedHeap = LockedHeap::empty();

/// Bytes of the heap in use now (allocated blocks, with the allocator's rounding).
pub fn used() -> usize {
    HEAP.lock().used()
}

/// Hands the arena to the allocator; called once by the start-up code.
pub fn init() {
    // SAFETY: called once before any allocation (from `start`); ARENA is used by
    // nothing else, so the allocator owns it exclusively from here on.
    unsafe {
        let base = core::ptr::addr_of_mut!(ARENA) as *mut u8;
        HEAP.lock().init(base, HEAP_SIZE);
    }
}
