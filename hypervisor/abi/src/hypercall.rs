//! Hypercall numbers and the register encoding of their arguments.
//!
//! Entry is the `syscall` instruction. Registers on entry:
//!
//! | register | contents |
//! |---|---|
//! | `rdi` | [`HypercallWord`]: number (bits 0–7), flags (bits 8–11), selector (bits 12–63) |
//! | `rsi` | argument 1 |
//! | `rdx` | argument 2 |
//! | `rax` | argument 3 |
//! | `r8`  | argument 4 |
//! | `r9`  | argument 5 |
//!
//! On return `rdi` holds the [`Status`](crate::Status) in its low byte and `rsi`/`rdx`
//! hold results where a hypercall has them. `rcx` and `r11` are clobbered by
//! `syscall`/`sysret`; every other register is preserved.

/// The hypercall numbers. Explicit discriminants: these are ABI.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hypercall {
    /// Call a portal: send the UTCB message, donate the SC, block until the reply.
    Call = 0,
    /// Reply to the caller of the current portal invocation and wait for the next call.
    Reply = 1,
    /// Create a protection domain.
    CreatePd = 2,
    /// Create an execution context (thread or vCPU).
    CreateEc = 3,
    /// Create a scheduling context bound to a global EC.
    CreateSc = 4,
    /// Create a portal to a local EC.
    CreatePt = 5,
    /// Create a semaphore.
    CreateSm = 6,
    /// Revoke a capability range from the children of the caller's PD (optionally self).
    Revoke = 7,
    /// Look up the capability that covers a selector/page/port.
    Lookup = 8,
    /// Control an EC (recall).
    EcCtrl = 9,
    /// Query an SC's consumed time.
    ScCtrl = 10,
    /// Set a portal's identifier.
    PtCtrl = 11,
    /// Semaphore up/down, down with a deadline.
    SmCtrl = 12,
    /// Assign a PCI device to a PD (IOMMU; not yet supported).
    AssignPci = 13,
    /// Route a global system interrupt to its semaphore on a CPU.
    AssignGsi = 14,
    /// Delegate a capability range directly from one PD to another (root/pagers).
    PdCtrl = 15,
}

impl Hypercall {
    /// Number of defined hypercalls.
    pub const COUNT: u8 = 16;

    /// Decodes a hypercall number; unknown numbers are `None` (the kernel answers
    /// [`Status::BadHypercall`](crate::Status::BadHypercall)).
    pub const fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            0 => Self::Call,
            1 => Self::Reply,
            2 => Self::CreatePd,
            3 => Self::CreateEc,
            4 => Self::CreateSc,
            5 => Self::CreatePt,
            6 => Self::CreateSm,
            7 => Self::Revoke,
            8 => Self::Lookup,
            9 => Self::EcCtrl,
            10 => Self::ScCtrl,
            11 => Self::PtCtrl,
            12 => Self::SmCtrl,
            13 => Self::AssignPci,
            14 => Self::AssignGsi,
            15 => Self::PdCtrl,
            _ => return None,
        })
    }
}

/// The first hypercall register: number, flags and a capability selector in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallWord(pub u64);

impl HypercallWord {
    /// Packs a hypercall word. Flags above 4 bits and selectors above 52 bits are cut.
    pub const fn new(hc: Hypercall, flags: u8, sel: u64) -> Self {
        Self((hc as u64) | (((flags & 0xf) as u64) << 8) | (sel << 12))
    }
    /// The raw hypercall number (may be undefined).
    pub const fn number(self) -> u8 {
        self.0 as u8
    }
    /// The four flag bits.
    pub const fn flags(self) -> u8 {
        ((self.0 >> 8) & 0xf) as u8
    }
    /// The capability selector.
    pub const fn sel(self) -> u64 {
        self.0 >> 12
    }
}

/// Flags of [`Hypercall::Call`].
pub mod call_flags {
    /// Fail with `Timeout` instead of waiting when the portal's EC is busy.
    pub const NON_BLOCKING: u8 = 1 << 0;
}

/// Flags of [`Hypercall::CreatePd`].
pub mod pd_flags {
    /// The new PD is a virtual machine: its memory space is a guest-physical space.
    pub const VM: u8 = 1 << 0;
}

/// Flags of [`Hypercall::CreateEc`].
pub mod ec_flags {
    /// A global EC (runs on its own SC); otherwise a local EC (portal handler).
    pub const GLOBAL: u8 = 1 << 0;
    /// A virtual CPU.
    pub const VCPU: u8 = 1 << 1;
}

