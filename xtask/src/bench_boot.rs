//! `cargo xtask bench boot`: the Linux guest (`guests/linux`: Debian's kernel, the busybox
//! initramfs, the 8-MiB disk) booted to its init marker, then its `/init` test `read`
//! (the whole disk read uncached with `dd bs=1M`), on three sides in the same QEMU mode
//! (software emulation, `-cpu EPYC`, one vCPU, 256 MiB of guest RAM, no `-icount`: it
//! would stop nothing here, but the figures are wall-clock based on every side):
//!
//! - **Peregrine**: the kernel, the root task and `nul-vmm mode=linux` booting the guest
//!   ([`crate::linux::with_vmm`], as `tests/tests/linux_vmm.rs` does);
//! - **QEMU direct**: the same kernel, initramfs and disk booted by QEMU itself
//!   ([`crate::linux::boot_qemu`]);
//! - **KVM L1**: Debian's kernel booted in QEMU with `kvm_amd` (nested SVM on QEMU's
//!   software SVM), whose initramfs runs a KVM-based VMM on the same guest files. The VMM
//!   is Debian's own `qemu-system-x86_64 -accel kvm` with its shared libraries and
//!   firmware copied from this machine into the L1 initramfs: Debian has no `kvmtool`
//!   package (not in bookworm, trixie, sid or bullseye), and nothing but Debian's
//!   packages can be fetched here.
//! - **vmm-kvm**: the same L1 Linux with KVM running *our* VMM library's PC on the same
//!   guest files (`vmm-kvm --linux`, [`crate::baseline_kvm::linux_on_kvm_spec`]): the
//!   same VMM as the Peregrine side on the other kernel, so the two differ in the kernel
//!   and its binding alone.
//!
//! Figures per side: the guest's own uptime at the marker (`boot_marker_s`, the figure to
//! prefer: wall time moves with the machine's load), the wall time from starting the VMM
//! to the marker line in the serial log (`boot_wall_s`: QEMU's start on the first two
//! sides, the L1 VMM's start on the KVM side, so the L1 kernel's own boot is left out),
//! the read's time and rate (`read_ms`, `read_mb_s`, MB = 10^6 bytes) and the 1-minute
//! load average before the run (`loadavg_1m`). `target/bench/boot.json` has the shape of
//! `ipc.json`: the `baseline` of `<figure>` is QEMU direct, that of `<figure>_kvm` the
//! KVM side, that of `<figure>_vmm_kvm` the vmm-kvm side.
//!
//! Every side's spec forbids KVM on this machine ([`side_specs`]; a host test holds them
//! to one mode), so a machine with a working `/dev/kvm` does not run one side at native
//! speed beside two emulated ones; the JSON's provenance and each figure say the mode.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::baseline_kvm::kvm_kernel;
use crate::bench::Figure;
use crate::boot::{BootSpec, Output, RunResult};
use crate::build::{Images, Profile};
use crate::deps::{self, Tool};
use crate::guest_linux::{module_closure, Initramfs};
use crate::linux::{self, Guest, MARKER};
use crate::workspace;

/// The mode of every figure: QEMU software emulation (TCG), `-cpu EPYC`, one vCPU.
pub const MODE: &str = "qemu-tcg";
/// The `/init` test that reads the disk.
pub const TESTS: &str = "read";
/// What the KVM side's L1 `/init` prints just before it starts the VMM.
pub const VMM_START: &str = "KVMBOOT start";
/// What it prints when the VMM has ended: `KVMBOOT status <n>`.
pub const VMM_END: &str = "KVMBOOT status ";
/// Suffix of the figures whose baseline is the KVM side.
pub const KVM_SUFFIX: &str = "_kvm";
/// Suffix of the figures whose baseline is the vmm-kvm side (our VMM on KVM).
pub const VMM_KVM_SUFFIX: &str = "_vmm_kvm";
/// The figures, in table order.
pub const FIGURES: &[(&str, &str)] = &[
    ("boot_marker_s", "s"),
    ("boot_wall_s", "s"),
    ("read_ms", "ms"),
    ("read_mb_s", "MB/s"),
    ("loadavg_1m", "load"),
];
/// Guest RAM on every side, MiB (as `linux::boot_qemu` and `linux::VMM_MEM_MIB`).
pub const GUEST_MIB: u32 = 256;
/// RAM of the KVM side's L1 Linux: the guest's, the VMM's and the unpacked initramfs.
pub const L1_MIB: u32 = 1024;
/// QEMU's firmware files the L1 VMM needs (q35, `-kernel`, no VGA, no NIC).
const QEMU_FIRMWARE: &[&str] = &["bios-256k.bin", "linuxboot_dma.bin", "kvmvapic.bin"];

