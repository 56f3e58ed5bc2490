//! `cargo xtask fuzz`: the VMM library's fuzz targets (`vmm/fuzz`), built and run with
//! libFuzzer on the pinned stable toolchain.
//!
//! cargo-fuzz needs nightly only for `-Zsanitizer=address` (and its `-Z` build
//! options); the coverage instrumentation libFuzzer steers by is LLVM's SanitizerCoverage,
//! which stable `rustc` turns on with the stable codegen options below — exactly the
//! flags cargo-fuzz passes. Without AddressSanitizer, what a run can find is what safe
//! Rust can do wrong: panics, arithmetic overflow (built with overflow checks and debug
//! assertions), hangs (`-timeout`) and runaway memory (`-rss_limit_mb`) — which is what
//! these targets are for. `libfuzzer-sys` compiles libFuzzer itself with the host C++
//! compiler. The flags go through `RUSTFLAGS` with an explicit `--target`, so build
//! scripts and proc macros are built without them (they cannot link the coverage
//! callbacks).
//!
//! Each run starts from `<target>/fuzz/corpus/<name>/` (kept, so runs on one machine
//! build on each other) plus the seeds below, written there when it is empty; a crash,
//! hang or leak leaves its input in `<target>/fuzz/artifacts/<name>/` and fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::deps::{self, Tool};
use crate::workspace;

/// The targets, in `vmm/fuzz/fuzz_targets/` (`blk_session` and `gpt` are the disk
/// service's `peregrine-blkproto`, fuzzed from the same crate).
pub const TARGETS: &[&str] = &[
    "emulator",
    "virtqueue",
    "bzimage",
    "devices",
    "virtio_blk",
    "virtio_pci",
    "apic",
    "blk_session",
    "gpt",
];

/// The instrumentation cargo-fuzz uses, without the sanitizer.
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "fuzzing",
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// The host's target triple (`rustc -vV`).
fn host_triple() -> Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .current_dir(workspace::root())
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")
}

