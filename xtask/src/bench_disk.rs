//! `cargo xtask bench disk`: the Linux guest's block-device throughput, measured inside
//! it by `diskbench` (`guests/linux/diskbench.c`) on a scratch disk: sequential read
//! and write with 1 MiB requests (`seq_read_mb_s`, `seq_write_mb_s`, MB = 10^6 bytes),
//! 4 KiB random reads one at a time (`rand_read_4k_qd1_iops`, and their mean latency
//! `rand_read_4k_qd1_lat_us`) and 32 in flight (`rand_read_4k_qd32_iops`), all with
//! O_DIRECT.
//!
//! The disk is one scratch image file, `<target>/bench/disk/scratch.img`:
//! [`SCRATCH_MIB`] MiB of a pattern (so reads hit data, not holes), written afresh
//! before every run, which `diskbench` overwrites. The guest stays in its initramfs
//! (where `diskbench` is, as on the ext4 root), so the scratch disk is all it measures.
//! Three sides, each in one QEMU with software emulation (TCG), `-cpu EPYC`, the guest
//! with one vCPU and [`VMM_MEM_MIB`](crate::linux::VMM_MEM_MIB) MiB, the image file opened with the same cache
//! mode (`cache=writeback`, written in place):
//!
//! - **QEMU direct** ([`direct_side`], the baseline `qemu-direct`): QEMU boots the guest
//!   itself, the image as a virtio-blk PCI disk ([`DIRECT_DEVICE`], after the pattern
//!   disk, which the benchmark leaves alone).
//! - **Peregrine** ([`peregrine_side`], configuration [`CONFIG_MSI`]): QEMU boots
//!   Peregrine with the image as its NVMe controller's namespace; the disk component
//!   (the user-level NVMe driver and disk service, [`sysdisk::DISK_ARGS`], MSI-X)
//!   serves a session bound to the whole image (`blk=range=0+…`), and the VMM's
//!   virtio-blk on that session is the guest's [`PEREGRINE_DEVICE`]: the guest's
//!   requests go guest → VMM → disk service → NVMe driver → QEMU's NVMe.
//! - **Peregrine, polled** (configuration [`CONFIG_POLL`]): the same with the disk
//!   component polling the controller's completions instead of waiting for its
//!   interrupts ([`sysdisk::DISK_ARGS_POLLED`]), polling only as a measured option.
//!
//! What differs besides Peregrine itself: on the host side QEMU emulates an NVMe
//! controller for Peregrine and a virtio-blk device for the direct guest (both on the
//! same file and cache mode, through QEMU's block layer), and the Peregrine guest runs
//! as a nested SVM guest of QEMU's emulated CPU, so each of its VM exits costs an
//! emulated world switch that the direct guest does not pay.
//!
//! `target/bench/disk.json` has the shape of the other benchmarks' ([`Report`]): per
//! configuration and figure the median of Peregrine's runs (`peregrine`, `median`)
//! beside QEMU direct's (`baseline`, `baseline_median`, named `qemu-direct`), and their
//! ratio (`ratio`, Peregrine/direct; for the latency lower is better, so a ratio above 1
//! is the slower side there).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::{Figure, Report};
use crate::bench_boot::median;
use crate::boot::{BootSpec, Exit, RunResult};
use crate::build::{Images, Profile};
use crate::linux::{self, test_results, Guest, Run};
use crate::provenance::Provenance;
use crate::sysdisk::{self, NvmeVm};
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
/// The seed of the scratch image's pattern ([`crate::storage::pattern`]).
pub const SCRATCH_SEED: u64 = 0x05c7_a7c4;
/// The scratch disk in the direct guest: the second virtio-blk disk, after the pattern
/// disk.
pub const DIRECT_DEVICE: &str = "/dev/vdb";
/// The scratch disk in the guest on Peregrine: its session's disk, the only one.
pub const PEREGRINE_DEVICE: &str = sysdisk::SESSION_ROOT_DEVICE;
/// The configuration of the Peregrine rows with the disk component on MSI-X.
pub const CONFIG_MSI: &str = "disk=msi-x";
/// The configuration of the Peregrine rows with the disk component polling.
pub const CONFIG_POLL: &str = "disk=poll";
/// Runs per side by default.
pub const RUNS: u32 = 3;
/// Seconds of random reads per queue depth.
pub const RANDOM_SECS: u32 = 3;

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

