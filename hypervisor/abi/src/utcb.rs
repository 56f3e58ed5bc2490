//! The user thread control block: one page per EC shared by the EC and the kernel.
//!
//! Layout: a four-word [`UtcbHead`] followed by [`DATA_WORDS`] data words. For a message,
//! untyped words fill the data area from the bottom and typed items ([`Xfer`]) from the
//! top. For exceptions and VM exits the data area holds an [`ArchState`].

use crate::crd::{Crd, Xfer};
use crate::mtd::Mtd;

mod state;

pub use state::{changed_groups, gpr_mtd};

/// Words in the data area.
pub const DATA_WORDS: usize = (crate::PAGE_SIZE - core::mem::size_of::<UtcbHead>()) / 8;

/// The UTCB header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UtcbHead {
    /// Message descriptor: untyped words (bits 0–15), typed items (bits 16–31).
    pub mtr: u64,
    /// Receive window for translated capabilities.
    pub crd_xlt: Crd,
    /// Receive window for delegated capabilities.
    pub crd_dlg: Crd,
    /// Free for the owner (thread-local storage pointer); never touched by the kernel.
    pub tls: u64,
}

impl Default for Crd {
    fn default() -> Self {
        Crd::NULL
    }
}

impl UtcbHead {
    /// Untyped words in the message.
    pub const fn untyped(&self) -> usize {
        (self.mtr & 0xffff) as usize
    }
    /// Typed items in the message.
    pub const fn typed(&self) -> usize {
        ((self.mtr >> 16) & 0xffff) as usize
    }
    /// Sets both counts.
    pub fn set_counts(&mut self, untyped: usize, typed: usize) {
        self.mtr = (untyped as u64 & 0xffff) | ((typed as u64 & 0xffff) << 16);
    }
    /// Whether the counts fit the data area.
    pub const fn counts_valid(&self) -> bool {
        self.untyped() + 2 * self.typed() <= DATA_WORDS
    }
}

/// The whole UTCB page.
#[repr(C, align(4096))]
#[derive(Clone)]
pub struct Utcb {
    /// Header.
    pub head: UtcbHead,
    /// Data area: message words or architectural state.
    pub data: [u64; DATA_WORDS],
}

const _: () = assert!(core::mem::size_of::<Utcb>() == crate::PAGE_SIZE);
const _: () = assert!(core::mem::size_of::<UtcbHead>() == 32);
const _: () = assert!(core::mem::size_of::<ArchState>() <= DATA_WORDS * 8);

impl Utcb {
    /// An empty UTCB.
    pub const fn new() -> Self {
        Utcb {
            head: UtcbHead {
                mtr: 0,
                crd_xlt: Crd::NULL,
                crd_dlg: Crd::NULL,
                tls: 0,
            },
            data: [0; DATA_WORDS],
        }
    }

    /// Reads typed item `i` (0 is the topmost).
    pub fn xfer(&self, i: usize) -> Option<Xfer> {
        let idx = DATA_WORDS.checked_sub(2 * (i + 1))?;
        Some(Xfer {
            crd: Crd(self.data[idx]),
            meta: self.data[idx + 1],
        })
    }

    /// Writes typed item `i` (0 is the topmost).
    pub fn set_xfer(&mut self, i: usize, x: Xfer) -> bool {
        match DATA_WORDS.checked_sub(2 * (i + 1)) {
            Some(idx) => {
                self.data[idx] = x.crd.0;
                self.data[idx + 1] = x.meta;
                true
            }
            None => false,
        }
    }

    /// The data area viewed as architectural state.
    pub fn arch(&self) -> &ArchState {
        // SAFETY: ArchState is repr(C), made only of integers (every bit pattern is
        // valid), fits the data area (asserted above) and the data area is 8-aligned,
        // which is ArchState's alignment.
        unsafe { &*(self.data.as_ptr() as *const ArchState) }
    }

