//! The register frame every interrupt and exception entry stub builds on the stack.

use core::mem::{offset_of, size_of};

/// Saved state at a trap: GPRs pushed by the stub (r15 lowest, rax highest: the same
/// layout as the syscall path's user frame), the vector, the error
/// code (0 if the CPU pushed none), then the hardware `iretq` frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Interrupt vector.
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Offset of the vector in [`Regs`] (the stubs push it at this position).
pub const REGS_VECTOR: usize = 120;
/// Offset of the saved CS.
pub const REGS_CS: usize = 144;
/// Size of the frame.
pub const REGS_SIZE: usize = 176;

const _: () = {
    assert!(offset_of!(Regs, r15) == 0);
    assert!(offset_of!(Regs, r14) == 8);
    assert!(offset_of!(Regs, r13) == 16);
    assert!(offset_of!(Regs, r12) == 24);
    assert!(offset_of!(Regs, r11) == 32);
    assert!(offset_of!(Regs, r10) == 40);
    assert!(offset_of!(Regs, r9) == 48);
    assert!(offset_of!(Regs, r8) == 56);
    assert!(offset_of!(Regs, rbp) == 64);
    assert!(offset_of!(Regs, rdi) == 72);
    assert!(offset_of!(Regs, rsi) == 80);
    assert!(offset_of!(Regs, rdx) == 88);
    assert!(offset_of!(Regs, rcx) == 96);
    assert!(offset_of!(Regs, rbx) == 104);
    assert!(offset_of!(Regs, rax) == 112);
    assert!(offset_of!(Regs, vector) == REGS_VECTOR);
    assert!(offset_of!(Regs, error) == 128);
    assert!(offset_of!(Regs, rip) == 136);
    assert!(offset_of!(Regs, cs) == REGS_CS);
    assert!(offset_of!(Regs, rflags) == 152);
    assert!(offset_of!(Regs, rsp) == 160);
    assert!(offset_of!(Regs, ss) == 168);
    assert!(size_of::<Regs>() == REGS_SIZE);
    // 16-byte multiple: the stack stays aligned for the call into Rust.
    assert!(REGS_SIZE.is_multiple_of(16));
};

impl Regs {
    /// Whether the trap came from ring 3.
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

impl core::fmt::Display for Regs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        writeln!(
            f,
            "  vec {:#x} err {:#x} rip {:#018x} cs {:#x} rflags {:#x}",
            self.vector, self.error, self.rip, self.cs, self.rflags
        )?;
        writeln!(
            f,
            "  rsp {:#018x} ss {:#x} cr2 {:#018x}",
            self.rsp,
            self.ss,
            super::cr::read_cr2()
        )?;
        writeln!(
            f,
            "  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}",
            self.rax, self.rbx, self.rcx, self.rdx
        )?;
        writeln!(
            f,
            "  rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}",
            self.rsi, self.rdi, self.rbp, self.r8
        )?;
        writeln!(
            f,
            "  r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}",
            self.r9, self.r10, self.r11, self.r12
        )?;
        write!(
            f,
            "  r13 {:#018x} r14 {:#018x} r15 {:#018x}",
            self.r13, self.r14, self.r15
        )
    }
}
