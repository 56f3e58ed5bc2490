//! Booting the system in either emulator: [`run`] dispatches a [`BootSpec`] to
//! [`crate::qemu`] or [`crate::bochs`]. The types live in [`crate::spec`] (re-exported
//! here), so the emulator modules do not depend on this one.

use anyhow::Result;

pub use crate::spec::{failure_lines, BootSpec, Emulator, Exit, Output, RunResult};

/// Boots `spec` in `emulator`.
pub fn run(emulator: Emulator, spec: &BootSpec) -> Result<RunResult> {
    match emulator {
        Emulator::Qemu => crate::qemu::run_qemu(spec),
        Emulator::Bochs => crate::bochs::run_bochs(spec),
    }
}
