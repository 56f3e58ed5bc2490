//! The test guest (`guests/test`) under the KVM baseline's setup: Debian's Linux with
//! KVM in QEMU (`-cpu EPYC -icount shift=0 -smp 1`, software SVM with nested paging)
//! runs `kvm-runner`, which runs the guest's check list on two vCPUs. This tests the
//! guest and the runner against real KVM, independently of Peregrine's VMM.
//!
//! Needs QEMU, busybox and Debian's kernel package (fetched with `apt-get download`);
//! when one cannot be had the test says so on stderr as `SKIPPED …` and passes.

use std::time::Duration;

use peregrine_tests::images;
use xtask::baseline_kvm::{run_kvm_guest, unavailable, KvmGuest};
use xtask::Emulator;

const CHECKS: &[&str] = &[
    "cpuid",
    "pio_out",
    "pio_in",
    "mmio_read",
    "mmio_write",
    "hypercall",
    "hlt",
    "rdtsc",
    "msr",
    "exception",
    "smp",
];

#[test]
fn kvm_runner_runs_the_guest_check_list() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED kvm_runner_runs_the_guest_check_list: {why}");
        return;
    }
    let guest = KvmGuest {
        cpus: 2,
        runner_timeout_s: 60,
        timeout: Duration::from_secs(150),
        ..KvmGuest::new("kvm-check-list", "check")
    };
    let r =
        run_kvm_guest(images(), &guest, Emulator::Qemu).expect("running Linux with KVM in QEMU");
    let report = r.run.report();
    for c in CHECKS {
        assert!(
            r.run.serial.contains(&format!("check {c} ok")),
            "no `check {c} ok`\n{report}"
        );
    }
    assert!(r.run.serial.contains("guest: done 0"), "{report}");
    assert_eq!(r.status, Some(0), "runner status\n{report}");
}
