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
      --no-linux             without the Linux guest (by default, with no --root, a VMM
                             boots it with 2 vCPUs; the first run fetches Debian's
                             kernel and builds the initramfs)
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
                             the Linux guest's diskbench on a 64-MiB virtio-blk scratch
                             disk (sequential read/write, 4 KiB random reads at queue
                             depth 1 and 32, S seconds each, default 3), booted from its
                             ext4 root directly in QEMU (-cpu EPYC, 1 vCPU): medians of N
                             runs (default 3); writes <target>/bench/disk.json (the
                             Peregrine side waits for the disk service)
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

fn run(mut args: Args) -> Result<ExitCode> {
    let mut emulator = Emulator::Qemu;
    let (mut smp, mut memory, mut timeout) = (1, 512, None);
    let (mut cpu, mut root_args, mut icount, mut profile) =
        (None, String::new(), false, Profile::Release);
    let mut kernel_args = Vec::new();
    let mut linux_guest = true;
    let mut smp_given = false;
    while let Some(a) = args.0.next() {
        match a.as_str() {
            "--no-linux" => linux_guest = false,
            "--emulator" => emulator = args.value(&a)?.parse()?,
            "--smp" => {
                smp = args.number(&a)?;
                smp_given = true;
            }
            "--memory" => memory = args.number(&a)?,
            "--timeout" => timeout = Some(args.number::<u64>(&a)?),
            "--cpu" => cpu = Some(args.value(&a)?),
            "--root" => root_args = args.value(&a)?,
            "--icount" => icount = true,
            "--debug" => profile = Profile::Debug,
            "--" => kernel_args.extend(args.0.by_ref()),
            _ => bail!("run: unknown option {a:?}\n{USAGE}"),
        }
    }
    // The production root (no scenarios), unless the root's arguments name a test or
    // benchmark, or the default run's Linux guest comes (its root runs the `vmm`
    // scenario, which waits for the VM's power-off).
    let default_vm = linux_guest && root_args.is_empty() && emulator == Emulator::Qemu;
    let scenarios = default_vm
        || root_args
            .split_whitespace()
            .any(|a| a.starts_with("test=") || a.starts_with("bench="));
    let images = xtask::build::build_with(profile, scenarios)?;
    let mut spec = BootSpec::new("run", &images)
        .kernel_args(&kernel_args.join(" "))
        .root_args(&root_args)
        .smp(smp)
        // No limit unless asked for: a person ends QEMU with Ctrl-A X.
        .timeout(Duration::from_secs(timeout.unwrap_or(7 * 24 * 3600)));
    spec.memory_mib = memory;
    spec.cpu_model = cpu;
    spec.icount = icount;
    spec.output = Output::Inherit;
    // The headline: with no root arguments, a VMM boots the Linux guest (when `cargo
    // xtask linux --prepare` left its files) with a shell on this terminal.
    // On a fresh machine it fetches Debian's kernel and builds the initramfs first.
    let linux = if default_vm {
        match xtask::linux::existing().map_or_else(xtask::linux::prepare, Ok) {
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
    if linux.is_some() && !smp_given {
        smp = 2;
        spec = spec.smp(smp);
    }
    if let Some(g) = &linux {
        eprintln!(
            "xtask: the VMM boots {} with {} vCPU(s) (--no-linux: without it)",
            g.kernel.display(),
            smp
        );
        spec = xtask::linux::with_vmm(spec, images.vmm(), g, smp, "", "interactive ")
            // The root waits (a year at most) for the VM's power-off, then ends QEMU.
            .root_args("test=vmm secs=31536000");
        spec.memory_mib = spec.memory_mib.max(memory);
    }
    if emulator == Emulator::Qemu {
        let kvm = xtask::qemu::uses_kvm(&spec);
        eprintln!(
            "xtask: booting in QEMU ({}); Ctrl-A X quits",
            if kvm { "KVM" } else { "TCG" }
        );
    } else {
        eprintln!("xtask: booting in Bochs from a GRUB ISO (serial output follows)");
    }
    let result = xtask::boot::run(emulator, &spec)?;
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
