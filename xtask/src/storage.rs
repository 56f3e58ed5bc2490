//! The Linux guest's storage tests on its ext4 root, booted directly in QEMU: data
//! written and synced before a power-off is there after the next boot ([`persist`]),
//! and data whose fsync returned is there after QEMU is killed at a random moment
//! ([`crash`]). Each runs on a fresh copy of the guest's `rootfs.img` in
//! `<target>/linux/storage/`, as the second virtio-blk disk, written in place (see
//! [`linux::virtio_disk`] for why what the guest flushed survives QEMU's death), and
//! ends with `e2fsck -fn` on the image: the file system the guest left is consistent.
//!
//! The guest's side is `guests/linux/init` (`persist-write`, `persist-check`,
//! `crash-writer`, `crash-check`) and `guests/linux/storetest.c`, whose patterns
//! [`pattern`] and [`crash_block`] compute here too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::boot::{Exit, RunResult};
use crate::linux::{self, test_results, Guest, Run, ROOT_DEVICE};
use crate::{deps, workspace};

/// Bytes `persist-write` writes.
pub const PERSIST_BYTES: usize = 4 << 20;
/// The block size of `crash-writer`.
pub const CRASH_BLOCK: usize = 4096;
/// Prefix of `crash-writer`'s lines.
pub const SEQ_PREFIX: &str = "PEREGRINE-SEQ ";
/// Where `pattern`'s stream starts for seed 0 (and what every seed is XORed with).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// `storetest pattern SEED LEN`: `len` bytes of the 64-bit xorshift (13, 7, 17) stream
/// started at `seed ^ GOLDEN` (`GOLDEN` if that is 0), each state as 8 little-endian
/// bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = match seed ^ GOLDEN {
        0 => GOLDEN,
        x => x,
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Block `n` of `crash-writer`: `PRGNSEQ1`, `n` as 8 little-endian bytes, then the
/// stream of seed `n`.
pub fn crash_block(n: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(CRASH_BLOCK);
    b.extend_from_slice(b"PRGNSEQ1");
    b.extend_from_slice(&n.to_le_bytes());
    b.extend(pattern(n, CRASH_BLOCK - 16));
    b
}

/// The highest `PEREGRINE-SEQ <n>` of a serial log, counting only whole lines (a line
/// the kill cut off may have lost digits).
pub fn last_seq(serial: &str) -> Option<u64> {
    let whole = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(SEQ_PREFIX)? + SEQ_PREFIX.len()..];
            rest.trim_end().parse().ok()
        })
        .max()
}

/// What `crash-check` printed: the highest block of the unbroken run of valid blocks
/// from 0 (`None`: not even block 0), and the file's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashCheck {
    /// Highest valid block.
    pub highest: Option<u64>,
    /// Whole blocks in the file.
    pub blocks: u64,
}

/// Parses `crash-check`'s result and detail (`ok <highest> <blocks>`); an error says
/// what else it printed (`hole …`, `missing`).
pub fn parse_crash_check(result: &str, detail: &str) -> Result<CrashCheck> {
    let mut w = detail.split_whitespace();
    let (Some(highest), Some(blocks), None) = (w.next(), w.next(), w.next()) else {
        bail!("crash-check: {result} {detail}");
    };
    if result != "ok" {
        bail!("crash-check: {result} {detail}");
    }
    let highest: i64 = highest.parse().context("crash-check: highest block")?;
    Ok(CrashCheck {
        highest: u64::try_from(highest).ok(),
        blocks: blocks.parse().context("crash-check: blocks")?,
    })
}

/// A seed for the patterns, different run to run (so a file from an earlier run does
/// not pass for this one's).
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut x = (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32) ^ GOLDEN;
    // A few xorshift steps spread the clock's low bits over the word.
    for _ in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// A fresh copy of `guest`'s root image as `<target>/linux/storage/<name>.img`.
pub fn fresh_root(guest: &Guest, name: &str) -> Result<PathBuf> {
    let img = workspace::out_dir("linux/storage")?.join(format!("{name}.img"));
    std::fs::copy(&guest.rootfs, &img).with_context(|| {
        format!(
            "copying {} to {} (cargo xtask linux --prepare builds it)",
            guest.rootfs.display(),
            img.display()
        )
    })?;
    Ok(img)
}

