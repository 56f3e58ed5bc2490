//! The Linux guest (`guests/linux`): Debian's distribution kernel, a busybox initramfs
//! with the kernel's virtio and ext4 modules and `guests/linux/init`, a disk image with
//! known contents, and an ext4 root file system image; and booting them directly in QEMU
//! (the baseline side of `bench boot`).
//!
//! Why the distribution kernel and not one built from Debian's source: see
//! `guests/linux/README.md` (boot time measured, and nothing to build or cache).
//!
//! Everything lands in `<target>/linux/guest/`: `initramfs.cpio`, `disk.img`,
//! `disk.md5` and `rootfs.img`; the kernel stays where [`debian_kernel`] unpacked it,
//! beside its modules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::boot::{BootSpec, Exit, Output, RunResult};
use crate::guest_linux::{debian_kernel, module_closure, modules_dir, newest_vmlinuz, Initramfs};
use crate::rootfs::{self, Tree};
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
/// The modules `/init` loads besides [`MODULES`] to mount an ext4 root
/// (`peregrine.root=`): Debian's 6.1 kernel has ext4 as a module (`CONFIG_EXT4_FS=m`),
/// like jbd2, mbcache and crc16 that it depends on. ext4 checksums its metadata with
/// the crypto API's crc32c, a soft dependency (`softdep=pre: crypto-crc32c`, which
/// `depends=` does not list and no modprobe resolves here), so its generic
/// implementation is named, first.
pub const ROOT_MODULES: &[&str] = &["crc32c_generic", "ext4"];
/// The storage test helper (`storetest pattern|crash-write|crash-check`), in the
/// initramfs and on the ext4 root as `/bin/storetest`.
pub const STORETEST_C: &str = include_str!("../../guests/linux/storetest.c");
/// The block-device benchmark, in the initramfs and on the ext4 root as
/// `/bin/diskbench`.
pub const DISKBENCH_C: &str = include_str!("../../guests/linux/diskbench.c");
/// The guest's static C programs: (name, source), each `/bin/<name>` in the initramfs
/// and on the ext4 root (so a guest without an ext4 root, whose disk is the one under
/// test, has them too).
pub const PROGRAMS: &[(&str, &str)] = &[("storetest", STORETEST_C), ("diskbench", DISKBENCH_C)];
/// The file on the ext4 root that tells `/init` it runs there (after `switch_root`).
pub const ROOTFS_MARK: &str = "etc/peregrine-rootfs";
/// The ext4 root's device when the pattern disk comes first (`peregrine.root=`).
pub const ROOT_DEVICE: &str = "/dev/vdb";
/// The ext4 root's device when the GPT system disk is the first disk: its partition 1.
pub const SYSTEM_ROOT_DEVICE: &str = "/dev/vda1";
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
    /// The ext4 root file system image (see [`rootfs_tree`]); boots copy it, since the
    /// guest writes to it.
    pub rootfs: PathBuf,
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

/// Compiles [`PROGRAMS`] statically into `build`: (name, binary).
pub fn compile_programs(build: &Path) -> Result<Vec<(String, PathBuf)>> {
    PROGRAMS
        .iter()
        .map(|(name, source)| {
            Ok((
                name.to_string(),
                rootfs::compile_static(name, source, build)?,
            ))
        })
        .collect()
}

/// The initramfs: busybox, `/init`, the modules under `/lib/modules/`, `/etc/modules`
/// (their load order), `/etc/modules.root` (what an ext4 root needs besides, in load
/// order), `/etc/disk.md5` and the `programs` ([`compile_programs`]) under `/bin/`.
pub fn build_initramfs(
    kernel: &Path,
    disk_md5: &str,
    programs: &[(String, PathBuf)],
    out: &Path,
) -> Result<()> {
    let dir = modules_dir(kernel)?;
    let modules = module_closure(&dir, MODULES)?;
    let root_modules: Vec<(String, PathBuf)> = module_closure(&dir, ROOT_MODULES)?
        .into_iter()
        .filter(|(n, _)| !modules.iter().any(|(m, _)| m == n))
        .collect();
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
    let names: Vec<&str> = root_modules.iter().map(|(n, _)| n.as_str()).collect();
    ramfs.file(
        "etc/modules.root",
        0o644,
        format!("{}\n", names.join("\n")).as_bytes(),
    );
    ramfs.file("etc/disk.md5", 0o644, format!("{disk_md5}\n").as_bytes());
    ramfs.modules("lib/modules", &modules)?;
    ramfs.modules("lib/modules", &root_modules)?;
    for (name, bin) in programs {
        ramfs.copy(&format!("bin/{name}"), 0o755, bin)?;
    }
    ramfs.write(out)
}

