//! The test guest (`guests/test`) under the KVM baseline's setup: Debian's Linux with
//! KVM in QEMU (`-cpu EPYC -icount shift=0 -smp 1`, software SVM with nested paging)
//! runs `vmm-kvm` (the VMM library's test machine hosted on KVM), which runs the guest's
//! check list on two vCPUs, and the guest's hostile mode. This tests the guest and the
//! VMM library against real KVM, independently of Peregrine's kernel.
//!
//! Needs QEMU, busybox and Debian's kernel package (fetched with `apt-get download`,
//! as `cargo xtask test` does for its linux-loader step); when one cannot be had the
//! test fails saying which, it never passes without having run.

use std::sync::Mutex;
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
    "pio_string",
];

/// Fails the test when the KVM baseline cannot run here: a test that did not run is not
/// a pass.
fn require_kvm_baseline() {
    if let Some(why) = unavailable() {
        panic!("the KVM baseline cannot run here: {why}");
    }
}

/// One emulator at a time (the tests of this file run in parallel threads).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn vmm_on_kvm_runs_the_guest_check_list() {
    require_kvm_baseline();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

/// The hostile guest under real KVM: it makes progress (past 1,000 actions) and the run
/// ends the way a hostile run may end (triple fault, the runner's time limit, a halt
/// with interrupts disabled, or an end code its random code wrote), never with a
/// runner error.
#[test]
fn vmm_on_kvm_survives_the_hostile_guest() {
    require_kvm_baseline();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let guest = KvmGuest {
        seed: 1,
        runner_timeout_s: 30,
        timeout: Duration::from_secs(150),
        ..KvmGuest::new("kvm-hostile", "hostile")
    };
    let r = run_kvm_guest(images(), &guest, Emulator::Qemu).expect("running Linux with KVM");
    let report = r.run.report();
    assert!(
        r.run.serial.contains("hostile: vCPU 0 1000 actions"),
        "no progress\n{report}"
    );
    assert!(
        matches!(r.status, Some(s) if s != 125),
        "runner status {:?}\n{report}",
        r.status
    );
}

/// The Linux guest of `tests/linux_vmm.rs` on the same VMM library's PC, hosted on KVM
/// (`vmm-kvm --linux`) inside Linux in QEMU with `cpus` vCPUs: it boots, its `/init`
/// tests pass (the vCPU count, kvmclock, the virtio-blk disk read, written and read
/// back, and read whole) and it powers off.
fn linux_on_kvm(cpus: u32) {
    require_kvm_baseline();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let guest = peregrine_tests::linux_guest();
    let r = xtask::baseline_kvm::run_linux_on_kvm(
        guest,
        cpus,
        "nproc,kvmclock,disk,write,read",
        Duration::from_secs(400),
    )
    .expect("running Linux with KVM in QEMU");
    let report = r.run.report();
    assert!(
        r.run.serial.contains(xtask::linux::MARKER),
        "no marker\n{report}"
    );
    let t = xtask::linux::test_results(&r.run.serial);
    let get = |name: &str| {
        t.iter()
            .find(|x| x.0 == name)
            .map(|x| (x.1.as_str(), x.2.as_str()))
    };
    let n = cpus.to_string();
    assert_eq!(get("nproc").map(|x| x.0), Some(n.as_str()), "{report}");
    assert_eq!(get("kvmclock").map(|x| x.0), Some("current"), "{report}");
    assert_eq!(get("disk").map(|x| x.0), Some("ok"), "{report}");
    assert_eq!(
        get("write"),
        Some(("ok", guest.disk_md5.as_str())),
        "{report}"
    );
    let bytes = xtask::linux::DISK_SIZE.to_string();
    assert_eq!(get("read").map(|x| x.1), Some(bytes.as_str()), "{report}");
    assert!(
        r.run.serial.contains("vmm-kvm: end guest powered off"),
        "{report}"
    );
    assert_eq!(r.status, Some(0), "vmm-kvm status\n{report}");
}

#[test]
fn vmm_on_kvm_boots_the_linux_guest() {
    linux_on_kvm(1);
}

#[test]
fn vmm_on_kvm_boots_the_linux_guest_on_two_vcpus() {
    linux_on_kvm(2);
}