/// Where Debian keeps them (`qemu-system-data`, `seabios`).
const FIRMWARE_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios"];

/// What one side measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Side {
    /// Guest uptime at the marker, s.
    pub marker_s: Option<f64>,
    /// Wall time from the VMM's start to the marker line, s.
    pub wall_s: Option<f64>,
    /// The read of the whole disk: milliseconds and bytes.
    pub read: Option<(u64, u64)>,
    /// 1-minute load average before the run.
    pub loadavg: Option<f64>,
}

impl Side {
    /// The side's value of `figure` (one of [`FIGURES`]).
    pub fn value(&self, figure: &str) -> Option<f64> {
        match figure {
            "boot_marker_s" => self.marker_s,
            "boot_wall_s" => self.wall_s,
            "read_ms" => self.read.map(|(ms, _)| ms as f64),
            "read_mb_s" => self
                .read
                .filter(|&(ms, _)| ms > 0)
                .map(|(ms, bytes)| bytes as f64 / 1e6 / (ms as f64 / 1e3)),
            "loadavg_1m" => self.loadavg,
            _ => None,
        }
    }

    /// The figures of a serial log (`wall_s` and `loadavg` come from the caller).
    pub fn from_serial(serial: &str, wall_s: Option<f64>, loadavg: Option<f64>) -> Side {
        let read = linux::test_results(serial)
            .into_iter()
            .find(|t| t.0 == "read")
            .and_then(|(_, ms, bytes)| {
                Some((ms.strip_suffix("ms")?.parse().ok()?, bytes.parse().ok()?))
            });
        Side {
            marker_s: linux::marker_uptime(serial),
            wall_s,
            read,
            loadavg,
        }
    }
}

/// The entries of `boot.json`: per figure, Peregrine with QEMU direct (`<figure>`),
/// with the KVM side (`<figure>_kvm`) and with the vmm-kvm side (`<figure>_vmm_kvm`).
pub fn figures(peregrine: &Side, direct: &Side, kvm: &Side, vmm_kvm: &Side) -> Vec<Figure> {
    let mut out = Vec::new();
    for (name, unit) in FIGURES {
        for (suffix, base, base_name) in [
            ("", direct, "qemu-direct"),
            (KVM_SUFFIX, kvm, "kvm-l1"),
            (VMM_KVM_SUFFIX, vmm_kvm, "vmm-kvm"),
        ] {
            out.push(Figure {
                figure: format!("{name}{suffix}"),
                unit: unit.to_string(),
                mode: MODE.to_string(),
                peregrine: peregrine.value(name),
                baseline_name: base_name.to_string(),
                baseline: base.value(name),
                ..Figure::default()
            });
        }
    }
    out
}

