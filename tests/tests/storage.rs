//! Storage (issue 11): the user-level NVMe driver in the disk component, on QEMU's
//! `-device nvme`, with the PCI function, MSI-X interrupt and DMA memory the root
//! gives it; and Linux on Peregrine booted from the GPT system disk
//! (`xtask::sysdisk`) through the disk service, a VMM session bound to the root
//! partition: what it sees, and `xtask::storage`'s persistence and crash tests there.

use std::time::Duration;

use peregrine_tests::{images, system};
use xtask::boot::Exit;
use xtask::storage;

/// A scratch NVMe image of `mib` MiB under the target directory.
fn scratch_image(name: &str, mib: u64) -> std::path::PathBuf {
    let dir = xtask::workspace::out_dir("storage").expect("target directory");
    let path = dir.join(format!("{name}.img"));
    let f = std::fs::File::create(&path).expect("create the scratch image");
    f.set_len(mib << 20).expect("size the scratch image");
    path
}

/// QEMU arguments attaching `image` as an NVMe controller with one namespace.
fn nvme_args(image: &std::path::Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "file={},if=none,id=nvm,format=raw",
            xtask::qemu::escape_commas(&image.to_string_lossy())
        ),
        "-device".into(),
        "nvme,serial=peregrine-nvme,drive=nvm".into(),
    ]
}

/// Boots the disk component with `args` on a fresh image; the serial log once
/// `NVMe selftest` appears (or the time limit).
fn selftest(name: &str, args: &str) -> xtask::boot::RunResult {
    let image = scratch_image(name, 16);
    let mut spec = system(name)
        .module(images().disk(), args)
        .timeout(Duration::from_secs(90));
    spec.extra_qemu_args = nvme_args(&image);
    let r = xtask::qemu::run_qemu_until(&spec, Some("NVMe selftest"))
        .unwrap_or_else(|e| panic!("could not run QEMU: {e:#}"));
    assert_eq!(r.exit, Exit::Success, "no selftest line\n{}", r.report());
    r
}

/// The driver finds QEMU's controller through the root's PCI enumeration, brings it
/// up with MSI-X interrupts, writes, flushes and reads back a pattern, and sees a read
/// past the namespace's end refused.
#[test]
fn nvme_driver_selftest_with_msix() {
    let r = selftest("nvme-selftest", "pci=nvme msi=1 dma=1024 selftest");
    for m in [
        "PCI 00:",
        "class 010802",
        "interrupts MSI-X",
        "namespace 1: 32768 blocks of 512 bytes",
        "a read past the end is refused",
        "NVMe selftest ok",
    ] {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
    // The waits slept on the MSI-X semaphore and interrupts ended them.
    let woken: u64 = r
        .serial
        .lines()
        .find_map(|l| l.split("ended by an interrupt ").nth(1))
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(woken > 0, "no wait ended by an interrupt\n{}", r.report());
}

/// The same, polled (the measured alternative to interrupts).
#[test]
fn nvme_driver_selftest_polled() {
    let r = selftest("nvme-selftest-poll", "pci=nvme dma=1024 selftest poll");
    for m in ["interrupts polled", "NVMe selftest ok"] {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
}

/// A driver whose `pci=` names no device is not started, and the root says so.
#[test]
fn driver_without_its_device_is_refused() {
    let spec = system("nvme-absent")
        .module(images().disk(), "pci=nvme selftest")
        .root_args("exit")
        .timeout(Duration::from_secs(60));
    let r = peregrine_tests::boot(&spec);
    assert!(
        r.serial.contains("no free PCI function pci=nvme"),
        "no refusal line\n{}",
        r.report()
    );
}

/// The Linux guest on Peregrine from the system disk's root partition: the VMM's
/// session (`blk=part=name:peregrine-root`) is its `/dev/vda`, the partition alone (no
/// partition table in it, exactly the partition's size), mounted as the ext4 root.
#[test]
#[ignore = "needs the disk service and the VMM's session backend (issue 11, in progress)"]
fn linux_on_peregrine_sees_its_partition_alone() {
    use xtask::sysdisk;
    let guest = peregrine_tests::linux_guest();
    let dir = xtask::workspace::out_dir("linux/storage").expect("target directory");
    let img = dir.join("peregrine-session.img");
    sysdisk::build(&guest.rootfs, &img).unwrap_or_else(|e| panic!("{e:#}"));
    let part = sysdisk::resolve(&img, sysdisk::DEFAULT_BINDING).unwrap();
    let vm = sysdisk::NvmeVm {
        tests: "parts,size,root".into(),
        ..sysdisk::NvmeVm::new(&img)
    };
    let spec = sysdisk::linux_on_nvme_spec(
        system("peregrine-session").timeout(Duration::from_secs(300)),
        images(),
        guest,
        &vm,
    );
    let r = peregrine_tests::boot(&spec);
    let t = xtask::linux::test_results(&r.serial);
    let of = |name: &str| {
        t.iter()
            .find(|x| x.0 == name)
            .map(|x| (x.1.as_str(), x.2.as_str()))
    };
    assert_eq!(of("parts"), Some(("none", "")), "{}", r.report());
    let size = (part.blocks * xtask::gpt_image::BLOCK).to_string();
    assert_eq!(
        of("size").map(|s| s.0),
        Some(size.as_str()),
        "{}",
        r.report()
    );
    assert_eq!(
        of("root"),
        Some(("ext4", sysdisk::SESSION_ROOT_DEVICE)),
        "{}",
        r.report()
    );
    assert!(sysdisk::vm_powered_off(&r), "no power-off\n{}", r.report());
    std::fs::remove_file(&img).ok();
}

/// Data synced before a power-off is on the NVMe disk after the next boot: Linux on
/// Peregrine, its ext4 root the system disk's partition 1 through the disk service.
#[test]
#[ignore = "needs the disk service and the VMM's session backend (issue 11, in progress)"]
fn linux_on_peregrine_root_persists_across_power_off() {
    let _one = peregrine_tests::one_emulator();
    let target = storage::Target::peregrine(images(), peregrine_tests::linux_guest());
    let p = storage::persist(&target).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "Peregrine, root on NVMe: 4 MiB of seed {} (md5 {}) written, synced, powered off, \
         read back; QEMU ran {:.1} s and {:.1} s",
        p.seed,
        p.md5,
        p.runs[0].wall.as_secs_f64(),
        p.runs[1].wall.as_secs_f64()
    );
}

/// Blocks whose fsync returned are on the NVMe disk after QEMU is killed at a random
/// moment: Linux on Peregrine, through the VMM's virtio-blk, the disk service and the
/// NVMe driver's flush.
#[test]
#[ignore = "needs the disk service and the VMM's session backend (issue 11, in progress)"]
fn linux_on_peregrine_keeps_fsynced_blocks_across_a_kill() {
    let _one = peregrine_tests::one_emulator();
    let target = storage::Target::peregrine(images(), peregrine_tests::linux_guest());
    let c = storage::crash(&target).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "Peregrine, root on NVMe: SIGKILL {} ms after {} PEREGRINE-SEQ lines, last printed \
         {}; after the reboot blocks 0..={:?} valid of {}",
        c.delay.as_millis(),
        c.after_lines,
        c.last_printed,
        c.check.highest,
        c.check.blocks
    );
}
