//! The Linux/KVM baseline of `cargo xtask bench vmexit` (and `cargo xtask kvm-run`):
//! Debian's kernel with `kvm.ko` and `kvm-amd.ko`/`kvm-intel.ko` (and their module
//! dependencies, from the same package) in a busybox initramfs whose `/init` loads them
//! and runs `vmm-kvm` (`hosts/kvm`: the VMM library on KVM, linked statically) on the test guest
//! (`guests/test`). In QEMU `-cpu EPYC -icount shift=0 -smp 1` the emulated Linux runs
//! KVM on QEMU's software SVM with nested paging; in Bochs `corei7_skylake_x` (a GRUB
//! ISO, minutes) on VMX with EPT. Never the host's `/dev/kvm`.
//!
//! [`run_kvm_guest`] also serves the emulator test that runs the guest's check list.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::baseline;
use crate::boot::{BootSpec, Emulator, Output, RunResult};
use crate::build::Images;
use crate::deps::{self, Tool};
use crate::guest_linux::{debian_kernel, module_closure, modules_dir, Initramfs};
use crate::workspace::{self, run_checked};

/// The runner's package and binary.
pub const RUNNER: &str = "vmm-kvm";
/// The host target the runner is built for, statically.
pub const RUNNER_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The modules loaded for each vendor, in load order after their dependencies.
const VENDOR_MODULES: [(&str, &str); 2] = [("svm", "kvm-amd"), ("vmx", "kvm-intel")];

/// What the test guest runs under the KVM runner.
#[derive(Debug, Clone)]
pub struct KvmGuest {
    /// `check`, `bench` or `hostile`.
    pub mode: &'static str,
    /// vCPUs of the guest (1 or 2).
    pub cpus: u32,
    /// Seed of the hostile mode.
    pub seed: u64,
    /// The runner's own time limit in seconds (0: none).
    pub runner_timeout_s: u64,
    /// Names the log files.
    pub name: String,
    /// The emulator's wall-time limit.
    pub timeout: Duration,
    /// The runner's `--irqchip` settings, one run each in the same boot (empty: one run
    /// with the runner's default, the user-space irqchip).
    pub irqchips: Vec<&'static str>,
    /// The configuration (`mitigations=on|off`) of the Linux kernel the runner runs on.
    pub config: String,
}

impl KvmGuest {
    /// The guest in `mode` on one vCPU.
    pub fn new(name: &str, mode: &'static str) -> Self {
        KvmGuest {
            mode,
            cpus: 1,
            seed: 0,
            runner_timeout_s: 0,
            name: name.to_string(),
            timeout: Duration::from_secs(240),
            irqchips: Vec::new(),
            config: String::new(),
        }
    }

    /// The runs of the runner in the initramfs: (label, command line) per `--irqchip`
    /// setting, or one run labelled `default`.
    pub fn runs(&self) -> Vec<(String, String)> {
        if self.irqchips.is_empty() {
            return vec![("default".into(), self.runner_command(None))];
        }
        self.irqchips
            .iter()
            .map(|i| (format!("irqchip={i}"), self.runner_command(Some(i))))
            .collect()
    }

    /// The runner's command line in the initramfs, with `--irqchip irqchip` if given.
    pub fn runner_command(&self, irqchip: Option<&str>) -> String {
        let mut c = format!("/{RUNNER} --mode {} --cpus {}", self.mode, self.cpus);
        if let Some(i) = irqchip {
            let _ = write!(c, " --irqchip {i}");
        }
        if self.seed != 0 {
            let _ = write!(c, " --seed {}", self.seed);
        }
        if self.runner_timeout_s != 0 {
            let _ = write!(c, " --timeout {}", self.runner_timeout_s);
        }
        c + " /guest-test"
    }
}

/// A finished run of the KVM side.
#[derive(Debug, Clone)]
pub struct KvmRun {
    /// The emulator run (serial log: kernel, `/init` and runner lines).
    pub run: RunResult,
    /// The runner's exit status (`KVMRUN status N`; the first non-zero one of several
    /// runs), if every run got that far.
    pub status: Option<i32>,
    /// The kernel's provenance line.
    pub kernel: String,
}

/// What `/init` prints before each run of the runner: `KVMRUN config <label>`.
pub const CONFIG_MARK: &str = "KVMRUN config ";

