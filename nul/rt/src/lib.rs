//! NUL runtime: what every user-level component of Peregrine links against.
//!
//! - [`hc`]: the hypercall bindings, one function per hypercall, using the ABI crate's
//!   numbers and register encoding;
//! - [`utcb`]: access to the running EC's UTCB;
//! - [`sel`]: the selector allocator and the well-known selectors of a component;
//! - [`heap`]: the global allocator over a static arena;
//! - [`console`]: `println!` through a pluggable sink (the root writes to the serial
//!   port, everyone else calls the root's console portal);
//! - [`start`]: the `_start` entry, the stack and the panic handler;
//! - [`thread`]: local ECs (portal handlers) with their stacks and UTCBs.
// A host test build (`cargo clippy --workspace --all-targets`) links std, with its own
// panic handler and allocator.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod blk;
pub mod console;
pub mod device;
pub mod hc;
pub mod heap;
pub mod sel;
pub mod stack;
pub mod start;
pub mod start_info;
pub mod svc;
pub mod sync;
pub mod thread;
pub mod utcb;

pub use peregrine_abi as abi;
