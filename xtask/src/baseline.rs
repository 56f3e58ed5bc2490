//! The Linux baseline of `cargo xtask bench ipc`: Debian's kernel and a busybox
//! initramfs built here, whose `/init` runs `pingpong` (`xtask/assets/pingpong.c`: a pipe
//! round trip between two processes and a futex ping-pong between two threads), booted
//! in the same QEMU mode as Peregrine's benchmark (`-icount shift=0 -smp 1`).
//!
//! The kernel is `$PEREGRINE_LINUX_KERNEL` or the one in Debian's `linux-image-amd64`
//! package, fetched with `apt-get download` into `<target>/linux/` once and kept there:
//! the same kernel as the KVM baseline's and the Linux guest's, never the host's `/boot`
//! kernel (which differs from machine to machine). It runs with its default mitigations
//! or with `mitigations=off`, as the configuration says.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::{parse_bench_lines, Figure};
use crate::boot::{BootSpec, Exit, Output};
use crate::deps::{self, Tool};
use crate::workspace::{self, run_checked};

/// The benchmark program's source.
const PINGPONG_C: &str = include_str!("../assets/pingpong.c");

/// The initramfs `/init`.
const INIT: &str = "#!/bin/sh\n/pingpong\n/bin/busybox poweroff -f\n";

/// A newc ("070701") cpio archive, as the Linux initramfs unpacker reads it.
#[derive(Debug, Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend(b"070701");
        for f in fields {
            self.data.extend(format!("{f:08x}").as_bytes());
        }
        self.data.extend(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), body);
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

/// Compiles `pingpong.c` statically with the host C compiler (`$CC` or `cc`).
fn build_pingpong(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("pingpong.c");
    let bin = dir.join("pingpong");
    std::fs::write(&src, PINGPONG_C)?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    run_checked(
        Command::new(cc)
            .args(["-O2", "-static", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .context("compiling the Linux ping-pong benchmark (needs cc and libc6-dev)")?;
    Ok(bin)
}

/// Builds the initramfs in `dir`: busybox, `/init`, `/pingpong`, `/dev/console`.
pub fn build_initramfs(dir: &Path) -> Result<PathBuf> {
    deps::ensure(&[Tool::Busybox])?;
    let pingpong = std::fs::read(build_pingpong(dir)?)?;
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox")?;
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("pingpong", 0o755, &pingpong);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, cpio.finish())?;
    Ok(path)
}

/// The newest `vmlinuz-*` in `dir`.
pub fn newest_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// The baseline guest's kernel: `$PEREGRINE_LINUX_KERNEL` or Debian's package's
/// ([`debian_kernel`]), the kernel of every Linux baseline.
pub fn linux_kernel() -> Result<PathBuf> {
    if let Some(k) = std::env::var_os("PEREGRINE_LINUX_KERNEL") {
        return Ok(k.into());
    }
    debian_kernel()
}

/// Debian's `linux-image-amd64` kernel, fetched with `apt-get download` and unpacked
/// into `<target>/linux/root/` once (with its modules, which the Linux guest's
/// initramfs and the KVM baseline's take from there).
pub fn debian_kernel() -> Result<PathBuf> {
    let dir = workspace::out_dir("linux")?;
    let extracted = dir.join("root");
    if let Some(k) = newest_vmlinuz(&extracted.join("boot")) {
        return Ok(k);
    }
    // linux-image-amd64 is a metapackage: download the image package it depends on.
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()?;
    let deps = String::from_utf8_lossy(&out.stdout);
    let Some(package) = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
    else {
        bail!(
            "no Linux kernel for the baseline: set PEREGRINE_LINUX_KERNEL to a bzImage, or \
             make `apt-cache depends linux-image-amd64` work (apt-get update)"
        );
    };
    eprintln!("xtask: fetching {package} for the Linux baseline");
    run_checked(
        Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", "-q", package]),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;
    std::fs::remove_file(&deb)?;
    newest_vmlinuz(&extracted.join("boot")).context("the kernel package has no boot/vmlinuz-*")
}

/// The baseline guest's kernel command line in `config` (see
/// [`crate::bench::config_args`]).
pub fn cmdline(config: &str) -> String {
    let base = "console=ttyS0 quiet panic=-1 rdinit=/init";
    match crate::bench::config_args(config) {
        "" => base.to_string(),
        extra => format!("{base} {extra}"),
    }
}

/// Boots the Linux baseline guest in `config` and returns its kernel's provenance line
/// and its `BENCH` figures (mode `qemu-icount`, tagged with `config`).
pub fn run(config: &str) -> Result<(String, Vec<Figure>)> {
    let dir = workspace::out_dir("linux")?;
    let kernel = linux_kernel()?;
    let initramfs = build_initramfs(&dir)?;
    let spec = BootSpec {
        name: "bench-linux-baseline".into(),
        kernel: kernel.clone(),
        kernel_args: cmdline(config),
        modules: Vec::new(),
        smp: 1,
        memory_mib: 512,
        cpu_model: None,
        icount: true,
        allow_kvm: false,
        timeout: Duration::from_secs(300),
        extra_qemu_args: vec!["-initrd".into(), initramfs.to_string_lossy().into_owned()],
        output: Output::Capture,
    };
    let r = crate::qemu::run_qemu(&spec)?;
    // `poweroff -f` with -no-reboot ends QEMU with status 0.
    if !matches!(r.exit, Exit::Other(0) | Exit::Success) || !r.serial.contains("BENCH done") {
        bail!("the Linux baseline did not finish: {}", r.report());
    }
    let figures = parse_bench_lines(&r.serial, "qemu-icount")
        .into_iter()
        .filter(|f| f.figure != "done")
        .map(|f| f.with_config(config))
        .collect();
    Ok((crate::provenance::linux_kernel(&kernel), figures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        // Header 110 bytes + "init\0" padded to 116, data padded to 4.
        assert_eq!(&data[110..115], b"init\0");
        assert_eq!(&data[116..119], b"abc");
        assert_eq!(data.len() % 4, 0);
        assert_eq!(&data[14..22], b"000081ed"); // mode: regular file 0755
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn mitigations_off_reaches_the_guest_command_line() {
        use crate::bench::{MITIGATIONS_OFF, MITIGATIONS_ON};
        assert_eq!(
            cmdline(MITIGATIONS_ON),
            "console=ttyS0 quiet panic=-1 rdinit=/init"
        );
        assert!(cmdline(MITIGATIONS_OFF).ends_with(" rdinit=/init mitigations=off"));
    }
}
