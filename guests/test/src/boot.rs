//! The guest as a Multiboot v1 kernel, and the real-mode start of its application
//! processors on a PC.
//!
//! A Multiboot loader (QEMU's `-kernel`, GRUB, our VMM's PC) enters `mb_entry32` in
//! 32-bit protected mode without paging, `eax` = 0x2BADB002, `ebx` = the info structure.
//! It builds an identity map of the first 4 GiB (2 MiB pages, the top GiB uncached for
//! the APICs) in `.bss.boot`, enters long mode and joins the contract's 64-bit entry
//! `_start` (arch.rs) as vCPU 0 with `rsi` = the Multiboot magic and `rcx` = the info
//! address; [`guest_main`](crate::guest_main) reads the mode from the command line.
//!
//! An AP woken by INIT-SIPI-SIPI starts at [`TRAMPOLINE`] in real mode (the copy of
//! `tramp_start`..`tramp_end`), loads the boot GDT, enters 32-bit protected mode at
//! `ap_entry32`, which takes the same path into long mode (the boot vCPU's page tables)
//! and joins `_start` with the index, mode and vCPU count the boot vCPU left in
//! [`AP_INDEX`], [`AP_MODE`] and [`AP_CPUS`].

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// The Multiboot v1 header magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// Header flags: memory information (bit 1), the address fields (bit 16).
pub const HEADER_FLAGS: u32 = 1 << 1 | 1 << 16;
/// What a Multiboot loader leaves in `eax` (and the entry passes on in `rsi`).
pub const LOADER_MAGIC: u64 = 0x2bad_b002;
/// Where the real-mode AP trampoline is copied (SIPI vector 0x08): must be RAM below
/// 1 MiB that the guest may overwrite.
pub const TRAMPOLINE: u64 = 0x8000;

/// The index the next AP to start takes (set before its SIPI).
pub static AP_INDEX: AtomicU64 = AtomicU64::new(0);
/// The mode the APs run.
pub static AP_MODE: AtomicU64 = AtomicU64::new(0);
/// The vCPU count the APs are told.
pub static AP_CPUS: AtomicU64 = AtomicU64::new(0);

global_asm!(
    // The boot GDT: 0x08 32-bit code, 0x10 data, 0x18 64-bit code.
    ".pushsection .rodata.boot, \"a\"",
    ".balign 16",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00cf9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".quad 0x00af9a000000ffff",
    "boot_gdt_end:",
    ".balign 8",
    "boot_gdtr:",
    ".word boot_gdt_end - boot_gdt - 1",
    ".long boot_gdt",
    ".popsection",
    // The page tables (kept by `_start`'s clearing of .bss: link.ld).
    ".pushsection .bss.boot, \"aw\", @nobits",
    ".balign 4096",
    "boot_pml4: .skip 4096",
    "boot_pdpt: .skip 4096",
    "boot_pd: .skip 4 * 4096",
    "boot_tables_end:",
    ".popsection",
    ".pushsection .text.boot32, \"ax\"",
    ".code32",
    ".global mb_entry32",
    "mb_entry32:",
    "cli",
    "cld",
    "cmpl $0x2badb002, %eax",
    "jne 9f",
    "movl %ebx, %esi",
    "lgdtl boot_gdtr",
    "ljmpl $0x08, $1f",
    "1:",
    "movl $0x10, %eax",
    "movl %eax, %ds",
    "movl %eax, %es",
    "movl %eax, %ss",
    "movl %eax, %fs",
    "movl %eax, %gs",
    // Zero the tables (a loader zeroes .bss; be sure).
    "movl $boot_pml4, %edi",
    "movl $((boot_tables_end - boot_pml4) / 4), %ecx",
    "xorl %eax, %eax",
    "rep stosl",
    // Four page directories of 2 MiB pages: 0..4 GiB; 3..4 GiB (the APICs, PCI
    // holes) with PCD|PWT.
    "movl $boot_pd, %edi",
    "xorl %ecx, %ecx",
    "2:",
    "movl %ecx, %eax",
    "shll $21, %eax",
    "orl $0x83, %eax",
    "cmpl $1536, %ecx",
    "jb 3f",
    "orl $0x18, %eax",
    "3:",
    "movl %eax, (%edi,%ecx,8)",
    "incl %ecx",
    "cmpl $2048, %ecx",
    "jb 2b",
    "movl $boot_pdpt, %edi",
    "movl $boot_pd + 3, %eax",
    "movl %eax, 0(%edi)",
    "addl $4096, %eax",
    "movl %eax, 8(%edi)",
    "addl $4096, %eax",
    "movl %eax, 16(%edi)",
    "addl $4096, %eax",
    "movl %eax, 24(%edi)",
    "movl $boot_pdpt + 3, %eax",
    "movl %eax, boot_pml4",
    "movl $0x2badb002, %ebp",
    "jmp 5f",
    // Not entered by a Multiboot loader: say so on COM1 and stop.
    "9:",
    "movw $0x3f8, %dx",
    "movb $0x4d, %al",
    "outb %al, %dx",
    "8:",
    "hlt",
    "jmp 8b",
    // An AP from the trampoline: CS = 0x08 of boot_gdt.
    ".global ap_entry32",
    "ap_entry32:",
    "movl $0x10, %eax",
    "movl %eax, %ds",
    "movl %eax, %es",
    "movl %eax, %ss",
    "movl %eax, %fs",
    "movl %eax, %gs",
    "xorl %ebp, %ebp",
    // Both: PAE, the tables, EFER.LME, paging; then 64-bit code.
    "5:",
    "movl %cr4, %eax",
    "orl $0x20, %eax",
    "movl %eax, %cr4",
    "movl $boot_pml4, %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax",
    "wrmsr",
    "movl %cr0, %eax",
    "orl $0x80000001, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x18, $6f",
    ".code64",
    "6:",
    "movl $0x10, %eax",
    "movl %eax, %ds",
    "movl %eax, %es",
    "movl %eax, %ss",
    "testl %ebp, %ebp",
    "jz 7f",
    // The boot vCPU: index 0, rsi = magic, rcx = info (zero-extended), rdx = 0.
    "movl %esi, %ecx",
    "movl %ebp, %esi",
    "xorl %edi, %edi",
    "xorl %edx, %edx",
    "jmp _start",
    "7:",
    "movq {ap_index}(%rip), %rdi",
    "movq {ap_mode}(%rip), %rsi",
    "movq {ap_cpus}(%rip), %rdx",
    "xorl %ecx, %ecx",
    "jmp _start",
    // The real-mode trampoline, copied to TRAMPOLINE (CS = TRAMPOLINE >> 4, IP = 0).
    ".code16",
    ".global tramp_start",
    "tramp_start:",
    "cli",
    "cld",
    "movw %cs, %ax",
    "movw %ax, %ds",
    "lgdtl %ds:(tramp_gdtr - tramp_start)",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, $ap_entry32",
    ".balign 8",
    "tramp_gdtr:",
    ".word boot_gdt_end - boot_gdt - 1",
    ".long boot_gdt",
    ".global tramp_end",
    "tramp_end:",
    ".code64",
    ".popsection",
    ap_index = sym AP_INDEX,
    ap_mode = sym AP_MODE,
    ap_cpus = sym AP_CPUS,
    options(att_syntax),
);