/// Builds every target; the directory holding the binaries.
pub fn build() -> Result<PathBuf> {
    deps::ensure(&[Tool::Cxx])?;
    let triple = host_triple()?;
    let target_dir = workspace::out_dir("fuzz")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace::root().join("vmm/fuzz"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        .args(["build", "--release", "--bins", "--target", &triple]);
    workspace::run_checked(&mut cmd).context("building the fuzz targets")?;
    Ok(target_dir.join(triple).join("release"))
}

/// Writes split-virtqueue descriptors `(addr, len, flags, next)` into `m` from offset
/// `table` on (flags: 1 NEXT, 2 WRITE).
fn put_descriptors(m: &mut [u8], table: usize, descs: &[(u64, u32, u16, u16)]) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let d = table + 16 * i;
        m[d..d + 8].copy_from_slice(&addr.to_le_bytes());
        m[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
        m[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
        m[d + 14..d + 16].copy_from_slice(&next.to_le_bytes());
    }
}

/// Seed inputs: one well-formed input per target, so that a short run starts from the
/// interesting paths instead of rediscovering the formats.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "emulator" => {
            // Long mode, RCX 4, MMIO; then an MMIO store, load, zero-extending load,
            // a string copy and port output.
            let head = |dev: u8| {
                let mut h = vec![2u8, 0, 4, dev];
                h.resize(20, 0);
                h
            };
            let codes: [&[u8]; 6] = [
                &[0x89, 0x08],
                &[0x8b, 0x07],
                &[0x0f, 0xb7, 0x07],
                &[0x48, 0x89, 0x07],
                &[0xf3, 0xa4],
                &[0xf3, 0x6e],
            ];
            codes
                .iter()
                .map(|c| [head(1), c.to_vec()].concat())
                .collect()
        }
        "virtqueue" => {
            // Queue size 4; one chain: descriptor 0, 16 device-writable bytes.
            let mut m = vec![0u8; 0x220];
            m[0] = 2;
            m[2..4].copy_from_slice(&1u16.to_le_bytes());
            m[0x210..0x218].copy_from_slice(&0x1800u64.to_le_bytes());
            m[0x218..0x21c].copy_from_slice(&16u32.to_le_bytes());
            m[0x21c..0x21e].copy_from_slice(&2u16.to_le_bytes());
            vec![m]
        }
        "bzimage" => {
            // The smallest loadable 64-bit bzImage: 4 setup sectors, 32 bytes of kernel.
            let mut b = vec![0u8; 5 * 512 + 32];
            let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
            put(&mut b, 0x1f1, &[4]);
            put(&mut b, 0x1f4, &2u32.to_le_bytes());
            put(&mut b, 0x1fe, &0xaa55u16.to_le_bytes());
            put(&mut b, 0x200, &[0xeb, 0x6a]);
            put(&mut b, 0x202, b"HdrS");
            put(&mut b, 0x206, &0x020fu16.to_le_bytes());
            put(&mut b, 0x211, &[1]);
            put(&mut b, 0x22c, &0x7fff_ffffu32.to_le_bytes());
            put(&mut b, 0x230, &0x20_0000u32.to_le_bytes());
            put(&mut b, 0x236, &1u16.to_le_bytes());
            put(&mut b, 0x238, &255u32.to_le_bytes());
            put(&mut b, 0x258, &0x100_0000u64.to_le_bytes());
            put(&mut b, 0x260, &0x10_0000u32.to_le_bytes());
            vec![b]
        }
        "devices" => {
            // PIT channel 0 rate generator; HPET enabled with timer 0 armed; a PCI
            // configuration read through CF8/CFC; the I/O APIC's version register.
            vec![[
                &[1u8, 3, 3, 0, 0x34][..],
                &[1, 3, 0, 0, 0x10],
                &[1, 3, 0, 0, 0x00],
                &[5, 12, 0x10, 10, 1, 0, 0, 0],
                &[5, 12, 0x00, 0, 4, 0, 0, 0],
                &[5, 12, 0x08, 20, 0x10, 0, 0, 0],
                &[5, 8, 0, 0, 0, 0, 0, 0x80],
                &[4, 9, 0, 0],
                &[1, 11, 0, 0, 1],
                &[4, 11, 0x10, 30],
            ]
            .concat()]
        }
        "virtio_blk" => {
            // Queue size 4 (16 with the read-only bit), one chain each: IN of sector 3
            // into 512 writable bytes; OUT of two sectors from 159 (past the end);
            // OUT of sector 0 to a read-only disk; OUT with device-writable data.
            let request = |size_ro: u8, ty: u32, sector: u64, data_writable: bool, len: u32| {
                let mut m = vec![0u8; 0x2000 + len as usize];
                m[0] = size_ro;
                m[2..4].copy_from_slice(&1u16.to_le_bytes());
                let data_flags = if data_writable { 3 } else { 1 };
                put_descriptors(
                    &mut m,
                    0x210,
                    &[
                        (0x1800, 16, 1, 1),
                        (0x2000, len, data_flags, 2),
                        (0x1900, 1, 2, 0),
                    ],
                );
                m[0x1800..0x1804].copy_from_slice(&ty.to_le_bytes());
                m[0x1808..0x1810].copy_from_slice(&sector.to_le_bytes());
                m
            };
            vec![
                request(2, 0, 3, true, 512),
                request(2, 1, 159, false, 1024),
                request(0x82, 1, 0, false, 512),
                request(2, 1, 0, true, 512),
            ]
        }
        "virtio_pci" => {
            // Negotiation (VERSION_1), queue 0 of size 4 at 0x100/0x200/0x300, DRIVER_OK,
            // a notification; memory: an IN of sector 1 into 512 bytes at 0x1000.
            let mut ops: Vec<u8> = Vec::new();
            // (BAR offset, log2 of the size, value): status, driver features (high
            // half: VERSION_1), queue select, size, ring addresses, enable, DRIVER_OK,
            // the notification.
            let writes: [(u16, u8, u64); 13] = [
                (0x14, 0, 1),
                (0x14, 0, 3),
                (0x08, 2, 1),
                (0x0c, 2, 1),
                (0x14, 0, 11),
                (0x16, 1, 0),
                (0x18, 1, 4),
                (0x20, 2, 0x100),
                (0x28, 2, 0x200),
                (0x30, 2, 0x300),
                (0x1c, 1, 1),
                (0x14, 0, 15),
                (0x3000, 1, 0),
            ];
            for (off, size_code, v) in writes {
                ops.extend_from_slice(&[1, off as u8, (off >> 8) as u8, size_code]);
                ops.extend_from_slice(&v.to_le_bytes()[..1 << size_code]);
            }
            // A configuration-space read of the vendor ID and a BAR read of the ISR.
            ops.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0x10, 0]);
            let mut mem = vec![0u8; 0x1200];
            put_descriptors(
                &mut mem,
                0x100,
                &[(0x800, 16, 1, 1), (0x1000, 512, 3, 2), (0x900, 1, 2, 0)],
            );
            mem[0x202..0x204].copy_from_slice(&1u16.to_le_bytes());
            mem[0x808..0x810].copy_from_slice(&1u64.to_le_bytes());
            vec![[&(ops.len() as u16).to_le_bytes()[..], &ops, &mem].concat()]
        }
        "apic" => {
            // The LAPIC enabled, its one-shot timer (vector 0x40) armed and fired,
            // accepted and EOId; I/O APIC pin 0 level-triggered to vector 0x31, raised,
            // accepted and EOId (redelivered, the pin still high); then x2APIC mode and
            // an x2APIC ID read.
            let lapic_w = |off: u16, v: u32, step: u8| {
                [
                    &[1u8, off as u8, (off >> 8) as u8, step][..],
                    &v.to_le_bytes(),
                ]
                .concat()
            };
            let x2 = 0xfee0_0000u64 | 0x800 | 0x400 | 0x100;
            vec![[
                lapic_w(0xf0, 0x1ff, 0),
                lapic_w(0x320, 0x40, 0),
                lapic_w(0x3e0, 0xb, 0),
                lapic_w(0x380, 1000, 20),
                vec![7, 0, 0, 0],
                lapic_w(0xb0, 0, 0),
                [&[5u8, 0, 0, 0][..], &0x10u32.to_le_bytes()].concat(),
                [&[5u8, 0x10, 0, 0][..], &0x8031u32.to_le_bytes()].concat(),
                vec![6, 0, 1, 0],
                vec![7, 0, 0, 0],
                lapic_w(0xb0, 0, 0),
                [&[3u8, 0, 1, 0][..], &x2.to_le_bytes()].concat(),
                vec![2, 2, 0, 0],
            ]
            .concat()]
        }
        "blk_session" => {
            // Eight slots, discard offered: a write and a read in one batch, served in
            // reverse and consumed; then a discard alone; then a flush alone.
            let desc = |tag: u32, op: u8, block: u64, count: u32, buf: u64| {
                let mut d = tag.to_le_bytes().to_vec();
                d.extend([op, 0, 0, 0]);
                d.extend(block.to_le_bytes());
                d.extend(count.to_le_bytes());
                d.extend([0; 4]);
                d.extend(buf.to_le_bytes());
                d
            };
            vec![[
                vec![0x83, 0, 0],
                desc(1, 2, 0, 1, 0),
                vec![0, 1],
                desc(2, 1, 31, 1, 512),
                vec![1, 2, 3, 1, 4, 0, 2],
                desc(3, 4, 5, 2, 0),
                vec![1, 1, 3, 0, 4],
                vec![0, 3],
                desc(4, 3, 0, 0, 0),
                vec![1, 1, 3, 0, 4],
            ]
            .concat()]
        }
        "gpt" => {
            // Flags 3 (the target computes both copies' CRCs), 512-byte blocks, a
            // 64-block disk: protective MBR, headers at 1 and 63, four-entry arrays at
            // 2 and 62, partitions 8..=15 "vm1" and 20..=40.
            let mut d = vec![0u8; 64 * 512];
            d[446 + 4] = 0xee;
            d[510] = 0x55;
            d[511] = 0xaa;
            let put = |d: &mut Vec<u8>, at: usize, v: &[u8]| d[at..at + v.len()].copy_from_slice(v);
            for (hdr, alt, arr) in [(1u64, 63u64, 2u64), (63, 1, 62)] {
                let h = hdr as usize * 512;
                put(&mut d, h, b"EFI PART");
                put(&mut d, h + 8, &0x0001_0000u32.to_le_bytes());
                put(&mut d, h + 12, &92u32.to_le_bytes());
                put(&mut d, h + 24, &hdr.to_le_bytes());
                put(&mut d, h + 32, &alt.to_le_bytes());
                put(&mut d, h + 40, &3u64.to_le_bytes());
                put(&mut d, h + 48, &61u64.to_le_bytes());
                put(&mut d, h + 56, &[0x5a; 16]);
                put(&mut d, h + 72, &arr.to_le_bytes());
                put(&mut d, h + 80, &4u32.to_le_bytes());
                put(&mut d, h + 84, &128u32.to_le_bytes());
                for (i, (first, last)) in [(8u64, 15u64), (20, 40)].into_iter().enumerate() {
                    let e = arr as usize * 512 + 128 * i;
                    put(&mut d, e, &[0xa2; 16]);
                    put(&mut d, e + 16, &[i as u8 + 1; 16]);
                    put(&mut d, e + 32, &first.to_le_bytes());
                    put(&mut d, e + 40, &last.to_le_bytes());
                    put(&mut d, e + 56, &[b'v', 0, b'm', 0, b'1' + i as u8, 0]);
                }
            }
            vec![[vec![3], d].concat()]
        }
        _ => Vec::new(),
    }
}