/// Flags of [`Hypercall::Revoke`].
pub mod revoke_flags {
    /// Also remove the range from the caller's own space.
    pub const SELF: u8 = 1 << 0;
}

/// Flags of [`Hypercall::Lookup`].
pub mod lookup_flags {
    /// Result 1 is the physical address of the first page of a memory CRD.
    pub const PHYS: u8 = 1 << 0;
}

/// The MSI address (low 32 bits; the high half is zero) in `assign_gsi`'s result for a
/// message-signalled GSI.
pub const fn msi_address(result: u64) -> u32 {
    result as u32
}

/// The MSI data in `assign_gsi`'s result for a message-signalled GSI.
pub const fn msi_data(result: u64) -> u32 {
    (result >> 32) as u32
}

/// Packs an MSI address and data as `assign_gsi` answers them.
pub const fn msi_result(address: u32, data: u32) -> u64 {
    address as u64 | (data as u64) << 32
}

/// Flags of [`Hypercall::SmCtrl`].
pub mod sm_flags {
    /// Down (wait); without it, up (signal).
    pub const DOWN: u8 = 1 << 0;
    /// With `DOWN`: consume the whole count, not just one.
    pub const ZERO: u8 = 1 << 1;
}

/// Operations of [`Hypercall::EcCtrl`] (argument 1).
pub mod ec_ctrl_op {
    /// Force the EC through its RECALL event at the next opportunity.
    pub const RECALL: u64 = 0;
}

/// Operations of [`Hypercall::PdCtrl`] (the flags field).
pub mod pd_ctrl_op {
    /// Delegate `src_crd` of the source PD into the window `dst_crd` of the destination.
    pub const DELEGATE: u8 = 0;
    /// Move `arg2` pages of kernel-memory quota from the source PD to the destination.
    pub const QUOTA: u8 = 1;
    /// Read one figure (argument 1: a [`stat`](super::stat) item) of the PD into the
    /// first result register: its quota, or, on the kernel PD, the kernel's memory.
    pub const STAT: u8 = 2;
}

/// Items of [`pd_ctrl_op::STAT`](pd_ctrl_op::STAT) (argument 1).
pub mod stat {
    /// Pages of the PD's kernel-memory quota not charged.
    pub const QUOTA_AVAIL: u64 = 0;
    /// Pages of the PD's kernel-memory quota in all.
    pub const QUOTA_TOTAL: u64 = 1;
    /// Kernel PD only: free frames of the kernel's frame pool (after freeing every frame
    /// that waited for a TLB shootdown).
    pub const POOL_FREE: u64 = 16;
    /// Kernel PD only: frames of the kernel's frame pool in all.
    pub const POOL_TOTAL: u64 = 17;
    /// Kernel PD only: bytes of the kernel heap in use.
    pub const HEAP_USED: u64 = 18;
    /// Kernel PD only: bytes of the kernel heap mapped (taken from the pool).
    pub const HEAP_MAPPED: u64 = 19;
    /// Kernel PD only: mapping-database nodes (memory, I/O ports and objects together).
    pub const MDB_NODES: u64 = 20;
}

/// Flags of [`Hypercall::AssignGsi`] (argument 2).
pub mod gsi_flags {
    /// Level-triggered (otherwise edge).
    pub const LEVEL: u64 = 1 << 0;
    /// Active low (otherwise active high).
    pub const ACTIVE_LOW: u64 = 1 << 1;
    /// Use the ACPI/MP default trigger mode and polarity for this GSI.
    pub const DEFAULT: u64 = 1 << 2;
}

/// Packs an SC's quantum-priority descriptor: priority (bits 0–7, 1..=255, larger is
/// more urgent) and time quantum in microseconds (bits 12–63).
pub const fn qpd(prio: u8, quantum_us: u64) -> u64 {
    (prio as u64) | (quantum_us << 12)
}

/// Unpacks a quantum-priority descriptor into (priority, quantum in µs).
pub const fn qpd_split(qpd: u64) -> (u8, u64) {
    (qpd as u8, qpd >> 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for n in 0..=255u8 {
            match Hypercall::from_raw(n) {
                Some(h) => assert_eq!(h as u8, n),
                None => assert!(n >= Hypercall::COUNT),
            }
        }
    }

    #[test]
    fn word_packing() {
        let w = HypercallWord::new(Hypercall::SmCtrl, sm_flags::DOWN, 0x1234);
        assert_eq!(w.number(), 12);
        assert_eq!(w.flags(), 1);
        assert_eq!(w.sel(), 0x1234);
        assert_eq!(qpd_split(qpd(7, 10_000)), (7, 10_000));
    }
}
