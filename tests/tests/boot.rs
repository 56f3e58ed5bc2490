//! Booting the system on 1, 2 and 4 CPUs in QEMU (software emulation, SVM CPU model).
//!
//! `exit_after_boot` (temporary) makes the kernel print `all N CPUs online` once every
//! CPU is up and exit through `isa-debug-exit` with success.

use std::time::Duration;

use peregrine_tests::{assert_success, boot, system};

fn boot_smp(n: u32) {
    let spec = system(&format!("boot-smp{n}"))
        .kernel_args("exit_after_boot")
        .smp(n)
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &[&format!("all {n} CPUs online")]);
}

#[test]
fn boot_smp_1() {
    boot_smp(1);
}

#[test]
fn boot_smp_2() {
    boot_smp(2);
}

#[test]
fn boot_smp_4() {
    boot_smp(4);
}
