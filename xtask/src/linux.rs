//! The Linux guest (`guests/linux`): Debian's distribution kernel, a busybox initramfs
//! with the kernel's virtio modules and `guests/linux/init`, and a disk image with known
//! contents; and booting them directly in QEMU (the baseline side of `bench boot`).
//!
//! Why the distribution kernel and not one built from Debian's source: see
//! `guests/linux/README.md` (boot time measured, and nothing to build or cache).
//!
//! Everything lands in `<target>/linux/guest/`: `initramfs.cpio`, `disk.img` and
//! `disk.md5`; the kernel stays where [`debian_kernel`] unpacked it, beside its
//! modules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::boot::{BootSpec, Exit, Output, RunResult};
use crate::guest_linux::{debian_kernel, module_closure, modules_dir, newest_vmlinuz, Initramfs};
use crate::workspace;

/// The line `/init` prints once the modules are loaded and the disk is there.
pub const MARKER: &str = "PEREGRINE-LINUX-READY";
/// Prefix of each test's result line.
pub const TEST_PREFIX: &str = "PEREGRINE-TEST ";
/// The init script.
const INIT: &str = include_str!("../../guests/linux/init");
/// The distribution kernel's modules the guest needs (virtio over PCI, block,
/// console); what they depend on comes along, loaded first.
pub const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console"];
/// Size of the disk image.
pub const DISK_SIZE: usize = 8 << 20;
/// Every test `/init` knows, in the order `peregrine.test=all` runs them.
pub const ALL_TESTS: &str = "nproc,kvmclock,disk,write,read";

/// The guest's files.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The busybox initramfs (newc cpio).
    pub initramfs: PathBuf,
    /// The raw disk image.
    pub disk: PathBuf,
    /// The disk image's MD5, as `md5sum` prints it.
    pub disk_md5: String,
}

/// The disk: a header line, then bytes from a fixed xorshift sequence, so its checksum
/// is the same on every machine and any lost or misplaced block shows.
pub fn disk_image() -> Vec<u8> {
    let mut d = Vec::with_capacity(DISK_SIZE);
    d.extend_from_slice(b"PEREGRINE-DISK v1\n");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while d.len() < DISK_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.extend_from_slice(&x.to_le_bytes());
    }
    d.truncate(DISK_SIZE);
    d
}

/// The MD5 of `data` in hex.
pub fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The initramfs: busybox, `/init`, the modules under `/lib/modules/`, `/etc/modules`
/// (their load order) and `/etc/disk.md5`.
pub fn build_initramfs(kernel: &Path, disk_md5: &str, out: &Path) -> Result<()> {
    let modules = module_closure(&modules_dir(kernel)?, MODULES)?;
    let mut ramfs = Initramfs::new(&[
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "tmp",
    ])?;
    ramfs.sh();
    ramfs.file("init", 0o755, INIT.as_bytes());
    let names: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    ramfs.file(
        "etc/modules",
        0o644,
        format!("{}\n", names.join("\n")).as_bytes(),
    );
    ramfs.file("etc/disk.md5", 0o644, format!("{disk_md5}\n").as_bytes());
    ramfs.modules("lib/modules", &modules)?;
    ramfs.write(out)
}

/// Fetches the kernel (once) and builds the initramfs and the disk image.
pub fn prepare() -> Result<Guest> {
    let kernel = debian_kernel()?;
    let dir = workspace::out_dir("linux/guest")?;
    let disk = dir.join("disk.img");
    let data = disk_image();
    let disk_md5 = md5_hex(&data);
    std::fs::write(&disk, &data)?;
    std::fs::write(dir.join("disk.md5"), format!("{disk_md5}  disk.img\n"))?;
    let initramfs = dir.join("initramfs.cpio");
    build_initramfs(&kernel, &disk_md5, &initramfs)?;
    Ok(Guest {
        kernel,
        initramfs,
        disk,
        disk_md5,
    })
}

/// How to boot the guest directly in QEMU.
#[derive(Debug, Clone)]
pub struct Run {
    /// Log name.
    pub name: String,
    /// vCPUs.
    pub smp: u32,
    /// `peregrine.test=` value; empty: the interactive shell.
    pub tests: String,
    /// Console to this terminal instead of a captured log.
    pub interactive: bool,
    /// Time limit.
    pub timeout: Duration,
}

/// The kernel command line.
pub fn cmdline(tests: &str) -> String {
    let mut c = String::from("console=ttyS0 panic=-1 rdinit=/init");
    if !tests.is_empty() {
        c += " quiet peregrine.test=";
        c += tests;
    }
    c
}

