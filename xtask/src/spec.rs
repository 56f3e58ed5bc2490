//! What to boot and how a boot ended, for either emulator: the types [`crate::qemu`] and
//! [`crate::bochs`] share, kept apart from [`crate::boot`], which dispatches to them.
//!
//! The system's pass/fail convention: the kernel or root task writes 0x10 (success) or
//! 0x11 (failure) to the `isa-debug-exit` port 0xf4, which ends QEMU with status
//! `(code << 1) | 1` = 33 or 35. Bochs has no such device: there the guest ends Bochs by
//! writing `Shutdown` to port 0x8900, and the result is judged from the serial log:
//! scenario lines `PASS <name>` / `FAIL <name>: reason`, and `KERNEL PANIC`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::build::Images;

/// The emulators the system boots in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU, through its Multiboot loader (`-kernel`, `-initrd`).
    Qemu,
    /// Bochs, from a GRUB ISO (the VMX lab).
    Bochs,
}

impl std::str::FromStr for Emulator {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qemu" => Ok(Emulator::Qemu),
            "bochs" => Ok(Emulator::Bochs),
            _ => anyhow::bail!("unknown emulator {s:?} (expected qemu or bochs)"),
        }
    }
}

/// Where the emulator's serial output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Into a log file, returned in [`RunResult::serial`] (tests, benchmarks).
    Capture,
    /// To this terminal (QEMU: `-nographic`, serial and monitor on stdio); the log is
    /// still written for Bochs.
    Inherit,
}

/// Everything needed to boot the system once.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Names the log files (`<target>/emulator/<name>.serial.log`); unique per test.
    pub name: String,
    /// The kernel image.
    pub kernel: PathBuf,
    /// Kernel command line (after the file name QEMU puts first).
    pub kernel_args: String,
    /// Boot modules with their argument strings; the first is the root task.
    pub modules: Vec<(PathBuf, String)>,
    /// Number of CPUs.
    pub smp: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// CPU model; `None`: QEMU `EPYC` (or `host` with KVM), Bochs `corei7_skylake_x`.
    pub cpu_model: Option<String>,
    /// QEMU `-icount shift=0`: the TSC counts instructions (deterministic; use with
    /// `smp` 1, and it rules out KVM).
    pub icount: bool,
    /// Whether QEMU may use KVM when [`crate::kvm::usable`] says it can.
    pub allow_kvm: bool,
    /// Hard limit on the emulator's wall time.
    pub timeout: Duration,
    /// Extra arguments for QEMU.
    pub extra_qemu_args: Vec<String>,
    /// Where serial output goes.
    pub output: Output,
}

impl BootSpec {
    /// The default system built in `images`: kernel and root task, no arguments, one CPU,
    /// 512 MiB, 60 s limit, output captured.
    pub fn new(name: &str, images: &Images) -> Self {
        BootSpec {
            name: name.to_string(),
            kernel: images.kernel(),
            kernel_args: String::new(),
            modules: vec![(images.root(), String::new())],
            smp: 1,
            memory_mib: 512,
            cpu_model: None,
            icount: false,
            allow_kvm: true,
            timeout: Duration::from_secs(60),
            extra_qemu_args: Vec::new(),
            output: Output::Capture,
        }
    }

    /// Sets the kernel command line.
    pub fn kernel_args(mut self, args: &str) -> Self {
        self.kernel_args = args.to_string();
        self
    }

    /// Sets the root task's argument string (the first module's).
    pub fn root_args(mut self, args: &str) -> Self {
        if let Some(root) = self.modules.first_mut() {
            root.1 = args.to_string();
        }
        self
    }

    /// Adds a boot module.
    pub fn module(mut self, path: PathBuf, args: &str) -> Self {
        self.modules.push((path, args.to_string()));
        self
    }

    /// Sets the number of CPUs.
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }

    /// Sets the time limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Turns on `-icount shift=0`.
    pub fn icount(mut self) -> Self {
        self.icount = true;
        self
    }

    /// Sets the CPU model.
    pub fn cpu_model(mut self, model: &str) -> Self {
        self.cpu_model = Some(model.to_string());
        self
    }
}

/// How an emulator run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest reported success (QEMU status 33 = debug-exit 0x10; Bochs shut down
    /// on request with no failure marker in the serial log).
    Success,
    /// The guest reported failure (QEMU status 35 = debug-exit 0x11; Bochs: a `FAIL` or
    /// `KERNEL PANIC` marker).
    Failure,
    /// Killed at the time limit.
    Timeout,
    /// Any other end: the emulator's exit status (-1: killed by a signal).
    Other(i32),
}

/// The outcome of one emulator run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// How it ended.
    pub exit: Exit,
    /// Everything the guest wrote to COM1 (empty for an inherited QEMU console).
    pub serial: String,
    /// Wall time of the emulator process.
    pub wall: Duration,
    /// The serial log file.
    pub serial_log: PathBuf,
    /// What the emulator itself printed (warnings, errors), or its log.
    pub emulator_output: String,
}

impl RunResult {
    /// Whether the serial log has the line `PASS <name>` (possibly behind a console tag).
    pub fn passed(&self, name: &str) -> bool {
        let marker = format!("PASS {name}");
        self.serial
            .lines()
            .any(|l| l.trim_end() == marker || l.trim_end().ends_with(&format!(" {marker}")))
    }

    /// The `FAIL …` and `KERNEL PANIC` lines of the serial log.
    pub fn failures(&self) -> Vec<&str> {
        failure_lines(&self.serial)
    }

    /// The last `lines` lines of the serial log, for messages.
    pub fn serial_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.serial.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A description for assertion messages: exit, wall time, log path, serial tail and
    /// the emulator's own output.
    pub fn report(&self) -> String {
        format!(
            "exit {:?} after {:.1} s; serial log {}\n--- serial (last 40 lines) ---\n{}\n\
             --- emulator output ---\n{}",
            self.exit,
            self.wall.as_secs_f64(),
            self.serial_log.display(),
            self.serial_tail(40),
            self.emulator_output.trim_end()
        )
    }
}

/// The lines of `serial` that mark a failure: `FAIL <name>…` or `KERNEL PANIC`.
pub fn failure_lines(serial: &str) -> Vec<&str> {
    serial
        .lines()
        .filter(|l| l.contains("KERNEL PANIC") || l.starts_with("FAIL ") || l.contains("] FAIL "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(serial: &str) -> RunResult {
        RunResult {
            exit: Exit::Success,
            serial: serial.to_string(),
            wall: Duration::ZERO,
            serial_log: PathBuf::new(),
            emulator_output: String::new(),
        }
    }

    #[test]
    fn pass_markers_match_whole_names_with_or_without_tag() {
        let r = result("boot\nPASS ipc\n[root] PASS revoke\r\nPASS ipc_long\n");
        assert!(r.passed("ipc"));
        assert!(r.passed("revoke"));
        assert!(!r.passed("ip"));
        assert!(!r.passed("delegate"));
    }

    #[test]
    fn failure_lines_find_fail_and_panic() {
        let s = "ok\nFAIL ipc: wrong word\n[root] FAIL sm: timeout\nKERNEL PANIC at x\nFAILED?\n";
        assert_eq!(failure_lines(s).len(), 3);
    }
}
