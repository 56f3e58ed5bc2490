//! x86_64 platform: boot entry, descriptor tables, interrupts, APICs, SMP.

pub mod acpi;
pub mod apic;
pub mod cpu;
pub mod cr;
pub mod dr;
pub mod entry;
pub mod gdt;
pub mod idt;
pub mod io;
pub mod ioapic;
pub mod msr;
pub mod paging;
pub mod pic;
pub mod pit;
pub mod qemu;
pub mod regs;
pub mod selfcheck;
pub mod serial;
pub mod smp;
pub mod spec;
pub mod stack;
pub mod svm;
pub mod syscall;
pub mod timer;
pub mod trap;
pub mod vmx;

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));
core::arch::global_asm!(include_str!("trampoline.S"), options(att_syntax));
