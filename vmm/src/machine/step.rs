//! What the VMM does after an exit ([`Step`]), and why a VM ended ([`End`]).

use core::fmt;

use crate::emul::EmulError;

/// What the VMM does after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reply: the vCPU runs on.
    Resume,
    /// Start the vCPU with this index (never started before), then reply.
    Start(u32),
    /// The vCPU halted with interrupts disabled: nothing wakes it, it stops for good
    /// (no reply). When every vCPU stopped, the VMM ends the VM ([`End::HaltForever`]).
    Stop,
    /// The vCPU halted with interrupts enabled and has no interrupt to take: block it
    /// until one is pending, then let the machine inject it
    /// ([`crate::pc::Pc::wake`]) and reply.
    Wait,
    /// End the VM.
    End(End),
}

/// Why a VM ended. The doc comment of each variant is its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest reported the end of its run with this code.
    Done(u32),
    /// The guest powered the machine off.
    PowerOff,
    /// The guest reset the machine (not supported: ended).
    Reset,
    /// Triple fault (shutdown).
    TripleFault {
        /// RIP at the exit.
        rip: u64,
    },
    /// The kernel refused the vCPU's state.
    InvalidState {
        /// Exit information.
        qual: [u64; 2],
    },
    /// Every vCPU halted with interrupts disabled: nothing can wake the VM.
    HaltForever {
        /// RIP of the last HLT.
        rip: u64,
    },
    /// An event the VMM does not handle.
    Unhandled {
        /// Event number.
        event: u64,
        /// Exit information.
        qual: [u64; 2],
        /// RIP at the exit.
        rip: u64,
    },
    /// An I/O exit without an instruction length.
    NoLength {
        /// RIP.
        rip: u64,
    },
    /// Instruction fetch from guest-physical memory no RAM backs.
    FetchFromMmio {
        /// Guest-physical address.
        gpa: u64,
    },
    /// The VMM's time limit for the VM passed.
    TimeLimit {
        /// The limit in seconds.
        secs: u64,
    },
    /// The VMM's own exit handler took an exception (a VMM or kernel bug, never the
    /// guest's doing): the VMM ended the VM and lives on.
    VmmFault {
        /// Exception vector.
        vector: u64,
        /// The handler's RIP.
        rip: u64,
    },
    /// The instruction behind an MMIO access could not be emulated.
    Emulation {
        /// Why.
        error: EmulError,
        /// RIP.
        rip: u64,
    },
    /// The guest ended the VM through QEMU's isa-debug-exit; the VM's exit status is
    /// `(value << 1) | 1` ([`End::exit_status`]), as QEMU's process status would be.
    DebugExit {
        /// What the guest wrote.
        value: u32,
    },
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            End::Done(code) => write!(f, "guest done {code}"),
            End::PowerOff => write!(f, "guest powered off"),
            End::DebugExit { value } => write!(
                f,
                "guest exited through isa-debug-exit with {value:#x} (status {})",
                crate::qemu_testdev::debug_exit_status(value)
            ),
            End::Reset => write!(f, "guest reset (not supported)"),
            End::TripleFault { rip } => write!(f, "triple fault at rip {rip:#x}"),
            End::InvalidState { qual } => {
                write!(f, "invalid guest state ({:#x}, {:#x})", qual[0], qual[1])
            }
            End::HaltForever { rip } => {
                write!(
                    f,
                    "every vCPU halted with interrupts disabled (last at rip {rip:#x})"
                )
            }
            End::Unhandled { event, qual, rip } => write!(
                f,
                "unhandled exit {event:#x} ({:#x}, {:#x}) at rip {rip:#x}",
                qual[0], qual[1]
            ),
            End::NoLength { rip } => write!(f, "I/O exit without length at rip {rip:#x}"),
            End::FetchFromMmio { gpa } => {
                write!(f, "instruction fetch from non-RAM address {gpa:#x}")
            }
            End::TimeLimit { secs } => write!(f, "time limit of {secs} s reached"),
            End::VmmFault { vector, rip } => {
                write!(
                    f,
                    "the exit handler took exception {vector} at rip {rip:#x}"
                )
            }
            End::Emulation { error, rip } => {
                write!(f, "MMIO access not emulated at rip {rip:#x}: {error}")
            }
        }
    }
}

impl End {
    /// A number for the end (kind in bits 32–39, the guest's code in 0–31 for
    /// [`End::Done`], the low 32 bits of the exit status for [`End::DebugExit`]): how
    /// the VMM reports it to the root.
    pub fn code(&self) -> u64 {
        let kind = match self {
            End::Done(c) => return u64::from(*c),
            End::DebugExit { value } => {
                let status = crate::qemu_testdev::debug_exit_status(*value) as u32;
                return 12 << 32 | u64::from(status);
            }
            End::PowerOff => 1,
            End::Reset => 2,
            End::TripleFault { .. } => 3,
            End::InvalidState { .. } => 4,
            End::HaltForever { .. } => 5,
            End::Unhandled { .. } => 6,
            End::NoLength { .. } => 7,
            End::FetchFromMmio { .. } => 8,
            End::Emulation { .. } => 9,
            End::TimeLimit { .. } => 10,
            End::VmmFault { .. } => 11,
        };
        kind << 32
    }

    /// The exit status the guest asked for: `(value << 1) | 1` for
    /// [`End::DebugExit`] (what QEMU exits with), none for the other ends.
    pub fn exit_status(&self) -> Option<u64> {
        match *self {
            End::DebugExit { value } => Some(crate::qemu_testdev::debug_exit_status(value)),
            _ => None,
        }
    }
}
