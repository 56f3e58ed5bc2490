//! Booting from a GRUB ISO in Bochs (`corei7_skylake_x`: VMX with EPT). Bochs runs at
//! about 40 MIPS, so these tests are few and have long limits; `cargo xtask test
//! --quick` leaves out every test whose name contains `bochs`.

use std::time::Duration;

use peregrine_tests::{assert_run, assert_success, boot_in, system, test_kernel, Emulator, Exit};
use xtask::testimage::TestImage;

/// The GRUB ISO and Bochs plumbing, with the hand-assembled test kernel.
#[test]
fn bochs_runner_grub_iso() {
    let image = TestImage {
        serial: "PASS bochs_runner\n".into(),
        debug_exit: Some(0x10),
        bochs_shutdown: true,
    };
    let spec = test_kernel("bochs-runner", &image).timeout(Duration::from_secs(90));
    let r = boot_in(Emulator::Bochs, &spec);
    assert_run(&r, Exit::Success, &["PASS bochs_runner"]);
}

/// The system itself from the GRUB ISO (GRUB's command lines, Bochs' ACPI tables).
#[test]
fn bochs_grub_boot() {
    let spec = system("bochs-grub-boot")
        .kernel_args("exit_after_boot")
        .timeout(Duration::from_secs(120));
    let r = boot_in(Emulator::Bochs, &spec);
    assert_success(&r, &["all 1 CPUs online"]);
}

/// Timer, interrupts and IPIs through the x2APIC (QEMU's software emulation has no
/// x2APIC; Bochs' `corei7_skylake_x` has): semaphore timeouts on the LAPIC timer, the
/// PIT's interrupt delivered to a semaphore, and a wake-up across two CPUs. Also the
/// root's arguments from GRUB's module command line.
#[test]
fn bochs_x2apic() {
    for (name, smp) in [("sm", 1), ("irq", 1), ("xcpu", 2)] {
        let spec = system(&format!("bochs-x2apic-{name}"))
            .root_args(&format!("test={name}"))
            .smp(smp)
            .timeout(Duration::from_secs(150));
        let r = boot_in(Emulator::Bochs, &spec);
        assert_success(&r, &["apic x2APIC"]);
        assert!(r.passed(name), "no `PASS {name}` line\n{}", r.report());
    }
}

/// The root's `test=vm` on VT-x with EPT (`corei7_skylake_x`): the tiny guest's exit
/// sequence (with `vmcall`), recall from the other CPU, revocation of a guest page
/// (INVEPT) and a hostile VMM whose random state the kernel refuses or the entry
/// reports as INVALID_STATE.
#[test]
fn bochs_vmx_scenario_vm() {
    let spec = system("bochs-vmx-vm")
        .root_args("test=vm rounds=100")
        .smp(2)
        .timeout(Duration::from_secs(120));
    let r = boot_in(Emulator::Bochs, &spec);
    assert_success(&r, &["vmx: EPT"]);
    assert!(r.passed("vm"), "no `PASS vm` line\n{}", r.report());
}
