//! Platform hardening (issue 8, "Isolation that holds"): guarded kernel stacks, the
//! kernel image read-only in the physmap, the transient-execution mitigations line, and
//! NMIs that neither deadlock on the console nor run on a user GS base.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peregrine_tests::{assert_run, assert_success, boot, system, with_test_components, Exit};

/// The kernel's self-check walks its page table: every kernel stack (kernel, NMI, #DF,
/// #MC on each CPU) has an unmapped guard page below it.
#[test]
fn hardening_stack_guards() {
    let spec = system("hardening-stack-guards")
        .kernel_args("exit_after_boot")
        .smp(2)
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &["ok: kernel stacks guarded (8 stacks on 2 CPUs"]);
}

/// `selftest=stack_overflow`: the BSP recurses until its kernel stack overflows; the
/// guard page turns that into a #PF whose delivery faults, a #DF on its own stack, and
/// the panic naming the overflow.
#[test]
fn hardening_stack_overflow_panics_cleanly() {
    let spec = system("hardening-stack-overflow")
        .kernel_args("selftest=stack_overflow")
        .smp(2)
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_run(
        &r,
        Exit::Failure,
        &[
            "selftest: overflowing the kernel stack of cpu 0",
            "KERNEL PANIC: kernel stack overflow on cpu 0",
        ],
    );
}

/// The physmap alias of the kernel's text and read-only data is read-only, and the
/// physmap is not executable.
#[test]
fn hardening_physmap_text_read_only() {
    let spec = system("hardening-physmap")
        .kernel_args("exit_after_boot")
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &["ok: kernel text read-only in the physmap"]);
}

/// Kernel objects are allocated fallibly: the heap block `kmem::try_arc`/`try_box`
/// allocate ahead (answering `OutOfMemory` when there is none) is the one `Arc::new` and
/// `Box::new` take (the boot self-check).
#[test]
fn hardening_objects_allocated_fallibly() {
    let spec = system("hardening-objects")
        .kernel_args("exit_after_boot")
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &["ok: kernel objects allocated fallibly"]);
}

/// The line listing the transient-execution mitigations on QEMU's EPYC model: on by
/// default (an AMD CPU: eager FPU switching, SMAP, RSB filling on VM exit; not affected
/// by Meltdown, MDS or L1TF). QEMU's `EPYC` (Zen 1) enumerates neither IBPB nor
/// AutoIBRS, so the second line names Spectre v2 as not mitigated, and nothing else.
#[test]
fn hardening_mitigations_default() {
    let spec = system("hardening-mitigations")
        .kernel_args("exit_after_boot")
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &[]);
    let line = r
        .serial
        .lines()
        .find(|l| l.starts_with("mitigations: "))
        .unwrap_or_else(|| panic!("no `mitigations:` line\n{}", r.report()));
    assert_eq!(line.trim_end(), "mitigations: eager-fpu smap rsb-vmexit");
    let open = r
        .serial
        .lines()
        .find(|l| l.starts_with("not mitigated: "))
        .unwrap_or_else(|| panic!("no `not mitigated:` line\n{}", r.report()));
    assert_eq!(
        open.trim_end(),
        "not mitigated: spectre-v2-kernel (no eIBRS/AutoIBRS, no retpolines), \
         spectre-v2-vm (no IBPB)"
    );
}

/// An Intel CPU without RDCL_NO is affected by Meltdown, which the kernel does not
/// mitigate (no KPTI): it says so at boot. (QEMU's software emulation offers no
/// IA32_ARCH_CAPABILITIES, IBRS or MD_CLEAR, so its Skylake is affected by MDS and
/// Spectre v2 unmitigated as well.)
#[test]
fn hardening_mitigations_meltdown_reported() {
    let spec = system("hardening-mitigations-intel")
        .kernel_args("exit_after_boot")
        .cpu_model("Skylake-Client")
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &[]);
    assert!(
        r.serial
            .lines()
            .any(|l| l.trim_end() == "mitigations: eager-fpu smap"),
        "no `mitigations: eager-fpu smap` line\n{}",
        r.report()
    );
    let open = r
        .serial
        .lines()
        .find(|l| l.starts_with("not mitigated: "))
        .unwrap_or_else(|| panic!("no `not mitigated:` line\n{}", r.report()));
    assert!(
        open.starts_with("not mitigated: meltdown (no KPTI), "),
        "{open:?}"
    );
}

/// `mitigations=off` turns them all off and says so.
#[test]
fn hardening_mitigations_off() {
    let spec = system("hardening-mitigations-off")
        .kernel_args("exit_after_boot mitigations=off")
        .timeout(Duration::from_secs(60));
    let r = boot(&spec);
    assert_success(&r, &[]);
    assert!(
        r.serial.lines().any(|l| l.trim_end() == "mitigations: off"),
        "no `mitigations: off` line\n{}",
        r.report()
    );
}

/// Waits for `marker` in the serial log `log`, then sends the QEMU monitor command
/// `nmi` (an NMI to every CPU) every 2 ms through the monitor socket `sock` until
/// `stop`. Returns the number of NMIs sent.
fn flood_nmis(log: PathBuf, marker: &'static str, sock: PathBuf, stop: Arc<AtomicBool>) -> u64 {
    let start = Instant::now();
    while !std::fs::read_to_string(&log).is_ok_and(|s| s.contains(marker)) {
        if stop.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(120) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut conn = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(_) if !stop.load(Ordering::Relaxed) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return 0,
        }
    };
    // Drain the monitor's replies so that it never blocks on a full socket.
    if let Ok(mut rd) = conn.try_clone() {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while rd.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
    }
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        if conn.write_all(b"nmi\n").is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    sent
}

/// NMIs flood both CPUs (QEMU monitor `nmi` every 2 ms) while the kernel prints a line
/// for every failed hypercall of a hostile component (`trace_hc`) and a canary answers
/// IPC: the run must complete. Before the fix, an NMI arriving while its CPU held the
/// console lock spun on that lock forever.
#[test]
fn hardening_nmi_flood() {
    let name = "hardening-nmi-flood";
    let dir = xtask::workspace::out_dir("emulator").expect("target directory");
    let sock = dir.join(format!("{name}.monitor.sock"));
    let log = dir.join(format!("{name}.serial.log"));
    // A stale log or socket from an earlier run must not start the flood early.
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&log);
    let mut spec = system(name)
        .kernel_args("trace_hc")
        .root_args("test=hostile calls=40000 secs=120 quick")
        .smp(2)
        .timeout(Duration::from_secs(240));
    spec.extra_qemu_args = vec![
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ];
    let spec = with_test_components(
        spec,
        &["role=hostile seed=7 cpu=1 deferred", "role=canary cpu=0"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (log, sock, stop) = (log.clone(), sock.clone(), stop.clone());
        std::thread::spawn(move || flood_nmis(log, "hostile: 1 components", sock, stop))
    };
    let r = boot(&spec);
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().expect("the NMI thread");
    eprintln!("{name}: {sent} NMIs sent");
    assert_success(&r, &[]);
    assert!(r.passed("hostile"), "no `PASS hostile`\n{}", r.report());
    assert!(sent >= 500, "only {sent} NMIs sent\n{}", r.report());
}
