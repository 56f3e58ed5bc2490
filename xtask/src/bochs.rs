//! Booting the system in Bochs from a GRUB ISO (the VMX lab: `corei7_skylake_x` offers
//! VMX with EPT; `trinity_apu` offers SVM with NPT).
//!
//! Bochs has no `isa-debug-exit`: the guest ends Bochs by writing `Shutdown` to port
//! 0x8900, and the run is judged from the serial log's markers.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::deps::{self, BIOS, VGA_BIOS};
use crate::process::{run_with_timeout, Ended};
use crate::spec::{failure_lines, BootSpec, Exit, Output, RunResult};
use crate::workspace;

/// Default CPU model: VMX with EPT, VPID and unrestricted guest.
pub const DEFAULT_CPU: &str = "corei7_skylake_x";
/// What Bochs logs when the guest wrote `Shutdown` to port 0x8900.
const SHUTDOWN_MARK: &str = "shutdown requested";

/// The file name a module gets on the ISO: `/boot/<file name>`; duplicates get a suffix.
fn iso_names(spec: &BootSpec) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let files = std::iter::once(&spec.kernel).chain(spec.modules.iter().map(|(p, _)| p));
    for path in files {
        let base = path
            .file_name()
            .map_or("module".into(), |n| n.to_string_lossy().into_owned());
        let mut name = base.clone();
        let mut i = 1;
        while names.contains(&name) {
            i += 1;
            name = format!("{base}.{i}");
        }
        names.push(name);
    }
    names
}

/// Whether `spec` boots a Linux kernel (a file named `vmlinuz*`): GRUB's `linux` and
/// `initrd` commands (the modules are the initrds) instead of `multiboot`/`module`.
pub fn is_linux(spec: &BootSpec) -> bool {
    spec.kernel
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
}

/// The `grub.cfg` that boots `spec` (GRUB's own output stays on the VGA console, so the
/// serial log holds only what the system prints).
pub fn grub_cfg(spec: &BootSpec) -> String {
    let names = iso_names(spec);
    let mut cfg = String::from("set timeout=0\nset default=0\n\nmenuentry \"Peregrine\" {\n");
    let line = |cmd: &str, name: &str, args: &str| {
        format!(
            "    {cmd} /boot/{name}{}{args}\n",
            if args.is_empty() { "" } else { " " }
        )
    };
    if is_linux(spec) {
        cfg += &line("linux", &names[0], &spec.kernel_args);
        for name in &names[1..] {
            cfg += &line("initrd", name, "");
        }
        cfg += "    boot\n}\n";
        return cfg;
    }
    cfg += &line("multiboot", &names[0], &spec.kernel_args);
    // GRUB hands a module only the words after its file name, QEMU the whole entry:
    // the module's own name goes first, so both give `name args` (the root names
    // components after it).
    for ((path, args), name) in spec.modules.iter().zip(&names[1..]) {
        let own = path
            .file_name()
            .map_or("module".into(), |n| n.to_string_lossy().into_owned());
        let words = if args.is_empty() {
            own
        } else {
            format!("{own} {args}")
        };
        cfg += &line("module", name, &words);
    }
    cfg += "    boot\n}\n";
    cfg
}

/// Builds a GRUB ISO for `spec` in `dir` and returns its path.
pub fn build_iso(spec: &BootSpec, dir: &Path) -> Result<PathBuf> {
    deps::ensure(&[deps::Tool::Grub])?;
    let root = dir.join("iso");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let boot = root.join("boot");
    std::fs::create_dir_all(boot.join("grub"))?;
    let names = iso_names(spec);
    let files = std::iter::once(&spec.kernel).chain(spec.modules.iter().map(|(p, _)| p));
    for (path, name) in files.zip(&names) {
        std::fs::copy(path, boot.join(name))
            .with_context(|| format!("copying {} into the ISO", path.display()))?;
    }
    std::fs::write(boot.join("grub/grub.cfg"), grub_cfg(spec))?;
    let iso = dir.join("peregrine.iso");
    let log = dir.join("grub-mkrescue.log");
    let out = Command::new("grub-mkrescue")
        .args(["-d", "/usr/lib/grub/i386-pc", "-o"])
        .arg(&iso)
        .arg(&root)
        .stdin(Stdio::null())
        .output()
        .context("running grub-mkrescue")?;
    std::fs::write(
        &log,
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )?;
    anyhow::ensure!(
        out.status.success(),
        "grub-mkrescue failed ({}); see {}",
        out.status,
        log.display()
    );
    Ok(iso)
}

