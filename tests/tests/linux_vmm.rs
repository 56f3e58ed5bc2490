//! Linux on Peregrine: the VMM component (`nul-vmm mode=linux`) boots Debian's kernel
//! (`guests/linux`) on QEMU's software SVM with NPT, with the initramfs and the disk as
//! boot modules, runs `/init`'s tests and powers off; the VMM reports the power-off to
//! the root (`test=vmm`).

use std::time::Duration;

use peregrine_tests::{assert_success, boot_in, images, system, Emulator, RunResult};
use xtask::linux::{self, Guest};

fn guest() -> &'static Guest {
    peregrine_tests::linux_guest()
}

fn run(name: &str, smp: u32, cpus: u32, tests: &str, timeout_s: u64) -> RunResult {
    run_in(Emulator::Qemu, name, smp, cpus, tests, timeout_s)
}

fn run_in(e: Emulator, name: &str, smp: u32, cpus: u32, tests: &str, timeout_s: u64) -> RunResult {
    let spec = system(name)
        .smp(smp)
        .timeout(Duration::from_secs(timeout_s));
    let spec = linux::with_vmm(spec, images().vmm(), guest(), cpus, tests, "");
    let r = boot_in(e, &spec);
    eprintln!(
        "{name}: marker at guest uptime {:?} s, the emulator ran {:.1} s; {:?}",
        linux::figures(&r).map(|f| f.marker_s),
        r.wall.as_secs_f64(),
        linux::test_results(&r.serial)
    );
    r
}

fn result<'a>(results: &'a [(String, String, String)], name: &str) -> Option<&'a str> {
    results.iter().find(|t| t.0 == name).map(|t| t.1.as_str())
}

/// A test's result and detail.
fn result_and_detail<'a>(
    results: &'a [(String, String, String)],
    name: &str,
) -> Option<(&'a str, &'a str)> {
    results
        .iter()
        .find(|t| t.0 == name)
        .map(|t| (t.1.as_str(), t.2.as_str()))
}

#[test]
fn linux_vmm_one_vcpu() {
    let r = run("linux-vmm-1", 1, 1, "all", 240);
    assert!(
        r.serial.contains(linux::MARKER),
        "no marker\n{}",
        r.report()
    );
    let t = linux::test_results(&r.serial);
    assert_eq!(result(&t, "nproc"), Some("1"), "{}", r.report());
    assert_eq!(result(&t, "kvmclock"), Some("current"), "{}", r.report());
    assert_eq!(result(&t, "disk"), Some("ok"), "{}", r.report());
    // The write read back, and the whole disk as built after the write's restore.
    assert_eq!(
        result_and_detail(&t, "write"),
        Some(("ok", guest().disk_md5.as_str())),
        "{}",
        r.report()
    );
    // The sequential read: every byte of the disk, in some milliseconds.
    let (ms, bytes) = result_and_detail(&t, "read").unwrap_or_default();
    assert!(
        ms.strip_suffix("ms")
            .and_then(|m| m.parse::<u64>().ok())
            .is_some(),
        "read took {ms:?}\n{}",
        r.report()
    );
    assert_eq!(bytes, linux::DISK_SIZE.to_string(), "{}", r.report());
    assert!(
        r.serial.contains("vmm: guest powered off"),
        "{}",
        r.report()
    );
    assert_success(&r, &["PASS vmm"]);
}

#[test]
fn linux_vmm_two_vcpus() {
    let r = run("linux-vmm-2", 2, 2, "nproc,disk", 240);
    assert!(
        r.serial.contains(linux::MARKER),
        "no marker\n{}",
        r.report()
    );
    let t = linux::test_results(&r.serial);
    assert_eq!(result(&t, "nproc"), Some("2"), "{}", r.report());
    assert_eq!(result(&t, "disk"), Some("ok"), "{}", r.report());
    assert!(
        r.serial.contains("vmm: guest powered off"),
        "{}",
        r.report()
    );
    assert_success(&r, &["PASS vmm"]);
}

/// Two vCPUs sharing one host CPU (with their handlers and timer threads).
#[test]
fn linux_vmm_two_vcpus_on_one_cpu() {
    let r = run("linux-vmm-2on1", 1, 2, "nproc,disk", 240);
    assert!(
        r.serial.contains(linux::MARKER),
        "no marker\n{}",
        r.report()
    );
    let t = linux::test_results(&r.serial);
    assert_eq!(result(&t, "nproc"), Some("2"), "{}", r.report());
    assert_eq!(result(&t, "disk"), Some("ok"), "{}", r.report());
    assert_success(&r, &["PASS vmm"]);
}

/// The same Linux on Intel VT-x with EPT: Bochs `corei7_skylake_x`, one vCPU, to the
/// marker and the disk check (about 100 s here: the guest's uptime at the marker is
/// about 40 s of Bochs' clock, some 24,000 exits; `--quick` leaves it out with the
/// other Bochs tests).
#[test]
fn bochs_linux_vmm_one_vcpu() {
    let r = run_in(
        Emulator::Bochs,
        "bochs-linux-vmm-1",
        1,
        1,
        "nproc,disk",
        1800,
    );
    assert!(r.serial.contains("VMX EPT"), "{}", r.report());
    assert!(
        r.serial.contains(linux::MARKER),
        "no marker\n{}",
        r.report()
    );
    let t = linux::test_results(&r.serial);
    assert_eq!(result(&t, "nproc"), Some("1"), "{}", r.report());
    assert_eq!(result(&t, "disk"), Some("ok"), "{}", r.report());
    assert_success(&r, &["PASS vmm"]);
}
