//! The platform's start: boot (the Multiboot hand-over, memory and CPU bring-up),
//! the boot loader's information, the per-CPU records, and the start of the root task
//! once every CPU is up.

pub mod boot;
pub mod multiboot;
pub mod percpu;
pub mod start;
