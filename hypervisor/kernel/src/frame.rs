//! The user register frame of an EC: where entries from user mode save the registers
//! and from which every return to user mode restores them.
//!
//! The layout is the order in which the syscall entry pushes (the last push is at the
//! lowest address), ending in a hardware `iretq` frame so the common exit path is
//! `pop` ×15, skip two words, `iretq`.

use peregrine_abi::utcb::gpr;

/// Saved user registers: the same record the trap stubs build (the platform layer's
/// [`Regs`](crate::arch::x86::regs::Regs)), so a trap frame is an EC frame as it is.
pub type Frame = crate::arch::x86::regs::Regs;

/// The `vector` of a frame saved by the syscall entry.
pub const SYSCALL: u64 = 0x100;

/// Size of a frame.
pub const FRAME_SIZE: usize = core::mem::size_of::<Frame>();
const _: () = assert!(FRAME_SIZE == 22 * 8);
const _: () = assert!(core::mem::offset_of!(Frame, vector) == 15 * 8);
const _: () = assert!(core::mem::offset_of!(Frame, rip) == 17 * 8);

/// RFLAGS bits a user may hold: CF PF AF ZF SF TF DF OF AC ID and the reserved bit 1.
const RFLAGS_USER: u64 =
    0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x4_0000 | 0x20_0000;
/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 0x200;

/// Whether `a` is a user-half canonical address.
pub const fn user_addr(a: u64) -> bool {
    a < peregrine_abi::hip::USER_END
}

impl Frame {
    /// A fresh user frame.
    pub fn user(rip: u64, rsp: u64) -> Self {
        Frame {
            rip,
            rsp,
            cs: crate::arch::USER_CS as u64,
            ss: crate::arch::USER_DS as u64,
            rflags: RFLAGS_IF | 2,
            ..Default::default()
        }
    }

    /// General-purpose register `i` in the x86 encoding order.
    pub fn gpr(&self, i: usize) -> u64 {
        match i {
            gpr::RAX => self.rax,
            gpr::RCX => self.rcx,
            gpr::RDX => self.rdx,
            gpr::RBX => self.rbx,
            gpr::RSP => self.rsp,
            gpr::RBP => self.rbp,
            gpr::RSI => self.rsi,
            gpr::RDI => self.rdi,
            gpr::R8 => self.r8,
            gpr::R9 => self.r9,
            gpr::R10 => self.r10,
            gpr::R11 => self.r11,
            gpr::R12 => self.r12,
            gpr::R13 => self.r13,
            gpr::R14 => self.r14,
            _ => self.r15,
        }
    }

    /// Sets general-purpose register `i`; RSP only when canonical user.
    pub fn set_gpr(&mut self, i: usize, v: u64) {
        match i {
            gpr::RAX => self.rax = v,
            gpr::RCX => self.rcx = v,
            gpr::RDX => self.rdx = v,
            gpr::RBX => self.rbx = v,
            gpr::RSP => {
                if user_addr(v) {
                    self.rsp = v
                }
            }
            gpr::RBP => self.rbp = v,
            gpr::RSI => self.rsi = v,
            gpr::RDI => self.rdi = v,
            gpr::R8 => self.r8 = v,
            gpr::R9 => self.r9 = v,
            gpr::R10 => self.r10 = v,
            gpr::R11 => self.r11 = v,
            gpr::R12 => self.r12 = v,
            gpr::R13 => self.r13 = v,
            gpr::R14 => self.r14 = v,
            _ => self.r15 = v,
        }
    }

    /// Sets RFLAGS from an untrusted value: only user-changeable bits, IF forced on.
    pub fn set_rflags(&mut self, v: u64) {
        self.rflags = (v & RFLAGS_USER) | RFLAGS_IF | 2;
    }

    /// Sets RIP from an untrusted value: only canonical user addresses are taken.
    pub fn set_rip(&mut self, v: u64) -> bool {
        if user_addr(v) {
            self.rip = v;
            true
        } else {
            false
        }
    }
}
