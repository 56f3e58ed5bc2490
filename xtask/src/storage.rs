//! The Linux guest's storage tests on its ext4 root: data written and synced before a
//! power-off is there after the next boot ([`persist`]), and data whose fsync returned
//! is there after QEMU is killed at a random moment ([`crash`]). Where the guest boots
//! is a [`Target`]: directly in QEMU from a copy of the guest's `rootfs.img` as its
//! second virtio-blk disk ([`Target::qemu`]) or from the GPT system disk
//! ([`Target::qemu_gpt`]), or on Peregrine from the system disk on QEMU's NVMe
//! controller through the disk component and a VMM session ([`Target::peregrine`]).
//! Each test writes a fresh image in `<target>/linux/storage/`, which the guest writes
//! in place (see [`linux::virtio_disk`] for why what the guest flushed survives QEMU's
//! death), and ends with `e2fsck -fn` on the root: the file system the guest left is
//! consistent.
//!
//! The guest's side is `guests/linux/init` (`persist-write`, `persist-check`,
//! `crash-writer`, `crash-check`) and `guests/linux/storetest.c`, whose patterns
//! [`pattern`] and [`crash_block`] compute here too.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::boot::{BootSpec, Exit, RunResult};
use crate::build::Images;
use crate::gpt_image::{self, Extent};
use crate::linux::{self, test_results, Guest, Run, ROOT_DEVICE};
use crate::sysdisk::{self, NvmeVm};
use crate::{deps, workspace};

/// Bytes `persist-write` writes.
pub const PERSIST_BYTES: usize = 4 << 20;
/// The block size of `crash-writer`.
pub const CRASH_BLOCK: usize = 4096;
/// Prefix of `crash-writer`'s lines.
pub const SEQ_PREFIX: &str = "PEREGRINE-SEQ ";
/// Where `pattern`'s stream starts for seed 0 (and what every seed is XORed with).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// `storetest pattern SEED LEN`: `len` bytes of the 64-bit xorshift (13, 7, 17) stream
/// started at `seed ^ GOLDEN` (`GOLDEN` if that is 0), each state as 8 little-endian
/// bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = match seed ^ GOLDEN {
        0 => GOLDEN,
        x => x,
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Block `n` of `crash-writer`: `PRGNSEQ1`, `n` as 8 little-endian bytes, then the
/// stream of seed `n`.
pub fn crash_block(n: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(CRASH_BLOCK);
    b.extend_from_slice(b"PRGNSEQ1");
    b.extend_from_slice(&n.to_le_bytes());
    b.extend(pattern(n, CRASH_BLOCK - 16));
    b
}

/// The highest `PEREGRINE-SEQ <n>` of a serial log, counting only whole lines (a line
/// the kill cut off may have lost digits).
pub fn last_seq(serial: &str) -> Option<u64> {
    let whole = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(SEQ_PREFIX)? + SEQ_PREFIX.len()..];
            rest.trim_end().parse().ok()
        })
        .max()
}

/// What `crash-check` printed: the highest block of the unbroken run of valid blocks
/// from 0 (`None`: not even block 0), and the file's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashCheck {
    /// Highest valid block.
    pub highest: Option<u64>,
    /// Whole blocks in the file.
    pub blocks: u64,
}

/// Parses `crash-check`'s result and detail (`ok <highest> <blocks>`); an error says
/// what else it printed (`hole …`, `missing`).
pub fn parse_crash_check(result: &str, detail: &str) -> Result<CrashCheck> {
    let mut w = detail.split_whitespace();
    let (Some(highest), Some(blocks), None) = (w.next(), w.next(), w.next()) else {
        bail!("crash-check: {result} {detail}");
    };
    if result != "ok" {
        bail!("crash-check: {result} {detail}");
    }
    let highest: i64 = highest.parse().context("crash-check: highest block")?;
    Ok(CrashCheck {
        highest: u64::try_from(highest).ok(),
        blocks: blocks.parse().context("crash-check: blocks")?,
    })
}

/// A seed for the patterns, different run to run (so a file from an earlier run does
/// not pass for this one's).
pub fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut x = (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32) ^ GOLDEN;
    // A few xorshift steps spread the clock's low bits over the word.
    for _ in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Writes a fresh disk image to the path; returns where the ext4 root lies in it.
pub type MakeImage = Box<dyn Fn(&Path) -> Result<Extent>>;
/// The boot of a disk image with `/init`'s tests and a seed: (log name, image, tests,
/// seed) to the spec.
pub type MakeSpec = Box<dyn Fn(&str, &Path, &str, u64) -> BootSpec>;

