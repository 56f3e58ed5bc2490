//! Peregrine: a NOVA-style x86_64 microhypervisor.
//!
//! Boot: Multiboot v1 → `arch/x86/boot.S` (long mode, boot page tables) → [`platform::boot::kmain`]
//! (platform bring-up, all CPUs online) → [`hooks::bsp_ready`].
#![no_std]
#![no_main]

extern crate alloc;

pub mod console;

pub mod arch;
pub mod hooks;
pub mod mem;
pub mod panic;
pub mod platform;

// The kernel proper: objects, capabilities, IPC, scheduling.
pub mod cap;
pub mod cpu;
pub mod ec;
pub mod entry;
pub mod fastpath;
pub mod fpu;
pub mod frame;
pub mod ipc;
pub mod irq;
pub mod kmem;
pub mod pd;
pub mod pt;
pub mod root;
pub mod sc;
pub mod sched;
pub mod sm;
pub mod space;
pub mod space_guest;
pub mod space_mem;
pub mod space_pio;
pub mod syscall;
pub mod tlb;
pub mod trap;
pub mod vcpu;

/// Panics with a fixed message (for paths that have no formatting to do).
pub fn kpanic(msg: &str) -> ! {
    panic!("{msg}")
}
