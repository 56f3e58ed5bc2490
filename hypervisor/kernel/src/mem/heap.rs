//! The kernel heap: a linked-list allocator over a virtual window that grows on demand
//! with frames from the pool (so `alloc::{Box, Vec, Arc}` work in the kernel).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use peregrine_abi::hip::MAX_CPUS;

use linked_list_allocator::Heap;
use spin::Mutex;

use super::layout::{HEAP_BASE, HEAP_MAX};
use super::{align_up, PAGE_SIZE};
use crate::arch::x86::{cr, paging};

/// Initial heap size.
const INITIAL: u64 = 256 * 1024;
/// Minimum growth step.
const STEP: u64 = 256 * 1024;

struct KernelHeap {
    inner: Mutex<(Heap, u64)>, // heap, mapped bytes
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap {
    inner: Mutex::new((Heap::empty(), 0)),
};

/// Maps `bytes` more at the heap's top; returns false when out of frames or window.
fn grow(mapped: &mut u64, bytes: u64) -> bool {
    let bytes = align_up(bytes, PAGE_SIZE);
    if *mapped + bytes > HEAP_MAX {
        return false;
    }
    let mut off = 0;
    while off < bytes {
        let Some(f) = super::pool::alloc_frame() else {
            return false;
        };
        if paging::map_kernel_page(HEAP_BASE + *mapped, f, paging::Flags::KERNEL_RW).is_err() {
            super::pool::free_frame(f);
            return false;
        }
        *mapped += PAGE_SIZE;
        off += PAGE_SIZE;
    }
    true
}

/// Maps the initial heap. Call once after paging is set up.
pub fn init() {
    let mut g = HEAP.inner.lock();
    let (heap, mapped) = &mut *g;
    assert!(grow(mapped, INITIAL), "heap: cannot map the initial heap");
    // SAFETY: [HEAP_BASE, +INITIAL) is freshly mapped, unused memory owned by the heap.
    unsafe { heap.init(HEAP_BASE as *mut u8, INITIAL as usize) };
}

/// Per CPU: a block allocated ahead ([`park`]) for the next allocation of exactly its
/// layout on that CPU. Rust's `Arc::new` and `Box::new` cannot fail; allocating their
/// block first, fallibly, and handing it to them is how the kernel makes object creation
/// answer `OutOfMemory` instead of aborting (`kmem::try_arc`).
struct Parked(UnsafeCell<Option<(NonNull<u8>, Layout)>>);
// SAFETY: each CPU's slot is used only by that CPU, with interrupts off.
unsafe impl Sync for Parked {}
static PARKED: [Parked; MAX_CPUS] = [const { Parked(UnsafeCell::new(None)) }; MAX_CPUS];
/// Blocks parked on all CPUs (0: the allocator need not look, e.g. before per-CPU data
/// exists).
static PARKED_ANY: AtomicUsize = AtomicUsize::new(0);
/// Parked blocks that went back unused (the layout asked for was another): a check of
/// `kmem::try_arc`'s layout rule.
pub static PARK_MISSES: AtomicUsize = AtomicUsize::new(0);

/// This CPU's parked block.
fn parked() -> &'static mut Option<(NonNull<u8>, Layout)> {
    // SAFETY: this CPU's slot; callers run with interrupts off and do not keep the
    // reference across another call of this function.
    unsafe { &mut *PARKED[crate::platform::percpu::cpu_id()].0.get() }
}

/// Allocates a block of `layout` now and keeps it for this CPU's next allocation of
/// the same layout; false when the heap has no room. Call with interrupts off, and
/// [`unpark`] after the allocation it was for.
pub fn park(layout: Layout) -> bool {
    unpark();
    // SAFETY: `layout` has a non-zero size (the kernel's objects do); the block goes
    // back through `dealloc` with the same layout if nobody takes it.
    let p = unsafe { HEAP.alloc(layout) };
    let Some(p) = NonNull::new(p) else {
        return false;
    };
    *parked() = Some((p, layout));
    PARKED_ANY.fetch_add(1, Ordering::Relaxed);
    true
}

/// Frees this CPU's parked block if the allocation it was for did not take it.
pub fn unpark() {
    if let Some((p, l)) = parked().take() {
        PARKED_ANY.fetch_sub(1, Ordering::Relaxed);
        PARK_MISSES.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the block came from `HEAP.alloc` with layout `l` and nobody uses it.
        unsafe { HEAP.dealloc(p.as_ptr(), l) };
    }
}

/// Makes sure the heap has at least `bytes` free, growing it if it must; false when the
/// pool cannot supply the frames. The mapping database's B-trees and the lists a
/// revocation collects allocate through Rust's infallible collections: a delegation or a
/// revocation first reserves room for them here, so that running out of memory is an
/// `OutOfMemory` answer before any change instead of an abort in the middle of one.
/// (Free bytes are not one block, and other CPUs allocate too: the reserve is headroom,
/// sized well above what one call inserts, not a guarantee.)
pub fn reserve(bytes: usize) -> bool {
    cr::without_interrupts(|| {
        let mut g = HEAP.inner.lock();
        let (heap, mapped) = &mut *g;
        let free = heap.free();
        if free >= bytes {
            return true;
        }
        let before = *mapped;
        let ok = grow(mapped, (bytes - free) as u64);
        // SAFETY: [old top, new top) was just mapped and belongs to nobody.
        unsafe { heap.extend((*mapped - before) as usize) };
        ok
    })
}

/// (used, mapped) heap bytes.
pub fn stats() -> (usize, u64) {
    let g = HEAP.inner.lock();
    (g.0.used(), g.1)
}

// SAFETY: allocation is serialized by the lock (with interrupts off, so an interrupt
// handler on the same CPU cannot deadlock); blocks come from `Heap`, which returns
// properly sized and aligned memory inside the mapped window.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if PARKED_ANY.load(Ordering::Relaxed) != 0 {
            let slot = cr::without_interrupts(|| {
                let slot = parked();
                match *slot {
                    Some((p, l)) if l == layout => {
                        *slot = None;
                        PARKED_ANY.fetch_sub(1, Ordering::Relaxed);
                        Some(p)
                    }
                    _ => None,
                }
            });
            if let Some(p) = slot {
                return p.as_ptr();
            }
        }
        cr::without_interrupts(|| {
            let mut g = self.inner.lock();
            let (heap, mapped) = &mut *g;
            loop {
                if let Ok(p) = heap.allocate_first_fit(layout) {
                    return p.as_ptr();
                }
                let before = *mapped;
                let want = (layout.size() + layout.align()) as u64 + 64;
                if !grow(mapped, want.max(STEP)) {
                    // Keep what was mapped before failing.
                    let added = *mapped - before;
                    // SAFETY: the pages just mapped at the old top are unused and contiguous.
                    unsafe { heap.extend(added as usize) };
                    return core::ptr::null_mut();
                }
                // SAFETY: [old top, new top) was just mapped and belongs to nobody.
                unsafe { heap.extend((*mapped - before) as usize) };
            }
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        cr::without_interrupts(|| {
            if let Some(p) = NonNull::new(ptr) {
                // SAFETY: the caller passes a block this allocator returned with `layout`.
                unsafe { self.inner.lock().0.deallocate(p, layout) };
            }
        })
    }
}
