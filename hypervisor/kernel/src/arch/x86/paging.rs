//! Host page tables (4-level, SDM vol. 3 4.5): the kernel's own table, kernel mappings,
//! and new user roots that share the kernel half.

use core::sync::atomic::{AtomicU64, Ordering};

use bitflags::bitflags;
use spin::Mutex;

use crate::mem::layout::{self, phys_to_ptr, KERNEL_VMA, PHYSMAP_BASE};
use crate::mem::{align_up, pool, PAGE_SIZE};
use crate::platform::multiboot::BootInfo;

bitflags! {
    /// Page-table entry bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Flags: u64 {
        /// Present.
        const P = 1 << 0;
        /// Writable.
        const W = 1 << 1;
        /// User accessible.
        const U = 1 << 2;
        /// Write-through.
        const PWT = 1 << 3;
        /// Cache disable.
        const PCD = 1 << 4;
        /// Accessed.
        const A = 1 << 5;
        /// Dirty.
        const D = 1 << 6;
        /// Large page (in a PDPT or PD entry).
        const PS = 1 << 7;
        /// Global.
        const G = 1 << 8;
        /// No-execute (only set when EFER.NXE is on; see [`nx`]).
        const NX = 1 << 63;
        /// Kernel read/write data.
        const KERNEL_RW = Self::P.bits() | Self::W.bits() | Self::G.bits() | Self::NX.bits();
        /// Kernel uncached MMIO.
        const KERNEL_MMIO = Self::KERNEL_RW.bits() | Self::PCD.bits() | Self::PWT.bits();
    }
}

/// Why a kernel mapping failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No frame for a page table.
    NoMemory,
    /// The address is not in the kernel half.
    NotKernel,
    /// Something is mapped there already (a page or a large page).
    Busy,
}

/// Address bits of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Flags for non-leaf kernel entries.
const TABLE: u64 = 0x3; // P | W

static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);
static NX_MASK: AtomicU64 = AtomicU64::new(0);
static MAP_LOCK: Mutex<()> = Mutex::new(());

/// Whether NX is usable (EFER.NXE set at boot).
pub fn nx() -> bool {
    NX_MASK.load(Ordering::Relaxed) != 0
}

/// Drops flags the CPU does not support (NX without EFER.NXE).
fn fix(f: Flags) -> u64 {
    f.bits() & !(Flags::NX.bits() & !NX_MASK.load(Ordering::Relaxed))
}

/// Physical address of the kernel's PML4.
pub fn kernel_root() -> u64 {
    KERNEL_ROOT.load(Ordering::Relaxed)
}

fn table(phys: u64) -> &'static mut [u64; 512] {
    // SAFETY: page-table frames are pool frames, mapped in the physmap and only changed
    // under MAP_LOCK (or during single-threaded boot).
    unsafe { &mut *phys_to_ptr::<[u64; 512]>(phys) }
}

fn idx(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * level)) & 0x1ff) as usize
}

/// Returns the table that entry `e` points to, creating it if absent.
fn next(e: &mut u64) -> Result<u64, MapError> {
    if *e & 1 == 0 {
        let t = pool::alloc_frame_zeroed().ok_or(MapError::NoMemory)?;
        *e = t | TABLE;
    } else if *e & Flags::PS.bits() != 0 {
        return Err(MapError::Busy);
    }
    Ok(*e & ADDR_MASK)
}

/// Maps one 4 KiB page in the kernel half (`virt` >= 0xffff_8000_0000_0000).
///
/// The kernel's PML4 never changes (all its PDPTs exist), so the mapping is seen by every
/// user page table at once. Only not-present → present changes are made here, which need
/// no TLB shootdown.
pub fn map_kernel_page(virt: u64, phys: u64, flags: Flags) -> Result<(), MapError> {
    if virt < PHYSMAP_BASE {
        return Err(MapError::NotKernel);
    }
    crate::arch::x86::cr::without_interrupts(|| {
        let _g = MAP_LOCK.lock();
        let pml4 = table(kernel_root());
        let pdpt = pml4[idx(virt, 3)] & ADDR_MASK;
        let pd = next(&mut table(pdpt)[idx(virt, 2)])?;
        let pt = next(&mut table(pd)[idx(virt, 1)])?;
        let e = &mut table(pt)[idx(virt, 0)];
        if *e & 1 != 0 {
            return Err(MapError::Busy);
        }
        *e = (phys & ADDR_MASK) | fix(flags | Flags::P);
        Ok(())
    })
}

/// Allocates a new user root (PML4): empty lower half, kernel entries 256..511 copied.
pub fn new_user_root() -> Option<u64> {
    let root = pool::alloc_frame_zeroed()?;
    let k = table(kernel_root());
    table(root)[256..].copy_from_slice(&k[256..]);
    Some(root)
}

