//! The Linux guest booted directly by QEMU (software emulation, `-cpu EPYC`, 256 MiB,
//! virtio-blk disk, 8250 console): the baseline side of `bench boot`, and the check
//! that the kernel, the initramfs and its `/init` tests work before Peregrine's VMM
//! runs them. With 1 and 2 vCPUs: the marker, `nproc`, the disk's known checksum, a
//! write read back, a sequential read, and the ACPI power-off that ends QEMU.
//!
//! The kernel is Debian's (fetched into `<target>/linux` once, with `apt-get download`);
//! a machine that cannot fetch it fails here with the reason.

use std::sync::Mutex;

use xtask::linux::{self, Guest};

fn guest() -> &'static Guest {
    peregrine_tests::linux_guest()
}

fn boot(smp: u32, tests: &str) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
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