/// The ext4 root file system: busybox with its applet links, `/init` (the same script
/// as the initramfs's, which it runs after `switch_root`), [`ROOTFS_MARK`],
/// `/etc/disk.md5`, the `programs` ([`compile_programs`]: `storetest` and `diskbench`)
/// under `/bin/`, and empty `/dev`, `/proc`, `/sys`, `/tmp`, `/mnt` and `/root`.
pub fn rootfs_tree(disk_md5: &str, programs: &[(String, PathBuf)]) -> Result<Tree> {
    let mut t = Tree::new();
    for d in ["dev", "proc", "sys", "tmp", "mnt", "root"] {
        t.dir(d);
    }
    rootfs::add_busybox(&mut t)?;
    t.file("init", 0o755, INIT.as_bytes());
    t.file(
        ROOTFS_MARK,
        0o644,
        b"the ext4 root of Peregrine's Linux guest (xtask/src/linux.rs)\n",
    );
    t.file("etc/disk.md5", 0o644, format!("{disk_md5}\n").as_bytes());
    for (name, bin) in programs {
        t.copy(&format!("bin/{name}"), 0o755, bin)?;
    }
    Ok(t)
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
    // Compiled and staged in a directory of this process's own, and the root renamed
    // into place whole, so two processes preparing at once do not mix their files.
    let work = dir.join(format!("rootfs.work.{}", std::process::id()));
    let programs = compile_programs(&work.join("build"))?;
    let initramfs = dir.join("initramfs.cpio");
    build_initramfs(&kernel, &disk_md5, &programs, &initramfs)?;
    let rootfs = dir.join("rootfs.img");
    let tree = rootfs_tree(&disk_md5, &programs)?;
    rootfs::build(&tree, &work.join("fs"), &rootfs)?;
    std::fs::remove_dir_all(&work).ok();
    Ok(Guest {
        kernel,
        initramfs,
        disk,
        disk_md5,
        rootfs,
    })
}

/// How to boot the guest directly in QEMU.
#[derive(Debug, Clone, Default)]
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
    /// An ext4 root image (a copy of [`Guest::rootfs`]) as the second disk, `/dev/vdb`,
    /// written in place, and `peregrine.root=/dev/vdb`: `/init` mounts it and
    /// `switch_root`s there.
    pub root: Option<PathBuf>,
    /// A raw scratch image as the next disk (`/dev/vdc` with a root, else `/dev/vdb`),
    /// written in place.
    pub scratch: Option<PathBuf>,
    /// A GPT system disk ([`crate::sysdisk`]) in place of the pattern disk: the first
    /// disk, `/dev/vda`, written in place; without `root`, its first partition is the
    /// root (`peregrine.root=/dev/vda1`).
    pub system_disk: Option<PathBuf>,
    /// More of the kernel command line (`peregrine.seed=…`).
    pub args: String,
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

/// The root's device in a boot of `run`: [`ROOT_DEVICE`] with a root image, else the
/// system disk's first partition ([`SYSTEM_ROOT_DEVICE`]), else none.
pub fn root_device(run: &Run) -> Option<&'static str> {
    if run.root.is_some() {
        Some(ROOT_DEVICE)
    } else if run.system_disk.is_some() {
        Some(SYSTEM_ROOT_DEVICE)
    } else {
        None
    }
}

/// The kernel command line of `run`: [`cmdline`], `peregrine.root=` with a root (see
/// [`root_device`]), and `run.args`.
pub fn run_cmdline(run: &Run) -> String {
    let mut c = cmdline(&run.tests);
    if let Some(root) = root_device(run) {
        c += " peregrine.root=";
        c += root;
    }
    if !run.args.is_empty() {
        c.push(' ');
        c += &run.args;
    }
    c
}