/// Builds the kernel's final page table and switches to it.
///
/// Layout: see [`crate::mem::layout`]. Physmap with 2 MiB pages over all RAM and the
/// whole 0..4 GiB (non-RAM chunks below 4 GiB uncached), never executable, and with the
/// kernel image's text and rodata read-only (4 KiB pages where they lie); kernel image
/// with 4 KiB pages (text RX, rodata R, data/bss RW-NX); every PML4 entry 256..511 gets
/// its PDPT now.
///
/// # Safety
/// Call once on the BSP during boot, after the frame pool is set up; `nx_supported` must
/// reflect EFER.NXE.
pub unsafe fn init(bi: &BootInfo, nx_supported: bool) {
    if nx_supported {
        NX_MASK.store(Flags::NX.bits(), Ordering::Relaxed);
    }
    let root = pool::alloc_frame_zeroed().expect("paging: no frame for the PML4");
    let pml4 = table(root);
    for e in pml4[256..].iter_mut() {
        *e = pool::alloc_frame_zeroed().expect("paging: no frame for a PDPT") | TABLE;
    }
    KERNEL_ROOT.store(root, Ordering::Relaxed);

    // Direct map.
    let top = bi
        .mmap()
        .iter()
        .filter(|e| e.kind == 1)
        .map(|e| e.addr + e.len)
        .max()
        .unwrap_or(0);
    let top = align_up(top.max(1 << 32), 1 << 21);
    let is_ram = |a: u64| {
        bi.mmap()
            .iter()
            .any(|e| matches!(e.kind, 1 | 3 | 4) && a + (1 << 21) > e.addr && a < e.addr + e.len)
    };
    // The image's text and read-only data stay read-only through their physmap alias:
    // the 2 MiB pages covering them are split into 4 KiB pages.
    let (start, text_end, ro_end, _) = layout::image_bounds();
    let (ro_first, ro_last) = (start - KERNEL_VMA, ro_end - KERNEL_VMA);
    let mut a = 0;
    while a < top {
        let v = PHYSMAP_BASE + a;
        let pdpt = pml4[idx(v, 3)] & ADDR_MASK;
        let pd = next(&mut table(pdpt)[idx(v, 2)]).expect("paging: no frame for a PD");
        let f = if is_ram(a) {
            Flags::KERNEL_RW
        } else {
            Flags::KERNEL_MMIO
        };
        if a < ro_last && a + (1 << 21) > ro_first {
            let pt = next(&mut table(pd)[idx(v, 1)]).expect("paging: no frame for a PT");
            for (i, e) in table(pt).iter_mut().enumerate() {
                let p = a + i as u64 * PAGE_SIZE;
                let pf = if p >= ro_first && p < ro_last {
                    Flags::P | Flags::G | Flags::NX
                } else {
                    f
                };
                *e = p | fix(pf);
            }
        } else {
            table(pd)[idx(v, 1)] = a | fix(f | Flags::PS);
        }
        a += 1 << 21;
    }

    // Kernel image.
    let end = layout::image_bounds().3;
    let mut v = start;
    while v < end {
        let flags = if v < text_end {
            Flags::P | Flags::G
        } else if v < ro_end {
            Flags::P | Flags::G | Flags::NX
        } else {
            Flags::KERNEL_RW
        };
        let pdpt = pml4[idx(v, 3)] & ADDR_MASK;
        let pd = next(&mut table(pdpt)[idx(v, 2)]).expect("paging: PD");
        let pt = next(&mut table(pd)[idx(v, 1)]).expect("paging: PT");
        table(pt)[idx(v, 0)] = (v - KERNEL_VMA) | fix(flags);
        v += PAGE_SIZE;
    }
    // SAFETY: the new table maps the kernel image, stack (.bss) and physmap exactly as the
    // boot table did at the same virtual addresses; only the identity map goes away, and
    // nothing uses it any more.
    unsafe { super::cr::write_cr3(root) };
}

/// A present leaf of a page-table walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The leaf entry.
    pub entry: u64,
    /// Its level: 0 for a 4 KiB page, 1 for 2 MiB, 2 for 1 GiB.
    pub level: u32,
    /// Whether every level of the walk allows writes.
    pub writable: bool,
    /// Whether no level of the walk forbids instruction fetches (NX).
    pub executable: bool,
}

/// Walks the page table `root` for `virt`: the leaf that maps it, or `None` when some
/// level is not present.
pub fn walk(root: u64, virt: u64) -> Option<Leaf> {
    let mut t = root;
    let (mut writable, mut executable) = (true, true);
    for level in (0..4).rev() {
        let e = table(t)[idx(virt, level)];
        if e & Flags::P.bits() == 0 {
            return None;
        }
        writable &= e & Flags::W.bits() != 0;
        executable &= e & Flags::NX.bits() == 0;
        if level == 0 || (level < 3 && e & Flags::PS.bits() != 0) {
            return Some(Leaf {
                entry: e,
                level,
                writable,
                executable,
            });
        }
        t = e & ADDR_MASK;
    }
    None
}

/// Activates `root` (a PML4 from [`new_user_root`] or [`kernel_root`]) on this CPU.
///
/// # Safety
/// `root` must map the kernel half exactly like the kernel's table.
pub unsafe fn activate(root: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { super::cr::write_cr3(root) };
}