fn number(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn ratio(p: Option<f64>, b: Option<f64>) -> String {
    match (p, b) {
        (Some(p), Some(b)) if b != 0.0 => format!("{:.2}", p / b),
        _ => "-".into(),
    }
}

/// The table of `figures` (as [`figures`] makes them): one row per figure with the four
/// sides and Peregrine's ratio to each baseline.
pub fn table(figures: &[Figure]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<14} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9} {:>9}  {:<5} mode",
        "figure",
        "peregrine",
        "qemu-direct",
        "kvm-l1",
        "vmm-kvm",
        "/direct",
        "/kvm",
        "/vmm-kvm",
        "unit"
    );
    let base = |name: &str, suffix: &str| {
        figures
            .iter()
            .find(|k| k.figure == format!("{name}{suffix}"))
            .and_then(|k| k.baseline)
    };
    for f in figures
        .iter()
        .filter(|f| FIGURES.iter().any(|(n, _)| f.figure == *n))
    {
        let (kvm, vmm_kvm) = (base(&f.figure, KVM_SUFFIX), base(&f.figure, VMM_KVM_SUFFIX));
        let _ = writeln!(
            t,
            "{:<14} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9} {:>9}  {:<5} {}",
            f.figure,
            number(f.peregrine),
            number(f.baseline),
            number(kvm),
            number(vmm_kvm),
            ratio(f.peregrine, f.baseline),
            ratio(f.peregrine, kvm),
            ratio(f.peregrine, vmm_kvm),
            f.unit,
            f.mode
        );
    }
    t
}

/// The 1-minute load average of `/proc/loadavg`'s text.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