/// The serial log cut into the runner's runs: (label, that run's lines).
pub fn sections(serial: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in serial.lines() {
        if let Some(at) = line.find(CONFIG_MARK) {
            out.push((
                line[at + CONFIG_MARK.len()..].trim().to_string(),
                String::new(),
            ));
        } else if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

/// Builds `vmm-kvm` statically for the host and returns its path.
pub fn build_runner() -> Result<PathBuf> {
    run_checked(
        workspace::cargo()
            .args([
                "build",
                "--release",
                "-p",
                RUNNER,
                "--target",
                RUNNER_TARGET,
            ])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static -C strip=debuginfo",
            ),
    )
    .context("building the KVM runner (statically linked, needs libc6-dev)")?;
    let path = workspace::target_dir()?
        .join(RUNNER_TARGET)
        .join("release")
        .join(RUNNER);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing after the build",
        path.display()
    );
    Ok(path)
}

/// The initramfs `/init`: mount, load the KVM modules of the CPU's vendor (`vendors`:
/// CPU flag and module file names in load order), run the runner once per `runs` entry
/// ((label, command): `KVMRUN config <label>` before, `KVMRUN status N` after), power off.
pub fn init_script(vendors: &[(&str, Vec<String>)], runs: &[(String, String)]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         B=/bin/busybox\n\
         $B mount -t proc proc /proc\n\
         $B mount -t sysfs sys /sys\n\
         $B mount -t devtmpfs dev /dev 2>/dev/null\n",
    );
    for (i, (flag, modules)) in vendors.iter().enumerate() {
        let kw = if i == 0 { "if" } else { "elif" };
        let _ = writeln!(s, "{kw} $B grep -qw {flag} /proc/cpuinfo; then");
        for m in modules {
            let _ = writeln!(s, "  $B insmod /lib/kvm/{m}.ko");
        }
    }
    s += "fi\n[ -e /dev/kvm ] || $B mknod /dev/kvm c 10 232\n";
    s += "echo KVMRUN start\n";
    for (label, runner) in runs {
        let _ = writeln!(
            s,
            "echo \"{CONFIG_MARK}{label}\"\n{runner}\necho \"KVMRUN status $?\""
        );
    }
    let _ = writeln!(s, "/{RUNNER} --bochs-shutdown");
    s + "$B poweroff -f\n"
}

/// Parses the `KVMRUN status N` lines of the serial log: the first non-zero status, or 0,
/// when there are `runs` of them; `None` when a run did not end.
pub fn runner_status(serial: &str, runs: usize) -> Option<i32> {
    let all: Vec<i32> = serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("KVMRUN status ")?.trim().parse().ok())
        .collect();
    if all.len() < runs.max(1) {
        return None;
    }
    Some(all.iter().copied().find(|&s| s != 0).unwrap_or(0))
}

/// The kernel and its modules directory for the KVM side: `$PEREGRINE_LINUX_KERNEL`
/// with `$PEREGRINE_LINUX_MODULES`, or Debian's package (see [`debian_kernel`]).
pub fn kvm_kernel() -> Result<(PathBuf, PathBuf)> {
    if let (Some(k), Some(m)) = (
        std::env::var_os("PEREGRINE_LINUX_KERNEL"),
        std::env::var_os("PEREGRINE_LINUX_MODULES"),
    ) {
        return Ok((k.into(), m.into()));
    }
    let kernel = debian_kernel()?;
    let modules = modules_dir(&kernel)?;
    anyhow::ensure!(modules.is_dir(), "no modules at {}", modules.display());
    Ok((kernel, modules))
}

/// Builds the initramfs `name` in `dir`: busybox, the KVM modules, the runner, `files`
/// (name in the archive, file) and an `/init` that runs `runs` (see [`init_script`]).
fn build_initramfs(
    dir: &Path,
    name: &str,
    modules_dir: &Path,
    runner: &Path,
    files: &[(&str, &Path)],
    runs: &[(String, String)],
) -> Result<PathBuf> {
    let mut ramfs = Initramfs::new(&["bin", "dev", "proc", "sys", "lib", "lib/kvm"])?;
    ramfs.sh();
    let mut vendors = Vec::new();
    let mut added: Vec<String> = Vec::new();
    for (flag, module) in VENDOR_MODULES {
        let closure = module_closure(modules_dir, &[module])?;
        let new: Vec<(String, PathBuf)> = closure
            .iter()
            .filter(|(name, _)| !added.contains(name))
            .cloned()
            .collect();
        ramfs.modules("lib/kvm", &new)?;
        added.extend(new.into_iter().map(|(name, _)| name));
        vendors.push((flag, closure.into_iter().map(|(name, _)| name).collect()));
    }
    ramfs.file("init", 0o755, init_script(&vendors, runs).as_bytes());
    ramfs.copy(RUNNER, 0o755, runner)?;
    for (name, file) in files {
        ramfs.copy(name, 0o644, file)?;
    }
    let path = dir.join(format!("{name}.cpio"));
    ramfs.write(&path)?;
    Ok(path)
}