/// Where the storage tests boot the guest: how its disk image is made, how a boot of
/// it is specified, and how that boot's clean end looks. [`Target::qemu`] is QEMU
/// alone with the ext4 root image as a virtio-blk disk, [`Target::qemu_gpt`] the same
/// with the GPT system disk, [`Target::peregrine`] Peregrine with the system disk on
/// QEMU's NVMe controller, the disk component and a VMM session. The boot and the kill
/// are the same for all: QEMU runs (or is killed) as the spec says.
pub struct Target {
    /// Prefix of the log and image names (`linux`, `linux-gpt`, `peregrine`).
    pub name: String,
    /// The root's device in the guest, as the `root` test prints it.
    pub root_device: String,
    /// Writes a fresh disk image to the path; returns where the ext4 root lies in it.
    pub image: MakeImage,
    /// The boot of the image with `/init`'s tests and a seed: (log name, image, tests,
    /// seed) to the spec.
    pub spec: MakeSpec,
    /// Whether a boot with tests ended as the guest's clean power-off.
    pub powered_off: fn(&RunResult) -> bool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("root_device", &self.root_device)
            .finish_non_exhaustive()
    }
}

/// The boot of the guest with `tests` and seed `seed`, directly in QEMU: `run` with
/// them, one vCPU and 240 s.
fn direct(guest: &Guest, run: Run, name: &str, tests: &str, seed: u64) -> BootSpec {
    linux::qemu_spec(
        guest,
        &Run {
            name: name.into(),
            smp: 1,
            tests: tests.into(),
            timeout: Duration::from_secs(240),
            args: format!("peregrine.seed={seed}"),
            ..run
        },
    )
}

/// Whether a direct QEMU boot ended as the guest's ACPI power-off (QEMU's status 0).
fn qemu_powered_off(r: &RunResult) -> bool {
    matches!(r.exit, Exit::Other(0))
}

/// The ext4 root of the system disk `img`: its [`sysdisk::ROOT_NAME`] partition.
fn system_root(img: &Path) -> Result<Extent> {
    extent_of(img, sysdisk::DEFAULT_BINDING)
}

/// The blocks of `img` that the binding `binding` names ([`sysdisk::resolve`]).
pub fn extent_of(img: &Path, binding: &str) -> Result<Extent> {
    let b = sysdisk::resolve(img, binding)?;
    if b.blocks == 0 {
        bail!("binding {binding:?} on {}: no blocks", img.display());
    }
    Ok(Extent {
        first_lba: b.first_lba,
        last_lba: b.first_lba + b.blocks - 1,
    })
}

impl Target {
    /// QEMU alone, the root a copy of `guest`'s `rootfs.img` as the second virtio-blk
    /// disk ([`ROOT_DEVICE`]), after the pattern disk.
    pub fn qemu(guest: &Guest) -> Target {
        let (g, h) = (guest.clone(), guest.clone());
        Target {
            name: "linux".into(),
            root_device: ROOT_DEVICE.into(),
            image: Box::new(move |img| {
                std::fs::copy(&g.rootfs, img).with_context(|| {
                    format!(
                        "copying {} to {} (cargo xtask linux --prepare builds it)",
                        g.rootfs.display(),
                        img.display()
                    )
                })?;
                let len = std::fs::metadata(img)?.len();
                Ok(Extent {
                    first_lba: 0,
                    last_lba: len / gpt_image::BLOCK - 1,
                })
            }),
            spec: Box::new(move |name, img, tests, seed| {
                let run = Run {
                    root: Some(img.to_path_buf()),
                    ..Run::default()
                };
                direct(&h, run, name, tests, seed)
            }),
            powered_off: qemu_powered_off,
        }
    }

    /// QEMU alone, the GPT system disk built from `guest`'s `rootfs.img` as the only
    /// virtio-blk disk, the root its partition 1 ([`linux::SYSTEM_ROOT_DEVICE`]).
    pub fn qemu_gpt(guest: &Guest) -> Target {
        let (g, h) = (guest.clone(), guest.clone());
        Target {
            name: "linux-gpt".into(),
            root_device: linux::SYSTEM_ROOT_DEVICE.into(),
            image: Box::new(move |img| {
                sysdisk::build(&g.rootfs, img)?;
                system_root(img)
            }),
            spec: Box::new(move |name, img, tests, seed| {
                let run = Run {
                    system_disk: Some(img.to_path_buf()),
                    ..Run::default()
                };
                direct(&h, run, name, tests, seed)
            }),
            powered_off: qemu_powered_off,
        }
    }

