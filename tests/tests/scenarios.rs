//! The root task's test scenarios (issue 2, section 4): the root task started with
//! `test=<name>` runs scenario `<name>` against `nul-test` components started with a
//! role (module lists as in `nul/root/src/scenario/mod.rs`), prints `PASS <name>` or
//! `FAIL <name>`, and ends the run through `isa-debug-exit`.

use std::time::Duration;

use peregrine_tests::{assert_success, boot, system, with_test_components};

/// Runs scenario `name` (root arguments `test=<name> <extra>`) with `nul-test` modules
/// `components` on `smp` CPUs and asserts `PASS <name>`.
fn scenario(name: &str, extra: &str, components: &[&str], smp: u32, timeout_s: u64) {
    let root_args = format!("test={name} {extra}");
    let spec = system(&format!("scenario-{name}"))
        .root_args(root_args.trim_end())
        .smp(smp)
        .timeout(Duration::from_secs(timeout_s));
    let r = boot(&with_test_components(spec, components));
    assert_success(&r, &[]);
    assert!(r.passed(name), "no `PASS {name}` line\n{}", r.report());
}

/// IPC with untyped words (2 CPUs: the bad-CPU check needs a second one).
#[test]
fn scenario_ipc() {
    scenario("ipc", "", &["role=echo cpu=0"], 2, 60);
}

/// Delegation of memory, I/O ports and object capabilities.
#[test]
fn scenario_delegate() {
    scenario(
        "delegate",
        "",
        &["role=memcheck cpu=0", "role=echo cpu=0"],
        1,
        60,
    );
}

/// After revoke, a revoked page faults and a revoked portal returns bad-capability.
#[test]
fn scenario_revoke() {
    scenario("revoke", "", &["role=memcheck cpu=0"], 2, 60);
}

/// A page fault resolved by a user-level pager.
#[test]
fn scenario_pager() {
    scenario("pager", "", &["role=paged cpu=0"], 1, 60);
}

/// Semaphore up, down and down with timeout.
#[test]
fn scenario_sm() {
    scenario("sm", "", &[], 1, 60);
}

/// Device memory, physical addresses and MSI routing from the kernel PD; the kernel's
/// own memory and interrupt hardware out of reach.
#[test]
fn scenario_devmem() {
    scenario("devmem", "", &[], 1, 60);
}

/// A hardware interrupt (PIT or serial) delivered to a user semaphore.
#[test]
fn scenario_irq() {
    scenario("irq", "", &[], 1, 60);
}

/// A cross-CPU wake-up through a semaphore.
#[test]
fn scenario_xcpu() {
    scenario("xcpu", "", &[], 2, 60);
}

/// A root lock held by the scenario thread while a higher-priority thread on the same
/// CPU wants it (a root service handler on the disk component's SC does): the waiter
/// lets the holder run instead of spinning on its CPU for good.
#[test]
fn scenario_lock() {
    scenario("lock", "", &[], 1, 60);
}

/// An up that wakes a higher-priority thread on the same CPU switches to it at once,
/// and the upper's next down blocks until its own up (the kernel once returned to the
/// upper without its SC, which left it queued on the semaphore it had not blocked on).
#[test]
fn scenario_wakeup() {
    scenario("wakeup", "", &[], 1, 60);
}

/// `ec_ctrl` recall of a thread running on another CPU, `sc_ctrl` consumed time.
#[test]
fn scenario_recall() {
    scenario("recall", "", &[], 2, 60);
}

/// Kernel-memory quota exhaustion returns its error.
#[test]
fn scenario_quota() {
    scenario("quota", "", &[], 1, 60);
}

/// A faulting component is reported and removed while the others keep running.
#[test]
fn scenario_fault() {
    scenario(
        "fault",
        "",
        &["role=fault cpu=0", "role=canary cpu=0"],
        1,
        60,
    );
}

/// The hostile test, second generation (issue 8): 10 million random hypercalls from
/// four hostile components, one on each CPU (the canary's CPU 0 too), which share
/// semaphores, a PD and their portals, rewrite their UTCBs from a second thread, wait
/// with far deadlines and build PD chains deeper than any kernel stack; one of them is
/// destroyed and started again every 2 s. The canary answers every call, and when they
/// are all gone the kernel's memory is back (the root's quota and the kernel's frames
/// exactly).
#[test]
fn scenario_hostile() {
    let hostile = [
        "role=hostile seed=1 cpu=0 quota=2600 deferred",
        "role=hostile seed=2 cpu=1 quota=2600 deferred",
        "role=hostile seed=3 cpu=2 quota=2600 deferred",
        "role=hostile seed=4 cpu=3 quota=2600 deferred",
        "role=canary cpu=0",
    ];
    let mut spec = system("scenario-hostile")
        .root_args("test=hostile calls=10000000 secs=900 respawn_ms=2000")
        .smp(4)
        .timeout(Duration::from_secs(900));
    spec.memory_mib = 1024;
    let r = boot(&with_test_components(spec, &hostile));
    assert_success(&r, &[]);
    assert!(
        r.passed("hostile"),
        "no `PASS hostile` line\n{}",
        r.report()
    );
}

/// The kernel-object findings of the isolation review (issue 8): kernel memory that
/// grew without a charge, quota minted by a lost race, a PD chain deeper than any
/// stack, death that left handlers busy and waiters asleep, a failed delegation that
/// unmapped a UTCB. Also: ECs that die without event portals are reported a few times,
/// not once each (a flood on a busy-waiting UART).
#[test]
fn scenario_isolation() {
    let spec = system("scenario-isolation")
        .root_args("test=isolation")
        .smp(2)
        .timeout(Duration::from_secs(300));
    let r = boot(&with_test_components(spec, &["role=blocker deferred"]));
    assert_success(&r, &[]);
    assert!(
        r.passed("isolation"),
        "no `PASS isolation` line\n{}",
        r.report()
    );
    let reports = r.serial.matches("unhandled event").count();
    assert!(
        reports <= 20,
        "{reports} unhandled-event reports for 200 stopped ECs\n{}",
        r.report()
    );
}

/// Virtualization (issue 3): a VM with one vCPU on QEMU's software SVM with NPT — exits
/// as portal calls, guest-memory revoke, recall from another CPU, a hostile VMM's
/// replies refused, a triple-faulting guest.
#[test]
fn scenario_vm() {
    scenario("vm", "", &[], 2, 120);
}