/// Boots Linux with KVM and runs the test guest of `images` under `vmm-kvm`: in QEMU
/// (`-cpu EPYC -icount shift=0 -smp 1`: KVM on software SVM) or in Bochs
/// (`corei7_skylake_x` from a GRUB ISO: KVM on VMX with EPT; minutes).
pub fn run_kvm_guest(images: &Images, guest: &KvmGuest, emulator: Emulator) -> Result<KvmRun> {
    let (kernel, modules_dir) = kvm_kernel()?;
    let runner = build_runner()?;
    let dir = workspace::out_dir("kvm")?;
    let initramfs = build_initramfs(
        &dir,
        &guest.name,
        &modules_dir,
        &runner,
        &[("guest-test", &images.guest_test())],
        &guest.runs(),
    )?;
    let mut spec = l1_spec(
        &guest.name,
        &kernel,
        &initramfs,
        &guest.config,
        512,
        guest.timeout,
    );
    if emulator == Emulator::Bochs {
        spec.icount = false;
        spec.extra_qemu_args.clear();
        spec.modules = vec![(initramfs, String::new())];
    }
    let run = crate::boot::run(emulator, &spec)?;
    let status = runner_status(&run.serial, guest.runs().len());
    Ok(KvmRun {
        run,
        status,
        kernel: crate::provenance::linux_kernel(&kernel),
    })
}

/// Guest RAM of the Linux guest under `vmm-kvm`, in MiB (as on Peregrine).
pub const LINUX_MEM_MIB: u32 = crate::linux::VMM_MEM_MIB;

/// The `vmm-kvm` command line that boots `guest` on the library's PC with `cpus` vCPUs
/// and the `/init` tests `tests` (the files as [`run_linux_on_kvm`] puts them).
pub fn linux_command(cpus: u32, tests: &str, timeout_s: u64) -> String {
    format!(
        "/{RUNNER} --linux /linux-kernel --initrd /linux-initramfs --disk /linux-disk \
         --cpus {cpus} --memory {LINUX_MEM_MIB} --timeout {timeout_s} --append \"{}\"",
        crate::linux::cmdline(tests)
    )
}

/// The spec that boots Linux with KVM in QEMU (`-cpu EPYC`, one CPU, 1 GiB; with
/// `-icount shift=0` when `icount`) and in it the Linux guest `guest` on the VMM
/// library's PC under `vmm-kvm`, with `cpus` vCPUs running the `/init` tests `tests`:
/// the same VMM and guest as `tests/tests/linux_vmm.rs` on Peregrine. `/init` prints
/// `KVMRUN config linux` when it starts the VMM and `KVMRUN status N` when it ended.
pub fn linux_on_kvm_spec(
    guest: &crate::linux::Guest,
    cpus: u32,
    tests: &str,
    timeout: Duration,
    icount: bool,
) -> Result<BootSpec> {
    let (kernel, modules_dir) = kvm_kernel()?;
    let runner = build_runner()?;
    let dir = workspace::out_dir("kvm")?;
    let name = format!("linux-on-kvm-smp{cpus}");
    let runs = [(
        "linux".to_string(),
        linux_command(cpus, tests, timeout.as_secs().saturating_sub(30).max(30)),
    )];
    let initramfs = build_initramfs(
        &dir,
        &name,
        &modules_dir,
        &runner,
        &[
            ("linux-kernel", &guest.kernel),
            ("linux-initramfs", &guest.initramfs),
            ("linux-disk", &guest.disk),
        ],
        &runs,
    )?;
    Ok(BootSpec {
        icount,
        ..l1_spec(&name, &kernel, &initramfs, "", 1024, timeout)
    })
}