/// The kernel command line's bench arguments for the scratch device `dev`.
pub fn bench_args(dev: &str, secs: u32) -> String {
    format!(
        "peregrine.bench_dev={dev} peregrine.bench_mib={SCRATCH_MIB} peregrine.bench_secs={secs}"
    )
}

/// Writes the scratch image: [`SCRATCH_MIB`] MiB of a pattern.
pub fn scratch_image(path: &Path) -> Result<()> {
    let data = crate::storage::pattern(SCRATCH_SEED, (SCRATCH_MIB as usize) << 20);
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// The binding of the Peregrine side's session: the whole scratch image.
pub fn scratch_binding() -> String {
    format!("range=0+{}", (SCRATCH_MIB << 20) / crate::gpt_image::BLOCK)
}

/// A side of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// QEMU booting the guest itself, virtio-blk on the image: the baseline.
    Direct,
    /// Peregrine, the disk component on MSI-X.
    Peregrine,
    /// Peregrine, the disk component polled.
    PeregrinePolled,
}

impl Side {
    /// Every side, in the order a round runs them.
    pub const ALL: [Side; 3] = [Side::Direct, Side::Peregrine, Side::PeregrinePolled];

    /// Its name in logs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Side::Direct => "qemu-direct",
            Side::Peregrine => "peregrine",
            Side::PeregrinePolled => "peregrine-poll",
        }
    }

    /// The scratch disk's device in its guest.
    pub fn device(self) -> &'static str {
        match self {
            Side::Direct => DIRECT_DEVICE,
            _ => PEREGRINE_DEVICE,
        }
    }
}

