//! `vmm-kvm`: the VMM library ([`peregrine_vmm`]) hosted on Linux KVM.
//!
//! `nul/vmm` binds the library's machines to Peregrine's vCPU portals; this crate binds
//! the same machines to `/dev/kvm` (rust-vmm's `kvm-ioctls`, guest memory from
//! `vm-memory`), so that one VMM runs on both kernels and a benchmark's difference is the
//! kernels' alone. What needs no KVM is here and host-tested: the command line, the
//! register file between the library's [`ArchState`] and KVM's `kvm_regs`/`kvm_sregs`,
//! the CPUID table a machine answers, guest memory as the library sees it, and the exit
//! status of an [`End`]. `main.rs` is the KVM glue.
//!
//! KVM decodes and completes what Peregrine hands to the VMM whole: an I/O or MMIO exit
//! arrives with the port or address and the data (the binding passes it to the board's
//! devices through [`peregrine_vmm::machine::access`]), CPUID is a table set once per
//! vCPU (the board's answers, [`cpuid_table`]), and RIP is already past HLT, RDMSR and
//! WRMSR when they reach user space. Exits that need the register file (the entry
//! state, HLT, the MSRs KVM hands to user space) go through
//! [`peregrine_vmm::machine::handle`] on an [`ArchState`]; what the handler recorded in
//! its MTD is what the binding writes back ([`WriteBack`]).

pub mod args;
pub mod ram;
pub mod state;

pub use args::{parse_args, Config, Irqchip};

use peregrine_vmm::exit::End;

/// Exit status at the time limit.
pub const STATUS_TIMEOUT: u8 = 124;
/// Exit status on a VMM or KVM error.
pub const STATUS_ERROR: u8 = 125;
/// Exit status on a triple fault.
pub const STATUS_SHUTDOWN: u8 = 126;
/// Exit status when the boot vCPU halted for good.
pub const STATUS_HALTED: u8 = 127;

/// The process's exit status for a VM that ended with `end`: the guest's end code (0 =
/// every check passed; a code whose low byte is 0 but is not 0 becomes 1), or one of the
/// `STATUS_*` values.
pub fn status(end: &End) -> u8 {
    match *end {
        End::Done(0) => 0,
        End::Done(c) if c & 0xff == 0 => 1,
        End::Done(c) => (c & 0xff) as u8,
        End::PowerOff => 0,
        // What QEMU exits with for isa-debug-exit: `(value << 1) | 1`, its low byte.
        End::DebugExit { .. } => end.exit_status().map_or(STATUS_ERROR, |s| s as u8),
        End::TripleFault { .. } => STATUS_SHUTDOWN,
        End::HaltForever { .. } => STATUS_HALTED,
        End::TimeLimit { .. } => STATUS_TIMEOUT,
        _ => STATUS_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_codes_become_exit_statuses() {
        assert_eq!(status(&End::Done(0)), 0);
        assert_eq!(status(&End::Done(3)), 3);
        assert_eq!(status(&End::DebugExit { value: 0x21 }), 0x43);
        assert_eq!(status(&End::Done(0x100)), 1, "non-zero stays a failure");
        assert_eq!(status(&End::TripleFault { rip: 0 }), STATUS_SHUTDOWN);
        assert_eq!(status(&End::HaltForever { rip: 0 }), STATUS_HALTED);
        assert_eq!(status(&End::Reset), STATUS_ERROR);
    }
}