/// The spec of an L1 Linux with KVM: Debian's `kernel` in QEMU (`-cpu EPYC`, one CPU,
/// `memory_mib`, `-icount shift=0`, never the host's KVM) in `config`
/// (`mitigations=…`, see [`baseline::cmdline`]) with `initramfs`, named `name`.
pub fn l1_spec(
    name: &str,
    kernel: &Path,
    initramfs: &Path,
    config: &str,
    memory_mib: u32,
    timeout: Duration,
) -> BootSpec {
    BootSpec {
        name: name.to_string(),
        kernel: kernel.to_path_buf(),
        kernel_args: baseline::cmdline(config),
        modules: Vec::new(),
        smp: 1,
        memory_mib,
        cpu_model: None,
        icount: true,
        allow_kvm: false,
        timeout,
        extra_qemu_args: vec!["-initrd".into(), initramfs.to_string_lossy().into_owned()],
        output: Output::Capture,
    }
}

/// Runs [`linux_on_kvm_spec`] under `-icount shift=0` (the vmexit baseline's mode).
pub fn run_linux_on_kvm(
    guest: &crate::linux::Guest,
    cpus: u32,
    tests: &str,
    timeout: Duration,
) -> Result<KvmRun> {
    let spec = linux_on_kvm_spec(guest, cpus, tests, timeout, true)?;
    let kernel = spec.kernel.clone();
    let run = crate::boot::run(Emulator::Qemu, &spec)?;
    let status = runner_status(&run.serial, 1);
    Ok(KvmRun {
        run,
        status,
        kernel: crate::provenance::linux_kernel(&kernel),
    })
}

/// Whether the KVM side can run here: the reason when it cannot (no kernel package,
/// no busybox, no QEMU), for tests that must say why they cannot run.
pub fn unavailable() -> Option<String> {
    if let Err(e) = deps::ensure(&[Tool::Qemu, Tool::Busybox]) {
        return Some(format!("{e:#}"));
    }
    if let Err(e) = kvm_kernel() {
        return Some(format!("no Linux kernel with KVM modules: {e:#}"));
    }
    if Command::new("cc").arg("--version").output().is_err() {
        return Some("no C toolchain (cc) to link the static runner".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_vendor_modules_and_reports_the_status() {
        let s = init_script(
            &[
                ("svm", vec!["kvm".into(), "kvm_amd".into()]),
                ("vmx", vec!["kvm".into(), "kvm_intel".into()]),
            ],
            &[(
                "default".into(),
                "/vmm-kvm --mode check --cpus 2 /guest-test".into(),
            )],
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("if $B grep -qw svm /proc/cpuinfo; then\n  $B insmod /lib/kvm/kvm.ko\n  $B insmod /lib/kvm/kvm_amd.ko\nelif"));
        assert!(s.contains(
            "echo \"KVMRUN config default\"\n/vmm-kvm --mode check --cpus 2 /guest-test\n\
             echo \"KVMRUN status $?\"\n"
        ));
        assert!(s.ends_with("poweroff -f\n"));
        let g = KvmGuest {
            seed: 7,
            runner_timeout_s: 30,
            ..KvmGuest::new("x", "hostile")
        };
        assert_eq!(
            g.runner_command(None),
            "/vmm-kvm --mode hostile --cpus 1 --seed 7 --timeout 30 /guest-test"
        );
        assert_eq!(g.runs().len(), 1);
        let b = KvmGuest {
            irqchips: vec!["kernel", "user"],
            ..KvmGuest::new("b", "bench")
        };
        let runs = b.runs();
        assert_eq!(runs[0].0, "irqchip=kernel");
        assert_eq!(
            runs[0].1,
            "/vmm-kvm --mode bench --cpus 1 --irqchip kernel /guest-test"
        );
        assert_eq!(runs[1].0, "irqchip=user");
    }

    #[test]
    fn the_log_is_cut_into_runs() {
        let log = "boot\nKVMRUN config irqchip=kernel\r\nBENCH a 1\nKVMRUN status 0\n\
                   KVMRUN config irqchip=user\nBENCH a 2\n";
        let s = sections(log);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "irqchip=kernel");
        assert!(s[0].1.contains("BENCH a 1") && !s[0].1.contains("BENCH a 2"));
        assert_eq!(s[1].1, "BENCH a 2\n");
    }

    #[test]
    fn runner_status_is_parsed() {
        assert_eq!(
            runner_status("a\nKVMRUN start\nKVMRUN status 0\r\n", 1),
            Some(0)
        );
        assert_eq!(runner_status("KVMRUN status 126\n", 1), Some(126));
        assert_eq!(runner_status("KVMRUN start\n", 1), None);
        let two = "KVMRUN status 0\nKVMRUN status 3\n";
        assert_eq!(runner_status(two, 2), Some(3));
        assert_eq!(
            runner_status("KVMRUN status 0\n", 2),
            None,
            "one run missing"
        );
    }
}