    /// Peregrine: the GPT system disk built from `guest`'s `rootfs.img` on QEMU's NVMe
    /// controller, the disk component, and a VMM with one vCPU bound to the root
    /// partition ([`sysdisk::DEFAULT_BINDING`]), whose guest sees it as
    /// [`sysdisk::SESSION_ROOT_DEVICE`] ([`sysdisk::linux_on_nvme_spec`]).
    pub fn peregrine(images: &Images, guest: &Guest) -> Target {
        let (g, h, images) = (guest.clone(), guest.clone(), images.clone());
        Target {
            name: "peregrine".into(),
            root_device: sysdisk::SESSION_ROOT_DEVICE.into(),
            image: Box::new(move |img| {
                sysdisk::build(&g.rootfs, img)?;
                system_root(img)
            }),
            spec: Box::new(move |name, img, tests, seed| {
                let vm = NvmeVm {
                    tests: tests.into(),
                    args: format!("peregrine.seed={seed}"),
                    ..NvmeVm::new(img)
                };
                let spec = BootSpec::new(name, &images).timeout(Duration::from_secs(300));
                sysdisk::linux_on_nvme_spec(spec, &images, &h, &vm)
            }),
            powered_off: sysdisk::vm_powered_off,
        }
    }

    /// A fresh disk image `<target>/linux/storage/<name>-<test>.img`, and where the root
    /// lies in it.
    pub fn fresh_image(&self, test: &str) -> Result<(PathBuf, Extent)> {
        let img = workspace::out_dir("linux/storage")?.join(format!("{}-{test}.img", self.name));
        let root = (self.image)(&img)?;
        Ok((img, root))
    }

    /// Boots `img` with `tests` and seed `seed`, the log named `<name>-<log>`.
    fn boot(&self, log: &str, img: &Path, tests: &str, seed: u64) -> Result<RunResult> {
        crate::qemu::run_qemu(&(self.spec)(
            &format!("{}-{log}", self.name),
            img,
            tests,
            seed,
        ))
    }

    /// Checks that `r` ran on the ext4 root (the `root` test) and powered off cleanly.
    fn check_root_boot(&self, r: &RunResult) -> Result<()> {
        let (result, detail) = result_of(r, "root")?;
        if result != "ext4" || detail != self.root_device {
            bail!(
                "the root is {result} {detail}, not ext4 {}: {}",
                self.root_device,
                r.report()
            );
        }
        if !(self.powered_off)(r) {
            bail!("the guest did not power off: {}", r.report());
        }
        Ok(())
    }
}

/// The result and detail of test `name` in `r`, failing if it printed none.
fn result_of(r: &RunResult, name: &str) -> Result<(String, String)> {
    test_results(&r.serial)
        .into_iter()
        .find(|t| t.0 == name)
        .map(|(_, result, detail)| (result, detail))
        .with_context(|| format!("test {name} printed no result: {}", r.report()))
}

/// Copies the blocks `extent` of `img` to the file `out`.
fn copy_extent(img: &Path, extent: Extent, out: &Path) -> Result<()> {
    let mut src = std::fs::File::open(img).with_context(|| format!("{}", img.display()))?;
    src.seek(SeekFrom::Start(extent.offset()))?;
    let mut dst = std::fs::File::create(out).with_context(|| format!("{}", out.display()))?;
    let n = std::io::copy(&mut src.take(extent.bytes()), &mut dst)?;
    if n != extent.bytes() {
        bail!("{}: the extent {extent:?} passes the end", img.display());
    }
    Ok(())
}

/// The bytes of the blocks `extent` of `img`.
pub fn read_extent(img: &Path, extent: Extent) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(img).with_context(|| format!("{}", img.display()))?;
    f.seek(SeekFrom::Start(extent.offset()))?;
    let mut data = vec![0; usize::try_from(extent.bytes())?];
    f.read_exact(&mut data)
        .with_context(|| format!("{}: reading {extent:?}", img.display()))?;
    Ok(data)
}

/// `e2fsck -fn` on the file system at `root` in `img` (a copy of it beside `img` when
/// it is not the whole file): fails unless it is clean and consistent.
pub fn fsck_in(img: &Path, root: Extent) -> Result<()> {
    let whole = root.first_lba == 0 && std::fs::metadata(img)?.len() == root.bytes();
    if whole {
        return fsck(img);
    }
    let copy = img.with_extension("root.img");
    copy_extent(img, root, &copy)?;
    let r = fsck(&copy);
    std::fs::remove_file(&copy).ok();
    r.with_context(|| format!("the root at block {} of {}", root.first_lba, img.display()))
}

/// The file `path` (absolute) of the ext4 file system at `root` in `img`, read on the
/// host with `debugfs` (the file system is not mounted, nor changed).
pub fn read_file_in(img: &Path, root: Extent, path: &str) -> Result<Vec<u8>> {
    deps::ensure(&[deps::Tool::Ext4])?;
    let fs = img.with_extension("dump-fs.img");
    let out = img.with_extension("dump-file");
    copy_extent(img, root, &fs)?;
    let run = Command::new(deps::DEBUGFS)
        .arg("-R")
        .arg(format!("dump {path} {}", out.display()))
        .arg(&fs)
        .output()
        .context("running debugfs");
    std::fs::remove_file(&fs).ok();
    let run = run?;
    let data = std::fs::read(&out);
    std::fs::remove_file(&out).ok();
    // debugfs says what failed on stderr and exits 0 all the same.
    let err = String::from_utf8_lossy(&run.stderr);
    match data {
        Ok(d) if run.status.success() && err.lines().all(|l| l.starts_with("debugfs ")) => Ok(d),
        _ => bail!(
            "debugfs: dump {path} from block {} of {} ({}): {err}",
            root.first_lba,
            img.display(),
            run.status
        ),
    }
}