/// Runs `target` for `secs` seconds from its corpus; the number of executions.
pub fn run_target(bin_dir: &Path, target: &str, secs: u64) -> Result<u64> {
    let dir = workspace::out_dir("fuzz")?;
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    if std::fs::read_dir(&corpus)?.next().is_none() {
        for (i, s) in seeds(target).iter().enumerate() {
            std::fs::write(corpus.join(format!("seed-{i}")), s)?;
        }
    }
    let start = Instant::now();
    let out = Command::new(bin_dir.join(target))
        .arg(format!("-max_total_time={secs}"))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .output()
        .with_context(|| format!("running fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        bail!(
            "fuzz target {target} failed ({}); input in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("Done ")?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    println!(
        "xtask fuzz: {target}: {runs} executions in {:.1} s, no failure",
        start.elapsed().as_secs_f64()
    );
    Ok(runs)
}

/// Builds the targets and runs each of `targets` (all if empty) for `secs` seconds.
pub fn run(targets: &[String], secs: u64) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?} (have {})", TARGETS.join(", "));
        }
    }
    let bins = build()?;
    let all: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
    for t in if targets.is_empty() { &all } else { targets } {
        run_target(&bins, t, secs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_seeds_and_a_source() {
        for t in TARGETS {
            assert!(!seeds(t).is_empty(), "{t}");
            let src = workspace::root().join(format!("vmm/fuzz/fuzz_targets/{t}.rs"));
            assert!(src.is_file(), "{}", src.display());
        }
    }

    #[test]
    fn the_bzimage_seed_is_a_bzimage() {
        let b = &seeds("bzimage")[0];
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(0x202 + usize::from(b[0x201]), 0x26c, "header end");
    }
}
