//! The kernel's virtual address layout and the direct map of physical memory.
//!
//! ```text
//! 0x0000_0000_0000_0000 .. 0x0000_8000_0000_0000  user space (PML4 0..255, empty in the
//!                                                 kernel's own page table)
//! 0xffff_8000_0000_0000 .. 0xffff_c000_0000_0000  PHYSMAP: all RAM and 0..4 GiB MMIO
//!                                                 (PML4 256..383; 2 MiB pages, never
//!                                                 executable; the kernel image's text
//!                                                 and rodata read-only in 4 KiB pages)
//! 0xffff_c000_0000_0000 .. +1 GiB                 kernel heap (PML4 384, grown on demand)
//! 0xffff_c080_0000_0000 .. +32 MiB                kernel stacks (PML4 385): a slot of
//!                                                 STACK_SLOT bytes per CPU and stack,
//!                                                 the stack at its top, the rest of the
//!                                                 slot unmapped (the guard below it)
//! 0xffff_c080_0200_0000 .. 0xffff_ff80_0000_0000  free for kernel use (PML4 385..510)
//! 0xffff_ffff_8000_0000 .. +image                 kernel image at KERNEL_VMA + physical
//!                                                 (PML4 511, PDPT 510)
//! ```
//! All PML4 entries 256..511 point to PDPT pages created at boot that never change, so a
//! user page table shares the kernel by copying entries 256..511.

/// Base of the direct map: `virt = PHYSMAP_BASE + phys`.
pub const PHYSMAP_BASE: u64 = 0xffff_8000_0000_0000;
/// Size of the direct map window (64 TiB).
pub const PHYSMAP_SIZE: u64 = 1 << 46;
/// Kernel heap base.
pub const HEAP_BASE: u64 = 0xffff_c000_0000_0000;
/// Kernel heap maximum size.
pub const HEAP_MAX: u64 = 1 << 30;
/// Base of the kernel stacks' region.
pub const STACKS_BASE: u64 = 0xffff_c080_0000_0000;
/// Bytes of virtual address space per stack: the stack sits at the top of its slot, the
/// rest of the slot below it is never mapped.
pub const STACK_SLOT: u64 = 128 << 10;
/// Stacks per CPU: the kernel stack and the IST stacks for NMI, #DF and #MC.
pub const STACKS_PER_CPU: u64 = 4;
/// End of the kernel stacks' region.
pub const STACKS_END: u64 =
    STACKS_BASE + STACK_SLOT * STACKS_PER_CPU * peregrine_abi::hip::MAX_CPUS as u64;
/// First address of the range left free for other kernel mappings.
pub const KERNEL_FREE_BASE: u64 = STACKS_END;
/// End of that range.
pub const KERNEL_FREE_END: u64 = 0xffff_ff80_0000_0000;
/// Where the kernel image is linked: `virt = KERNEL_VMA + phys`.
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
/// First PML4 slot of the kernel half.
pub const KERNEL_PML4_FIRST: usize = 256;

/// Virtual address of physical address `phys` in the direct map.
#[inline]
pub const fn phys_to_virt(phys: u64) -> u64 {
    PHYSMAP_BASE + phys
}

/// Pointer to physical address `phys` in the direct map.
#[inline]
pub const fn phys_to_ptr<T>(phys: u64) -> *mut T {
    phys_to_virt(phys) as *mut T
}

/// Physical address of a direct-map or kernel-image virtual address.
///
/// Returns `None` for addresses outside both (e.g. the heap: use the page table there).
#[inline]
pub const fn virt_to_phys(virt: u64) -> Option<u64> {
    if virt >= KERNEL_VMA {
        Some(virt - KERNEL_VMA)
    } else if virt >= PHYSMAP_BASE && virt < PHYSMAP_BASE + PHYSMAP_SIZE {
        Some(virt - PHYSMAP_BASE)
    } else {
        None
    }
}

extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __image_end: u8;
}

/// Virtual addresses of the kernel image sections: (start, text end, rodata end, end).
pub fn image_bounds() -> (u64, u64, u64, u64) {
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__text_end) as u64,
        core::ptr::addr_of!(__rodata_end) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}

/// Physical range `[start, end)` of the kernel image (including .bss).
pub fn image_phys() -> (u64, u64) {
    let (s, _, _, e) = image_bounds();
    (s - KERNEL_VMA, e - KERNEL_VMA)
}
