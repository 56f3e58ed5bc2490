//! The Linux guest booted directly by QEMU (software emulation, `-cpu EPYC`, 256 MiB,
//! virtio-blk disk, 8250 console): the baseline side of `bench boot`, and the check
//! that the kernel, the initramfs and its `/init` tests work before Peregrine's VMM
//! runs them. With 1 and 2 vCPUs: the marker, `nproc`, the disk's known checksum, a
//! write read back, a sequential read, and the ACPI power-off that ends QEMU. On the
//! ext4 root (a copy of `rootfs.img`, `peregrine.root=/dev/vdb`): data synced before a
//! power-off is there on the next boot, and data whose fsync returned is there after
//! QEMU is killed at a random moment (`xtask::storage`); and `diskbench` (`bench disk`)
//! measures a scratch disk. On the GPT system disk (`xtask::sysdisk`) as its only
//! disk, the kernel finds both partitions and the guest boots from partition 1.
//!
//! The kernel is Debian's (fetched into `<target>/linux` once, with `apt-get download`);
//! a machine that cannot fetch it fails here with the reason.

use std::sync::Mutex;

use xtask::linux::{self, Guest};
use xtask::storage;

fn guest() -> &'static Guest {
    peregrine_tests::linux_guest()
}

/// One QEMU at a time: the machine's cores are few.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn boot(smp: u32, tests: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = linux::check_qemu(guest(), smp, tests).unwrap_or_else(|e| panic!("{e:#}"));
    let f = linux::figures(&r).expect("the marker has the guest's uptime");
    eprintln!(
        "linux smp {smp}: marker at guest uptime {:.2} s, QEMU ran {:.1} s, read {:?}; {:?}",
        f.marker_s,
        f.wall_s,
        f.read,
        linux::test_results(&r.serial)
    );
}

#[test]
fn linux_qemu_smp_1() {
    boot(1, "all");
}

#[test]
fn linux_qemu_smp_2() {
    boot(2, "nproc,disk");
}

#[test]
fn linux_ext4_root_persists_across_power_off() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p = storage::persist(&storage::Target::qemu(guest())).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "ext4 root: 4 MiB of seed {} (md5 {}) written, synced, powered off, read back; \
         QEMU ran {:.1} s and {:.1} s",
        p.seed,
        p.md5,
        p.runs[0].wall.as_secs_f64(),
        p.runs[1].wall.as_secs_f64()
    );
}

#[test]
fn linux_ext4_root_keeps_fsynced_blocks_across_a_kill() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = storage::crash(&storage::Target::qemu(guest())).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "ext4 root: SIGKILL {} ms after {} PEREGRINE-SEQ lines, last printed {}; after the \
         reboot blocks 0..={:?} valid of {} in the file",
        c.delay.as_millis(),
        c.after_lines,
        c.last_printed,
        c.check.highest,
        c.check.blocks
    );
}

#[test]
fn linux_diskbench_measures_a_scratch_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let v = xtask::bench_disk::direct_side(guest(), 1).unwrap_or_else(|e| panic!("{e:#}"));
    for (name, value) in &v {
        assert!(*value > 0.0, "{name} {value}");
    }
    eprintln!(
        "diskbench on {}, directly in QEMU: {v:?}",
        xtask::bench_disk::DIRECT_DEVICE
    );
}

/// The system disk (`xtask::sysdisk`, written by `xtask::gpt_image`) as the guest's
/// only virtio-blk disk: the kernel's own GPT parser finds `vda1` and `vda2` with the
/// sizes written, and `/init` mounts the ext4 root from `vda1` and powers off.
#[test]
fn linux_boots_from_partition_1_of_the_gpt_system_disk() {
    use xtask::{gpt_image, sysdisk};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = xtask::workspace::out_dir("linux/storage").expect("target directory");
    let img = dir.join("gpt-boot.img");
    let layout = sysdisk::build(&guest().rootfs, &img).unwrap_or_else(|e| panic!("{e:#}"));
    let run = linux::Run {
        name: "linux-gpt-boot".into(),
        smp: 1,
        tests: "parts,size,root".into(),
        timeout: std::time::Duration::from_secs(240),
        system_disk: Some(img.clone()),
        ..linux::Run::default()
    };
    let r = linux::boot_qemu(guest(), &run).unwrap_or_else(|e| panic!("{e:#}"));
    let t = linux::test_results(&r.serial);
    let of = |name: &str| {
        t.iter()
            .find(|x| x.0 == name)
            .map(|x| (x.1.as_str(), x.2.as_str()))
    };
    let (result, detail) = of("parts").unwrap_or_else(|| panic!("no parts line\n{}", r.report()));
    assert_eq!(result, "ok", "{}", r.report());
    let want: Vec<(String, u64)> = layout
        .extents
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("vda{}", i + 1), e.bytes() / 1024))
        .collect();
    assert_eq!(linux::parse_parts(detail), want, "{}", r.report());
    let size = (layout.blocks * gpt_image::BLOCK).to_string();
    assert_eq!(
        of("size").map(|s| s.0),
        Some(size.as_str()),
        "{}",
        r.report()
    );
    assert_eq!(
        of("root"),
        Some(("ext4", linux::SYSTEM_ROOT_DEVICE)),
        "{}",
        r.report()
    );
    assert_eq!(
        r.exit,
        xtask::boot::Exit::Other(0),
        "no power-off\n{}",
        r.report()
    );
    // The guest remounted its root read-only before the power-off: clean.
    let root = sysdisk::resolve(&img, sysdisk::DEFAULT_BINDING).unwrap();
    storage::fsck_in(
        &img,
        gpt_image::Extent {
            first_lba: root.first_lba,
            last_lba: root.first_lba + root.blocks - 1,
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    std::fs::remove_file(&img).ok();
}

/// Data synced before a power-off is there on the next boot, with the root on the GPT
/// system disk's partition 1 (`/dev/vda1`): the storage test as Peregrine runs it,
/// directly in QEMU.
#[test]
fn linux_gpt_root_persists_across_power_off() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let p =
        storage::persist(&storage::Target::qemu_gpt(guest())).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "GPT root: seed {} (md5 {}) read back; QEMU ran {:.1} s and {:.1} s",
        p.seed,
        p.md5,
        p.runs[0].wall.as_secs_f64(),
        p.runs[1].wall.as_secs_f64()
    );
}
