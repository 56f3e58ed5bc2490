//! Boot self-checks of the kernel's own mappings, run on every boot once all CPUs are
//! online: each prints one `ok: …` line, or `FAIL selfcheck: …` lines naming what is
//! wrong (the integration tests treat a `FAIL` line as a failed run).
//!
//! - every kernel stack (each CPU's kernel stack and its NMI, #DF and #MC stacks) is
//!   mapped, and the page below it is not: an overflow faults instead of overwriting
//!   whatever lies below;
//! - the physmap alias of the kernel image's text and read-only data is read-only, and
//!   the physmap is not executable;
//! - kernel objects are allocated fallibly: the block `kmem::try_arc` and `try_box`
//!   allocate ahead is the one `Arc::new` and `Box::new` take.

use super::paging::{self, walk};
use super::stack;
use crate::kprintln;
use crate::mem::layout::{self, phys_to_virt, KERNEL_VMA};
use crate::mem::PAGE_SIZE;

/// Runs every check on `cpus` CPUs; true when all passed.
pub fn run(cpus: usize) -> bool {
    let a = stacks(cpus);
    let b = physmap_image();
    let c = objects();
    a && b && c
}

/// `kmem::try_arc` and `try_box` hand their fallibly allocated block to `Arc::new` and
/// `Box::new` (else object creation could still abort when the heap is full).
fn objects() -> bool {
    use core::sync::atomic::Ordering;
    let misses = || crate::mem::heap::PARK_MISSES.load(Ordering::Relaxed);
    let before = misses();
    let a = crate::kmem::try_arc([7u64; 40]);
    let b = crate::kmem::try_box([9u8; 100]);
    let c = crate::kmem::try_arc(crate::sm::Sm::new(None, 0));
    let ok = a.is_ok() && b.is_ok() && c.is_ok() && misses() == before;
    if ok {
        kprintln!("ok: kernel objects allocated fallibly (the heap block is taken first)");
    } else {
        kprintln!(
            "FAIL selfcheck: an object's allocation did not take the block allocated for it ({} misses)",
            misses() - before
        );
    }
    ok
}

/// Each stack's pages are present and writable, the page below its bottom is not
/// present.
fn stacks(cpus: usize) -> bool {
    let root = paging::kernel_root();
    let mut ok = true;
    let mut n = 0;
    for cpu in 0..cpus {
        for s in stack::live(cpu) {
            n += 1;
            let bottom = s.top - s.bytes;
            let mut v = bottom;
            while v < s.top {
                if !walk(root, v).is_some_and(|l| l.writable) {
                    kprintln!(
                        "FAIL selfcheck: cpu {} {} stack page {:#x} not mapped writable",
                        cpu,
                        s.stack.name(),
                        v
                    );
                    ok = false;
                    break;
                }
                v += PAGE_SIZE;
            }
            if walk(root, bottom - PAGE_SIZE).is_some() {
                kprintln!(
                    "FAIL selfcheck: cpu {} {} stack {:#x}..{:#x} has no guard page (the page below is mapped)",
                    cpu,
                    s.stack.name(),
                    bottom,
                    s.top
                );
                ok = false;
            }
        }
    }
    if ok {
        kprintln!("ok: kernel stacks guarded ({n} stacks on {cpus} CPUs, guard page below each)");
    }
    ok
}

/// The physmap alias of the image's text and read-only data is neither writable nor
/// executable; the physmap alias of the data is not executable.
fn physmap_image() -> bool {
    let root = paging::kernel_root();
    let (start, text_end, ro_end, end) = layout::image_bounds();
    let mut ok = true;
    let mut v = start;
    while v < end {
        let alias = phys_to_virt(v - KERNEL_VMA);
        let what = if v < text_end {
            "text"
        } else if v < ro_end {
            "read-only data"
        } else {
            "data"
        };
        match walk(root, alias) {
            Some(l) if l.writable && v < ro_end => {
                kprintln!(
                    "FAIL selfcheck: kernel {} at {:#x} is writable through its physmap alias {:#x}",
                    what,
                    v,
                    alias
                );
                ok = false;
                break;
            }
            Some(l) if l.executable && paging::nx() => {
                kprintln!(
                    "FAIL selfcheck: kernel {} at {:#x} is executable through its physmap alias {:#x}",
                    what,
                    v,
                    alias
                );
                ok = false;
                break;
            }
            _ => {}
        }
        v += PAGE_SIZE;
    }
    // Any other RAM: a pool frame's alias must not be executable either.
    if ok && paging::nx() {
        if let Some(f) = crate::mem::pool::alloc_frame() {
            if walk(root, phys_to_virt(f)).is_some_and(|l| l.executable) {
                kprintln!("FAIL selfcheck: the physmap is executable (frame {:#x})", f);
                ok = false;
            }
            crate::mem::pool::free_frame(f);
        }
    }
    if ok {
        kprintln!("ok: kernel text read-only in the physmap (text and rodata read-only, physmap not executable)");
    }
    ok
}