fn loadavg() -> Option<f64> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// Runs `spec` in QEMU while watching its serial log: the wall time (from QEMU's start)
/// at which each of `marks` first appears in it.
pub fn run_watched(spec: &BootSpec, marks: &[&str]) -> Result<(RunResult, Vec<Option<f64>>)> {
    let log = workspace::out_dir("emulator")?.join(format!("{}.serial.log", spec.name));
    // run_qemu creates it anew; an old one must not be read as this run's.
    let _ = std::fs::remove_file(&log);
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, log) = (done.clone(), log.clone());
        let marks: Vec<String> = marks.iter().map(|m| m.to_string()).collect();
        let start = Instant::now();
        std::thread::spawn(move || {
            let mut seen: Vec<Option<f64>> = vec![None; marks.len()];
            while !done.load(Ordering::Relaxed) && seen.iter().any(Option::is_none) {
                let text = std::fs::read(&log).unwrap_or_default();
                let text = String::from_utf8_lossy(&text);
                let t = start.elapsed().as_secs_f64();
                for (m, s) in marks.iter().zip(seen.iter_mut()) {
                    if s.is_none() && text.contains(m.as_str()) {
                        *s = Some(t);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    let r = crate::qemu::run_qemu(spec);
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap_or_default();
    Ok((r?, seen))
}

/// One side's run: its figures and the run itself.
pub struct SideRun {
    /// The figures.
    pub side: Side,
    /// The emulator run.
    pub run: RunResult,
}

fn check(name: &str, r: &RunResult, side: &Side) -> Result<()> {
    if side.marker_s.is_none() {
        bail!("{name}: no {MARKER}: {}", r.report());
    }
    if side.read.is_none() {
        bail!("{name}: no result of the read test: {}", r.report());
    }
    Ok(())
}

/// The Peregrine side's spec: the root task and `nul-vmm mode=linux` booting `guest`,
/// in software emulation like the other sides (`BootSpec::new` would allow KVM).
pub fn peregrine_spec(images: &Images, guest: &Guest) -> BootSpec {
    let mut spec = BootSpec::new("bench-boot-peregrine", images)
        .smp(1)
        .timeout(Duration::from_secs(600));
    spec.allow_kvm = false;
    linux::with_vmm(spec, images.vmm(), guest, 1, TESTS, "")
}

/// The Peregrine side: the root task and `nul-vmm mode=linux` booting `guest`.
pub fn peregrine_side(guest: &Guest) -> Result<SideRun> {
    let images = crate::build::build(Profile::Release)?;
    let spec = peregrine_spec(&images, guest);
    let load = loadavg();
    let (run, seen) = run_watched(&spec, &[MARKER])?;
    let side = Side::from_serial(&run.serial, seen[0], load);
    check("Peregrine", &run, &side)?;
    Ok(SideRun { side, run })
}

/// The QEMU-direct side's run: one vCPU, the read test.
fn direct_run() -> linux::Run {
    linux::Run {
        name: "bench-boot-direct".into(),
        smp: 1,
        tests: TESTS.into(),
        timeout: Duration::from_secs(300),
        ..linux::Run::default()
    }
}

/// The spec [`linux::boot_qemu`] boots ([`linux::qemu_spec`]: q35, `-cpu EPYC`, 256 MiB,
/// the disk as a modern-only virtio-blk PCI device in snapshot mode), with the serial
/// log captured.
pub fn direct_spec(guest: &Guest, run: &linux::Run) -> BootSpec {
    BootSpec {
        memory_mib: GUEST_MIB,
        output: Output::Capture,
        ..linux::qemu_spec(guest, run)
    }
}

/// The QEMU direct side: `guest` booted by QEMU itself.
pub fn direct_side(guest: &Guest) -> Result<SideRun> {
    let spec = direct_spec(guest, &direct_run());
    let load = loadavg();
    let (run, seen) = run_watched(&spec, &[MARKER])?;
    let side = Side::from_serial(&run.serial, seen[0], load);
    check("QEMU direct", &run, &side)?;
    Ok(SideRun { side, run })
}

/// The shared libraries `ldd` names for `binary`, the dynamic loader included.
pub fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The L1 VMM's command line: QEMU with KVM booting the guest in `/guest` as
/// [`linux::boot_qemu`] does (q35, 256 MiB, modern virtio-blk), console on its stdio.
pub fn l1_vmm_command() -> String {
    format!(
        "/bin/qemu-system-x86_64 -L /qemu -machine q35,accel=kvm -cpu host -smp 1 -m {GUEST_MIB} \
         -display none -vga none -nic none -monitor none -serial stdio -no-reboot \
         -kernel /guest/bzImage -initrd /guest/initramfs.cpio -append '{}' \
         -drive file=/guest/disk.img,if=none,id=vda,format=raw \
         -device virtio-blk-pci,drive=vda,disable-legacy=on",
        linux::cmdline(TESTS)
    )
}

/// The L1 `/init`: mount, load the KVM modules (`modules`, in order), run the VMM
/// between [`VMM_START`] and [`VMM_END`], power off.
pub fn l1_init(modules: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\nexport PATH=/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n",
    );
    for m in modules {
        let _ = writeln!(s, "insmod /lib/kvm/{m}.ko");
    }
    s += "[ -e /dev/kvm ] || mknod /dev/kvm c 10 232\n";
    let _ = writeln!(
        s,
        "echo \"{VMM_START} uptime=$(cut -d' ' -f1 /proc/uptime)\"\n{} </dev/null\n\
         echo \"{VMM_END}$? uptime=$(cut -d' ' -f1 /proc/uptime)\"\npoweroff -f",
        l1_vmm_command()
    );
    s
}

/// The L1 VMM's exit status (`KVMBOOT status <n>`), once it has ended.
pub fn vmm_status(serial: &str) -> Option<i32> {
    serial.lines().find_map(|l| {
        let rest = &l[l.find(VMM_END)? + VMM_END.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The KVM side's L1 initramfs: busybox, `kvm` and `kvm_amd`, this machine's
/// `qemu-system-x86_64` with its libraries and firmware, and the guest's files.
fn l1_initramfs(guest: &Guest) -> Result<PathBuf> {
    deps::ensure(&[Tool::Qemu])?;
    let (_, modules_dir) = kvm_kernel()?;
    let mut ramfs = Initramfs::new(&[
        "bin", "dev", "proc", "sys", "tmp", "lib", "lib/kvm", "qemu", "guest",
    ])?;
    let modules = module_closure(&modules_dir, &["kvm-amd"])?;
    ramfs.modules("lib/kvm", &modules)?;
    let names: Vec<String> = modules.into_iter().map(|(name, _)| name).collect();
    ramfs.file("init", 0o755, l1_init(&names).as_bytes());
    let qemu = workspace::which(crate::qemu::QEMU).context("qemu-system-x86_64 not found")?;
    ramfs.copy("bin/qemu-system-x86_64", 0o755, &qemu)?;
    let ldd = Command::new("ldd")
        .arg(&qemu)
        .output()
        .context("running ldd")?;
    for lib in parse_ldd(&String::from_utf8_lossy(&ldd.stdout)) {
        ramfs.copy_at_own_path(&lib, 0o755)?;
    }
    for f in QEMU_FIRMWARE {
        let p = FIRMWARE_DIRS
            .iter()
            .map(|d| Path::new(d).join(f))
            .find(|p| p.is_file())
            .with_context(|| format!("QEMU firmware {f} not in {FIRMWARE_DIRS:?}"))?;
        ramfs.copy(&format!("qemu/{f}"), 0o644, &p)?;
    }
    ramfs.copy("guest/bzImage", 0o644, &guest.kernel)?;
    ramfs.copy("guest/initramfs.cpio", 0o644, &guest.initramfs)?;
    ramfs.copy("guest/disk.img", 0o644, &guest.disk)?;
    let path = workspace::out_dir("kvm")?.join("bench-boot-l1.cpio");
    ramfs.write(&path)?;
    Ok(path)
}

/// The KVM side's spec: Debian's `kernel` in QEMU (software emulation) with the L1
/// `initramfs`.
pub fn kvm_spec(kernel: PathBuf, initramfs: &Path) -> BootSpec {
    BootSpec {
        icount: false,
        ..crate::baseline_kvm::l1_spec(
            "bench-boot-kvm",
            &kernel,
            initramfs,
            "",
            L1_MIB,
            Duration::from_secs(600),
        )
    }
}

/// The specs of the four sides, in [`SIDES`] order (the KVM side's with `kvm_kernel`
/// and `l1_initramfs`; `vmm_kvm` is the vmm-kvm side's).
pub fn side_specs(
    images: &Images,
    guest: &Guest,
    kvm_kernel: PathBuf,
    l1_initramfs: &Path,
    vmm_kvm: BootSpec,
) -> [BootSpec; 4] {
    [
        peregrine_spec(images, guest),
        direct_spec(guest, &direct_run()),
        kvm_spec(kvm_kernel, l1_initramfs),
        vmm_kvm,
    ]
}

/// The vmm-kvm side's spec: the L1 Linux of the KVM side running `vmm-kvm --linux` on
/// the guest (one vCPU, the `/init` test `read`), without `-icount` as every side here.
pub fn vmm_kvm_spec(guest: &Guest) -> Result<BootSpec> {
    let mut spec =
        crate::baseline_kvm::linux_on_kvm_spec(guest, 1, TESTS, Duration::from_secs(600), false)?;
    spec.name = "bench-boot-vmm-kvm".into();
    spec.memory_mib = L1_MIB;
    Ok(spec)
}

/// The vmm-kvm side: our VMM library's PC on KVM in the L1 Linux of the KVM side.
pub fn vmm_kvm_side(guest: &Guest) -> Result<SideRun> {
    let spec = vmm_kvm_spec(guest)?;
    let load = loadavg();
    let start = crate::baseline_kvm::CONFIG_MARK;
    let (run, seen) = run_watched(&spec, &[start, MARKER])?;
    let wall = match (seen[0], seen[1]) {
        (Some(start), Some(marker)) => Some(marker - start),
        _ => None,
    };
    let side = Side::from_serial(&run.serial, wall, load);
    if !run.serial.contains(start) {
        bail!(
            "vmm-kvm: the L1 Linux did not start the VMM: {}",
            run.report()
        );
    }
    check("vmm-kvm", &run, &side)?;
    if crate::baseline_kvm::runner_status(&run.serial, 1) != Some(0) {
        bail!("vmm-kvm did not end with status 0: {}", run.report());
    }
    Ok(SideRun { side, run })
}

/// The mode a spec runs in here: `qemu-icount`, `qemu-kvm` (when it may use KVM and
/// this machine has it) or `qemu-tcg`.
pub fn spec_mode(spec: &BootSpec) -> &'static str {
    if spec.icount {
        "qemu-icount"
    } else if crate::qemu::uses_kvm(spec) {
        "qemu-kvm"
    } else {
        "qemu-tcg"
    }
}

/// The KVM side: Debian's kernel with `kvm_amd` in QEMU (`-cpu EPYC`, no `-icount`)
/// running the guest under `qemu-system-x86_64 -accel kvm`.
pub fn kvm_side(guest: &Guest) -> Result<SideRun> {
    let (kernel, _) = kvm_kernel()?;
    let initramfs = l1_initramfs(guest)?;
    let spec = kvm_spec(kernel, &initramfs);
    let load = loadavg();
    let (run, seen) = run_watched(&spec, &[VMM_START, MARKER])?;
    let wall = match (seen[0], seen[1]) {
        (Some(start), Some(marker)) => Some(marker - start),
        _ => None,
    };
    let side = Side::from_serial(&run.serial, wall, load);
    if !run.serial.contains(VMM_START) {
        bail!(
            "KVM L1: the L1 Linux did not start its VMM: {}",
            run.report()
        );
    }
    check("KVM L1", &run, &side)?;
    Ok(SideRun { side, run })
}

/// Rounds of the three sides `cargo xtask bench boot` runs by default.
pub const RUNS: u32 = 3;

/// The sides, by the names `--only` takes.
pub const SIDES: &[&str] = &["peregrine", "qemu-direct", "kvm-l1", "vmm-kvm"];

/// The median of `values` (the upper one of the middle two for an even count), `None`
/// for none.
pub fn median<T: Copy + PartialOrd>(mut values: Vec<T>) -> Option<T> {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values.get(values.len() / 2).copied()
}

/// Each figure's median over `runs` (the read's time and size as one).
pub fn median_side(runs: &[Side]) -> Side {
    Side {
        marker_s: median(runs.iter().filter_map(|s| s.marker_s).collect()),
        wall_s: median(runs.iter().filter_map(|s| s.wall_s).collect()),
        read: median(runs.iter().filter_map(|s| s.read).collect()),
        loadavg: median(runs.iter().filter_map(|s| s.loadavg).collect()),
    }
}

/// `cargo xtask bench boot [--runs N] [--only SIDE]`: `runs` rounds of the three sides
/// (or the one named), one side after another in each round so that a change in the
/// machine's load falls on every side alike; the table of each figure's median, and
/// `<target>/bench/boot.json`. Fails if a run failed (the other runs' figures are
/// written).
pub fn bench(only: Option<&str>, runs: u32) -> Result<Vec<Figure>> {
    if let Some(o) = only.filter(|o| !SIDES.contains(o)) {
        bail!(
            "bench boot: unknown side {o:?} (known: {})",
            SIDES.join(", ")
        );
    }
    let guest = linux::prepare()?;
    type SideFn = fn(&Guest) -> Result<SideRun>;
    let all: [(&str, SideFn); 4] = [
        ("peregrine", peregrine_side),
        ("qemu-direct", direct_side),
        ("kvm-l1", kvm_side),
        ("vmm-kvm", vmm_kvm_side),
    ];
    let mut results: Vec<Vec<Side>> = vec![Vec::new(); all.len()];
    let mut failed = Vec::new();
    for round in 1..=runs.max(1) {
        for ((name, f), results) in all.iter().zip(results.iter_mut()) {
            if only.is_some_and(|o| o != *name) {
                continue;
            }
            eprintln!("xtask: bench boot: {name}, run {round} of {runs} …");
            match f(&guest) {
                Ok(s) => {
                    eprintln!(
                        "xtask: bench boot: {name}: {:?}; serial log {}",
                        s.side,
                        s.run.serial_log.display()
                    );
                    results.push(s.side);
                }
                Err(e) => {
                    eprintln!("xtask: bench boot: {name} failed: {e:#}");
                    failed.push(format!("{name} (run {round})"));
                }
            }
        }
    }
    let sides: Vec<Side> = results.iter().map(|r| median_side(r)).collect();
    let figures = figures(&sides[0], &sides[1], &sides[2], &sides[3]);
    let kernels = kvm_kernel()
        .map(|(k, _)| vec![crate::provenance::linux_kernel(&k)])
        .unwrap_or_default();
    let report = crate::bench::Report {
        provenance: crate::provenance::Provenance::now(MODE, kernels),
        figures: figures.clone(),
    };
    let path = workspace::out_dir("bench")?.join("boot.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let svg = path.with_extension("svg");
    crate::plot::write_svg(&svg, "bench boot", &report)?;
    println!("medians of {runs} run(s) per side:");
    print!("{}", table(&figures));
    println!("wrote {} and {}", path.display(), svg.display());
    if !failed.is_empty() {
        bail!("bench boot: failed: {}", failed.join(", "));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "SeaBIOS\r\nPEREGRINE-LINUX-READY uptime=2.75\r\n\
                       PEREGRINE-TEST read 160ms 8388608\r\nPEREGRINE-LINUX: tests done\r\n";

    #[test]
    fn side_from_a_serial_log() {
        let s = Side::from_serial(LOG, Some(7.5), Some(3.2));
        assert_eq!(s.marker_s, Some(2.75));
        assert_eq!(s.read, Some((160, 8 << 20)));
        assert_eq!(s.value("boot_wall_s"), Some(7.5));
        assert_eq!(s.value("read_ms"), Some(160.0));
        let rate = s.value("read_mb_s").unwrap();
        assert!((rate - 52.4288).abs() < 1e-9, "{rate}");
        assert_eq!(s.value("loadavg_1m"), Some(3.2));
        assert_eq!(s.value("nothing"), None);
        let none = Side::from_serial("no marker\nPEREGRINE-TEST read 0ms 8388608\n", None, None);
        assert_eq!(none.marker_s, None);
        assert_eq!(none.value("read_mb_s"), None, "no rate from 0 ms");
    }

    #[test]
    fn figures_json_shape_and_table() {
        let p = Side::from_serial(LOG, Some(20.0), Some(4.0));
        let d = Side {
            marker_s: Some(2.5),
            wall_s: Some(8.0),
            read: Some((80, 8 << 20)),
            loadavg: Some(3.0),
        };
        let k = Side { read: None, ..d };
        let v = Side {
            marker_s: Some(5.5),
            ..d
        };
        let f = figures(&p, &d, &k, &v);
        assert_eq!(f.len(), 3 * FIGURES.len());
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json[0]["figure"], "boot_marker_s");
        assert_eq!(json[0]["unit"], "s");
        assert_eq!(json[0]["mode"], MODE);
        assert_eq!(json[0]["peregrine"], 2.75);
        assert_eq!(json[0]["baseline"], 2.5);
        assert_eq!(json[1]["figure"], "boot_marker_s_kvm");
        assert_eq!(json[2]["figure"], "boot_marker_s_vmm_kvm");
        assert_eq!(json[2]["baseline"], 5.5);
        assert_eq!(json[7]["figure"], "read_ms_kvm");
        assert_eq!(json[7]["baseline"], serde_json::Value::Null);
        assert_eq!(json[0]["baseline_name"], "qemu-direct");
        assert_eq!(json[1]["baseline_name"], "kvm-l1");
        assert_eq!(json[2]["baseline_name"], "vmm-kvm");
        let t = table(&f);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 1 + FIGURES.len(), "{t}");
        assert!(lines[0].contains("qemu-direct") && lines[0].contains("kvm-l1"));
        assert!(lines[0].contains("vmm-kvm"));
        assert!(
            lines[1].contains(" 5.50 ") && lines[1].contains(" 0.50 "),
            "{t}"
        );
        assert!(lines[1].starts_with("boot_marker_s "), "{t}");
        assert!(
            lines[1].contains(" 2.75 ") && lines[1].contains(" 1.10 "),
            "{t}"
        );
        assert!(
            lines[3].starts_with("read_ms ") && lines[3].contains(" 2.00 "),
            "{t}"
        );
        assert!(lines[3].contains(" - "), "no KVM read: {t}");
    }

    #[test]
    fn every_side_runs_in_the_same_mode() {
        let images = Images {
            dir: PathBuf::from("/img"),
        };
        let guest = Guest {
            kernel: "/g/bzImage".into(),
            initramfs: "/g/initramfs.cpio".into(),
            disk: "/g/disk.img".into(),
            disk_md5: String::new(),
            rootfs: "/g/rootfs.img".into(),
        };
        let vmm_kvm = BootSpec {
            name: "vmm-kvm".into(),
            ..kvm_spec("/k/vmlinuz".into(), Path::new("/k/vmm-kvm.cpio"))
        };
        let specs = side_specs(
            &images,
            &guest,
            "/k/vmlinuz".into(),
            Path::new("/k/l1.cpio"),
            vmm_kvm,
        );
        for s in &specs {
            assert!(!s.allow_kvm, "{} may use KVM", s.name);
            assert!(!s.icount, "{}", s.name);
            assert_eq!(s.cpu_model, None, "{}: -cpu EPYC", s.name);
            assert_eq!(s.smp, 1, "{}", s.name);
            assert_eq!(spec_mode(s), MODE, "{}", s.name);
        }
        // A spec that allowed KVM would say so on a machine that has it.
        let mut k = specs[0].clone();
        k.allow_kvm = true;
        let expected = if crate::kvm::usable().is_some() {
            "qemu-kvm"
        } else {
            MODE
        };
        assert_eq!(spec_mode(&k), expected);
    }

    #[test]
    fn medians_per_figure() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4, 1, 3, 2]), Some(3));
        assert_eq!(median::<f64>(Vec::new()), None);
        let a = Side::from_serial(LOG, Some(9.0), Some(1.0));
        let b = Side {
            marker_s: Some(2.0),
            read: Some((100, 8 << 20)),
            ..Side::default()
        };
        let c = Side {
            marker_s: Some(3.0),
            read: Some((80, 8 << 20)),
            ..a
        };
        let m = median_side(&[a, b, c]);
        assert_eq!(m.marker_s, Some(2.75));
        assert_eq!(m.read, Some((100, 8 << 20)));
        assert_eq!(m.wall_s, Some(9.0), "of the two runs that have one");
        assert_eq!(median_side(&[]), Side::default());
    }

    #[test]
    fn loadavg_and_ldd_are_parsed() {
        assert_eq!(parse_loadavg("4.14 4.18 5.14 3/900 1234\n"), Some(4.14));
        assert_eq!(parse_loadavg(""), None);
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \tlibmissing.so => not found\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn l1_init_runs_the_vmm_between_its_marks() {
        let s = l1_init(&["kvm".into(), "kvm_amd".into()]);
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("insmod /lib/kvm/kvm.ko\ninsmod /lib/kvm/kvm_amd.ko\n"));
        let start = s.find(VMM_START).unwrap();
        let vmm = s.find("/bin/qemu-system-x86_64 ").unwrap();
        let end = s.find(VMM_END).unwrap();
        assert!(start < vmm && vmm < end, "{s}");
        assert!(s.ends_with("poweroff -f\n"));
        assert_eq!(
            vmm_status("KVMBOOT start uptime=3.0\r\nKVMBOOT status 1 uptime=9.1\r\n"),
            Some(1)
        );
        assert_eq!(vmm_status("KVMBOOT status 0\n"), Some(0));
        assert_eq!(vmm_status("KVMBOOT start uptime=3.0\n"), None);
        let c = l1_vmm_command();
        assert!(c.contains("accel=kvm") && c.contains("-m 256 "), "{c}");
        assert!(c.contains(&format!("-append '{}'", linux::cmdline(TESTS))));
        assert!(c.contains("virtio-blk-pci,drive=vda,disable-legacy=on"));
    }
}
