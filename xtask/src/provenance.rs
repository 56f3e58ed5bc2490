//! Where a benchmark's figures come from: the [`Provenance`] block of every bench JSON.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::workspace;

/// What a reader needs to reproduce (or distrust) a set of figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// `git describe --always --tags --dirty` of the work tree.
    pub commit: String,
    /// `git rev-parse HEAD`.
    pub commit_id: String,
    /// Whether the work tree had uncommitted changes to tracked files.
    pub dirty: bool,
    /// `qemu-system-x86_64 --version`'s first line, if QEMU is there.
    pub qemu: Option<String>,
    /// The Bochs package's version, if Bochs is there.
    pub bochs: Option<String>,
    /// The baselines' kernels: `linux <version> (<file>)`, `seL4 …`.
    pub baseline_kernels: Vec<String>,
    /// The command line that produced the figures.
    pub command: String,
    /// When, UTC (`YYYY-MM-DDTHH:MM:SSZ`).
    pub date: String,
    /// The measuring mode: `qemu-icount` (instructions), `qemu-tcg` (wall time, software
    /// emulation), `qemu-kvm`, `bochs-vmx`.
    pub mode: String,
}

/// `program args…`'s trimmed standard output when it succeeds.
fn output(program: &str, args: &[&str], dir: Option<&Path>) -> Option<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The first line of `qemu-system-x86_64 --version`.
pub fn qemu_version() -> Option<String> {
    output(crate::qemu::QEMU, &["--version"], None)?
        .lines()
        .next()
        .map(str::to_string)
}

/// The installed Bochs package's version (Bochs itself prints none without starting).
pub fn bochs_version() -> Option<String> {
    workspace::which("bochs")?;
    output("dpkg-query", &["-W", "-f=${Version}", "bochs"], None).map(|v| format!("bochs {v}"))
}

/// A Linux kernel's provenance line from its file name (`vmlinuz-<version>`).
pub fn linux_kernel(path: &Path) -> String {
    let version = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("unknown version");
    format!("linux {version} ({})", path.display())
}

/// The time now, UTC, as `YYYY-MM-DDTHH:MM:SSZ` (`date -u`).
pub fn utc_now() -> String {
    output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"], None).unwrap_or_else(|| "unknown".into())
}

impl Provenance {
    /// This work tree, this machine's emulators, this process's command line and the
    /// time now; `mode` and the baselines' `kernels` from the caller.
    pub fn now(mode: &str, kernels: Vec<String>) -> Provenance {
        let root = Some(workspace::root());
        let git = |args: &[&str]| output("git", args, root).unwrap_or_else(|| "unknown".into());
        let dirty = output(
            "git",
            &["status", "--porcelain", "--untracked-files=no"],
            root,
        )
        .is_some_and(|s| !s.is_empty());
        let mut args = std::env::args();
        let program = args.next().unwrap_or_default();
        let program = Path::new(&program)
            .file_name()
            .map_or(program.clone(), |n| n.to_string_lossy().into_owned());
        Provenance {
            commit: git(&["describe", "--always", "--tags", "--dirty"]),
            commit_id: git(&["rev-parse", "HEAD"]),
            dirty,
            qemu: qemu_version(),
            bochs: bochs_version(),
            baseline_kernels: kernels,
            command: std::iter::once(program)
                .chain(args)
                .collect::<Vec<_>>()
                .join(" "),
            date: utc_now(),
            mode: mode.to_string(),
        }
    }

    /// A fixed example, for tests.
    pub fn sample() -> Provenance {
        Provenance {
            commit: "fbda408-dirty".into(),
            commit_id: "fbda408".into(),
            dirty: true,
            qemu: Some("QEMU emulator version 7.2.22".into()),
            bochs: None,
            baseline_kernels: vec!["linux 6.1.0-41-amd64 (vmlinuz-6.1.0-41-amd64)".into()],
            command: "xtask bench ipc".into(),
            date: "2026-12-03T18:14:54Z".into(),
            mode: "qemu-icount".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_tree_has_a_commit_and_qemu_a_version() {
        let p = Provenance::now("qemu-icount", vec![]);
        assert_eq!(p.commit_id.len(), 40, "{p:?}");
        assert!(!p.command.is_empty());
        assert_eq!(p.date.len(), 20, "{}", p.date);
        assert!(
            p.date.starts_with("20") && p.date.ends_with('Z'),
            "{}",
            p.date
        );
        assert_eq!(
            linux_kernel(Path::new("/t/boot/vmlinuz-6.1.0-41-amd64")),
            "linux 6.1.0-41-amd64 (/t/boot/vmlinuz-6.1.0-41-amd64)"
        );
    }
}
