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

/// Word `i` of block `b` that `nul-test role=blkclient seed=…` writes (its `pattern`).
fn client_pattern(seed: u64, b: u64, i: u64) -> u64 {
    let mut x =
        seed ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 30;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Two clients on two ranges of one disk, served at once by the disk service: each
/// writes, flushes and reads back its own blocks, requests outside its range or data
/// area are refused, the second breaks its ring on purpose (only its session ends);
/// afterwards the image holds each client's pattern in its range and zeros
/// everywhere else.
#[test]
fn disk_service_keeps_sessions_to_their_ranges() {
    const A: (u64, u64) = (2048, 4096);
    const B: (u64, u64) = (8192, 4096);
    let image = scratch_image("sessions", 16);
    let mut spec = system("disk-sessions")
        .module(images().disk(), "role=disk pci=nvme msi=1 dma=1024")
        .module(
            images().test_component(),
            &format!(
                "role=blkclient blk=range={}+{} mem=4 seed=11 fault",
                A.0, A.1
            ),
        )
        .module(
            images().test_component(),
            &format!(
                "role=blkclient blk=range={}+{} mem=4 seed=22 hostile delay=2000",
                B.0, B.1
            ),
        )
        .timeout(Duration::from_secs(120));
    spec.extra_qemu_args = nvme_args(&image);
    let r = xtask::qemu::run_qemu_until(&spec, Some("ring broken on purpose"))
        .unwrap_or_else(|e| panic!("could not run QEMU: {e:#}"));
    assert_eq!(
        r.exit,
        Exit::Success,
        "the clients did not finish\n{}",
        r.report()
    );
    for m in [
        "BLK-CLIENT 11 ok",
        "BLK-CLIENT 22 ok",
        "requests outside the session refused",
        // The first client died; the service closed its session for the root.
        "disk: session 0 closed",
        "blk=range=2048+4096: session 0 for component 1",
    ] {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
    assert!(!r.serial.contains("FAILED"), "{}", r.report());
    assert!(!r.serial.contains("stays out of use"), "{}", r.report());
    // The image: each range's first 64 blocks hold its client's pattern, the rest is
    // untouched.
    let disk = std::fs::read(&image).expect("read the image back");
    let block = |lba: u64| &disk[(lba * 512) as usize..((lba + 1) * 512) as usize];
    for (seed, (first, len)) in [(11, A), (22, B)] {
        for b in 0..64 {
            let want: Vec<u8> = (0..64)
                .flat_map(|i| client_pattern(seed, b, i).to_le_bytes())
                .collect();
            assert_eq!(block(first + b), &want[..], "client {seed}, block {b}");
        }
        for lba in first + 64..first + len {
            assert!(
                block(lba).iter().all(|&x| x == 0),
                "client {seed} wrote LBA {lba}"
            );
        }
    }
    for lba in (0..A.0).chain(A.0 + A.1..B.0).chain(B.0 + B.1..32768) {
        assert!(
            block(lba).iter().all(|&x| x == 0),
            "LBA {lba} outside both ranges changed"
        );
    }
}

/// A controller that stops answering (QEMU's null block driver with 10 s of latency
/// behind the NVMe device: no command completes within the service's 5 s deadline):
/// the client's write, flush and read end with IOERR, the service says why, later
/// requests fail at once, and nothing else goes down.
#[test]
fn disk_service_reports_a_controller_that_stops_answering() {
    let mut spec = system("disk-stalled")
        .module(images().disk(), "role=disk pci=nvme msi=1 dma=1024")
        .module(
            images().test_component(),
            "role=blkclient blk=range=2048+4096 mem=4 seed=33 ioerr",
        )
        .timeout(Duration::from_secs(120));
    spec.extra_qemu_args = vec![
        "-drive".into(),
        "driver=null-co,size=16M,latency-ns=10000000000,if=none,id=nvm".into(),
        "-device".into(),
        "nvme,serial=stalled,drive=nvm".into(),
    ];
    let r = xtask::qemu::run_qemu_until(&spec, Some("BLK-CLIENT 33"))
        .unwrap_or_else(|e| panic!("could not run QEMU: {e:#}"));
    assert_eq!(
        r.exit,
        Exit::Success,
        "the client did not finish\n{}",
        r.report()
    );
    for m in [
        "the NVMe controller stopped answering",
        "Write failed with IOERR",
        "Flush failed with IOERR",
        "Read failed with IOERR",
        "a later read failed at once",
        "BLK-CLIENT 33 ioerr ok",
    ] {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
    assert!(
        !r.serial.contains("removed:"),
        "a component went down\n{}",
        r.report()
    );
}

/// A controller that stops answering under a running Linux VM: the guest's reads and
/// writes of its disk end with I/O errors (the service's IOERR through virtio-blk), the
/// service says why, and the VM runs on to its power-off.
#[test]
fn linux_gets_io_errors_when_the_controller_stops_answering() {
    use xtask::sysdisk;
    let vm = sysdisk::NvmeVm {
        binding: "range=0+32768".into(),
        tests: "ioerr".into(),
        root: false,
        ..sysdisk::NvmeVm::new(std::path::Path::new("/unused"))
    };
    let mut spec = sysdisk::linux_on_nvme_spec(
        system("linux-nvme-ioerr").timeout(Duration::from_secs(300)),
        images(),
        peregrine_tests::linux_guest(),
        &vm,
    );
    spec.extra_qemu_args = vec![
        "-drive".into(),
        "driver=null-co,size=16M,latency-ns=10000000000,if=none,id=nvm".into(),
        "-device".into(),
        "nvme,serial=stalled,drive=nvm".into(),
    ];
    let r = peregrine_tests::boot(&spec);
    for m in [
        "the NVMe controller stopped answering",
        "PEREGRINE-TEST ioerr ok",
        "vmm: guest powered off",
        "PASS vmm",
    ] {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
}

/// The Linux guest on Peregrine from the system disk's root partition: the VMM's
/// session (`blk=part=name:peregrine-root`) is its `/dev/vda`, the partition alone (no
/// partition table in it, exactly the partition's size), mounted as the ext4 root.
#[test]
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

/// Two Linux VMs at once on two partitions of one NVMe disk, both VMMs on host CPU 1
/// (taking turns; the disk component alone on CPU 0): A writes `/persist.bin` on its
/// ext4 root (`part=name:peregrine-root`), B overwrites the whole of its `/dev/vda`
/// (`part=name:peregrine-data`) with a pattern and reads it back. Afterwards the root
/// partition is fsck-clean and holds A's file, the data partition B's pattern, and the
/// protective MBR, both GPTs and every other block outside the two partitions are as
/// built (`xtask::storage::isolation`).
#[test]
fn linux_vms_on_two_partitions_stay_in_them() {
    two_vms(storage::Placement::SharedCpu);
}

/// The same with each VM on a CPU of its own (A beside the disk component on CPU 0, B on
/// CPU 1), both guests executing at once.
#[test]
#[ignore = "intermittent under QEMU 7.2's TCG nested SVM, about 1 run in 90: the whole \
            machine resets, or a guest loses every translation right after a VM entry \
            (resumed by the VMM since: diag::impossible_shutdown); see the README's \
            system disk section"]
fn linux_vms_on_two_partitions_on_two_cpus_stay_in_them() {
    two_vms(storage::Placement::OwnCpus);
}

fn two_vms(at: storage::Placement) {
    let _one = peregrine_tests::one_emulator();
    let i = storage::isolation(images(), peregrine_tests::linux_guest(), at)
        .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "two VMs on one NVMe disk ({at:?}): A's /persist.bin (seed {}, md5 {}) on blocks \
         {:?}, B's pattern (seed {}, md5 {}) on blocks {:?}, nothing else changed; QEMU \
         ran {:.1} s",
        i.seed_a,
        i.md5_a,
        i.parts[0],
        i.seed_b,
        i.md5_b,
        i.parts[1],
        i.run.wall.as_secs_f64()
    );
}

/// `bench disk`'s sides once each, 1 s of random reads per queue depth: `diskbench` on
/// the scratch image on Peregrine (the disk component on MSI-X, and polled) and directly
/// in QEMU; every figure is there and positive on every side.
#[test]
fn bench_disk_sides_measure_the_scratch_image() {
    use xtask::bench_disk::{self, Side};
    let _one = peregrine_tests::one_emulator();
    for side in Side::ALL {
        let v = bench_disk::run_side(side, images(), peregrine_tests::linux_guest(), 1)
            .unwrap_or_else(|e| panic!("{}: {e:#}", side.name()));
        for (name, _) in bench_disk::FIGURES {
            let value = v.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            assert!(
                value.is_some_and(|x| x > 0.0),
                "{}: {name} {value:?}",
                side.name()
            );
        }
        eprintln!("bench disk, {}: {v:?}", side.name());
    }
}

/// A driver gets exactly its function: q35's AHCI controller (00:1f.2) given to a
/// component as `pci=ahci` shows its configuration page and its I/O BARs' ports,
/// which the component reads without a fault (no ports were its before).
#[test]
fn a_driver_gets_its_config_page_and_io_ports() {
    let spec = system("pcidump-ahci")
        .module(
            images().test_component(),
            "role=pcidump pci=ahci msi=0 dma=16",
        )
        .timeout(Duration::from_secs(60));
    let r = xtask::qemu::run_qemu_until(&spec, Some("PCIDUMP"))
        .unwrap_or_else(|e| panic!("could not run QEMU: {e:#}"));
    assert_eq!(r.exit, Exit::Success, "{}", r.report());
    for m in ["pcidump: 8086:2922 class 010601", "ports 0x", "PCIDUMP ok"] {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
    assert!(!r.serial.contains("removed:"), "{}", r.report());
}