/// Checks a run: `diskbench ok <dev>`, a clean end (`powered_off`) and every figure of
/// [`FIGURES`]; returns its values.
pub fn check(r: &RunResult, dev: &str, powered_off: fn(&RunResult) -> bool) -> Result<Values> {
    let done = test_results(&r.serial)
        .into_iter()
        .find(|t| t.0 == "diskbench")
        .map(|(_, result, detail)| format!("{result} {detail}"));
    if done.as_deref() != Some(&format!("ok {dev}")) {
        bail!("diskbench: {done:?}: {}", r.report());
    }
    if !powered_off(r) {
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

/// Whether a direct QEMU boot ended as the guest's power-off (QEMU's status 0).
fn qemu_powered_off(r: &RunResult) -> bool {
    matches!(r.exit, Exit::Other(0))
}

/// The direct boot of `guest` with `diskbench` on `scratch` ([`DIRECT_DEVICE`]).
pub fn direct_spec(guest: &Guest, scratch: &Path, secs: u32) -> BootSpec {
    linux::qemu_spec(
        guest,
        &Run {
            name: "bench-disk-direct".into(),
            smp: 1,
            tests: "diskbench".into(),
            timeout: Duration::from_secs(600),
            scratch: Some(scratch.to_path_buf()),
            args: bench_args(DIRECT_DEVICE, secs),
            ..Run::default()
        },
    )
}

/// The boot of Peregrine with `guest` running `diskbench` on `scratch` through the disk
/// component started with `disk_args` ([`PEREGRINE_DEVICE`], bound to the whole image).
pub fn peregrine_spec(
    images: &Images,
    guest: &Guest,
    scratch: &Path,
    disk_args: &str,
    name: &str,
    secs: u32,
) -> BootSpec {
    let vm = NvmeVm {
        binding: scratch_binding(),
        tests: "diskbench".into(),
        args: bench_args(PEREGRINE_DEVICE, secs),
        root: false,
        ..NvmeVm::new(scratch)
    };
    let spec = BootSpec::new(name, images).timeout(Duration::from_secs(900));
    sysdisk::linux_vms_on_nvme_spec(spec, images, guest, disk_args, &[vm])
}

/// Runs `side` once on a fresh scratch image (the Peregrine sides boot `images`).
pub fn run_side(side: Side, images: &Images, guest: &Guest, secs: u32) -> Result<Values> {
    let scratch = work_dir()?.join("scratch.img");
    scratch_image(&scratch)?;
    let (spec, powered_off): (BootSpec, fn(&RunResult) -> bool) = match side {
        Side::Direct => (direct_spec(guest, &scratch, secs), qemu_powered_off),
        Side::Peregrine => (
            peregrine_spec(
                images,
                guest,
                &scratch,
                sysdisk::DISK_ARGS,
                "bench-disk-peregrine",
                secs,
            ),
            sysdisk::vm_powered_off,
        ),
        Side::PeregrinePolled => (
            peregrine_spec(
                images,
                guest,
                &scratch,
                sysdisk::DISK_ARGS_POLLED,
                "bench-disk-peregrine-poll",
                secs,
            ),
            sysdisk::vm_powered_off,
        ),
    };
    let r = crate::qemu::run_qemu(&spec)?;
    check(&r, side.device(), powered_off)
}

/// The QEMU direct side, once: `guest` booted by QEMU with a fresh scratch image.
pub fn direct_side(guest: &Guest, secs: u32) -> Result<Values> {
    let scratch = work_dir()?.join("scratch.img");
    scratch_image(&scratch)?;
    let r = crate::qemu::run_qemu(&direct_spec(guest, &scratch, secs))?;
    check(&r, DIRECT_DEVICE, qemu_powered_off)
}

/// The Peregrine side, once: `guest` in Peregrine's VMM on the disk component with the
/// same fresh scratch image, MSI-X or (`polled`) polling.
pub fn peregrine_side(images: &Images, guest: &Guest, secs: u32, polled: bool) -> Result<Values> {
    let side = if polled {
        Side::PeregrinePolled
    } else {
        Side::Peregrine
    };
    run_side(side, images, guest, secs)
}

/// Every side's runs.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    /// QEMU direct.
    pub direct: Vec<Values>,
    /// Peregrine, MSI-X.
    pub peregrine: Vec<Values>,
    /// Peregrine, polled.
    pub polled: Vec<Values>,
}

impl Runs {
    /// The runs of `side`.
    pub fn of(&mut self, side: Side) -> &mut Vec<Values> {
        match side {
            Side::Direct => &mut self.direct,
            Side::Peregrine => &mut self.peregrine,
            Side::PeregrinePolled => &mut self.polled,
        }
    }
}

/// The median of figure `name` over `runs`.
fn median_of(runs: &[Values], name: &str) -> Option<f64> {
    median(
        runs.iter()
            .filter_map(|r| r.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
            .collect(),
    )
}

/// The rows: per configuration ([`CONFIG_MSI`], [`CONFIG_POLL`]) and figure of
/// [`FIGURES`], the median of that Peregrine side's runs beside that of QEMU direct's
/// (the same baseline in both configurations), and their ratio; a side without runs
/// has empty values and a note.
pub fn figures(runs: &Runs) -> Vec<Figure> {
    let mut out = Vec::new();
    for (config, side) in [(CONFIG_MSI, &runs.peregrine), (CONFIG_POLL, &runs.polled)] {
        for (name, unit) in FIGURES {
            let p = median_of(side, name);
            let b = median_of(&runs.direct, name);
            out.push(Figure {
                figure: name.to_string(),
                unit: unit.to_string(),
                mode: MODE.to_string(),
                config: config.to_string(),
                peregrine: p,
                median: p,
                baseline_name: "qemu-direct".into(),
                baseline: b,
                baseline_median: b,
                ratio: match (p, b) {
                    (Some(p), Some(b)) if b != 0.0 => Some((p / b * 1000.0).round() / 1000.0),
                    _ => None,
                },
                note: p
                    .is_none()
                    .then(|| format!("no run of the {config} side succeeded")),
                ..Figure::default()
            });
        }
    }
    out
}

/// Runs `diskbench` `runs` times on every side (a round: direct, Peregrine, Peregrine
/// polled), writes `<target>/bench/disk.json` and its chart, and prints the table.
/// Fails if a run failed (the others' figures are still written).
pub fn bench(runs: u32, secs: u32) -> Result<Vec<Figure>> {
    let guest = linux::prepare()?;
    let images = crate::build::build(Profile::Release)?;
    let mut all = Runs::default();
    let mut failed = Vec::new();
    for round in 1..=runs.max(1) {
        for side in Side::ALL {
            eprintln!(
                "xtask: bench disk: {}, run {round} of {runs} …",
                side.name()
            );
            match run_side(side, &images, &guest, secs) {
                Ok(v) => {
                    eprintln!("xtask: bench disk: {}: {v:?}", side.name());
                    all.of(side).push(v);
                }
                Err(e) => failed.push(format!("{} (run {round}): {e:#}", side.name())),
            }
        }
    }
    let figures = figures(&all);
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

/// Where the sides keep the scratch image.
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

    const LOG: &str = "PEREGRINE-LINUX: diskbench /dev/vdb: 64 MiB\n\
        PEREGRINE-BENCH disk seq_read_mb_s 120.5\r\n\
        PEREGRINE-BENCH disk seq_write_mb_s 60.0\r\n\
        [ 4.0] x PEREGRINE-BENCH disk rand_read_4k_qd1_iops 1500.0\r\n\
        PEREGRINE-BENCH disk rand_read_4k_qd1_lat_us 666.7\r\n\
        PEREGRINE-BENCH disk rand_read_4k_qd32_iops 4000.0\r\n\
        PEREGRINE-BENCH disk broken nan\nPEREGRINE-BENCH disk cut\n\
        PEREGRINE-TEST diskbench ok /dev/vdb\n";

    #[test]
    fn parses_bench_lines() {
        let v = parse(LOG);
        assert_eq!(v.len(), 5);
        assert_eq!(v[0], ("seq_read_mb_s".into(), 120.5));
        assert_eq!(v[2], ("rand_read_4k_qd1_iops".into(), 1500.0));
        assert_eq!(
            check(&run(LOG), DIRECT_DEVICE, qemu_powered_off).unwrap(),
            v
        );
    }

    #[test]
    fn check_wants_every_figure_and_the_result() {
        let c = |r: &RunResult| check(r, DIRECT_DEVICE, qemu_powered_off);
        assert!(c(&run(&LOG.replace("seq_write_mb_s", "other"))).is_err());
        assert!(c(&run(&LOG.replace("diskbench ok", "diskbench failed"))).is_err());
        assert!(check(&run(LOG), PEREGRINE_DEVICE, qemu_powered_off).is_err());
        let mut timed_out = run(LOG);
        timed_out.exit = Exit::Timeout;
        assert!(c(&timed_out).is_err());
        // On Peregrine: the VMM's tagged lines, and the VM's power-off as the root saw it.
        let tagged: String = LOG
            .replace("/dev/vdb", PEREGRINE_DEVICE)
            .lines()
            .map(|l| format!("[linux] {l}\n"))
            .collect();
        let mut p = run(&(tagged + "[linux] vmm: guest powered off\nPASS vmm\n"));
        p.exit = Exit::Success;
        assert_eq!(
            check(&p, PEREGRINE_DEVICE, sysdisk::vm_powered_off)
                .unwrap()
                .len(),
            5
        );
        p.serial = p.serial.replace("PASS vmm", "FAIL vmm");
        assert!(check(&p, PEREGRINE_DEVICE, sysdisk::vm_powered_off).is_err());
    }

    #[test]
    fn figures_are_medians_per_configuration_with_qemu_direct_as_baseline() {
        let runs: Vec<Values> = [100.0, 300.0, 200.0]
            .iter()
            .map(|&v| vec![("seq_read_mb_s".to_string(), v)])
            .collect();
        let all = Runs {
            direct: runs.clone(),
            peregrine: runs[..1].to_vec(),
            polled: Vec::new(),
        };
        let f = figures(&all);
        assert_eq!(f.len(), 2 * FIGURES.len());
        let (msi, poll) = f.split_at(FIGURES.len());
        assert_eq!(msi[0].figure, "seq_read_mb_s");
        assert_eq!(msi[0].config, CONFIG_MSI);
        assert_eq!(msi[0].unit, "MB/s");
        assert_eq!(msi[0].baseline, Some(200.0));
        assert_eq!(msi[0].baseline_name, "qemu-direct");
        assert_eq!(msi[0].peregrine, Some(100.0));
        assert_eq!(msi[0].ratio, Some(0.5));
        assert_eq!(msi[0].note, None);
        assert_eq!(msi[1].baseline, None);
        assert_eq!(msi[1].ratio, None);
        assert_eq!(poll[0].config, CONFIG_POLL);
        assert_eq!(poll[0].baseline, Some(200.0));
        assert_eq!((poll[0].peregrine, poll[0].ratio), (None, None));
        assert!(poll[0].note.as_deref().unwrap().contains(CONFIG_POLL));
    }

    #[test]
    fn the_guest_is_told_the_scratch_device() {
        let a = bench_args("/dev/vdb", 2);
        assert_eq!(
            a,
            "peregrine.bench_dev=/dev/vdb peregrine.bench_mib=64 peregrine.bench_secs=2"
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

    fn guest() -> Guest {
        Guest {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.cpio".into(),
            disk: "/g/disk.img".into(),
            disk_md5: String::new(),
            rootfs: "/g/rootfs.img".into(),
        }
    }

    /// Both sides: the same image file with the same cache mode, the same guest RAM,
    /// CPU model and vCPUs, the guest in its initramfs.
    #[test]
    fn the_sides_boot_the_same_guest_on_the_same_file() {
        let scratch = Path::new("/s/scratch.img");
        let d = direct_spec(&guest(), scratch, 2);
        let images = Images { dir: "/i".into() };
        let p = peregrine_spec(&images, &guest(), scratch, sysdisk::DISK_ARGS, "p", 2);
        let q = peregrine_spec(
            &images,
            &guest(),
            scratch,
            sysdisk::DISK_ARGS_POLLED,
            "q",
            2,
        );
        let (da, pa) = (d.extra_qemu_args.join(" "), p.extra_qemu_args.join(" "));
        for a in [&da, &pa] {
            assert!(
                a.contains("file=/s/scratch.img,if=none,")
                    && a.contains(",format=raw,cache=writeback"),
                "{a}"
            );
        }
        assert!(da.contains("virtio-blk-pci,drive=scratch"), "{da}");
        assert!(pa.contains("-device nvme,"), "{pa}");
        assert_eq!((d.cpu_model.clone(), d.smp), (None, 1));
        assert_eq!((p.cpu_model.clone(), p.smp), (None, 1));
        assert_eq!(d.memory_mib, linux::VMM_MEM_MIB);
        assert!(d.kernel_args.ends_with(&bench_args(DIRECT_DEVICE, 2)));
        assert!(!d.kernel_args.contains("peregrine.root="));
        assert_eq!(p.modules[1].1, sysdisk::DISK_ARGS);
        assert_eq!(q.modules[1].1, sysdisk::DISK_ARGS_POLLED);
        let vmm = &p.modules[2].1;
        assert!(vmm.contains(" cpus=1 mem=256 "), "{vmm}");
        assert!(vmm.contains(" blk=range=0+131072 -- "), "{vmm}");
        assert!(vmm.ends_with(&bench_args(PEREGRINE_DEVICE, 2)), "{vmm}");
        assert!(!vmm.contains("peregrine.root="), "{vmm}");
        assert_eq!(q.modules[2].1, *vmm);
    }
}