/// The blocks of `a` and `b` (two disk images) outside every extent of `skip` whose
/// bytes differ, as ranges of blocks (`first..end`), and whether the two have the same
/// length.
pub fn differences_outside(
    a: &Path,
    b: &Path,
    skip: &[Extent],
) -> Result<(Vec<std::ops::Range<u64>>, bool)> {
    let (x, y) = (
        std::fs::read(a).with_context(|| format!("{}", a.display()))?,
        std::fs::read(b).with_context(|| format!("{}", b.display()))?,
    );
    let block = gpt_image::BLOCK as usize;
    let blocks = (x.len().min(y.len()) / block) as u64;
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for lba in 0..blocks {
        if skip
            .iter()
            .any(|e| (e.first_lba..=e.last_lba).contains(&lba))
        {
            continue;
        }
        let at = lba as usize * block;
        if x[at..at + block] != y[at..at + block] {
            match out.last_mut() {
                Some(r) if r.end == lba => r.end = lba + 1,
                _ => out.push(lba..lba + 1),
            }
        }
    }
    Ok((out, x.len() == y.len()))
}

/// `e2fsck -fn` on `img`: fails unless the file system is clean and consistent.
pub fn fsck(img: &Path) -> Result<()> {
    deps::ensure(&[deps::Tool::Ext4])?;
    let out = Command::new(deps::E2FSCK)
        .arg("-fn")
        .arg(img)
        .output()
        .context("running e2fsck")?;
    if !out.status.success() {
        bail!(
            "e2fsck -fn {} ({}):\n{}{}",
            img.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What [`persist`] saw.
#[derive(Debug, Clone)]
pub struct Persist {
    /// The seed of the pattern.
    pub seed: u64,
    /// The pattern's MD5, as both boots printed it.
    pub md5: String,
    /// The two boots.
    pub runs: [RunResult; 2],
}

/// Boots a fresh disk image of `target` with `persist-write` (4 MiB of the pattern of
/// a fresh seed to `/persist.bin`, synced, then the power-off), then again with
/// `persist-check`: both must print the pattern's MD5 as computed here, the guest
/// must power off cleanly both times, and `e2fsck` must find the root clean. The image
/// is removed unless something failed.
pub fn persist(target: &Target) -> Result<Persist> {
    let seed = fresh_seed();
    let md5 = linux::md5_hex(&pattern(seed, PERSIST_BYTES));
    let (img, root) = target.fresh_image("persist")?;
    let write = target.boot("persist-write", &img, "root,persist-write", seed)?;
    target.check_root_boot(&write)?;
    let (result, detail) = result_of(&write, "persist-write")?;
    if result != "ok" || detail != md5 {
        bail!(
            "persist-write: {result} {detail}, want ok {md5} (seed {seed}): {}",
            write.report()
        );
    }
    let check = target.boot("persist-check", &img, "root,persist-check", seed)?;
    target.check_root_boot(&check)?;
    let (result, detail) = result_of(&check, "persist-check")?;
    if result != "ok" || detail != md5 {
        bail!(
            "persist-check: {result} {detail}, want ok {md5} (seed {seed}, image {}): {}",
            img.display(),
            check.report()
        );
    }
    fsck_in(&img, root)?;
    std::fs::remove_file(&img).ok();
    Ok(Persist {
        seed,
        md5,
        runs: [write, check],
    })
}

/// What [`crash`] saw.
#[derive(Debug, Clone)]
pub struct Crash {
    /// `PEREGRINE-SEQ` lines to wait for before the kill.
    pub after_lines: u64,
    /// Extra wait after them before the kill.
    pub delay: Duration,
    /// The highest `PEREGRINE-SEQ` the host saw before the kill.
    pub last_printed: u64,
    /// What `crash-check` found after the reboot.
    pub check: CrashCheck,
    /// The killed boot and the checking one.
    pub runs: [RunResult; 2],
}

/// Boots a fresh disk image of `target` with `crash-writer`, kills QEMU with SIGKILL
/// at a random moment after 3 to 10 `PEREGRINE-SEQ` lines (up to 500 ms later), and
/// boots the image again with `crash-check`: every block up to the last number the
/// host saw must hold its number and pattern (the guest printed it only after its
/// fsync returned), the guest must power off cleanly, and `e2fsck` must find the root
/// clean (the journal replayed). The image is removed unless something failed.
pub fn crash(target: &Target) -> Result<Crash> {
    let r = fresh_seed();
    let after_lines = 3 + r % 8;
    let delay = Duration::from_millis((r >> 8) % 500);
    let (img, root) = target.fresh_image("crash")?;
    let spec = (target.spec)(
        &format!("{}-crash-writer", target.name),
        &img,
        "root,crash-writer",
        0,
    );
    let mut seen_at: Option<Instant> = None;
    let killed = crate::qemu::run_qemu_killed(&spec, |serial| {
        if seen_at.is_none() && last_seq(serial).is_some_and(|n| n + 1 >= after_lines) {
            seen_at = Some(Instant::now());
        }
        seen_at.is_some_and(|t| t.elapsed() >= delay)
    })?;
    // Killed counts as success; so does Peregrine's root ending QEMU after the VM's
    // power-off, which a writer that stopped by itself would lead to.
    let stopped = test_results(&killed.serial)
        .iter()
        .any(|t| t.0 == "crash-writer");
    if killed.exit != Exit::Success || stopped {
        bail!(
            "crash-writer: the guest ended before the kill ({:?}): {}",
            killed.exit,
            killed.report()
        );
    }
    let last_printed = last_seq(&killed.serial).context("no PEREGRINE-SEQ line")?;
    let check = target.boot("crash-check", &img, "root,crash-check", 0)?;
    target.check_root_boot(&check)?;
    let (result, detail) = result_of(&check, "crash-check")?;
    let found = parse_crash_check(&result, &detail)
        .with_context(|| format!("image {}: {}", img.display(), check.report()))?;
    if found.highest.is_none_or(|h| h < last_printed) {
        bail!(
            "crash-check: blocks valid up to {:?}, but the guest had printed {last_printed} \
             before the kill (image {}): {}",
            found.highest,
            img.display(),
            check.report()
        );
    }
    fsck_in(&img, root)?;
    std::fs::remove_file(&img).ok();
    Ok(Crash {
        after_lines,
        delay,
        last_printed,
        check: found,
        runs: [killed, check],
    })
}

/// Where [`isolation`]'s two VMs run (the disk component is on host CPU 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A on CPU 0 beside the disk component, B on CPU 1: both guests execute at the
    /// same moment.
    OwnCpus,
    /// Both on CPU 1, the disk component alone on CPU 0: the guests take turns.
    SharedCpu,
}

impl Placement {
    /// The host CPUs of A and B.
    pub fn cpus(self) -> [u32; 2] {
        match self {
            Placement::OwnCpus => [0, 1],
            Placement::SharedCpu => [1, 1],
        }
    }

    /// The run's name (its image and serial log).
    pub fn run_name(self) -> &'static str {
        match self {
            Placement::OwnCpus => "peregrine-two-vms",
            Placement::SharedCpu => "peregrine-two-vms-one-cpu",
        }
    }
}

/// The VMs of [`isolation`] on the system disk `img`, on the host CPUs of `at`: **A**
/// (`linux-a`) bound to the root partition, its ext4 root, writing `/persist.bin` with
/// `seed_a` (`persist-write`); **B** (`linux-b`) bound to the data partition, in its
/// initramfs, overwriting its whole `/dev/vda` with the stream of `seed_b` and reading
/// it back (`fill`).
pub fn isolation_vms(img: &Path, seed_a: u64, seed_b: u64, at: Placement) -> [NvmeVm; 2] {
    let [cpu_a, cpu_b] = at.cpus();
    [
        NvmeVm {
            name: "linux-a".into(),
            host_cpu: cpu_a,
            tests: "root,persist-write".into(),
            args: format!("peregrine.seed={seed_a}"),
            ..NvmeVm::new(img)
        },
        NvmeVm {
            name: "linux-b".into(),
            host_cpu: cpu_b,
            binding: format!("part=name:{}", sysdisk::DATA_NAME),
            tests: "root,size,fill".into(),
            args: format!("peregrine.seed={seed_b}"),
            root: false,
            ..NvmeVm::new(img)
        },
    ]
}

/// The serial lines of the VM named `name` (the VMM's console tag `[name] `), untagged.
pub fn vm_serial(serial: &str, name: &str) -> String {
    let tag = format!("[{name}] ");
    serial
        .lines()
        .filter_map(|l| Some(format!("{}\n", &l[l.find(&tag)? + tag.len()..])))
        .collect()
}

/// What [`isolation`] saw.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// VM A's seed.
    pub seed_a: u64,
    /// VM B's seed.
    pub seed_b: u64,
    /// The MD5 of A's `/persist.bin`, as A printed it and the host read it back.
    pub md5_a: String,
    /// The MD5 of B's partition, as B printed it and the host read it back.
    pub md5_b: String,
    /// The root partition's and the data partition's blocks.
    pub parts: [Extent; 2],
    /// The run.
    pub run: RunResult,
}