    /// The data area viewed as mutable architectural state.
    pub fn arch_mut(&mut self) -> &mut ArchState {
        // SAFETY: as in `arch`; the exclusive borrow of self covers the data area.
        unsafe { &mut *(self.data.as_mut_ptr() as *mut ArchState) }
    }
}

impl Default for Utcb {
    fn default() -> Self {
        Self::new()
    }
}

/// A segment register or descriptor-table register as VMX and SVM both describe it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub sel: u16,
    /// Access rights in the compressed SVM form (type, S, DPL, P in bits 0–7; AVL, L,
    /// D/B, G in bits 8–11).
    pub ar: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

const _: () = assert!(core::mem::size_of::<Segment>() == 16);

/// Index of each general-purpose register in [`ArchState::gpr`], in the x86 encoding
/// order.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
    pub const R12: usize = 12;
    pub const R13: usize = 13;
    pub const R14: usize = 14;
    pub const R15: usize = 15;
}

/// Backend-neutral execution controls of a vCPU (`ArchState::ctrl[0]`, MTD `CTRL`):
/// optional exits a VMM may enable. `ctrl[1]` is the exception bitmap (bit *n* set:
/// exception vector *n* exits as [`EXCEPTION`](crate::event::vcpu::EXCEPTION)). Exits
/// the kernel needs (CPUID, HLT, I/O, MSR, VMCALL, INVD, XSETBV, triple fault, NPT
/// fault, the SVM/VMX instructions) are always on.
pub mod ctrl {
    /// RDTSC exits.
    pub const RDTSC: u64 = 1 << 0;
    /// RDTSCP exits.
    pub const RDTSCP: u64 = 1 << 1;
    /// INVLPG exits.
    pub const INVLPG: u64 = 1 << 2;
    /// PAUSE exits.
    pub const PAUSE: u64 = 1 << 3;
    /// MONITOR and MWAIT exit.
    pub const MWAIT: u64 = 1 << 4;
    /// WBINVD exits.
    pub const WBINVD: u64 = 1 << 5;
    /// Writes to CR0 and CR4 exit (CR_ACCESS).
    pub const CR0_CR4_WRITE: u64 = 1 << 6;
    /// Reads and writes of CR3 exit (CR_ACCESS).
    pub const CR3_ACCESS: u64 = 1 << 7;
    /// RDPMC exits (as [`OTHER`](crate::event::vcpu::OTHER)).
    pub const RDPMC: u64 = 1 << 8;
    /// All bits a kernel may accept.
    pub const ALL: u64 = 0x1ff;
}

/// Bits of `ArchState::inj_info` above the VMX entry-interruption field.
pub mod inj {
    /// Valid bit of the entry-interruption field.
    pub const VALID: u64 = 1 << 31;
    /// Error code valid.
    pub const ERROR_VALID: u64 = 1 << 11;
    /// Request an INTR_WINDOW exit as soon as the guest can take an external interrupt.
    pub const REQ_INTR_WINDOW: u64 = 1 << 32;
    /// Request an NMI_WINDOW exit when the guest can take an NMI.
    pub const REQ_NMI_WINDOW: u64 = 1 << 33;
    /// Type: external interrupt.
    pub const TYPE_EXTINT: u64 = 0 << 8;
    /// Type: NMI.
    pub const TYPE_NMI: u64 = 2 << 8;
    /// Type: hardware exception.
    pub const TYPE_HW_EXC: u64 = 3 << 8;
    /// Type: software interrupt (INT n).
    pub const TYPE_SW_INT: u64 = 4 << 8;
    /// Type: privileged software exception (INT1).
    pub const TYPE_PRIV_SW_EXC: u64 = 5 << 8;
    /// Type: software exception (INT3, INTO).
    pub const TYPE_SW_EXC: u64 = 6 << 8;
}