/// A boot of `guest` from the root image `root` with `tests`, seed `seed`.
fn run(name: &str, root: &Path, tests: &str, seed: u64) -> Run {
    Run {
        name: name.into(),
        smp: 1,
        tests: tests.into(),
        timeout: Duration::from_secs(240),
        root: Some(root.to_path_buf()),
        args: format!("peregrine.seed={seed}"),
        ..Run::default()
    }
}

/// The result and detail of test `name` in `r`, failing if it printed none.
fn result_of(r: &RunResult, name: &str) -> Result<(String, String)> {
    test_results(&r.serial)
        .into_iter()
        .find(|t| t.0 == name)
        .map(|(_, result, detail)| (result, detail))
        .with_context(|| format!("test {name} printed no result: {}", r.report()))
}

/// Checks that `r` ran on the ext4 root (the `root` test) and powered off cleanly.
fn check_root_boot(r: &RunResult) -> Result<()> {
    let (result, detail) = result_of(r, "root")?;
    if result != "ext4" || detail != ROOT_DEVICE {
        bail!(
            "the root is {result} {detail}, not ext4 {ROOT_DEVICE}: {}",
            r.report()
        );
    }
    if !matches!(r.exit, Exit::Other(0)) {
        bail!("the guest did not power off: {}", r.report());
    }
    Ok(())
}

