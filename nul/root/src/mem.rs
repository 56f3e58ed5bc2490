//! The root's memory: every page the kernel PD holds, mapped at a fixed window, and a
//! page allocator over it for the components the root starts.

use alloc::vec::Vec;

use nul_rt::hc;
use nul_rt::sel;
use nul_rt::sync::Mutex;
use peregrine_abi::hip::mem_kind;
use peregrine_abi::perm::MemPerm;
use peregrine_abi::{Crd, XferFlags, PAGE_BITS};

use crate::hip::HipView;

use crate::pieces::first_congruent;
pub use crate::pieces::{aligned_pieces, dual_pieces};

/// Physical page `p` is mapped at `WINDOW + p * 4096` in the root.
pub const WINDOW: u64 = 0x1000_0000_0000;

/// Free physical ranges (base page, pages).
static FREE: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// The root-virtual address of physical address `phys`.
pub fn virt(phys: u64) -> u64 {
    WINDOW + phys
}

/// Delegates a physical range from the kernel PD into the window.
fn take(base_page: u64, pages: u64) -> u64 {
    let mut got = 0;
    for (p, order) in aligned_pieces(base_page, pages) {
        let src = Crd::mem(p, order, MemPerm::all());
        let dst = Crd::mem(p + (WINDOW >> PAGE_BITS), order, MemPerm::all());
        if hc::pd_delegate(
            peregrine_abi::sel::KERN_PD,
            sel::OWN_PD,
            src,
            dst,
            0,
            XferFlags::empty(),
        )
        .is_ok()
        {
            got += 1u64 << order;
        }
    }
    got
}

/// Takes all available memory and all modules from the kernel PD. Returns free pages.
pub fn init(hip: &HipView) -> u64 {
    let mut free = FREE.lock();
    let mut total = 0;
    for m in hip.mems() {
        let first = m.addr.div_ceil(4096);
        let last = (m.addr + m.size) / 4096;
        if last <= first {
            continue;
        }
        match m.kind {
            mem_kind::AVAILABLE => {
                let got = take(first, last - first);
                if got == last - first {
                    free.push((first, got));
                }
                total += got;
            }
            mem_kind::MODULE => {
                take(
                    m.addr / 4096,
                    (m.addr + m.size).div_ceil(4096) - m.addr / 4096,
                );
            }
            _ => {}
        }
    }
    total
}

/// Allocates `pages` contiguous zeroed physical pages aligned to `align` pages (a power
/// of two): a pool mapped at an equally aligned address then goes to its holder in few
/// large pieces (few mapping-database nodes, large pages). Falls back to [`alloc`].
pub fn alloc_aligned(pages: u64, align: u64) -> Option<u64> {
    alloc_congruent(pages, align, 0)
}

/// Allocates `pages` contiguous zeroed physical pages whose first page number is `rem`
/// modulo `align` pages (a power of two): memory to be mapped at a virtual page number
/// with that remainder then goes to its holder in the largest pieces the range allows,
/// whatever the physical layout (few mapping-database nodes, large pages). Falls back
/// to [`alloc`].
pub fn alloc_congruent(pages: u64, align: u64, rem: u64) -> Option<u64> {
    let align = align.max(1).next_power_of_two();
    let rem = rem % align;
    let mut free = FREE.lock();
    let found = free.iter().enumerate().find_map(|(i, &(b, n))| {
        let a = first_congruent(b, align, rem);
        (a + pages <= b + n).then_some((i, b, n, a))
    });
    let Some((i, b, n, a)) = found else {
        drop(free);
        return alloc(pages);
    };
    // Keep the parts before and after the aligned range.
    free.remove(i);
    if a + pages < b + n {
        free.insert(i, (a + pages, b + n - a - pages));
    }
    if a > b {
        free.insert(i, (b, a - b));
    }
    drop(free);
    let phys = a * 4096;
    // SAFETY: as in `alloc`: free RAM of the window, just taken off the free list.
    unsafe { core::ptr::write_bytes(virt(phys) as *mut u8, 0, (pages * 4096) as usize) };
    Some(phys)
}

/// Allocates `pages` contiguous zeroed physical pages; returns the physical address.
pub fn alloc(pages: u64) -> Option<u64> {
    let mut free = FREE.lock();
    let i = free.iter().position(|&(_, n)| n >= pages)?;
    let (b, n) = free[i];
    if n == pages {
        free.remove(i);
    } else {
        free[i] = (b + pages, n - pages);
    }
    drop(free);
    let phys = b * 4096;
    // SAFETY: the range is free RAM mapped writable in the window (taken in `init`), and
    // no one else uses it: it was just removed from the free list.
    unsafe { core::ptr::write_bytes(virt(phys) as *mut u8, 0, (pages * 4096) as usize) };
    Some(phys)
}

/// Returns pages to the allocator.
pub fn free(phys: u64, pages: u64) {
    FREE.lock().push((phys / 4096, pages));
}

/// Pages currently free.
#[allow(dead_code)]
pub fn free_pages() -> u64 {
    FREE.lock().iter().map(|&(_, n)| n).sum()
}
