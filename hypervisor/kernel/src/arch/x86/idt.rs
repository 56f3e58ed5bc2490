//! The interrupt descriptor table (shared by all CPUs) and the vector assignment.

use super::entry::stub_addr;
use super::gdt::{IST_DF, IST_MC, IST_NMI, KERNEL_CS};

/// Exception vectors.
pub mod exc {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u8 = 2;
    /// Breakpoint.
    pub const BP: u8 = 3;
    /// Overflow.
    pub const OF: u8 = 4;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
    /// Machine check.
    pub const MC: u8 = 18;
}

/// First device-interrupt vector: GSI `g` is delivered at `VEC_GSI_BASE + g`.
pub const VEC_GSI_BASE: u8 = 0x30;
/// Last device-interrupt vector.
pub const VEC_GSI_LAST: u8 = 0xdf;
/// Number of GSIs that have a vector.
pub const NUM_GSI_VECTORS: usize = (VEC_GSI_LAST - VEC_GSI_BASE) as usize + 1;
/// IPI: reschedule.
pub const VEC_IPI_RESCHED: u8 = 0xe0;
/// IPI: recall a vCPU.
pub const VEC_IPI_RECALL: u8 = 0xe1;
/// IPI: TLB shootdown.
pub const VEC_IPI_TLB: u8 = 0xe2;
/// IPI: stop this CPU (panic).
pub const VEC_IPI_HALT: u8 = 0xe3;
/// Last IPI vector the kernel may use.
pub const VEC_IPI_LAST: u8 = 0xef;
/// Local APIC timer.
pub const VEC_TIMER: u8 = 0xf0;
/// Local APIC error.
pub const VEC_APIC_ERROR: u8 = 0xfe;
/// Local APIC spurious interrupt.
pub const VEC_SPURIOUS: u8 = 0xff;

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    _r: u32,
}

const _: () = assert!(core::mem::size_of::<Gate>() == 16);

static mut IDT: [Gate; 256] = [Gate {
    off_lo: 0,
    sel: 0,
    ist: 0,
    attr: 0,
    off_mid: 0,
    off_hi: 0,
    _r: 0,
}; 256];

/// Fills the IDT. Call once on the BSP before any CPU loads it.
pub fn init() {
    for v in 0..=255u8 {
        let a = stub_addr(v);
        let ist = match v {
            exc::NMI => IST_NMI,
            exc::DF => IST_DF,
            exc::MC => IST_MC,
            _ => 0,
        };
        // Interrupt gates; #BP and #OF may be raised by user code with int3/into.
        let dpl = if v == exc::BP || v == exc::OF { 3 } else { 0 };
        let g = Gate {
            off_lo: a as u16,
            sel: KERNEL_CS,
            ist,
            attr: 0x8e | (dpl << 5),
            off_mid: (a >> 16) as u16,
            off_hi: (a >> 32) as u32,
            _r: 0,
        };
        // SAFETY: boot is single-threaded here and no CPU has loaded the IDT yet.
        unsafe { (*core::ptr::addr_of_mut!(IDT))[usize::from(v)] = g };
    }
}

/// Loads the IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr {
        limit: (256 * 16 - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static and filled by init(); its gates point at the entry stubs.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags))
    };
}

/// The IDT's base address (shared by all CPUs; a VMCS host-state field).
pub fn base() -> u64 {
    core::ptr::addr_of!(IDT) as u64
}