/// `e2fsck -fn` on `img`: fails unless the file system is clean and consistent.
pub fn fsck(img: &Path) -> Result<()> {
    deps::ensure(&[deps::Tool::Ext4])?;
    let out = Command::new(deps::E2FSCK)
        .arg("-fn")
        .arg(img)
        .output()
        .context("running e2fsck")?;
    if !out.status.success() {
        bail!(
            "e2fsck -fn {} ({}):\n{}{}",
            img.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What [`persist`] saw.
#[derive(Debug, Clone)]
pub struct Persist {
    /// The seed of the pattern.
    pub seed: u64,
    /// The pattern's MD5, as both boots printed it.
    pub md5: String,
    /// The two boots.
    pub runs: [RunResult; 2],
}

/// Boots a fresh copy of the root image with `persist-write` (4 MiB of the pattern of
/// a fresh seed to `/persist.bin`, synced, then the power-off), then again with
/// `persist-check`: both must print the pattern's MD5 as computed here, the guest
/// must power off cleanly both times, and `e2fsck` must find the image clean. The image
/// is removed unless something failed.
pub fn persist(guest: &Guest) -> Result<Persist> {
    let seed = fresh_seed();
    let md5 = linux::md5_hex(&pattern(seed, PERSIST_BYTES));
    let img = fresh_root(guest, "persist")?;
    let write = linux::boot_qemu(
        guest,
        &run("linux-persist-write", &img, "root,persist-write", seed),
    )?;
    check_root_boot(&write)?;
    let (result, detail) = result_of(&write, "persist-write")?;
    if result != "ok" || detail != md5 {
        bail!(
            "persist-write: {result} {detail}, want ok {md5} (seed {seed}): {}",
            write.report()
        );
    }
    let check = linux::boot_qemu(
        guest,
        &run("linux-persist-check", &img, "root,persist-check", seed),
    )?;
    check_root_boot(&check)?;
    let (result, detail) = result_of(&check, "persist-check")?;
    if result != "ok" || detail != md5 {
        bail!(
            "persist-check: {result} {detail}, want ok {md5} (seed {seed}, image {}): {}",
            img.display(),
            check.report()
        );
    }
    fsck(&img)?;
    std::fs::remove_file(&img).ok();
    Ok(Persist {
        seed,
        md5,
        runs: [write, check],
    })
}

/// What [`crash`] saw.
#[derive(Debug, Clone)]
pub struct Crash {
    /// `PEREGRINE-SEQ` lines to wait for before the kill.
    pub after_lines: u64,
    /// Extra wait after them before the kill.
    pub delay: Duration,
    /// The highest `PEREGRINE-SEQ` the host saw before the kill.
    pub last_printed: u64,
    /// What `crash-check` found after the reboot.
    pub check: CrashCheck,
    /// The killed boot and the checking one.
    pub runs: [RunResult; 2],
}

/// Boots a fresh copy of the root image with `crash-writer`, kills QEMU with SIGKILL
/// at a random moment after 3 to 10 `PEREGRINE-SEQ` lines (up to 500 ms later), and
/// boots the image again with `crash-check`: every block up to the last number the
/// host saw must hold its number and pattern (the guest printed it only after its
/// fsync returned), the guest must power off cleanly, and `e2fsck` must find the image
/// clean (the journal replayed). The image is removed unless something failed.
pub fn crash(guest: &Guest) -> Result<Crash> {
    let r = fresh_seed();
    let after_lines = 3 + r % 8;
    let delay = Duration::from_millis((r >> 8) % 500);
    let img = fresh_root(guest, "crash")?;
    let spec = linux::qemu_spec(
        guest,
        &run("linux-crash-writer", &img, "root,crash-writer", 0),
    );
    let mut seen_at: Option<Instant> = None;
    let killed = crate::qemu::run_qemu_killed(&spec, |serial| {
        if seen_at.is_none() && last_seq(serial).is_some_and(|n| n + 1 >= after_lines) {
            seen_at = Some(Instant::now());
        }
        seen_at.is_some_and(|t| t.elapsed() >= delay)
    })?;
    if killed.exit != Exit::Success {
        bail!(
            "crash-writer: the guest ended before the kill ({:?}): {}",
            killed.exit,
            killed.report()
        );
    }
    let last_printed = last_seq(&killed.serial).context("no PEREGRINE-SEQ line")?;
    let check = linux::boot_qemu(
        guest,
        &run("linux-crash-check", &img, "root,crash-check", 0),
    )?;
    check_root_boot(&check)?;
    let (result, detail) = result_of(&check, "crash-check")?;
    let found = parse_crash_check(&result, &detail)
        .with_context(|| format!("image {}: {}", img.display(), check.report()))?;
    if found.highest.is_none_or(|h| h < last_printed) {
        bail!(
            "crash-check: blocks valid up to {:?}, but the guest had printed {last_printed} \
             before the kill (image {}): {}",
            found.highest,
            img.display(),
            check.report()
        );
    }
    fsck(&img)?;
    std::fs::remove_file(&img).ok();
    Ok(Crash {
        after_lines,
        delay,
        last_printed,
        check: found,
        runs: [killed, check],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_storetests_xorshift() {
        // Seed 0 starts at GOLDEN: the pattern disk's stream (linux::disk_image).
        let p = pattern(0, 16);
        let disk = linux::disk_image();
        assert_eq!(p[..], disk[18..34]); // after the 18-byte header line
                                         // The first state of seed 5, as `storetest pattern 5 16 | xxd` printed it.
        assert_eq!(
            pattern(5, 8),
            [0xe8, 0xec, 0x79, 0x49, 0xaf, 0x77, 0x1b, 0xdc]
        );
        // A prefix of a longer stream, also off the 8-byte grid.
        assert_eq!(pattern(7, 13)[..], pattern(7, 64)[..13]);
        // The seed that XORs to zero starts at GOLDEN too.
        assert_eq!(pattern(GOLDEN, 32), pattern(0, 32));
        assert_ne!(pattern(1, 32), pattern(2, 32));
    }

    #[test]
    fn crash_blocks_carry_their_number() {
        let b = crash_block(258);
        assert_eq!(b.len(), CRASH_BLOCK);
        assert_eq!(&b[..8], b"PRGNSEQ1");
        assert_eq!(&b[8..16], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[16..], pattern(258, CRASH_BLOCK - 16)[..]);
    }

    #[test]
    fn last_seq_counts_whole_lines_only() {
        assert_eq!(last_seq(""), None);
        assert_eq!(last_seq("PEREGRINE-SEQ 0\r\n"), Some(0));
        let log = "PEREGRINE-LINUX-READY\nPEREGRINE-SEQ 0\r\nPEREGRINE-SEQ 1\r\n\
                   [ 3.1] x PEREGRINE-SEQ 2\r\nPEREGRINE-SEQ 3";
        assert_eq!(last_seq(log), Some(2));
        assert_eq!(last_seq("PEREGRINE-SEQ 12\nPEREGRINE-SEQ 1"), Some(12));
        assert_eq!(last_seq("PEREGRINE-SEQ x\n"), None);
    }

    #[test]
    fn crash_check_lines() {
        assert_eq!(
            parse_crash_check("ok", "41 43").unwrap(),
            CrashCheck {
                highest: Some(41),
                blocks: 43
            }
        );
        assert_eq!(parse_crash_check("ok", "-1 0").unwrap().highest, None);
        for (r, d) in [("hole", "3 5"), ("missing", ""), ("ok", "1"), ("ok", "x 2")] {
            assert!(parse_crash_check(r, d).is_err(), "{r} {d}");
        }
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(fresh_seed(), fresh_seed());
    }
}
