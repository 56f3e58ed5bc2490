//! Kernel logic that needs no hardware: capability spaces, the mapping database,
//! allocators, kernel-memory quotas, scheduler run queues and page-table walking.
//!
//! Everything here is `no_std` + `alloc`, never panics on any input (errors come back
//! as `Result`/`Option`), bounds its recursion by constants, not by user input, and is
//! tested on the host with `cargo test -p peregrine-core`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod buddy;
pub mod capspace;
pub mod mdb;
pub mod mitigation;
pub mod pagetable;
pub mod poolranges;
pub mod quota;
pub mod runqueue;