extern "C" {
    static tramp_start: u8;
    static tramp_end: u8;
}

/// Copies the real-mode trampoline to [`TRAMPOLINE`] and sets what the next AP takes.
pub fn prepare_ap(index: u64, mode: u64, cpus: u64) {
    AP_INDEX.store(index, Ordering::SeqCst);
    AP_MODE.store(mode, Ordering::SeqCst);
    AP_CPUS.store(cpus, Ordering::SeqCst);
    // SAFETY: the trampoline's bytes lie in the image; TRAMPOLINE is low RAM the guest
    // owns (identity-mapped), used for nothing else.
    unsafe {
        let start = core::ptr::addr_of!(tramp_start);
        let len = core::ptr::addr_of!(tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
}

/// What the Multiboot command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Args {
    /// The mode (`mode=check|bench|hostile|loops|pc` or a number); `pc` if not given.
    pub mode: u64,
    /// `cpus=N` (the contract modes' vCPU count), 0 if not given.
    pub cpus: u64,
    /// `seed=N` (hostile mode); `code=N` (exit mode).
    pub seed: u64,
}

/// Reads the command line from the Multiboot info at `info` (flags bit 2).
pub fn args(info: u64) -> Args {
    // SAFETY: the loader's info structure is identity-mapped RAM beyond the image; the
    // command line is a NUL-terminated string.
    let line: &[u8] = unsafe {
        let flags = (info as *const u32).read_volatile();
        if flags & 1 << 2 == 0 {
            &[]
        } else {
            let p = ((info + 16) as *const u32).read_volatile() as usize as *const u8;
            let mut n = 0;
            while n < 4096 && p.add(n).read_volatile() != 0 {
                n += 1;
            }
            core::slice::from_raw_parts(p, n)
        }
    };
    parse(line)
}

/// Parses a command line (words separated by spaces; the first may be the file name).
pub fn parse(line: &[u8]) -> Args {
    let mut a = Args {
        mode: crate::MODE_PC,
        cpus: 0,
        seed: 0,
    };
    for word in line.split(|&b| b == b' ') {
        if let Some(v) = word.strip_prefix(b"mode=") {
            a.mode = match v {
                b"check" => crate::MODE_CHECK,
                b"bench" => crate::MODE_BENCH,
                b"hostile" => crate::MODE_HOSTILE,
                b"loops" => crate::MODE_LOOPS,
                b"pc" => crate::MODE_PC,
                b"exit" => crate::MODE_EXIT,
                b"triple" => crate::MODE_TRIPLE,
                n => number(n).unwrap_or(u64::MAX),
            };
        } else if let Some(v) = word.strip_prefix(b"cpus=") {
            a.cpus = number(v).unwrap_or(0);
        } else if let Some(v) = word
            .strip_prefix(b"seed=")
            .or_else(|| word.strip_prefix(b"code="))
        {
            a.seed = number(v).unwrap_or(0);
        }
    }
    a
}

/// A decimal or `0x` hexadecimal number.
fn number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        let x = (d as char).to_digit(radix)?;
        v = v.checked_mul(radix.into())?.checked_add(x.into())?;
    }
    Some(v)
}