/// Instructions per second of Bochs' emulated clock (see [`bochsrc`]).
pub const BOCHS_IPS: u64 = 40_000_000;

/// The bochsrc for booting `iso`, serial output to `serial_log`.
pub fn bochsrc(spec: &BootSpec, iso: &Path, serial_log: &Path, log: &Path) -> String {
    let model = spec.cpu_model.as_deref().unwrap_or(DEFAULT_CPU);
    let mut rc = String::new();
    let _ = writeln!(rc, "megs: {}", spec.memory_mib);
    // Bochs' emulated clock runs at `ips` instructions per second (default 4 M, i.e.
    // a 1 kHz timer tick every 4,000 instructions: too little for a kernel's tick path
    // plus any work). 40 M is about the speed Bochs really has here, so emulated time
    // passes roughly like wall time.
    let _ = writeln!(
        rc,
        "cpu: model={model}, count={}, ips={BOCHS_IPS}, reset_on_triple_fault=0",
        spec.smp
    );
    let _ = writeln!(rc, "romimage: file={BIOS}");
    let _ = writeln!(rc, "vgaromimage: file={VGA_BIOS}");
    let _ = writeln!(
        rc,
        "ata0-master: type=cdrom, path={}, status=inserted",
        iso.display()
    );
    let _ = writeln!(rc, "boot: cdrom");
    let _ = writeln!(
        rc,
        "com1: enabled=1, mode=file, dev={}",
        serial_log.display()
    );
    // Debian's Bochs has no `nogui`; rfb without waiting for a viewer works headless.
    let _ = writeln!(rc, "display_library: rfb, options=\"timeout=0\"");
    // Without a sound configuration, Debian's Bochs 2.7 aborts at start ("buffer
    // overflow detected") once its ALSA plugin finds none (seen on a fresh machine):
    // the dummy drivers keep it away from the host's sound system.
    let _ = writeln!(
        rc,
        "sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy"
    );
    let _ = writeln!(rc, "clock: sync=none, time0=local");
    let _ = writeln!(rc, "log: {}", log.display());
    let _ = writeln!(rc, "panic: action=fatal");
    let _ = writeln!(rc, "error: action=report");
    let _ = writeln!(rc, "info: action=report");
    rc
}

/// Judges a Bochs run from how it ended, its serial log and its own log.
pub fn judge(ended: Ended, serial: &str, bochs_log: &str) -> Exit {
    if !failure_lines(serial).is_empty() {
        return Exit::Failure;
    }
    match ended {
        Ended::TimedOut => Exit::Timeout,
        Ended::Exited(_) if bochs_log.contains(SHUTDOWN_MARK) => Exit::Success,
        Ended::Exited(status) => Exit::Other(status.code().unwrap_or(-1)),
    }
}

/// Boots `spec` in Bochs from a GRUB ISO and waits for it to end, at most
/// `spec.timeout`.
pub fn run_bochs(spec: &BootSpec) -> Result<RunResult> {
    deps::ensure(&[deps::Tool::Bochs, deps::Tool::Grub])?;
    let dir = workspace::out_dir(&format!("bochs/{}", spec.name))?;
    let iso = build_iso(spec, &dir)?;
    let logs = workspace::out_dir("emulator")?;
    let serial_log = logs.join(format!("{}.serial.log", spec.name));
    let bochs_log = logs.join(format!("{}.bochs.log", spec.name));
    File::create(&serial_log)?;
    File::create(&bochs_log)?;
    let rc_file = dir.join("bochsrc");
    std::fs::write(&rc_file, bochsrc(spec, &iso, &serial_log, &bochs_log))?;
    // Built with its debugger: start it with a script that says "continue".
    let cont = dir.join("continue.rc");
    std::fs::write(&cont, "c\n")?;
    let mut cmd = Command::new("bochs");
    cmd.arg("-q")
        .arg("-f")
        .arg(&rc_file)
        .arg("-rc")
        .arg(&cont)
        .stdin(Stdio::null());
    let out = File::create(dir.join("bochs.out"))?;
    cmd.stdout(out.try_clone()?).stderr(out);
    let stop = Arc::new(AtomicBool::new(false));
    let follower = (spec.output == Output::Inherit).then(|| {
        let (path, stop) = (serial_log.clone(), stop.clone());
        std::thread::spawn(move || follow(&path, &stop))
    });
    let ended = run_with_timeout(&mut cmd, spec.timeout);
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = follower {
        let _ = f.join();
    }
    let (ended, wall) = ended?;
    let serial: String = String::from_utf8_lossy(&std::fs::read(&serial_log)?).into();
    let log = String::from_utf8_lossy(&std::fs::read(&bochs_log).unwrap_or_default()).into_owned();
    let exit = judge(ended, &serial, &log);
    let mut emulator_output = format!("{}\n", workspace::describe(&cmd));
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    emulator_output.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
    Ok(RunResult {
        exit,
        serial,
        wall,
        serial_log,
        emulator_output,
    })
}

