//! `cargo xtask bench disk`: the Linux guest's block-device throughput, measured inside
//! it by `diskbench` (`guests/linux/diskbench.c`) on a scratch disk: sequential read
//! and write with 1 MiB requests (`seq_read_mb_s`, `seq_write_mb_s`, MB = 10^6 bytes),
//! 4 KiB random reads one at a time (`rand_read_4k_qd1_iops`, and their mean latency
//! `rand_read_4k_qd1_lat_us`) and 32 in flight (`rand_read_4k_qd32_iops`), all with
//! O_DIRECT, in the same QEMU mode as `bench boot` (software emulation, `-cpu EPYC`, one
//! vCPU, 256 MiB).
//!
//! The guest boots from its ext4 root (a fresh copy of `rootfs.img`, where `diskbench`
//! is) and measures the third disk, `/dev/vdc`: a [`SCRATCH_MIB`]-MiB image filled with
//! a pattern (so reads hit data, not holes), which it overwrites.
//!
//! Sides: **QEMU direct** ([`direct_side`]: QEMU's own virtio-blk on the image file) is
//! the baseline. **Peregrine** ([`peregrine_side`]) is the hook for the disk on
//! Peregrine's NVMe driver and disk service: until that exists it returns `None`, and
//! each figure's Peregrine value is empty with a note saying so. `target/bench/disk.json`
//! has the shape of the other benchmarks' ([`crate::bench::Report`]): `peregrine` and
//! `baseline` (`qemu-direct`) are medians over the runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::{Figure, Report};
use crate::bench_boot::median;
use crate::boot::{Exit, RunResult};
use crate::linux::{self, test_results, Guest, Run};
use crate::provenance::Provenance;
use crate::workspace;

/// The mode of every figure: QEMU software emulation (TCG), `-cpu EPYC`, one vCPU.
pub const MODE: &str = "qemu-tcg";
/// The figures `diskbench` prints, with their units, in table order.
pub const FIGURES: &[(&str, &str)] = &[
    ("seq_read_mb_s", "MB/s"),
    ("seq_write_mb_s", "MB/s"),
    ("rand_read_4k_qd1_iops", "IOPS"),
    ("rand_read_4k_qd1_lat_us", "us"),
    ("rand_read_4k_qd32_iops", "IOPS"),
];
/// Prefix of `diskbench`'s result lines.
pub const BENCH_PREFIX: &str = "PEREGRINE-BENCH disk ";
/// Size of the scratch disk, MiB: what the sequential passes cover and where the random
/// reads fall.
pub const SCRATCH_MIB: u64 = 64;
/// The scratch disk's device in the guest (after the pattern disk and the root).
pub const SCRATCH_DEVICE: &str = "/dev/vdc";
/// Runs per side by default.
pub const RUNS: u32 = 3;
/// Seconds of random reads per queue depth.
pub const RANDOM_SECS: u32 = 3;
/// Why the Peregrine side has no values yet.
pub const PEREGRINE_PENDING: &str =
    "Peregrine side pending: the disk on the NVMe driver and disk service";

/// One run's figures: (name, value) in the order printed.
pub type Values = Vec<(String, f64)>;

/// The `PEREGRINE-BENCH disk <figure> <value>` lines of a serial log.
pub fn parse(serial: &str) -> Values {
    serial
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(BENCH_PREFIX)? + BENCH_PREFIX.len()..];
            let mut w = rest.split_whitespace();
            let name = w.next()?.to_string();
            let value: f64 = w.next()?.parse().ok()?;
            value.is_finite().then_some((name, value))
        })
        .collect()
}

/// The kernel command line's bench arguments for the scratch device.
pub fn bench_args(secs: u32) -> String {
    format!(
        "peregrine.bench_dev={SCRATCH_DEVICE} peregrine.bench_mib={SCRATCH_MIB} \
         peregrine.bench_secs={secs}"
    )
}

