//! Booting the system in QEMU through its Multiboot loader.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::process::{run_until, run_until_killed, Ended};
use crate::spec::{BootSpec, Exit, Output, RunResult};
use crate::{deps, kvm, workspace};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// CPU model for software emulation: the guest sees SVM with nested paging.
pub const DEFAULT_CPU: &str = "EPYC";
/// QEMU's exit status when the guest writes 0x10 to `isa-debug-exit`: (0x10 << 1) | 1.
pub const STATUS_SUCCESS: i32 = 33;
/// QEMU's exit status when the guest writes 0x11: (0x11 << 1) | 1.
pub const STATUS_FAILURE: i32 = 35;

/// Escapes a string for QEMU's comma-separated option syntax (`,` becomes `,,`).
pub fn escape_commas(s: &str) -> String {
    s.replace(',', ",,")
}

/// The `-initrd` value for `modules`: `path args` entries separated by commas.
pub fn initrd_arg(modules: &[(impl AsRef<Path>, String)]) -> String {
    modules
        .iter()
        .map(|(path, args)| {
            let path = escape_commas(&path.as_ref().to_string_lossy());
            if args.is_empty() {
                path
            } else {
                format!("{path} {}", escape_commas(args))
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The QEMU arguments for `spec`, with serial output to `serial_log` when captured.
pub fn qemu_args(spec: &BootSpec, serial_log: &Path, use_kvm: bool) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
    push(&["-machine", "q35"]);
    let cpu = match (&spec.cpu_model, use_kvm) {
        (Some(model), _) => model.clone(),
        (None, true) => "host".to_string(),
        (None, false) => DEFAULT_CPU.to_string(),
    };
    if use_kvm {
        push(&["-enable-kvm"]);
    }
    push(&["-cpu", &cpu]);
    push(&[
        "-smp",
        &spec.smp.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    if spec.icount {
        push(&["-icount", "shift=0"]);
    }
    push(&[
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]);
    match spec.output {
        Output::Capture => push(&[
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            &format!("file:{}", serial_log.display()),
        ]),
        Output::Inherit => push(&["-nographic"]),
    }
    push(&[
        "-kernel",
        &spec.kernel.to_string_lossy(),
        "-append",
        &spec.kernel_args,
    ]);
    if !spec.modules.is_empty() {
        push(&["-initrd", &initrd_arg(&spec.modules)]);
    }
    a.extend(spec.extra_qemu_args.iter().cloned());
    // A debugging aid (README): extra arguments, e.g. a QMP socket or trace events.
    if let Ok(extra) = std::env::var("PEREGRINE_DEBUG_QEMU_ARGS") {
        a.extend(extra.split_whitespace().map(String::from));
    }
    a
}

/// Whether a run of `spec` uses KVM.
pub fn uses_kvm(spec: &BootSpec) -> bool {
    spec.allow_kvm && !spec.icount && kvm::usable().is_some()
}

/// Maps QEMU's exit status to an [`Exit`].
pub fn exit_from_status(code: Option<i32>) -> Exit {
    match code {
        Some(STATUS_SUCCESS) => Exit::Success,
        Some(STATUS_FAILURE) => Exit::Failure,
        Some(other) => Exit::Other(other),
        None => Exit::Other(-1),
    }
}

/// Boots `spec` in QEMU and waits for it to end, at most `spec.timeout`.
pub fn run_qemu(spec: &BootSpec) -> Result<RunResult> {
    run_qemu_until(spec, None)
}

/// [`run_qemu`] that also ends QEMU once the serial log has a line containing `mark`
/// (for guests that never power off): that counts as [`Exit::Success`].
pub fn run_qemu_until(spec: &BootSpec, mark: Option<&str>) -> Result<RunResult> {
    match mark {
        Some(m) => run_qemu_watched(
            spec,
            false,
            Some(&mut |serial: &str| serial.lines().any(|l| l.contains(m))),
        ),
        None => run_qemu_watched(spec, false, None),
    }
}

/// [`run_qemu`] that kills QEMU with SIGKILL as soon as `stop`, given the serial log so
/// far, returns true (polled about every 100 ms): a power cut, for crash tests. That
/// counts as [`Exit::Success`].
pub fn run_qemu_killed(spec: &BootSpec, mut stop: impl FnMut(&str) -> bool) -> Result<RunResult> {
    run_qemu_watched(spec, true, Some(&mut stop))
}

/// Runs `spec`, ending QEMU (SIGKILL if `kill`, else as [`run_until`] does) once
/// `stop`, given the serial log so far, returns true; without `stop` the log is not
/// read until QEMU exits.
fn run_qemu_watched(
    spec: &BootSpec,
    kill: bool,
    mut stop: Option<&mut dyn FnMut(&str) -> bool>,
) -> Result<RunResult> {
    deps::ensure(&[deps::Tool::Qemu])?;
    let dir = workspace::out_dir("emulator")?;
    let serial_log = dir.join(format!("{}.serial.log", spec.name));
    let qemu_log = dir.join(format!("{}.qemu.log", spec.name));
    // A stale log must not be mistaken for this run's output.
    File::create(&serial_log).with_context(|| format!("creating {}", serial_log.display()))?;
    let use_kvm = uses_kvm(spec);
    let mut cmd = Command::new(QEMU);
    cmd.args(qemu_args(spec, &serial_log, use_kvm));
    if spec.output == Output::Capture {
        let log = File::create(&qemu_log)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
    }
    let seen = || {
        stop.as_mut().is_some_and(|stop| {
            let log = std::fs::read(&serial_log).unwrap_or_default();
            stop(&String::from_utf8_lossy(&log))
        })
    };
    let (ended, wall) = if kill {
        run_until_killed(&mut cmd, spec.timeout, seen)?
    } else {
        run_until(&mut cmd, spec.timeout, seen)?
    };
    let exit = match ended {
        Some(Ended::Exited(status)) => exit_from_status(status.code()),
        Some(Ended::TimedOut) => Exit::Timeout,
        None => Exit::Success,
    };
    let serial = String::from_utf8_lossy(&std::fs::read(&serial_log).unwrap_or_default()).into();
    let mut emulator_output = format!("{}\n", workspace::describe(&cmd));
    emulator_output += &String::from_utf8_lossy(&std::fs::read(&qemu_log).unwrap_or_default());
    Ok(RunResult {
        exit,
        serial,
        wall,
        serial_log,
        emulator_output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn spec() -> BootSpec {
        BootSpec {
            name: "t".into(),
            kernel: "/k/peregrine".into(),
            kernel_args: "exit_after_boot".into(),
            modules: vec![
                (PathBuf::from("/k/nul-root"), "test=ipc".into()),
                (PathBuf::from("/k/x"), String::new()),
            ],
            smp: 2,
            memory_mib: 512,
            cpu_model: None,
            icount: true,
            allow_kvm: true,
            timeout: Duration::from_secs(1),
            extra_qemu_args: vec!["-s".into()],
            output: Output::Capture,
        }
    }

    #[test]
    fn initrd_separates_modules_by_commas_and_escapes_commas() {
        let m = vec![
            (PathBuf::from("/a/root"), "x=1,2".to_string()),
            ("/b".into(), String::new()),
        ];
        assert_eq!(initrd_arg(&m), "/a/root x=1,,2,/b");
    }

    #[test]
    fn args_have_the_lab_setup() {
        let a = qemu_args(&spec(), Path::new("/tmp/s.log"), false).join(" ");
        assert!(
            a.starts_with("-machine q35 -cpu EPYC -smp 2 -m 512M -icount shift=0"),
            "{a}"
        );
        assert!(a.contains("-device isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(a.contains("-serial file:/tmp/s.log"));
        assert!(a.contains("-kernel /k/peregrine -append exit_after_boot"));
        assert!(a.contains("-initrd /k/nul-root test=ipc,/k/x -s"));
        let a = qemu_args(&spec(), Path::new("/tmp/s.log"), true).join(" ");
        assert!(a.contains("-enable-kvm -cpu host"), "{a}");
    }

    #[test]
    fn exit_status_maps_debug_exit_codes() {
        assert_eq!(exit_from_status(Some(33)), Exit::Success);
        assert_eq!(exit_from_status(Some(35)), Exit::Failure);
        assert_eq!(exit_from_status(Some(0)), Exit::Other(0));
        assert_eq!(exit_from_status(None), Exit::Other(-1));
    }
}
