//! `cargo xtask`: the command-line front end of the xtask library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use xtask::{BootSpec, Emulator, Exit, Output, Profile};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build [--debug]            build the kernel and NUL components (x86_64-unknown-none)
                             and check the kernel's Multiboot header
  run [options] [-- ARGS]    build and boot the default system; ARGS go on the kernel
                             command line
      --emulator qemu|bochs  emulator (default qemu; bochs boots a GRUB ISO, VMX)
      --smp N                number of CPUs and Linux vCPUs (default 2 with Linux, else 1)
      --guest FILE           instead of Linux, a VMM boots FILE, a Multiboot kernel (ELF32,
                             ELF64 or the a.out kludge), on its PC with QEMU's fw_cfg,
                             isa-debug-exit and pc-testdev; --smp N vCPUs (default 1)
      --append ARGS          the Multiboot kernel's command line
      --no-linux             without the Linux guest (by default, with no --root, a VMM
                             boots it with 2 vCPUs from its ext4 root on the system
                             disk; the first run fetches Debian's kernel and builds the
                             initramfs and the root)
      --disk FILE            the system disk: a raw GPT image, attached as QEMU's NVMe
                             controller and written in place (default
                             <target>/peregrine-disk.img, built on first use and kept
                             across runs: partition 1 peregrine-root the guest's ext4
                             root, partition 2 peregrine-data 64 MiB of scratch)
      --fresh-disk           rebuild the default system disk first (what the guest wrote
                             to it is lost)
      --part BINDING         the partition the VM gets, which the guest sees as
                             /dev/vda and mounts as its root: part=N (GPT entry N,
                             from 1), part=name:NAME, part=guid:GUID or
                             range=FIRST+COUNT (blocks); default part=name:peregrine-root
      --ram-disk             no system disk: the VMM's RAM disk (the pattern disk) and
                             the initramfs as the root, as before the disk service
      --memory MIB           guest memory (default 512)
      --cpu MODEL            CPU model (default: QEMU EPYC, or host with KVM; Bochs
                             corei7_skylake_x, trinity_apu for SVM)
      --root ARGS            arguments of the root task (e.g. test=ipc, bench=ipc)
      --timeout S            stop the emulator after S seconds (default: none)
      --icount               QEMU -icount shift=0 (TSC counts instructions)
      --debug                boot the debug build
  kvm-run [options]          boot Linux with KVM in QEMU (-cpu EPYC -icount shift=0) and
                             run guests/test under vmm-kvm (the KVM baseline's setup)
      --mode M               check, bench, hostile or loops: what the guest runs
                             (default check)
      --cpus N               guest vCPUs, 1 or 2 (default 1)
      --seed N               seed of the hostile mode
      --timeout S            the runner's own time limit (default: none)
      --emulator qemu|bochs  QEMU EPYC -icount (default) or Bochs skylake_x (VMX)
  test [--quick] [--filter X]
                             fmt, clippy, host unit tests, image build, emulator tests;
                             --quick leaves out the slow Bochs tests, --filter X runs
                             only tests whose name contains X
  linux [options]            the Linux guest (Debian's kernel, busybox initramfs with
                             its virtio modules, a disk image) booted directly in QEMU
      --smp N                vCPUs (default 1)
      --test LIST            run these /init tests and power off (all, or some of
                             nproc,kvmclock,disk,write,read; with --root also root,
                             persist-write, persist-check, crash-writer, crash-check);
                             default: a shell
      --root FILE            boot from an ext4 root image: FILE, written in place (a
                             copy of the built rootfs.img if FILE does not exist)
      --args ARGS            more kernel command line (peregrine.seed=N)
      --prepare              only fetch the kernel and build initramfs, disk and rootfs
  fuzz [--secs N] [TARGET..] build the VMM's fuzz targets (libFuzzer, stable toolchain)
                             and run each N seconds (default 60): emulator, virtqueue,
                             bzimage, devices
  bench ipc [--sel4 DIR] [--mitigations on|off|both] [--kernel-args ARGS] [--no-baseline]
                             IPC round-trip instruction counts under QEMU -icount,
                             beside Linux's pipe/futex ping-pong (Debian's kernel) and,
                             with --sel4, seL4's sel4bench images from DIR (its
                             mitigation-on/ and mitigation-off/ builds; without them a
                             row says so); writes <target>/bench/ipc.json and ipc.svg
  bench vmexit [--emulator bochs] [--mitigations …] [--kernel-args ARGS] [--no-baseline]
                             VM-exit round trips, Peregrine and Linux/KVM (vmm-kvm,
                             with guests/test, with KVM's in-kernel irqchip and with a
                             user-space one) under QEMU -cpu EPYC -icount (SVM), or
                             in Bochs corei7_skylake_x (VMX, minutes);
                             writes <target>/bench/vmexit.json and vmexit.svg
      --mitigations M        on, off or both (default both): every side with its
                             mitigations on and with mitigations=off on its kernel
                             command line; each row says which
      --kernel-args ARGS     more of Peregrine's kernel command line
      --no-baseline          Peregrine's side only
  bench gate                 the regression gate alone (also part of `test`): Peregrine's
                             side of ipc and vmexit against bench/expected.json
  bench --update-expected    measure it and rewrite bench/expected.json and the README's
                             table of its figures
  bench boot [--runs N] [--only SIDE]
                             Linux boot to the init marker and a virtio-blk read, on
                             Peregrine, directly in QEMU, under Linux/KVM in QEMU with
                             QEMU as the VMM and with our VMM (vmm-kvm) (-cpu EPYC,
                             1 vCPU): medians of N runs per side (default 3, about 70 s
                             a round); writes <target>/bench/boot.json; --only
                             peregrine|qemu-direct|kvm-l1|vmm-kvm runs one side
  bench disk [--runs N] [--secs S]
                             the Linux guest's diskbench on a 64-MiB scratch image
                             (sequential read/write, 4 KiB random reads at queue depth
                             1 and 32, S seconds each, default 3): on Peregrine (NVMe
                             driver and disk service, MSI-X and polled) and directly in
                             QEMU (virtio-blk), -cpu EPYC, 1 vCPU, 256 MiB: medians of N
                             runs per side (default 3); writes <target>/bench/disk.json