/// Architectural state of an EC or vCPU, as transferred on events under an [`Mtd`].
///
/// A handler changes it through the setters (`set_gpr`, `set_rip`, `advance`,
/// `set_cr0`, `set_inj`, …), which record the changed group in `mtd`; that record is
/// what the reply (or any other binding) writes back.
///
/// For host exceptions `qual[0]` is the error code and `qual[1]` the fault address (CR2
/// for page faults). Offsets are ABI; see ABI.md.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ArchState {
    /// Which groups below are valid (kernel → handler) or to be taken back (reply).
    pub mtd: Mtd,
    /// Length of the instruction that caused the event (0 if unknown).
    pub inst_len: u64,
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// Interruptibility state (VMX encoding).
    pub intr_state: u32,
    /// Activity state (0 active, 1 HLT, 2 shutdown, 3 wait-for-SIPI).
    pub actv_state: u32,
    /// Event injection (VMX entry-interruption format: vector 0–7, type 8–10, error
    /// code valid 11, valid 31); bits 32–63 carry the window requests.
    pub inj_info: u64,
    /// Error code of the injected event.
    pub inj_error: u64,
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8–R15 (see [`gpr`]).
    pub gpr: [u64; 16],
    /// Exit qualification.
    pub qual: [u64; 2],
    /// Execution controls (exit enables), backend-neutral bits.
    pub ctrl: [u64; 2],
    /// TSC value at the event.
    pub tsc_val: u64,
    /// TSC offset.
    pub tsc_off: u64,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (TPR).
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
    /// PAT.
    pub pat: u64,
    /// XCR0.
    pub xcr0: u64,
    /// DR7.
    pub dr7: u64,
    /// SYSENTER_CS.
    pub sysenter_cs: u64,
    /// SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// FMASK (SFMASK).
    pub fmask: u64,
    /// KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// ES.
    pub es: Segment,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// DS.
    pub ds: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// LDTR.
    pub ldtr: Segment,
    /// TR.
    pub tr: Segment,
    /// GDTR (base and limit only).
    pub gdtr: Segment,
    /// IDTR (base and limit only).
    pub idtr: Segment,
    /// PDPTEs.
    pub pdpte: [u64; 4],
    /// DR6 (MTD `DR`, with DR7).
    pub dr6: u64,
}

impl Default for Mtd {
    fn default() -> Self {
        Mtd::empty()
    }
}

/// Offsets pinned: a change here is an ABI change.
const _: () = {
    assert!(core::mem::offset_of!(ArchState, gpr) == 56);
    assert!(core::mem::offset_of!(ArchState, qual) == 184);
    assert!(core::mem::offset_of!(ArchState, es) == 368);
    assert!(core::mem::offset_of!(ArchState, dr6) == 560);
    assert!(core::mem::size_of::<ArchState>() == 568);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::XferFlags;

    #[test]
    fn layout() {
        assert_eq!(DATA_WORDS, 508);
        let u = Utcb::new();
        assert_eq!(core::mem::align_of_val(&u), 4096);
    }

    #[test]
    fn typed_items_from_top() {
        let mut u = Utcb::new();
        let x = Xfer::delegate(Crd::obj(5, 0, 3), XferFlags::empty(), 9);
        assert!(u.set_xfer(0, x));
        assert_eq!(u.data[DATA_WORDS - 2], x.crd.0);
        assert_eq!(u.xfer(0), Some(x));
        assert!(u.set_xfer(DATA_WORDS / 2 - 1, x));
        assert!(!u.set_xfer(DATA_WORDS / 2, x));
        assert_eq!(u.xfer(DATA_WORDS / 2), None);
    }

    #[test]
    fn counts() {
        let mut h = UtcbHead::default();
        h.set_counts(500, 4);
        assert_eq!((h.untyped(), h.typed()), (500, 4));
        assert!(h.counts_valid());
        h.set_counts(501, 4);
        assert!(!h.counts_valid());
    }

    #[test]
    fn arch_overlay() {
        let mut u = Utcb::new();
        u.arch_mut().rip = 0x1234;
        u.arch_mut().gpr[gpr::RDI] = 7;
        assert_eq!(u.data[2], 0x1234);
        assert_eq!(u.data[7 + gpr::RDI], 7);
        assert_eq!(u.arch().rip, 0x1234);
    }
}