/// Two Linux VMs at once on one NVMe disk (Peregrine, two CPUs, the disk component and
/// two VMMs placed as `at` says, [`isolation_vms`]): A writes `/persist.bin` on its ext4 root partition,
/// B overwrites its whole partition (`/dev/vda` in B) with a pattern; both must say so
/// and power off. Then on the host: the root partition is `e2fsck`-clean and holds A's
/// file, the data partition holds B's pattern, and every block outside both partitions
/// (the protective MBR, both GPT headers and partition arrays, the gaps) is as built.
/// The image is removed unless something failed.
pub fn isolation(images: &Images, guest: &Guest, at: Placement) -> Result<Isolation> {
    let dir = workspace::out_dir("linux/storage")?;
    let name = at.run_name();
    let img = dir.join(format!("{name}.img"));
    let built = dir.join(format!("{name}.built.img"));
    sysdisk::build(&guest.rootfs, &img)?;
    std::fs::copy(&img, &built).with_context(|| format!("copying {}", img.display()))?;
    let root = system_root(&img)?;
    let data = extent_of(&img, &format!("part=name:{}", sysdisk::DATA_NAME))?;
    let (seed_a, seed_b) = (fresh_seed(), fresh_seed() ^ 0xb);
    let md5_a = linux::md5_hex(&pattern(seed_a, PERSIST_BYTES));
    let fill = pattern(seed_b, usize::try_from(data.bytes())?);
    let md5_b = linux::md5_hex(&fill);
    let vms = isolation_vms(&img, seed_a, seed_b, at);
    let spec = sysdisk::linux_vms_on_nvme_spec(
        BootSpec::new(name, images).timeout(Duration::from_secs(600)),
        images,
        guest,
        sysdisk::DISK_ARGS,
        &vms,
    );
    let r = crate::qemu::run_qemu(&spec)?;
    let want = [
        (
            &vms[0].name,
            vec![
                ("root", format!("ext4 {}", sysdisk::SESSION_ROOT_DEVICE)),
                ("persist-write", format!("ok {md5_a}")),
            ],
        ),
        (
            &vms[1].name,
            vec![
                ("root", "rootfs rootfs".to_string()),
                ("size", data.bytes().to_string()),
                ("fill", format!("ok {md5_b}")),
            ],
        ),
    ];
    for (name, tests) in &want {
        let serial = vm_serial(&r.serial, name);
        let results = test_results(&serial);
        for (test, expect) in tests {
            let got = results
                .iter()
                .find(|t| t.0 == *test)
                .map(|t| format!("{} {}", t.1, t.2).trim_end().to_string());
            if got.as_deref() != Some(expect.as_str()) {
                bail!(
                    "VM {name}: {test}: {got:?}, want {expect:?} (seeds {seed_a}, {seed_b}): {}",
                    r.report()
                );
            }
        }
        if !serial.contains("vmm: guest powered off") {
            bail!("VM {name} did not power off: {}", r.report());
        }
    }
    if !(r.exit == Exit::Success && r.passed("vmm")) {
        bail!("the root's test=vmm did not pass: {}", r.report());
    }
    fsck_in(&img, root)?;
    let file = read_file_in(&img, root, "/persist.bin")?;
    if linux::md5_hex(&file) != md5_a {
        bail!(
            "/persist.bin on the root partition of {}: {} bytes, MD5 {}, not A's {md5_a}",
            img.display(),
            file.len(),
            linux::md5_hex(&file)
        );
    }
    let on_disk = read_extent(&img, data)?;
    if on_disk != fill {
        let first = on_disk.iter().zip(&fill).position(|(a, b)| a != b);
        bail!(
            "the data partition of {} is not B's pattern (first difference at byte {first:?})",
            img.display()
        );
    }
    let (changed, same_len) = differences_outside(&img, &built, &[root, data])?;
    if !changed.is_empty() || !same_len {
        bail!(
            "blocks outside both partitions changed: {changed:?} (same length: {same_len}; \
             {} against {})",
            img.display(),
            built.display()
        );
    }
    std::fs::remove_file(&img).ok();
    std::fs::remove_file(&built).ok();
    Ok(Isolation {
        seed_a,
        seed_b,
        md5_a,
        md5_b,
        parts: [root, data],
        run: r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_storetests_xorshift() {
        // Seed 0 starts at GOLDEN: the pattern disk's stream (linux::disk_image).
        let p = pattern(0, 16);
        let disk = linux::disk_image();
        assert_eq!(p[..], disk[18..34]); // after the 18-byte header line
                                         // The first state of seed 5, as `storetest pattern 5 16 | xxd` printed it.
        assert_eq!(
            pattern(5, 8),
            [0xe8, 0xec, 0x79, 0x49, 0xaf, 0x77, 0x1b, 0xdc]
        );
        // A prefix of a longer stream, also off the 8-byte grid.
        assert_eq!(pattern(7, 13)[..], pattern(7, 64)[..13]);
        // The seed that XORs to zero starts at GOLDEN too.
        assert_eq!(pattern(GOLDEN, 32), pattern(0, 32));
        assert_ne!(pattern(1, 32), pattern(2, 32));
    }

    #[test]
    fn crash_blocks_carry_their_number() {
        let b = crash_block(258);
        assert_eq!(b.len(), CRASH_BLOCK);
        assert_eq!(&b[..8], b"PRGNSEQ1");
        assert_eq!(&b[8..16], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[16..], pattern(258, CRASH_BLOCK - 16)[..]);
    }

    #[test]
    fn last_seq_counts_whole_lines_only() {
        assert_eq!(last_seq(""), None);
        assert_eq!(last_seq("PEREGRINE-SEQ 0\r\n"), Some(0));
        let log = "PEREGRINE-LINUX-READY\nPEREGRINE-SEQ 0\r\nPEREGRINE-SEQ 1\r\n\
                   [ 3.1] x PEREGRINE-SEQ 2\r\nPEREGRINE-SEQ 3";
        assert_eq!(last_seq(log), Some(2));
        assert_eq!(last_seq("PEREGRINE-SEQ 12\nPEREGRINE-SEQ 1"), Some(12));
        assert_eq!(last_seq("PEREGRINE-SEQ x\n"), None);
    }

    #[test]
    fn crash_check_lines() {
        assert_eq!(
            parse_crash_check("ok", "41 43").unwrap(),
            CrashCheck {
                highest: Some(41),
                blocks: 43
            }
        );
        assert_eq!(parse_crash_check("ok", "-1 0").unwrap().highest, None);
        for (r, d) in [("hole", "3 5"), ("missing", ""), ("ok", "1"), ("ok", "x 2")] {
            assert!(parse_crash_check(r, d).is_err(), "{r} {d}");
        }
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(fresh_seed(), fresh_seed());
    }

    fn guest(rootfs: &Path) -> Guest {
        Guest {
            kernel: "/g/vmlinuz".into(),
            initramfs: "/g/initramfs.cpio".into(),
            disk: "/g/disk.img".into(),
            disk_md5: String::new(),
            rootfs: rootfs.to_path_buf(),
        }
    }

    #[test]
    fn targets_boot_their_image_as_they_say() {
        let g = guest(Path::new("/g/rootfs.img"));
        let img = Path::new("/s/x.img");
        let q = (Target::qemu(&g).spec)("linux-t", img, "root", 5);
        assert_eq!(q.name, "linux-t");
        let a = q.extra_qemu_args.join(" ");
        assert!(a.contains("file=/s/x.img,if=none,id=root,"), "{a}");
        assert!(a.contains("file=/g/disk.img,if=none,id=vda,"), "{a}");
        assert!(q
            .kernel_args
            .ends_with(" peregrine.root=/dev/vdb peregrine.seed=5"));
        let q = (Target::qemu_gpt(&g).spec)("t", img, "root", 5);
        let a = q.extra_qemu_args.join(" ");
        assert!(a.contains("file=/s/x.img,if=none,id=vda,"), "{a}");
        assert!(!a.contains("disk.img"), "{a}");
        assert!(q.kernel_args.contains(" peregrine.root=/dev/vda1 "));
        let images = Images { dir: "/i".into() };
        let t = Target::peregrine(&images, &g);
        assert_eq!(t.root_device, "/dev/vda");
        let p = (t.spec)("peregrine-t", img, "root,crash-check", 0);
        assert_eq!(p.kernel, Path::new("/i/peregrine"));
        assert_eq!(p.modules[1].1, sysdisk::DISK_ARGS);
        assert!(p.modules[2].1.contains(" blk=part=name:peregrine-root -- "));
        assert!(p.modules[2].1.ends_with(
            " peregrine.test=root,crash-check peregrine.root=/dev/vda peregrine.seed=0"
        ));
        assert!(p
            .extra_qemu_args
            .join(" ")
            .contains("file=/s/x.img,if=none,id=nvm,"));
    }

    #[test]
    fn powered_off_differs_by_target() {
        let r = |exit, serial: &str| RunResult {
            exit,
            serial: serial.into(),
            wall: Duration::ZERO,
            serial_log: PathBuf::new(),
            emulator_output: String::new(),
        };
        let g = guest(Path::new("/r"));
        let images = Images { dir: "/i".into() };
        let (q, p) = (Target::qemu(&g), Target::peregrine(&images, &g));
        assert!((q.powered_off)(&r(Exit::Other(0), "")));
        assert!(!(q.powered_off)(&r(Exit::Timeout, "")));
        let off = "vmm: guest powered off\nPASS vmm\n";
        assert!((p.powered_off)(&r(Exit::Success, off)));
        assert!(!(p.powered_off)(&r(Exit::Success, "PASS vmm\n")));
        assert!(!(p.powered_off)(&r(Exit::Other(0), off)));
    }

    #[test]
    fn isolation_vms_are_two_vmms_on_the_two_partitions() {
        let [a, b] = isolation_vms(Path::new("/s/d.img"), 5, 6, Placement::OwnCpus);
        assert_eq!((a.name.as_str(), a.host_cpu), ("linux-a", 0));
        assert_eq!((b.name.as_str(), b.host_cpu), ("linux-b", 1));
        let [a, b] = isolation_vms(Path::new("/s/d.img"), 5, 6, Placement::SharedCpu);
        assert_eq!((a.host_cpu, b.host_cpu), (1, 1));
        assert_eq!(a.binding, sysdisk::DEFAULT_BINDING);
        assert_eq!(b.binding, "part=name:peregrine-data");
        assert!(a.root && !b.root);
        assert_eq!(a.tests, "root,persist-write");
        assert!(b.tests.ends_with(",fill"));
        assert_eq!(
            (a.args.as_str(), b.args.as_str()),
            ("peregrine.seed=5", "peregrine.seed=6")
        );
        let init = include_str!("../../guests/linux/init");
        assert!(init.contains("fill) t_fill ;;"));
    }

    #[test]
    fn vm_serial_keeps_one_vms_lines() {
        let log = "[root] x\n[linux-a] PEREGRINE-TEST root ext4 /dev/vda\r\n\
                   [linux-b] PEREGRINE-TEST size 5\n[linux-a] vmm: guest powered off\n";
        assert_eq!(
            vm_serial(log, "linux-a"),
            "PEREGRINE-TEST root ext4 /dev/vda\nvmm: guest powered off\n"
        );
        assert_eq!(test_results(&vm_serial(log, "linux-b"))[0].1, "5");
        assert_eq!(vm_serial(log, "linux"), "");
    }

    /// Blocks that differ outside the extents given, as runs; the skipped ones are not
    /// looked at.
    #[test]
    fn differences_outside_skips_the_extents() {
        let dir = workspace::out_dir(&format!("test-diff.{}", std::process::id())).unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        let mut x = vec![0u8; 16 * 512];
        std::fs::write(&a, &x).unwrap();
        for lba in [1, 2, 5, 9, 15] {
            x[lba * 512 + 7] = 1;
        }
        std::fs::write(&b, &x).unwrap();
        let skip = [Extent {
            first_lba: 4,
            last_lba: 9,
        }];
        let (d, same) = differences_outside(&a, &b, &skip).unwrap();
        assert_eq!(d, vec![1..3, 15..16]);
        assert!(same);
        x.truncate(15 * 512);
        std::fs::write(&b, &x).unwrap();
        let (d, same) = differences_outside(&a, &b, &skip).unwrap();
        assert_eq!((d.len(), d[0].clone(), same), (1, 1..3, false));
        assert_eq!(
            read_extent(
                &a,
                Extent {
                    first_lba: 1,
                    last_lba: 2
                }
            )
            .unwrap(),
            vec![0; 1024]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The root partition of a system disk is checked in place of the whole image, and
    /// a damaged one fails.
    #[test]
    fn fsck_checks_the_root_partition() {
        let dir = workspace::out_dir(&format!("test-storage.{}", std::process::id())).unwrap();
        let rootfs = dir.join("rootfs.img");
        let mut tree = crate::rootfs::Tree::new();
        tree.file("etc/x", 0o644, b"x\n");
        crate::rootfs::build(&tree, &dir.join("work"), &rootfs).unwrap();
        fsck_in(
            &rootfs,
            (Target::qemu(&guest(&rootfs)).image)(&dir.join("copy.img")).unwrap(),
        )
        .unwrap();
        let img = dir.join("sys.img");
        let root = (Target::qemu_gpt(&guest(&rootfs)).image)(&img).unwrap();
        assert_eq!(root.first_lba, gpt_image::ALIGN_BLOCKS);
        fsck_in(&img, root).unwrap();
        assert_eq!(read_file_in(&img, root, "/etc/x").unwrap(), b"x\n");
        assert!(read_file_in(&img, root, "/etc/none").is_err());
        // The superblock's magic (at 1024 + 56 in the file system) broken.
        let mut data = std::fs::read(&img).unwrap();
        data[root.offset() as usize + 1024 + 56] ^= 0xff;
        std::fs::write(&img, data).unwrap();
        assert!(fsck_in(&img, root).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
