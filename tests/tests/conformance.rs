//! The test guest's PC check list (guests/README.md, "Mode pc") on QEMU directly: the
//! guest image booted by QEMU's Multiboot loader (`-kernel guest-test -append mode=pc`)
//! with one and two vCPUs. Every check must say `ok` (`tsc_deadline` may be skipped
//! where the CPU model lacks it, as QEMU's software emulation does; the two-vCPU checks
//! are skipped with one) and the guest must end through isa-debug-exit with 0.
//!
//! This is the reference run; the same image on Peregrine's VMM must give the same lines.

use std::path::PathBuf;
use std::sync::OnceLock;

use peregrine_tests::{boot, boot_in, images, system, Emulator, RunResult};
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
    assert_check_list(&r, smp);
    assert_eq!(
        r.exit,
        Exit::Other(conformance::STATUS_ALL_PASSED),
        "QEMU's exit status (isa-debug-exit 0 gives 1)\n{}",
        r.report()
    );
    r
}

/// The same image under Peregrine's VMM (`mode=multiboot`, the PC with QEMU's test
/// devices), `smp` vCPUs on as many host CPUs, in `emulator`; the root's `test=vmm`
/// checks that the VM ended through isa-debug-exit with status 1.
fn run_on_peregrine(e: Emulator, smp: u32) -> RunResult {
    let r = boot_in(
        e,
        &peregrine_spec(
            &format!("conformance-peregrine-{e:?}-smp{smp}"),
            smp,
            "",
            "mode=pc",
        ),
    );
    assert_check_list(&r, smp);
    assert!(r.passed("vmm"), "the root's test=vmm\n{}", r.report());
    r
}

/// The system with a VMM booting the test guest as a Multiboot kernel with command line
/// `cmdline` on `smp` vCPUs (as many host CPUs); `vmm` adds to the VMM's arguments
/// (`expect=`); the root runs `test=vmm`.
fn peregrine_spec(name: &str, smp: u32, vmm: &str, cmdline: &str) -> xtask::boot::BootSpec {
    let _ = guest();
    system(name)
        .smp(smp)
        .root_args("test=vmm secs=300")
        .module(
            images().vmm(),
            &format!(
                "name=pc guest=guest-test cpus={smp} mem=64 mode=multiboot cpu=0 {vmm} -- {cmdline}"
            ),
        )
        .module(images().guest_test(), "")
        .timeout(std::time::Duration::from_secs(300))
}

/// Every check of the list in order, each ok or an allowed skip, and the guest's end
/// code 0.
fn assert_check_list(r: &RunResult, smp: u32) {
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
}

/// Both sides' verdicts must agree check by check (a check that passes on one side and
/// not the other fails, with both outputs shown). Where one side skips a check for a
/// CPU feature its model lacks (QEMU's software CPU has no TSC-deadline timer, and may
/// lack RDTSCP; our PC offers both), the other may run it: that is a difference of the
/// CPU models, not of the device behaviour, and is printed.
fn assert_same_verdicts(a: &RunResult, b: &RunResult) {
    let (va, vb) = (
        conformance::checks(&a.serial),
        conformance::checks(&b.serial),
    );
    let names = |v: &[(String, Verdict)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&va), names(&vb), "the check lists differ");
    for ((name, x), (_, y)) in va.iter().zip(&vb) {
        let feature_skip = |v: &Verdict| {
            matches!(v, Verdict::Skipped(why)
                if why.starts_with("CPUID.1:ECX.TSC_DEADLINE is clear") || why.starts_with("no RDTSCP"))
        };
        if x == y {
            continue;
        }
        if feature_skip(x) || feature_skip(y) {
            eprintln!("{name}: QEMU {x:?}, Peregrine {y:?} (a CPU feature one model lacks)");
            continue;
        }
        panic!(
            "check {name}: QEMU {x:?}, Peregrine {y:?}\n--- QEMU ---\n{}\n--- Peregrine ---\n{}",
            a.report(),
            b.report()
        );
    }
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

#[test]
fn pc_check_list_passes_on_peregrine_svm_with_one_vcpu_as_on_qemu() {
    let q = run_pc(1);
    let p = run_on_peregrine(Emulator::Qemu, 1);
    assert_same_verdicts(&q, &p);
}

#[test]
fn pc_check_list_passes_on_peregrine_svm_with_two_vcpus_as_on_qemu() {
    let q = run_pc(2);
    let p = run_on_peregrine(Emulator::Qemu, 2);
    assert_same_verdicts(&q, &p);
}

#[test]
fn pc_check_list_passes_on_peregrine_bochs_vmx_with_one_vcpu() {
    run_on_peregrine(Emulator::Bochs, 1);
}

/// A Multiboot guest that ends through isa-debug-exit with a code of its choosing: QEMU
/// exits with `(code << 1) | 1`; on Peregrine the VMM reports that status to the root,
/// whose `test=vmm` checks it (`expect=`).
#[test]
fn isa_debug_exit_code_reaches_qemu_and_the_root() {
    let mut spec = conformance::pc_spec("conformance-exit-qemu", guest(), 1);
    spec.kernel_args = "mode=exit code=0x21".into();
    let q = boot(&spec);
    assert_eq!(q.exit, Exit::Other(0x43), "QEMU's status\n{}", q.report());
    let p = boot(&peregrine_spec(
        "conformance-exit-peregrine",
        1,
        "expect=67",
        "mode=exit code=0x21",
    ));
    assert!(p.passed("vmm"), "{}", p.report());
    assert!(
        p.serial.contains("isa-debug-exit with 0x21 (status 67)"),
        "{}",
        p.report()
    );
}

/// A Multiboot guest that triple-faults ends as such on both: QEMU (with -no-reboot)
/// shuts down; the VMM reports a triple fault to the root, with the vCPU's state.
#[test]
fn a_triple_fault_ends_the_guest_on_qemu_and_peregrine() {
    let mut spec = conformance::pc_spec("conformance-triple-qemu", guest(), 1);
    spec.kernel_args = "mode=triple".into();
    let q = boot(&spec);
    assert_eq!(q.exit, Exit::Other(0), "QEMU shuts down\n{}", q.report());
    assert!(q.serial.contains("guest: triple fault"), "{}", q.report());
    let p = boot(&peregrine_spec(
        "conformance-triple-peregrine",
        1,
        "expect=triple-fault",
        "mode=triple",
    ));
    assert!(p.passed("vmm"), "{}", p.report());
    assert!(p.serial.contains("triple fault at rip"), "{}", p.report());
    // The VMM's shutdown report shows why: the IDT is empty.
    assert!(
        p.serial
            .contains("at shutdown: idt[8]: beyond the IDT's limit"),
        "{}",
        p.report()
    );
    assert!(p.serial.contains("idtr 0x0+0x0"), "{}", p.report());
}
