//! Port I/O instructions.

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port write must not violate memory safety (e.g. reprogram a DMA engine).
#[inline]
pub unsafe fn outb(port: u16, val: u8) {
    // SAFETY: the caller vouches for the device side effect; `out` touches no memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// The port read must not have side effects that break memory safety.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller vouches for the device side effect; `in` touches no memory.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes a doubleword to an I/O port.
///
/// # Safety
/// As for [`outb`].
#[inline]
pub unsafe fn outl(port: u16, val: u32) {
    // SAFETY: as for outb.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}
