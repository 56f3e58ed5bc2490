//! The Peregrine kernel interface.
//!
//! Everything the kernel and user space must agree on lives here and only here:
//! hypercall numbers and their register encoding (one type per hypercall in [`args`]),
//! status codes, capability range descriptors (CRDs), permission bits, message transfer
//! descriptors (MTDs), the UTCB layout, event numbers and the hypervisor information
//! page (HIP). `ABI.md` beside this crate is the prose specification; every shared
//! structure's layout is pinned by a `const` assertion so that a change is a compile
//! error, not a silent break.
#![cfg_attr(not(test), no_std)]

pub mod args;
pub mod crd;
pub mod event;
pub mod hip;
pub mod hypercall;
pub mod mtd;
pub mod perm;
pub mod sel;
pub mod status;
pub mod utcb;

pub use crd::{Crd, CrdKind, Xfer, XferFlags};
pub use hypercall::{Hypercall, HypercallWord};
pub use mtd::Mtd;
pub use status::Status;
pub use utcb::Utcb;

/// Size of a page, the unit of memory capabilities.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_BITS: u32 = 12;

/// The interface version reported in the HIP. Bumped on any incompatible change.
pub const API_VERSION: u32 = 1;