/// The QEMU arguments of a modern-only virtio-blk PCI disk `id` on the raw image
/// `file`, in snapshot mode (writes stay in QEMU) or written in place. In place, QEMU's
/// default cache mode (`writeback`): a write completes once it is in the host's page
/// cache, and a guest's flush makes QEMU `fdatasync` the image, so what the guest
/// flushed survives QEMU's death, even by SIGKILL (the host kernel keeps the page
/// cache), and a later QEMU on the same file reads it. QEMU's image locking stays on:
/// boots on one image follow each other, and a killed QEMU's lock ends with it.
pub fn virtio_disk(id: &str, file: &Path, snapshot: bool) -> Vec<String> {
    let mut drive = format!(
        "file={},if=none,id={id},format=raw",
        crate::qemu::escape_commas(&file.to_string_lossy())
    );
    drive += if snapshot {
        ",snapshot=on"
    } else {
        ",cache=writeback"
    };
    vec![
        "-drive".into(),
        drive,
        "-device".into(),
        format!("virtio-blk-pci,drive={id},disable-legacy=on"),
    ]
}

/// What [`boot_qemu`] boots: software emulation, `-cpu EPYC`, 256 MiB, the pattern
/// disk as a modern-only virtio-blk PCI device in snapshot mode (so the image stays as
/// built) or, in its place, `run`'s system disk written in place; then `run`'s root and
/// scratch images, written in place.
pub fn qemu_spec(guest: &Guest, run: &Run) -> BootSpec {
    let mut extra = vec![
        "-initrd".into(),
        guest.initramfs.to_string_lossy().into_owned(),
    ];
    match &run.system_disk {
        Some(disk) => extra.extend(virtio_disk("vda", disk, false)),
        None => extra.extend(virtio_disk("vda", &guest.disk, true)),
    }
    if let Some(root) = &run.root {
        extra.extend(virtio_disk("root", root, false));
    }
    if let Some(scratch) = &run.scratch {
        extra.extend(virtio_disk("scratch", scratch, false));
    }
    BootSpec {
        name: run.name.clone(),
        kernel: guest.kernel.clone(),
        kernel_args: run_cmdline(run),
        modules: Vec::new(),
        smp: run.smp,
        memory_mib: 256,
        cpu_model: None,
        icount: false,
        allow_kvm: false,
        timeout: run.timeout,
        extra_qemu_args: extra,
        output: if run.interactive {
            Output::Inherit
        } else {
            Output::Capture
        },
    }
}

/// Boots `guest` in QEMU as [`qemu_spec`] says.
pub fn boot_qemu(guest: &Guest, run: &Run) -> Result<RunResult> {
    crate::qemu::run_qemu(&qemu_spec(guest, run))
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
        timeout: Duration::from_secs(120),
        ..Run::default()
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

/// The guest as `prepare` left it, if the kernel, initramfs and disk are there (nothing
/// fetched or built; `rootfs` may be missing): what `cargo xtask run` boots by default.
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
        rootfs: dir.join("rootfs.img"),
    })
}

/// Guest RAM of the Linux VM on Peregrine, in MiB (as the direct QEMU boot's `-m`).
pub const VMM_MEM_MIB: u32 = 256;

/// A file's name, as the root matches boot modules by it.
fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The module line of the VMM that boots `guest` with `cpus` vCPUs and the `/init`
/// tests `tests` (empty: the shell), with the pattern disk as its RAM disk (`disk=`);
/// the kernel command line follows ` -- `.
pub fn vmm_args(guest: &Guest, cpus: u32, tests: &str, extra: &str) -> String {
    vmm_line(
        guest,
        cpus,
        &format!("disk={} {extra}", file_name(&guest.disk)),
        &cmdline(tests),
    )
}

/// The module line of a VMM booting `guest` with `cpus` vCPUs: `args` (ending in a
/// space, or empty) after the common ones, then ` -- ` and the kernel command line
/// `cmdline`.
pub fn vmm_line(guest: &Guest, cpus: u32, args: &str, cmdline: &str) -> String {
    vmm_line_on(guest, "linux", 0, cpus, args, cmdline)
}