/// Boots `guest` in QEMU (software emulation, `-cpu EPYC`, 256 MiB, the disk as a
/// modern-only virtio-blk PCI device in snapshot mode, so the image stays as built).
pub fn boot_qemu(guest: &Guest, run: &Run) -> Result<RunResult> {
    let drive = format!(
        "file={},if=none,id=vda,format=raw,snapshot=on",
        crate::qemu::escape_commas(&guest.disk.to_string_lossy())
    );
    let spec = BootSpec {
        name: run.name.clone(),
        kernel: guest.kernel.clone(),
        kernel_args: cmdline(&run.tests),
        modules: Vec::new(),
        smp: run.smp,
        memory_mib: 256,
        cpu_model: None,
        icount: false,
        allow_kvm: false,
        timeout: run.timeout,
        extra_qemu_args: vec![
            "-initrd".into(),
            guest.initramfs.to_string_lossy().into_owned(),
            "-drive".into(),
            drive,
            "-device".into(),
            "virtio-blk-pci,drive=vda,disable-legacy=on".into(),
        ],
        output: if run.interactive {
            Output::Inherit
        } else {
            Output::Capture
        },
    };
    crate::qemu::run_qemu(&spec)
}

/// The `PEREGRINE-TEST` lines of a serial log: (test, result, detail).
pub fn test_results(serial: &str) -> Vec<(String, String, String)> {
    serial
        .lines()
        .filter_map(|l| {
            let rest = l[l.find(TEST_PREFIX)?..].strip_prefix(TEST_PREFIX)?;
            let mut w = rest.trim().splitn(3, ' ');
            let name = w.next()?.to_string();
            let result = w.next().unwrap_or_default().to_string();
            Some((name, result, w.next().unwrap_or_default().to_string()))
        })
        .collect()
}

/// What one boot of the guest measured, for `bench boot`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// Guest uptime at the marker, seconds.
    pub marker_s: f64,
    /// The `read` test: milliseconds for the whole disk, and its size in bytes.
    pub read: Option<(u64, u64)>,
    /// Wall time of the whole emulator run, seconds.
    pub wall_s: f64,
}

/// The figures of a run with the marker (and the `read` test, if it ran).
pub fn figures(r: &RunResult) -> Option<Figures> {
    let read = test_results(&r.serial)
        .into_iter()
        .find(|t| t.0 == "read")
        .and_then(|(_, ms, bytes)| {
            Some((ms.strip_suffix("ms")?.parse().ok()?, bytes.parse().ok()?))
        });
    Some(Figures {
        marker_s: marker_uptime(&r.serial)?,
        read,
        wall_s: r.wall.as_secs_f64(),
    })
}

/// The guest's uptime when it printed the marker, in seconds.
pub fn marker_uptime(serial: &str) -> Option<f64> {
    let l = serial.lines().find(|l| l.contains(MARKER))?;
    l.split("uptime=").nth(1)?.trim().parse().ok()
}

/// Boots with the tests in `tests` and checks what every guest must show: the marker,
/// `nproc` = `smp`, the disk's checksum, the write read back and the whole disk's
/// checksum after its restore, and a clean power-off.
pub fn check_qemu(guest: &Guest, smp: u32, tests: &str) -> Result<RunResult> {
    let run = Run {
        name: format!("linux-qemu-smp{smp}"),
        smp,
        tests: tests.into(),
        interactive: false,
        timeout: Duration::from_secs(120),
    };
    let r = boot_qemu(guest, &run)?;
    if !r.serial.contains(MARKER) {
        bail!("no {MARKER}: {}", r.report());
    }
    for (name, result, detail) in test_results(&r.serial) {
        let ok = match name.as_str() {
            "nproc" => result == smp.to_string(),
            "disk" => result == "ok" && detail == guest.disk_md5,
            "write" => result == "ok" && detail == guest.disk_md5,
            "read" => result.ends_with("ms") && detail == DISK_SIZE.to_string(),
            "kvmclock" => !result.is_empty(),
            _ => false,
        };
        if !ok {
            bail!("test {name}: {result} {detail}: {}", r.report());
        }
    }
    let ran: Vec<String> = test_results(&r.serial).into_iter().map(|t| t.0).collect();
    let tests = if tests == "all" { ALL_TESTS } else { tests };
    for want in tests
        .split(',')
        .filter(|t| !t.is_empty() && *t != "poweroff")
    {
        if !ran.iter().any(|t| t == want) {
            bail!("test {want} printed no result: {}", r.report());
        }
    }
    // `poweroff -f` (ACPI S5) ends QEMU, status 0 with -no-reboot.
    if !matches!(r.exit, Exit::Other(0)) {
        bail!("the guest did not power off: {}", r.report());
    }
    Ok(r)
}

