//! The kernel's stacks: each CPU's kernel stack and its IST stacks (NMI, #DF, #MC), each
//! in its own slot of the stacks' region (see [`crate::mem::layout`]) with the unmapped
//! rest of the slot below it as a guard: an overflow faults on the guard instead of
//! overwriting whatever memory lies below, and the #DF that follows (the #PF cannot push
//! its frame on the overflowed stack) names the overflow ([`guard_of`]).
//!
//! Above each IST stack's top lies one word that holds the CPU's per-CPU record: the
//! NMI, #DF and #MC entries find their CPU there without trusting the GS base they
//! interrupted (`entry.rs`).

use core::sync::atomic::Ordering;

use super::paging::{self, Flags};
use crate::mem::layout::{STACKS_BASE, STACKS_END, STACKS_PER_CPU, STACK_SLOT};
use crate::mem::{pool, PAGE_SIZE};
use crate::platform::percpu;

/// Pages of a CPU's kernel stack (64 KiB).
pub const KSTACK_PAGES: usize = 16;
/// Pages of each IST stack (16 KiB: the #DF handler formats the panic message there).
pub const IST_PAGES: usize = 4;
/// Bytes reserved at the top of an IST stack for the per-CPU record's address (16, so
/// the stack pointer the TSS names stays 16-byte aligned).
pub const IST_RESERVED: u64 = 16;

const _: () = assert!(
    (KSTACK_PAGES as u64 + 1) * PAGE_SIZE <= STACK_SLOT
        && (IST_PAGES as u64 + 1) * PAGE_SIZE <= STACK_SLOT
);
const _: () = assert!(KSTACK_PAGES as u64 * PAGE_SIZE == super::entry::KSTACK_MAX as u64);

/// One of a CPU's stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// The kernel stack (TSS.RSP0 at boot, the per-CPU `kstack_top`).
    Kernel = 0,
    /// The NMI stack (IST1).
    Nmi = 1,
    /// The double-fault stack (IST2).
    Df = 2,
    /// The machine-check stack (IST3).
    Mc = 3,
}

impl Stack {
    /// Every stack of a CPU, in slot order.
    pub const ALL: [Stack; 4] = [Stack::Kernel, Stack::Nmi, Stack::Df, Stack::Mc];

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Stack::Kernel => "kernel",
            Stack::Nmi => "nmi",
            Stack::Df => "df",
            Stack::Mc => "mc",
        }
    }

    /// Its size in pages.
    pub const fn pages(self) -> usize {
        match self {
            Stack::Kernel => KSTACK_PAGES,
            _ => IST_PAGES,
        }
    }

    /// Its size in bytes.
    pub const fn bytes(self) -> u64 {
        self.pages() as u64 * PAGE_SIZE
    }
}

/// The top of CPU `cpu`'s stack `s` (the end of its slot).
pub const fn top(cpu: usize, s: Stack) -> u64 {
    STACKS_BASE + (cpu as u64 * STACKS_PER_CPU + s as u64 + 1) * STACK_SLOT
}

/// Maps CPU `cpu`'s stacks (frames from the pool) at the tops of their slots and
/// returns the IST stack pointers for its TSS (NMI, #DF, #MC), each below the word that
/// names the CPU's per-CPU record.
///
/// # Panics
/// When the pool is exhausted at boot (nothing can run without the stacks).
pub fn map_all(cpu: usize) -> [u64; 3] {
    for s in Stack::ALL {
        let t = top(cpu, s);
        for i in 1..=s.pages() as u64 {
            let f = pool::alloc_frame().expect("stack: no memory for a kernel stack");
            paging::map_kernel_page(t - i * PAGE_SIZE, f, Flags::KERNEL_RW)
                .expect("stack: cannot map a kernel stack");
        }
    }
    [Stack::Nmi, Stack::Df, Stack::Mc].map(|s| ist_entry(cpu, top(cpu, s)))
}

/// Writes CPU `cpu`'s per-CPU record address just below the IST stack top `top` and
/// returns the stack pointer its TSS entry gets.
pub fn ist_entry(cpu: usize, top: u64) -> u64 {
    let p = percpu::get(cpu) as *const percpu::PerCpu as u64;
    let slot = top - IST_RESERVED;
    // SAFETY: the top 16 bytes of a mapped IST stack that no frame uses (the TSS entry
    // points below them); the CPU is not yet using this stack.
    unsafe { (slot as *mut u64).write(p) };
    slot
}

/// Which stack's guard `addr` lies in: (CPU, stack).
pub fn guard_of(addr: u64) -> Option<(usize, Stack)> {
    if !(STACKS_BASE..STACKS_END).contains(&addr) {
        return None;
    }
    let slot = (addr - STACKS_BASE) / STACK_SLOT;
    let s = Stack::ALL[(slot % STACKS_PER_CPU) as usize];
    let bottom = STACKS_BASE + (slot + 1) * STACK_SLOT - s.bytes();
    (addr < bottom).then_some(((slot / STACKS_PER_CPU) as usize, s))
}

/// One live stack of a CPU, for the boot self-check.
#[derive(Debug, Clone, Copy)]
pub struct StackInfo {
    /// Which stack.
    pub stack: Stack,
    /// Its top as the CPU uses it (`kstack_top`, or the TSS's IST entry plus the
    /// reserved word).
    pub top: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// CPU `cpu`'s stacks as its per-CPU record and its TSS name them.
pub fn live(cpu: usize) -> [StackInfo; 4] {
    let ist = super::gdt::tss(cpu).ist;
    Stack::ALL.map(|s| StackInfo {
        stack: s,
        top: match s {
            Stack::Kernel => percpu::get(cpu).kstack_top.load(Ordering::Relaxed),
            _ => ist[s as usize - 1] + IST_RESERVED,
        },
        bytes: s.bytes(),
    })
}