/// [`vmm_line`] of a VMM named `name` (its console tag) whose vCPU i runs on host CPU
/// `cpu + i`.
pub fn vmm_line_on(
    guest: &Guest,
    name: &str,
    cpu: u32,
    cpus: u32,
    args: &str,
    cmdline: &str,
) -> String {
    format!(
        "name={name} guest={} initrd={} cpus={cpus} mem={VMM_MEM_MIB} mode=linux cpu={cpu} {args}-- {cmdline}",
        file_name(&guest.kernel),
        file_name(&guest.initramfs),
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

/// The partitions of the `parts` test's detail (`vda1:<KiB>,vda2:<KiB>`): (name, KiB).
pub fn parse_parts(detail: &str) -> Vec<(String, u64)> {
    detail
        .split(',')
        .filter_map(|p| {
            let (name, kib) = p.split_once(':')?;
            Some((name.to_string(), kib.parse().ok()?))
        })
        .collect()
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
        for t in [
            "root",
            "parts",
            "size",
            "persist-write",
            "persist-check",
            "crash-writer",
            "crash-check",
        ] {
            assert!(
                INIT.contains(&format!("t_{}()", t.replace('-', "_"))),
                "{t}"
            );
            assert!(INIT.contains(&format!(" {t} ")), "{t} is not dispatched");
        }
        assert!(INIT.contains(&format!("/{ROOTFS_MARK}")));
        assert!(INIT.contains("/etc/modules.root"));
    }

    #[test]
    fn root_and_scratch_disks_follow_the_pattern_disk() {
        let guest = Guest {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.cpio".into(),
            disk: "/g/disk.img".into(),
            disk_md5: String::new(),
            rootfs: "/g/rootfs.img".into(),
        };
        let plain = Run {
            name: "t".into(),
            smp: 1,
            tests: "all".into(),
            ..Run::default()
        };
        let a = qemu_spec(&guest, &plain).extra_qemu_args.join(" ");
        assert_eq!(
            a,
            "-initrd /g/initramfs.cpio -drive file=/g/disk.img,if=none,id=vda,format=raw,\
             snapshot=on -device virtio-blk-pci,drive=vda,disable-legacy=on"
        );
        assert_eq!(run_cmdline(&plain), cmdline("all"));
        let rooted = Run {
            root: Some("/w/r,1.img".into()),
            scratch: Some("/w/s.img".into()),
            args: "peregrine.seed=7".into(),
            ..plain
        };
        let a = qemu_spec(&guest, &rooted).extra_qemu_args.join(" ");
        let root = a.find("file=/w/r,,1.img,if=none,id=root,format=raw,cache=writeback");
        let scratch = a.find("file=/w/s.img,if=none,id=scratch,format=raw,cache=writeback");
        assert!(a.find("id=vda") < root && root < scratch, "{a}");
        assert!(a.contains("virtio-blk-pci,drive=scratch,disable-legacy=on"));
        assert_eq!(
            run_cmdline(&rooted),
            "console=ttyS0 panic=-1 rdinit=/init quiet peregrine.test=all \
             peregrine.root=/dev/vdb peregrine.seed=7"
        );
    }

    #[test]
    fn the_system_disk_takes_the_pattern_disks_place() {
        let guest = Guest {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.cpio".into(),
            disk: "/g/disk.img".into(),
            disk_md5: String::new(),
            rootfs: "/g/rootfs.img".into(),
        };
        let run = Run {
            name: "t".into(),
            smp: 1,
            tests: "root,parts".into(),
            system_disk: Some("/t/sys.img".into()),
            ..Run::default()
        };
        let a = qemu_spec(&guest, &run).extra_qemu_args.join(" ");
        assert_eq!(
            a,
            "-initrd /g/initramfs.cpio -drive file=/t/sys.img,if=none,id=vda,format=raw,\
             cache=writeback -device virtio-blk-pci,drive=vda,disable-legacy=on"
        );
        assert_eq!(root_device(&run), Some(SYSTEM_ROOT_DEVICE));
        assert!(run_cmdline(&run).ends_with(" peregrine.root=/dev/vda1"));
        assert_eq!(
            parse_parts("vda1:65536,vda2:65536"),
            [("vda1".to_string(), 65536), ("vda2".to_string(), 65536)]
        );
        assert!(parse_parts("").is_empty());
    }
}