/// The guest as `prepare` left it, if every file is there (nothing fetched or built):
/// what `cargo xtask run` boots by default.
pub fn existing() -> Option<Guest> {
    let linux = workspace::target_dir().ok()?.join("linux");
    let kernel = newest_vmlinuz(&linux.join("root/boot"))?;
    let dir = linux.join("guest");
    let (initramfs, disk) = (dir.join("initramfs.cpio"), dir.join("disk.img"));
    let disk_md5 = std::fs::read_to_string(dir.join("disk.md5")).ok()?;
    (initramfs.is_file() && disk.is_file()).then(|| Guest {
        kernel,
        initramfs,
        disk,
        disk_md5: disk_md5.split_whitespace().next().unwrap_or("").to_string(),
    })
}

/// Guest RAM of the Linux VM on Peregrine, in MiB (as the direct QEMU boot's `-m`).
pub const VMM_MEM_MIB: u32 = 256;

/// The module line of the VMM that boots `guest` with `cpus` vCPUs and the `/init`
/// tests `tests` (empty: the shell); the kernel command line follows ` -- `.
pub fn vmm_args(guest: &Guest, cpus: u32, tests: &str, extra: &str) -> String {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    format!(
        "name=linux guest={} initrd={} disk={} cpus={cpus} mem={VMM_MEM_MIB} mode=linux cpu=0 {extra}-- {}",
        name(&guest.kernel),
        name(&guest.initramfs),
        name(&guest.disk),
        cmdline(tests)
    )
}

/// `spec` (the system with the root task) with a VMM booting `guest`: the VMM module
/// (`vmm` is its image) and the kernel, initramfs and disk as boot modules. The root
/// runs `test=vmm` when `tests` is set (waiting for the power-off), else nothing.
pub fn with_vmm(
    spec: BootSpec,
    vmm: PathBuf,
    guest: &Guest,
    cpus: u32,
    tests: &str,
    extra: &str,
) -> BootSpec {
    let spec = if tests.is_empty() {
        spec
    } else {
        spec.root_args("test=vmm secs=600")
    };
    let mut spec = spec
        .module(vmm, &vmm_args(guest, cpus, tests, extra))
        .module(guest.kernel.clone(), "")
        .module(guest.initramfs.clone(), "")
        .module(guest.disk.clone(), "");
    // Room for the guest's RAM besides the kernel, the root and the modules.
    spec.memory_mib = spec.memory_mib.max(VMM_MEM_MIB + 256);
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_image_is_fixed() {
        let d = disk_image();
        assert_eq!(d.len(), DISK_SIZE);
        assert!(d.starts_with(b"PEREGRINE-DISK v1\n"));
        assert_eq!(md5_hex(&d), md5_hex(&disk_image()));
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn parses_test_lines_and_marker() {
        let log = "x\nPEREGRINE-LINUX-READY uptime=3.25\n[  1.0] PEREGRINE-TEST nproc 2\n\
                   PEREGRINE-TEST disk ok abc\nPEREGRINE-TEST read 120ms 8388608\n";
        assert_eq!(marker_uptime(log), Some(3.25));
        let t = test_results(log);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0], ("nproc".into(), "2".into(), String::new()));
        assert_eq!(t[2], ("read".into(), "120ms".into(), "8388608".into()));
    }

    #[test]
    fn figures_from_a_run() {
        let r = RunResult {
            exit: Exit::Other(0),
            serial: "PEREGRINE-LINUX-READY uptime=2.50\nPEREGRINE-TEST read 40ms 8388608\n".into(),
            wall: Duration::from_millis(6500),
            serial_log: PathBuf::new(),
            emulator_output: String::new(),
        };
        let f = figures(&r).unwrap();
        assert_eq!(f.marker_s, 2.5);
        assert_eq!(f.read, Some((40, 8 << 20)));
        assert_eq!(f.wall_s, 6.5);
    }

    #[test]
    fn init_knows_every_test_and_the_marker() {
        assert!(INIT.contains(MARKER));
        for t in ALL_TESTS.split(',') {
            assert!(INIT.contains(&format!("t_{t}()")), "{t}");
        }
        assert!(INIT.contains(&format!("tests={ALL_TESTS}")));
        assert_eq!(cmdline(""), "console=ttyS0 panic=-1 rdinit=/init");
    }
}