";

/// Command-line arguments, consumed front to back.
struct Args(std::vec::IntoIter<String>);

impl Args {
    fn value(&mut self, flag: &str) -> Result<String> {
        self.0
            .next()
            .with_context(|| format!("{flag} needs a value"))
    }

    fn number<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T> {
        let v = self.value(flag)?;
        v.parse()
            .ok()
            .with_context(|| format!("{flag}: not a number: {v:?}"))
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let mut args = Args(std::env::args().skip(1).collect::<Vec<_>>().into_iter());
    let Some(command) = args.0.next() else {
        print!("{USAGE}");
        return Ok(ExitCode::FAILURE);
    };
    match command.as_str() {
        "build" => build(args),
        "run" => run(args),
        "test" => test(args),
        "bench" => bench(args),
        "linux" => linux(args),
        "kvm-run" => kvm_run(args),
        "fuzz" => fuzz(args),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn build(args: Args) -> Result<ExitCode> {
    let mut profile = Profile::Release;
    for a in args.0 {
        match a.as_str() {
            "--debug" => profile = Profile::Debug,
            _ => bail!("build: unknown option {a:?}\n{USAGE}"),
        }
    }
    let images = xtask::build(profile)?;
    let header = xtask::build::check_kernel(&images.kernel())?;
    println!(
        "built {} (Multiboot header at {:#x}, entry {:#x}) and {}",
        images.kernel().display(),
        header.offset,
        header.entry_addr,
        images.root().display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The options of `run`.
#[derive(Debug, Clone, PartialEq)]
struct RunOptions {
    emulator: Emulator,
    smp: Option<u32>,
    memory: u32,
    timeout: Option<u64>,
    cpu: Option<String>,
    root_args: String,
    icount: bool,
    profile: Profile,
    kernel_args: Vec<String>,
    linux_guest: bool,
    /// `--disk FILE`: the user's system disk.
    disk: Option<std::path::PathBuf>,
    fresh_disk: bool,
    /// `--part BINDING`.
    part: Option<String>,
    ram_disk: bool,
    /// `--guest FILE`: a Multiboot kernel instead of Linux.
    guest: Option<std::path::PathBuf>,
    /// `--append ARGS`: its command line.
    append: String,
    help: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            emulator: Emulator::Qemu,
            smp: None,
            memory: 512,
            timeout: None,
            cpu: None,
            root_args: String::new(),
            icount: false,
            profile: Profile::Release,
            kernel_args: Vec::new(),
            linux_guest: true,
            disk: None,
            fresh_disk: false,
            part: None,
            ram_disk: false,
            guest: None,
            append: String::new(),
            help: false,
        }
    }
}

impl RunOptions {
    /// Parses `run`'s arguments and refuses combinations that mean nothing.
    fn parse(mut args: Args) -> Result<RunOptions> {
        let mut o = RunOptions::default();
        while let Some(a) = args.0.next() {
            match a.as_str() {
                "--no-linux" => o.linux_guest = false,
                "--emulator" => o.emulator = args.value(&a)?.parse()?,
                "--smp" => o.smp = Some(args.number(&a)?),
                "--memory" => o.memory = args.number(&a)?,
                "--timeout" => o.timeout = Some(args.number::<u64>(&a)?),
                "--cpu" => o.cpu = Some(args.value(&a)?),
                "--root" => o.root_args = args.value(&a)?,
                "--icount" => o.icount = true,
                "--debug" => o.profile = Profile::Debug,
                "--disk" => o.disk = Some(args.value(&a)?.into()),
                "--fresh-disk" => o.fresh_disk = true,
                "--part" => o.part = Some(args.value(&a)?),
                "--ram-disk" => o.ram_disk = true,
                "--guest" => o.guest = Some(args.value(&a)?.into()),
                "--append" => o.append = args.value(&a)?,
                "--help" | "-h" => o.help = true,
                "--" => o.kernel_args.extend(args.0.by_ref()),
                _ => bail!("run: unknown option {a:?}\n{USAGE}"),
            }
        }
        if o.guest.is_some() && (!o.root_args.is_empty() || !o.linux_guest) {
            bail!("run: --guest boots a Multiboot kernel in a VMM: no --root, no --no-linux");
        }
        if o.guest.is_none() && !o.append.is_empty() {
            bail!("run: --append is the command line of --guest's kernel");
        }
        let disk_options = o.disk.is_some() || o.fresh_disk || o.part.is_some();
        if disk_options && o.ram_disk {
            bail!("run: --ram-disk has no system disk: no --disk, --fresh-disk or --part");
        }
        if o.fresh_disk && o.disk.is_some() {
            bail!("run: --fresh-disk rebuilds the default disk, never --disk's");
        }
        if (disk_options || o.ram_disk) && !o.default_vm() {
            bail!(
                "run: --disk, --fresh-disk, --part and --ram-disk are for the default Linux VM \
                 (QEMU, no --no-linux, no --root)"
            );
        }
        Ok(o)
    }

    /// Whether the default Linux VM comes: QEMU, no `--no-linux`, no root arguments,
    /// no `--guest`.
    fn default_vm(&self) -> bool {
        self.linux_guest
            && self.root_args.is_empty()
            && self.emulator == Emulator::Qemu
            && self.guest.is_none()
    }
}

/// The part of [`USAGE`] about `command`: its line and its options.
fn usage_of(command: &str) -> String {
    let mut lines = USAGE.lines().skip_while(|l| {
        l.strip_prefix("  ")
            .is_none_or(|r| !r.starts_with(&format!("{command} ")))
    });
    let mut out = String::from("usage: cargo xtask ");
    if let Some(first) = lines.next() {
        out += first.trim_start();
        out.push('\n');
    }
    // Its options and continuation lines are indented further than a command's.
    for l in lines.take_while(|l| l.starts_with("   ")) {
        out += l;
        out.push('\n');
    }
    out
}

fn run(args: Args) -> Result<ExitCode> {
    let o = RunOptions::parse(args)?;
    if o.help {
        print!("{}", usage_of("run"));
        return Ok(ExitCode::SUCCESS);
    }
    let mut smp = o.smp.unwrap_or(1);
    // The production root (no scenarios), unless the root's arguments name a test or
    // benchmark, or the default run's Linux guest comes (its root runs the `vmm`
    // scenario, which waits for the VM's power-off).
    let default_vm = o.default_vm();
    let scenarios = default_vm
        || o.guest.is_some()
        || o.root_args
            .split_whitespace()
            .any(|a| a.starts_with("test=") || a.starts_with("bench="));
    let images = xtask::build::build_with(o.profile, scenarios)?;
    let mut spec = BootSpec::new("run", &images)
        .kernel_args(&o.kernel_args.join(" "))
        .root_args(&o.root_args)
        .smp(smp)
        // No limit unless asked for: a person ends QEMU with Ctrl-A X.
        .timeout(Duration::from_secs(o.timeout.unwrap_or(7 * 24 * 3600)));
    spec.memory_mib = o.memory;
    spec.cpu_model = o.cpu.clone();
    spec.icount = o.icount;
    spec.output = Output::Inherit;
    // The headline: with no root arguments, a VMM boots the Linux guest (when `cargo
    // xtask linux --prepare` left its files) with a shell on this terminal.
    // On a fresh machine it fetches Debian's kernel and builds the initramfs first.
    let linux = if default_vm {
        // The system disk is built from the ext4 root, which an older prepare lacks.
        let found = xtask::linux::existing().filter(|g| o.ram_disk || g.rootfs.is_file());
        match found.map_or_else(xtask::linux::prepare, Ok) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("xtask: cannot prepare the Linux guest ({e:#}): the bare system");
                None
            }
        }
    } else {
        None
    };
    // Two vCPUs on two CPUs unless `--smp` says otherwise.
    if linux.is_some() && o.smp.is_none() {
        smp = 2;
        spec = spec.smp(smp);
    }
    if let Some(g) = &linux {
        if o.ram_disk {
            eprintln!(
                "xtask: the VMM boots {} with {} vCPU(s) and its RAM disk (--no-linux: \
                 without it)",
                g.kernel.display(),
                smp
            );
            spec = xtask::linux::with_vmm(spec, images.vmm(), g, smp, "", "interactive ")
                // The root waits (a year at most) for the VM's power-off, then ends QEMU.
                .root_args("test=vmm secs=31536000");
        } else {
            let vm = system_disk_vm(&o, g, smp)?;
            spec = xtask::sysdisk::linux_on_nvme_spec(spec, &images, g, &vm);
        }
        spec.memory_mib = spec.memory_mib.max(o.memory);
    }
    if let Some(file) = &o.guest {
        spec = with_multiboot_guest(spec, &images, file, &o.append, smp)?;
    }
    if o.emulator == Emulator::Qemu {
        let kvm = xtask::qemu::uses_kvm(&spec);
        eprintln!(
            "xtask: booting in QEMU ({}); Ctrl-A X quits",
            if kvm { "KVM" } else { "TCG" }
        );
    } else {
        eprintln!("xtask: booting in Bochs from a GRUB ISO (serial output follows)");
    }
    let result = xtask::boot::run(o.emulator, &spec)?;
    eprintln!(
        "\nxtask: {:?} after {:.1} s",
        result.exit,
        result.wall.as_secs_f64()
    );
    Ok(if result.exit == Exit::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `spec` with a VMM booting the Multiboot kernel `file` (its command line `append`) on
/// `cpus` vCPUs, its COM1 on this terminal; the root waits for the VM's end and
/// reports it (an isa-debug-exit status of 1, the guest's 0, counts as success).
fn with_multiboot_guest(
    spec: BootSpec,
    images: &xtask::build::Images,
    file: &std::path::Path,
    append: &str,
    cpus: u32,
) -> Result<BootSpec> {
    if !file.is_file() {
        bail!("run: --guest {}: no such file", file.display());
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!(
        "xtask: the VMM boots the Multiboot kernel {} with {cpus} vCPU(s), command line {append:?}",
        file.display()
    );
    Ok(spec
        .root_args("test=vmm secs=31536000")
        .module(
            images.vmm(),
            &format!(
                "name=guest guest={name} cpus={cpus} mem=128 mode=multiboot cpu=0 interactive -- {append}"
            ),
        )
        .module(file.to_path_buf(), ""))
}

/// The default VM on the system disk: `--disk`'s image (which must exist) or the
/// default one (built from `g`'s root when missing or `--fresh-disk`), the partition
/// `--part` names checked on it, the shell on this terminal.
fn system_disk_vm(
    o: &RunOptions,
    g: &xtask::linux::Guest,
    cpus: u32,
) -> Result<xtask::sysdisk::NvmeVm> {
    use xtask::sysdisk;
    let image = match &o.disk {
        Some(d) => {
            if !d.is_file() {
                bail!(
                    "run: --disk {}: no such image (without --disk, run builds and keeps \
                     its own)",
                    d.display()
                );
            }
            d.clone()
        }
        None => {
            let d = sysdisk::default_path()?;
            if sysdisk::ensure(&d, &g.rootfs, o.fresh_disk)? {
                eprintln!(
                    "xtask: built the system disk {} ({} on partition 1, {}; {} MiB of \
                     scratch on partition 2, {})",
                    d.display(),
                    g.rootfs.display(),
                    sysdisk::ROOT_NAME,
                    sysdisk::DATA_MIB,
                    sysdisk::DATA_NAME
                );
            }
            d
        }
    };
    let binding = o.part.as_deref().unwrap_or(sysdisk::DEFAULT_BINDING);
    let bounds = sysdisk::resolve(&image, binding)?;
    eprintln!(
        "xtask: the VMM boots {} with {cpus} vCPU(s) from {binding} of {} (blocks {}+{}, \
         /dev/vda in the guest; --ram-disk: without the disk)",
        g.kernel.display(),
        image.display(),
        bounds.first_lba,
        bounds.blocks
    );
    Ok(sysdisk::NvmeVm {
        binding: binding.into(),
        cpus,
        interactive: true,
        ..sysdisk::NvmeVm::new(&image)
    })
}

fn test(mut args: Args) -> Result<ExitCode> {
    let mut opts = xtask::suite::Options::default();
    while let Some(a) = args.0.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--filter" => opts.filter = Some(args.value(&a)?),
            _ => bail!("test: unknown option {a:?}\n{USAGE}"),
        }
    }
    let summary = xtask::suite::run(&opts)?;
    Ok(if summary.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench(mut args: Args) -> Result<ExitCode> {
    let name = args.0.next().unwrap_or_else(|| "ipc".to_string());
    match name.as_str() {
        "--update-expected" => {
            xtask::gate::update()?;
            return Ok(ExitCode::SUCCESS);
        }
        "gate" => {
            xtask::gate::check(true)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut emulator = Emulator::Qemu;
    let mut only = None;
    let mut runs = xtask::bench_boot::RUNS;
    let mut secs = xtask::bench_disk::RANDOM_SECS;
    let mut opts = xtask::bench::Options::default();
    while let Some(a) = args.0.next() {
        match a.as_str() {
            "--emulator" if name == "vmexit" => emulator = args.value(&a)?.parse()?,
            "--only" if name == "boot" => only = Some(args.value(&a)?),
            "--runs" if name == "boot" || name == "disk" => runs = args.number(&a)?,
            "--secs" if name == "disk" => secs = args.number(&a)?,
            "--sel4" if name == "ipc" => opts.sel4 = Some(args.value(&a)?.into()),
            "--mitigations" if name != "boot" && name != "disk" => {
                let (on, off) = (
                    xtask::bench::MITIGATIONS_ON.to_string(),
                    xtask::bench::MITIGATIONS_OFF.to_string(),
                );
                opts.configs = match args.value(&a)?.as_str() {
                    "on" => vec![on],
                    "off" => vec![off],
                    "both" => vec![on, off],
                    m => bail!("bench: --mitigations on, off or both, not {m:?}"),
                }
            }
            "--kernel-args" if name != "boot" && name != "disk" => {
                opts.kernel_args = args.value(&a)?
            }
            "--no-baseline" if name != "boot" && name != "disk" => opts.baseline = false,
            _ => bail!("bench: unexpected argument {a:?}\n{USAGE}"),
        }
    }
    if name == "boot" {
        xtask::bench_boot::bench(only.as_deref(), runs)?;
    } else if name == "disk" {
        xtask::bench_disk::bench(runs, secs)?;
    } else if emulator == Emulator::Bochs {
        xtask::bench_vmexit::bench(emulator, &opts)?;
    } else {
        xtask::bench::bench(&name, &opts)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn linux(mut args: Args) -> Result<ExitCode> {
    let mut run = xtask::linux::Run {
        name: "linux-qemu".into(),
        smp: 1,
        tests: String::new(),
        interactive: true,
        timeout: Duration::from_secs(24 * 3600),
        ..Default::default()
    };
    let mut prepare_only = false;
    while let Some(a) = args.0.next() {
        match a.as_str() {
            "--smp" => run.smp = args.number(&a)?,
            "--test" => run.tests = args.value(&a)?,
            "--root" => run.root = Some(args.value(&a)?.into()),
            "--args" => run.args = args.value(&a)?,
            "--prepare" => prepare_only = true,
            _ => bail!("linux: unknown option {a:?}\n{USAGE}"),
        }
    }
    let guest = xtask::linux::prepare()?;
    eprintln!(
        "xtask: kernel {}\nxtask: initramfs {}\nxtask: disk {} (md5 {})\nxtask: rootfs {}",
        guest.kernel.display(),
        guest.initramfs.display(),
        guest.disk.display(),
        guest.disk_md5,
        guest.rootfs.display()
    );
    if prepare_only {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(root) = &run.root {
        if !root.exists() {
            std::fs::copy(&guest.rootfs, root)
                .with_context(|| format!("copying the rootfs to {}", root.display()))?;
        }
    }
    if !run.tests.is_empty() && (run.root.is_some() || !run.args.is_empty()) {
        // The storage tests' results depend on earlier boots: shown, not judged.
        run.interactive = false;
        run.timeout = Duration::from_secs(600);
        let r = xtask::linux::boot_qemu(&guest, &run)?;
        for (name, result, detail) in xtask::linux::test_results(&r.serial) {
            println!("{name}: {result} {detail}");
        }
        println!("{:?} after {:.1} s", r.exit, r.wall.as_secs_f64());
        return Ok(ExitCode::SUCCESS);
    }
    if !run.tests.is_empty() {
        let r = xtask::linux::check_qemu(&guest, run.smp, &run.tests)?;
        for (name, result, detail) in xtask::linux::test_results(&r.serial) {
            println!("{name}: {result} {detail}");
        }
        println!(
            "marker at guest uptime {:.2} s; QEMU ran {:.1} s",
            xtask::linux::marker_uptime(&r.serial).unwrap_or(f64::NAN),
            r.wall.as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let r = xtask::linux::boot_qemu(&guest, &run)?;
    eprintln!("\nxtask: {:?} after {:.1} s", r.exit, r.wall.as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn kvm_run(mut args: Args) -> Result<ExitCode> {
    let mut guest = xtask::baseline_kvm::KvmGuest::new("kvm-run", "check");
    let mut emulator = Emulator::Qemu;
    while let Some(a) = args.0.next() {
        match a.as_str() {
            "--mode" => {
                guest.mode = match args.value(&a)?.as_str() {
                    "check" => "check",
                    "bench" => "bench",
                    "hostile" => "hostile",
                    "loops" => "loops",
                    m => bail!("kvm-run: unknown mode {m:?}"),
                }
            }
            "--cpus" => guest.cpus = args.number(&a)?,
            "--seed" => guest.seed = args.number(&a)?,
            "--timeout" => guest.runner_timeout_s = args.number(&a)?,
            "--emulator" => emulator = args.value(&a)?.parse()?,
            _ => bail!("kvm-run: unknown option {a:?}\n{USAGE}"),
        }
    }
    guest.timeout = Duration::from_secs(guest.runner_timeout_s + 900);
    let images = xtask::build(Profile::Release)?;
    let r = xtask::baseline_kvm::run_kvm_guest(&images, &guest, emulator)?;
    print!("{}", r.run.serial);
    eprintln!(
        "xtask: {:?} after {:.1} s; runner status {:?}; serial log {}",
        r.run.exit,
        r.run.wall.as_secs_f64(),
        r.status,
        r.run.serial_log.display()
    );
    Ok(if r.status == Some(0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn fuzz(mut args: Args) -> Result<ExitCode> {
    let mut secs = 60;
    let mut targets = Vec::new();
    while let Some(a) = args.0.next() {
        match a.as_str() {
            "--secs" => secs = args.number(&a)?,
            t if !t.starts_with('-') => targets.push(t.to_string()),
            _ => bail!("fuzz: unknown option {a:?}\n{USAGE}"),
        }
    }
    xtask::fuzz::run(&targets, secs)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<RunOptions> {
        RunOptions::parse(Args(
            a.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into_iter(),
        ))
    }

    #[test]
    fn run_takes_the_disk_options() {
        let o = parse(&["--disk", "/d/my.img", "--part", "part=2", "--", "x"]).unwrap();
        assert_eq!(o.disk.as_deref(), Some(std::path::Path::new("/d/my.img")));
        assert_eq!(o.part.as_deref(), Some("part=2"));
        assert_eq!(o.kernel_args, ["x"]);
        assert!(o.default_vm());
        let o = parse(&["--fresh-disk"]).unwrap();
        assert!(o.fresh_disk && o.disk.is_none());
        assert!(parse(&["--ram-disk", "--smp", "1"]).unwrap().ram_disk);
        assert_eq!(parse(&[]).unwrap(), RunOptions::default());
        assert!(parse(&["--help"]).unwrap().help);
    }

    #[test]
    fn run_refuses_disk_options_that_mean_nothing() {
        for a in [
            &["--ram-disk", "--disk", "x"][..],
            &["--ram-disk", "--part", "part=1"],
            &["--fresh-disk", "--disk", "x"],
            &["--no-linux", "--part", "part=1"],
            &["--root", "test=ipc", "--disk", "x"],
            &["--emulator", "bochs", "--fresh-disk"],
            &["--emulator", "bochs", "--ram-disk"],
            &["--disk"],
            &["--disks", "x"],
        ] {
            assert!(parse(a).is_err(), "{a:?}");
        }
    }

    #[test]
    fn run_takes_a_multiboot_guest() {
        let o = parse(&[
            "--guest",
            "/k/test.elf",
            "--append",
            "mode=pc x=1",
            "--smp",
            "2",
        ])
        .unwrap();
        assert_eq!(
            o.guest.as_deref(),
            Some(std::path::Path::new("/k/test.elf"))
        );
        assert_eq!((o.append.as_str(), o.smp), ("mode=pc x=1", Some(2)));
        assert!(!o.default_vm());
        for a in [
            &["--append", "x"][..],
            &["--guest", "k", "--root", "test=ipc"],
            &["--guest", "k", "--no-linux"],
            &["--guest", "k", "--ram-disk"],
            &["--guest"],
        ] {
            assert!(parse(a).is_err(), "{a:?}");
        }
    }

    #[test]
    fn run_help_is_the_run_section() {
        let u = usage_of("run");
        assert!(
            u.starts_with("usage: cargo xtask run [options] [-- ARGS]"),
            "{u}"
        );
        for flag in [
            "--disk FILE",
            "--fresh-disk",
            "--part BINDING",
            "--ram-disk",
            "--debug",
        ] {
            assert!(u.contains(flag), "{flag}: {u}");
        }
        assert!(!u.contains("kvm-run"), "{u}");
        assert!(usage_of("kvm-run").contains("--mode M"));
    }
}