/// Copies what appears in the file at `path` to stdout until `stop` is set.
fn follow(path: &Path, stop: &AtomicBool) {
    let Ok(mut file) = File::open(path) else {
        return;
    };
    let mut buf = [0u8; 4096];
    loop {
        let done = stop.load(Ordering::Relaxed);
        while let Ok(n @ 1..) = file.read(&mut buf) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
        }
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BootSpec {
        BootSpec {
            name: "t".into(),
            kernel: "/out/peregrine".into(),
            kernel_args: "exit_after_boot".into(),
            modules: vec![
                ("/out/nul-root".into(), "test=ipc".into()),
                ("/x/nul-root".into(), String::new()),
            ],
            smp: 2,
            memory_mib: 512,
            cpu_model: None,
            icount: false,
            allow_kvm: false,
            timeout: Duration::from_secs(1),
            extra_qemu_args: Vec::new(),
            output: Output::Capture,
        }
    }

    #[test]
    fn grub_cfg_loads_kernel_and_modules_with_args() {
        let cfg = grub_cfg(&spec());
        assert!(
            cfg.contains("    multiboot /boot/peregrine exit_after_boot\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("    module /boot/nul-root nul-root test=ipc\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("    module /boot/nul-root.2 nul-root\n"),
            "{cfg}"
        );
    }

    #[test]
    fn grub_cfg_boots_linux_with_initrd() {
        let mut s = spec();
        s.kernel = "/k/vmlinuz-6.1.0-56-amd64".into();
        s.kernel_args = "console=ttyS0 quiet".into();
        s.modules = vec![("/k/initramfs.cpio".into(), String::new())];
        let cfg = grub_cfg(&s);
        assert!(
            cfg.contains("    linux /boot/vmlinuz-6.1.0-56-amd64 console=ttyS0 quiet\n    initrd /boot/initramfs.cpio\n    boot\n"),
            "{cfg}"
        );
        assert!(!is_linux(&spec()));
    }

    #[test]
    fn bochsrc_has_cpu_count_and_serial_file() {
        let rc = bochsrc(
            &spec(),
            Path::new("/i.iso"),
            Path::new("/s.log"),
            Path::new("/b.log"),
        );
        assert!(rc.contains("cpu: model=corei7_skylake_x, count=2,"), "{rc}");
        assert!(rc.contains("com1: enabled=1, mode=file, dev=/s.log"));
        assert!(rc.contains("ata0-master: type=cdrom, path=/i.iso, status=inserted"));
        // A fresh machine has no ALSA configuration: Bochs must not touch it.
        assert!(
            rc.contains("sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy"),
            "{rc}"
        );
    }

    #[test]
    fn judged_by_markers_and_shutdown() {
        use std::os::unix::process::ExitStatusExt;
        let ok = Ended::Exited(std::process::ExitStatus::from_raw(0));
        let log = "Shutdown port: shutdown requested";
        assert_eq!(judge(ok, "PASS ipc\n", log), Exit::Success);
        assert_eq!(judge(ok, "FAIL ipc: x\n", log), Exit::Failure);
        assert_eq!(judge(ok, "KERNEL PANIC\n", ""), Exit::Failure);
        assert_eq!(judge(Ended::TimedOut, "boot ok\n", ""), Exit::Timeout);
        assert_eq!(judge(ok, "", ""), Exit::Other(0));
    }
}
