//! Storage (issue 11): the user-level NVMe driver in the disk component, on QEMU's
//! `-device nvme`, with the PCI function, MSI-X interrupt and DMA memory the root
//! gives it.

use std::time::Duration;

use peregrine_tests::{images, system};
use xtask::boot::Exit;

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
