//! The test guest's PC check list (guests/README.md, "Mode pc") on QEMU directly: the
//! guest image booted by QEMU's Multiboot loader (`-kernel guest-test -append mode=pc`)
//! with one and two vCPUs. Every check must say `ok` (`tsc_deadline` may be skipped
//! where the CPU model lacks it, as QEMU's software emulation does; the two-vCPU checks
//! are skipped with one) and the guest must end through isa-debug-exit with 0.
//!
//! This is the reference run; the same image on Peregrine's VMM must give the same lines.

use std::path::PathBuf;
use std::sync::OnceLock;

use peregrine_tests::{boot, RunResult};
use xtask::boot::Exit;
use xtask::build::Profile;
use xtask::conformance::{self, Verdict};

/// The PC check list in the guest's order; `true`: needs two vCPUs.
const PC_CHECKS: &[(&str, bool)] = &[
    ("cpuid", false),
    ("fw_cfg", false),
    ("apic_base", false),
    ("mmio_mov", false),
    ("mmio_rmw", false),
    ("mmio_string", false),
    ("mmio_narrow", false),
    ("pit_mode0", false),
    ("pit_mode2", false),
    ("lapic_timer_oneshot", false),
    ("lapic_timer_periodic", false),
    ("tsc_deadline", false),
    ("ioapic_pit", false),
    ("rtc_update", false),
    ("ioapic_level_eoi", false),
    ("smp_start", true),
    ("ipi_fixed", true),
    ("ipi_nmi", true),
    ("cpuid_smp", true),
    ("msr_smp", true),
    ("tsc_smp", true),
    ("ipi_init", true),
];

/// The guest image, built (alone) and checked as a Multiboot kernel once.
fn guest() -> &'static PathBuf {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match GUEST
        .get_or_init(|| conformance::build_guest(Profile::Release).map_err(|e| format!("{e:#}")))
    {
        Ok(p) => p,
        Err(e) => panic!("building the test guest failed: {e}"),
    }
}

/// Whether a skip is one the check list allows on QEMU.
fn allowed_skip(name: &str, why: &str, smp: u32) -> bool {
    (name == "tsc_deadline" && why.starts_with("CPUID.1:ECX.TSC_DEADLINE is clear"))
        || (smp == 1 && why == "one vCPU")
        // Without RDTSCP the MSR check still compares the MSRs, but not TSC_AUX.
        || (name == "msr_smp" && why.starts_with("no RDTSCP"))
}

fn run_pc(smp: u32) -> RunResult {
    let spec = conformance::pc_spec(&format!("conformance-pc-smp{smp}"), guest(), smp);
    let r = boot(&spec);
    let lines = conformance::checks(&r.serial);
    let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = PC_CHECKS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want, "the check lines\n{}", r.report());
    for ((name, verdict), (_, needs_two)) in lines.iter().zip(PC_CHECKS) {
        match verdict {
            Verdict::Ok => assert!(
                !(*needs_two && smp < 2),
                "{name} ran with one vCPU\n{}",
                r.report()
            ),
            Verdict::Skipped(why) => assert!(
                allowed_skip(name, why, smp),
                "check {name} skipped: {why}\n{}",
                r.report()
            ),
            Verdict::Fail(d) => panic!("check {name} FAIL {d}\n{}", r.report()),
        }
    }
    assert_eq!(conformance::done_code(&r.serial), Some(0), "{}", r.report());
    assert_eq!(
        r.exit,
        Exit::Other(conformance::STATUS_ALL_PASSED),
        "QEMU's exit status (isa-debug-exit 0 gives 1)\n{}",
        r.report()
    );
    r
}

#[test]
fn the_guest_image_is_a_multiboot_kernel() {
    let h = conformance::check_image(guest()).expect("a Multiboot kernel");
    assert_eq!(h.load_addr, 0x10_0000);
}

#[test]
fn pc_check_list_passes_on_qemu_with_one_vcpu() {
    run_pc(1);
}

#[test]
fn pc_check_list_passes_on_qemu_with_two_vcpus() {
    run_pc(2);
}
