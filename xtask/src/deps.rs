//! Host tools: checked before use, installed with apt when running as root, otherwise
//! named (with their Debian packages) in the error.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::workspace::{run_checked, which};

/// A group of host tools one command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `qemu-system-x86_64`.
    Qemu,
    /// Bochs with its BIOS and a working VGA BIOS.
    Bochs,
    /// What `grub-mkrescue` needs to build a BIOS-bootable ISO.
    Grub,
    /// A static busybox for the Linux baseline's initramfs.
    Busybox,
    /// ACPICA's `iasl`, which the vmm crate's tests check the guest's DSDT with.
    Iasl,
    /// A C++ compiler: `libfuzzer-sys` builds libFuzzer with it.
    Cxx,
    /// A C compiler and glibc's static library, for the Linux guest's static programs.
    Cc,
    /// e2fsprogs' `mkfs.ext4` and `debugfs`, which build the Linux guest's ext4 root,
    /// and `e2fsck`, which checks what the guest left there.
    Ext4,
}

/// How to tell that a requirement is met.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// A program on `PATH`.
    Program(&'static str),
    /// A file or directory.
    Path(&'static str),
}

/// One requirement and the Debian package that meets it.
#[derive(Debug, Clone, Copy)]
struct Requirement {
    tool: Tool,
    check: Check,
    package: &'static str,
}

const fn req(tool: Tool, check: Check, package: &'static str) -> Requirement {
    Requirement {
        tool,
        check,
        package,
    }
}

/// Bochs's BIOS (package `bochsbios`).
pub const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// The VGA BIOS Bochs loads (package `vgabios`; Debian's default link to it is broken
/// without that package).
pub const VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";

/// glibc's static library (package `libc6-dev`), which `cc -static` links.
pub const LIBC_A: &str = "/usr/lib/x86_64-linux-gnu/libc.a";
/// e2fsprogs' `mkfs.ext4` (`/sbin` is `/usr/sbin` on a merged-/usr system, and
/// e2fsprogs put it there before the merge).
pub const MKFS_EXT4: &str = "/sbin/mkfs.ext4";
/// e2fsprogs' `debugfs`.
pub const DEBUGFS: &str = "/sbin/debugfs";
/// e2fsprogs' `e2fsck`.
pub const E2FSCK: &str = "/sbin/e2fsck";

/// Everything xtask uses from the host.
const REQUIREMENTS: &[Requirement] = &[
    req(
        Tool::Qemu,
        Check::Program("qemu-system-x86_64"),
        "qemu-system-x86",
    ),
    req(Tool::Bochs, Check::Program("bochs"), "bochs"),
    req(Tool::Bochs, Check::Path(BIOS), "bochsbios"),
    req(Tool::Bochs, Check::Path(VGA_BIOS), "vgabios"),
    req(Tool::Grub, Check::Program("grub-mkrescue"), "grub-common"),
    req(
        Tool::Grub,
        Check::Path("/usr/lib/grub/i386-pc/multiboot.mod"),
        "grub-pc-bin",
    ),
    req(Tool::Grub, Check::Program("xorriso"), "xorriso"),
    req(Tool::Grub, Check::Program("mformat"), "mtools"),
    req(Tool::Busybox, Check::Path("/bin/busybox"), "busybox-static"),
    req(Tool::Iasl, Check::Program("iasl"), "acpica-tools"),
    req(Tool::Cxx, Check::Program("c++"), "g++"),
    req(Tool::Cc, Check::Program("cc"), "gcc"),
    req(Tool::Cc, Check::Path(LIBC_A), "libc6-dev"),
    // In /sbin, which is not on every user's PATH: checked and run by path.
    req(Tool::Ext4, Check::Path(MKFS_EXT4), "e2fsprogs"),
    req(Tool::Ext4, Check::Path(DEBUGFS), "e2fsprogs"),
    req(Tool::Ext4, Check::Path(E2FSCK), "e2fsprogs"),
];

impl Check {
    fn met(self) -> bool {
        match self {
            Check::Program(p) => which(p).is_some(),
            Check::Path(p) => Path::new(p).exists(),
        }
    }
}

/// The Debian packages missing for `tools`, without duplicates.
pub fn missing_packages(tools: &[Tool]) -> Vec<&'static str> {
    let mut missing: Vec<&'static str> = Vec::new();
    for r in REQUIREMENTS.iter().filter(|r| tools.contains(&r.tool)) {
        if !r.check.met() && !missing.contains(&r.package) {
            missing.push(r.package);
        }
    }
    missing
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes sure the host tools for `tools` are there: installs the missing Debian
/// packages with apt when running as root (`apt-get update` once per process), or
/// fails naming them.
pub fn ensure(tools: &[Tool]) -> Result<()> {
    // One install at a time, and `apt-get update` only once.
    static UPDATED: Mutex<bool> = Mutex::new(false);
    let missing = missing_packages(tools);
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() || which("apt-get").is_none() {
        bail!(
            "missing host tools for {tools:?}; install the Debian packages with:\n    \
             sudo apt-get install -y {list}"
        );
    }
    let mut updated = UPDATED.lock().unwrap_or_else(|e| e.into_inner());
    // Another thread may have installed them meanwhile.
    let missing = missing_packages(tools);
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    if !*updated {
        run_checked(apt().arg("update"))?;
        *updated = true;
    }
    run_checked(
        apt()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still = missing_packages(tools);
    if !still.is_empty() {
        bail!("installed {list}, but still missing: {}", still.join(" "));
    }
    Ok(())
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-o", "Dpkg::Use-Pty=0"]);
    cmd
}

/// Makes sure the rustup target for the bare-metal crates is installed
/// (`rust-toolchain.toml` lists it, so rustup normally installs it with the toolchain).
pub fn ensure_rust_target() -> Result<()> {
    let target = crate::workspace::TARGET;
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .current_dir(crate::workspace::root())
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if Path::new(&sysroot)
        .join("lib/rustlib")
        .join(target)
        .join("lib")
        .is_dir()
    {
        return Ok(());
    }
    eprintln!("xtask: adding the rustup target {target}");
    run_checked(
        Command::new("rustup")
            .current_dir(crate::workspace::root())
            .args(["target", "add", target]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_requirements_with_packages() {
        for tool in [
            Tool::Qemu,
            Tool::Bochs,
            Tool::Grub,
            Tool::Busybox,
            Tool::Iasl,
            Tool::Cxx,
            Tool::Cc,
            Tool::Ext4,
        ] {
            assert!(REQUIREMENTS
                .iter()
                .any(|r| r.tool == tool && !r.package.is_empty()));
        }
    }
}
