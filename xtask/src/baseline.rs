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
use crate::guest_linux::{debian_kernel, Initramfs};
use crate::workspace::{self, run_checked};

/// The benchmark program's source.
const PINGPONG_C: &str = include_str!("../assets/pingpong.c");

/// The initramfs `/init`.
const INIT: &str = "#!/bin/sh\n/pingpong\n/bin/busybox poweroff -f\n";

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
    let pingpong = build_pingpong(dir)?;
    let mut ramfs = Initramfs::new(&["bin", "dev", "proc", "sys"])?;
    ramfs.sh();
    ramfs.file("init", 0o755, INIT.as_bytes());
    ramfs.copy("pingpong", 0o755, &pingpong)?;
    let path = dir.join("initramfs.cpio");
    ramfs.write(&path)?;
    Ok(path)
}

/// The baseline guest's kernel: `$PEREGRINE_LINUX_KERNEL` or Debian's package's
/// ([`debian_kernel`]), the kernel of every Linux baseline.
pub fn linux_kernel() -> Result<PathBuf> {
    if let Some(k) = std::env::var_os("PEREGRINE_LINUX_KERNEL") {
        return Ok(k.into());
    }
    debian_kernel()
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
    fn mitigations_off_reaches_the_guest_command_line() {
        use crate::bench::{MITIGATIONS_OFF, MITIGATIONS_ON};
        assert_eq!(
            cmdline(MITIGATIONS_ON),
            "console=ttyS0 quiet panic=-1 rdinit=/init"
        );
        assert!(cmdline(MITIGATIONS_OFF).ends_with(" rdinit=/init mitigations=off"));
    }
}