/// Writes the scratch image: [`SCRATCH_MIB`] MiB of a pattern.
pub fn scratch_image(path: &Path) -> Result<()> {
    let data = crate::storage::pattern(0x05c7_a7c4, (SCRATCH_MIB as usize) << 20);
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// Checks a run: `diskbench ok`, a clean power-off and every figure of [`FIGURES`];
/// returns its values.
pub fn check(r: &RunResult) -> Result<Values> {
    let done = test_results(&r.serial)
        .into_iter()
        .find(|t| t.0 == "diskbench")
        .map(|(_, result, detail)| format!("{result} {detail}"));
    if done.as_deref() != Some(&format!("ok {SCRATCH_DEVICE}")) {
        bail!("diskbench: {done:?}: {}", r.report());
    }
    if !matches!(r.exit, Exit::Other(0)) {
        bail!("the guest did not power off: {}", r.report());
    }
    let values = parse(&r.serial);
    for (name, _) in FIGURES {
        if !values.iter().any(|(n, _)| n == name) {
            bail!("diskbench printed no {name}: {}", r.report());
        }
    }
    Ok(values)
}

/// The QEMU direct side: `guest` booted by QEMU from a fresh copy of its root, with the
/// scratch image as `/dev/vdc`.
pub fn direct_side(guest: &Guest, secs: u32) -> Result<Values> {
    let dir = work_dir()?;
    let root = dir.join("root.img");
    std::fs::copy(&guest.rootfs, &root)
        .with_context(|| format!("copying {}", guest.rootfs.display()))?;
    let scratch = dir.join("scratch.img");
    scratch_image(&scratch)?;
    let run = Run {
        name: "bench-disk-direct".into(),
        smp: 1,
        tests: "root,diskbench".into(),
        timeout: Duration::from_secs(600),
        root: Some(root),
        scratch: Some(scratch),
        args: bench_args(secs),
        ..Run::default()
    };
    let r = linux::boot_qemu(guest, &run)?;
    check(&r)
}

/// The Peregrine side: `None` until the guest's disk runs on Peregrine's NVMe driver
/// and disk service. Then: boot `guest` in Peregrine's VMM ([`linux::with_vmm`]) with
/// the root and the scratch image on that disk, the same `/init` test and kernel
/// command line ([`bench_args`]), and [`check`] the run as [`direct_side`] does.
pub fn peregrine_side(_guest: &Guest, _secs: u32) -> Option<Result<Values>> {
    None
}

/// The rows: per figure of [`FIGURES`], the median of Peregrine's runs beside that of
/// QEMU direct's; `peregrine: None` means that side did not run (see
/// [`PEREGRINE_PENDING`]).
pub fn figures(peregrine: Option<&[Values]>, direct: &[Values]) -> Vec<Figure> {
    let med = |runs: &[Values], name: &str| {
        median(
            runs.iter()
                .filter_map(|r| r.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
                .collect(),
        )
    };
    FIGURES
        .iter()
        .map(|(name, unit)| {
            let p = peregrine.and_then(|runs| med(runs, name));
            Figure {
                figure: name.to_string(),
                unit: unit.to_string(),
                mode: MODE.to_string(),
                peregrine: p,
                median: p,
                baseline_name: "qemu-direct".into(),
                baseline: med(direct, name),
                baseline_median: med(direct, name),
                note: peregrine.is_none().then(|| PEREGRINE_PENDING.to_string()),
                ..Figure::default()
            }
        })
        .collect()
}

/// Runs `diskbench` `runs` times on each side that exists, writes
/// `<target>/bench/disk.json` and its chart, and prints the table. Fails if a run
/// failed (the others' figures are still written).
pub fn bench(runs: u32, secs: u32) -> Result<Vec<Figure>> {
    let guest = linux::prepare()?;
    let mut direct = Vec::new();
    let mut peregrine: Option<Vec<Values>> = None;
    let mut failed = Vec::new();
    for round in 1..=runs.max(1) {
        eprintln!("xtask: bench disk: qemu-direct, run {round} of {runs} …");
        match direct_side(&guest, secs) {
            Ok(v) => {
                eprintln!("xtask: bench disk: qemu-direct: {v:?}");
                direct.push(v);
            }
            Err(e) => failed.push(format!("qemu-direct (run {round}): {e:#}")),
        }
        if let Some(r) = peregrine_side(&guest, secs) {
            match r {
                Ok(v) => peregrine.get_or_insert_with(Vec::new).push(v),
                Err(e) => failed.push(format!("peregrine (run {round}): {e:#}")),
            }
        }
    }
    let figures = figures(peregrine.as_deref(), &direct);
    let report = Report {
        provenance: Provenance::now(MODE, vec![crate::provenance::linux_kernel(&guest.kernel)]),
        figures: figures.clone(),
    };
    println!("medians of {runs} run(s) per side:");
    crate::bench::write_results("disk", &report)?;
    if !failed.is_empty() {
        bail!("bench disk: failed: {}", failed.join("; "));
    }
    Ok(figures)
}

/// Where [`direct_side`] keeps its images.
pub fn work_dir() -> Result<PathBuf> {
    workspace::out_dir("bench/disk")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(serial: &str) -> RunResult {
        RunResult {
            exit: Exit::Other(0),
            serial: serial.into(),
            wall: Duration::from_secs(1),
            serial_log: PathBuf::new(),
            emulator_output: String::new(),
        }
    }

    const LOG: &str = "PEREGRINE-LINUX: diskbench /dev/vdc: 64 MiB\n\
        PEREGRINE-BENCH disk seq_read_mb_s 120.5\r\n\
        PEREGRINE-BENCH disk seq_write_mb_s 60.0\r\n\
        [ 4.0] x PEREGRINE-BENCH disk rand_read_4k_qd1_iops 1500.0\r\n\
        PEREGRINE-BENCH disk rand_read_4k_qd1_lat_us 666.7\r\n\
        PEREGRINE-BENCH disk rand_read_4k_qd32_iops 4000.0\r\n\
        PEREGRINE-BENCH disk broken nan\nPEREGRINE-BENCH disk cut\n\
        PEREGRINE-TEST diskbench ok /dev/vdc\n";

    #[test]
    fn parses_bench_lines() {
        let v = parse(LOG);
        assert_eq!(v.len(), 5);
        assert_eq!(v[0], ("seq_read_mb_s".into(), 120.5));
        assert_eq!(v[2], ("rand_read_4k_qd1_iops".into(), 1500.0));
        assert_eq!(check(&run(LOG)).unwrap(), v);
    }

    #[test]
    fn check_wants_every_figure_and_the_result() {
        assert!(check(&run(&LOG.replace("seq_write_mb_s", "other"))).is_err());
        assert!(check(&run(&LOG.replace("diskbench ok", "diskbench failed"))).is_err());
        let mut timed_out = run(LOG);
        timed_out.exit = Exit::Timeout;
        assert!(check(&timed_out).is_err());
    }

    #[test]
    fn figures_are_medians_with_qemu_direct_as_baseline() {
        let runs: Vec<Values> = [100.0, 300.0, 200.0]
            .iter()
            .map(|&v| vec![("seq_read_mb_s".to_string(), v)])
            .collect();
        let f = figures(None, &runs);
        assert_eq!(f.len(), FIGURES.len());
        assert_eq!(f[0].figure, "seq_read_mb_s");
        assert_eq!(f[0].unit, "MB/s");
        assert_eq!(f[0].baseline, Some(200.0));
        assert_eq!(f[0].baseline_name, "qemu-direct");
        assert_eq!(f[0].peregrine, None);
        assert_eq!(f[0].note.as_deref(), Some(PEREGRINE_PENDING));
        assert_eq!(f[1].baseline, None);
        let f = figures(Some(&runs[..1]), &runs);
        assert_eq!(f[0].peregrine, Some(100.0));
        assert_eq!(f[0].note, None);
    }

    #[test]
    fn the_guest_is_told_the_scratch_device() {
        let a = bench_args(2);
        assert_eq!(
            a,
            "peregrine.bench_dev=/dev/vdc peregrine.bench_mib=64 peregrine.bench_secs=2"
        );
        let init = include_str!("../../guests/linux/init");
        for key in [
            "peregrine.bench_dev",
            "peregrine.bench_mib",
            "peregrine.bench_secs",
        ] {
            assert!(init.contains(&format!("arg {key}")), "{key}");
        }
        for (name, _) in FIGURES {
            assert!(
                linux::DISKBENCH_C.contains(&format!("\"{name}\"")),
                "{name}"
            );
        }
    }
}
