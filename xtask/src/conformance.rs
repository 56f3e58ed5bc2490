//! The test guest (`guests/test`) as a Multiboot kernel booted directly by QEMU (its own
//! PC: `-kernel guest-test -append "mode=pc"`), running the PC check list
//! (guests/README.md, "Mode pc"): the reference the same image must match on our VMM.
//!
//! QEMU ends with status `(code << 1) | 1` of the guest's isa-debug-exit code: 1 when
//! every check passed ([`STATUS_ALL_PASSED`]), otherwise that of the first failing
//! check's number.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::build::{Images, Profile, GUEST_TEST};
use crate::spec::{BootSpec, Output};
use crate::workspace::{self, TARGET};

/// QEMU's exit status when the guest writes 0 (all passed) to isa-debug-exit.
pub const STATUS_ALL_PASSED: i32 = 1;

/// Builds the test guest alone (not the whole system) and returns its image.
pub fn build_guest(profile: Profile) -> Result<PathBuf> {
    crate::deps::ensure_rust_target()?;
    let mut cmd = workspace::cargo();
    cmd.args(["build", "--target", TARGET, "-p", GUEST_TEST.package]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    workspace::run_checked(&mut cmd)?;
    let path = Images::locate(profile)?.path(GUEST_TEST);
    check_image(&path)?;
    Ok(path)
}

/// Checks that the guest's ELF file is also a Multiboot kernel QEMU can load: a header
/// with address fields ([`crate::multiboot::check`]) and every file-backed `PT_LOAD`
/// segment where the header's load range puts it.
pub fn check_image(path: &Path) -> Result<crate::multiboot::Header> {
    let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let header = crate::multiboot::check(&image)
        .with_context(|| format!("{}: Multiboot header", path.display()))?;
    let delta = header.load_offset() as i64 - i64::from(header.load_addr);
    for (offset, paddr, filesz) in load_segments(&image)? {
        if filesz == 0 {
            continue;
        }
        ensure!(
            offset as i64 - paddr as i64 == delta,
            "{}: PT_LOAD at {paddr:#x} (file offset {offset:#x}) is not where the Multiboot \
             load range puts it (file offset - address must be {delta:#x})",
            path.display()
        );
        ensure!(
            paddr + filesz <= u64::from(header.load_end_addr),
            "{}: PT_LOAD at {paddr:#x} ends past load_end_addr {:#x}",
            path.display(),
            header.load_end_addr
        );
    }
    Ok(header)
}

/// The `PT_LOAD` program headers of an ELF64 file: (file offset, physical address,
/// file size).
fn load_segments(image: &[u8]) -> Result<Vec<(u64, u64, u64)>> {
    let u16_at = |at: usize| -> Result<u64> {
        let b = image.get(at..at + 2).context("ELF file cut short")?;
        Ok(u16::from_le_bytes(b.try_into()?).into())
    };
    let u32_at = |at: usize| -> Result<u64> {
        let b = image.get(at..at + 4).context("ELF file cut short")?;
        Ok(u32::from_le_bytes(b.try_into()?).into())
    };
    let u64_at = |at: usize| -> Result<u64> {
        let b = image.get(at..at + 8).context("ELF file cut short")?;
        Ok(u64::from_le_bytes(b.try_into()?))
    };
    ensure!(
        image.starts_with(b"\x7fELF\x02\x01"),
        "not a little-endian ELF64 file"
    );
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    let mut segments = Vec::new();
    for i in 0..phnum as usize {
        let ph = phoff + i * phentsize as usize;
        if u32_at(ph)? == 1 {
            segments.push((u64_at(ph + 8)?, u64_at(ph + 0x18)?, u64_at(ph + 0x20)?));
        }
    }
    Ok(segments)
}

/// The QEMU run of `guest` (the test guest's image) in mode `pc` with `smp` vCPUs:
/// software emulation (QEMU's own device models, the same on every host), q35, 128 MiB,
/// isa-debug-exit at 0xf4 (as for every run), serial captured.
pub fn pc_spec(name: &str, guest: &Path, smp: u32) -> BootSpec {
    BootSpec {
        name: name.to_string(),
        kernel: guest.to_path_buf(),
        kernel_args: "mode=pc".into(),
        modules: Vec::new(),
        smp,
        memory_mib: 128,
        cpu_model: None,
        icount: false,
        allow_kvm: false,
        timeout: Duration::from_secs(120),
        extra_qemu_args: Vec::new(),
        output: Output::Capture,
    }
}

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `check <name> ok`.
    Ok,
    /// `check <name> skipped: <why>`.
    Skipped(String),
    /// `check <name> FAIL <detail>`.
    Fail(String),
}

/// The `check` lines of a console log, in order: (name, verdict). Text before `check`
/// on a line (a VMM's tag) is ignored.
pub fn checks(log: &str) -> Vec<(String, Verdict)> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("check ")? + "check ".len()..];
            let (name, rest) = rest.split_once(' ')?;
            let verdict = if rest.trim_end() == "ok" {
                Verdict::Ok
            } else if let Some(why) = rest.strip_prefix("skipped: ") {
                Verdict::Skipped(why.trim_end().to_string())
            } else if let Some(d) = rest.strip_prefix("FAIL") {
                Verdict::Fail(d.trim().to_string())
            } else {
                return None;
            };
            Some((name.to_string(), verdict))
        })
        .collect()
}

/// The code of the `guest: done <code>` line, if any.
pub fn done_code(log: &str) -> Option<u32> {
    log.lines().find_map(|l| {
        l[l.find("guest: done ")? + "guest: done ".len()..]
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_lines_parse_with_or_without_a_tag() {
        let log = "check cpuid ok\n[vm] check pit_mode0 FAIL OUT2: got 0x0, want 0x1\n\
                   check tsc_deadline skipped: CPUID.1:ECX.TSC_DEADLINE is clear\n\
                   guest: done 8\nnoise\n";
        assert_eq!(
            checks(log),
            vec![
                ("cpuid".to_string(), Verdict::Ok),
                (
                    "pit_mode0".to_string(),
                    Verdict::Fail("OUT2: got 0x0, want 0x1".into())
                ),
                (
                    "tsc_deadline".to_string(),
                    Verdict::Skipped("CPUID.1:ECX.TSC_DEADLINE is clear".into())
                ),
            ]
        );
        assert_eq!(done_code(log), Some(8));
        assert_eq!(done_code("nothing"), None);
    }

    #[test]
    fn the_spec_boots_the_guest_alone_in_mode_pc() {
        let s = pc_spec("pc2", Path::new("/g/guest-test"), 2);
        let a = crate::qemu::qemu_args(&s, Path::new("/tmp/s.log"), false).join(" ");
        assert!(a.contains("-smp 2"), "{a}");
        assert!(a.contains("-kernel /g/guest-test -append mode=pc"), "{a}");
        assert!(
            a.contains("-device isa-debug-exit,iobase=0xf4,iosize=0x04"),
            "{a}"
        );
        assert!(!a.contains("-initrd"), "{a}");
    }

    #[test]
    fn load_segments_reads_program_headers() {
        // An ELF64 header with one PT_LOAD program header right behind it.
        let mut f = vec![0u8; 0x40 + 0x38];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        f[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        f[0x48..0x50].copy_from_slice(&0x1000u64.to_le_bytes());
        f[0x58..0x60].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[0x60..0x68].copy_from_slice(&0x123u64.to_le_bytes());
        assert_eq!(load_segments(&f).unwrap(), vec![(0x1000, 0x10_0000, 0x123)]);
        assert!(load_segments(b"MZ").is_err());
    }
}
