//! The emulator plumbing itself, tested with a tiny hand-assembled Multiboot kernel so
//! that it does not depend on the real kernel: exit codes, serial capture, timeouts.

use std::time::Duration;

use peregrine_tests::{assert_run, boot, test_kernel, Exit};
use xtask::testimage::TestImage;

fn image(serial: &str, debug_exit: Option<u8>) -> TestImage {
    TestImage {
        serial: serial.into(),
        debug_exit,
        bochs_shutdown: false,
    }
}

#[test]
fn qemu_runner_reports_success_and_captures_serial() {
    let spec = test_kernel(
        "runner-success",
        &image("hello from the test kernel\n", Some(0x10)),
    );
    let r = boot(&spec);
    assert_run(&r, Exit::Success, &["hello from the test kernel"]);
}

#[test]
fn qemu_runner_reports_failure() {
    let r = boot(&test_kernel(
        "runner-failure",
        &image("FAIL runner: on purpose\n", Some(0x11)),
    ));
    assert_run(&r, Exit::Failure, &["FAIL runner: on purpose"]);
}

#[test]
fn qemu_runner_enforces_the_timeout() {
    let spec =
        test_kernel("runner-timeout", &image("halting\n", None)).timeout(Duration::from_secs(3));
    let r = boot(&spec);
    assert_run(&r, Exit::Timeout, &["halting"]);
    assert!(r.wall < Duration::from_secs(10), "took {:?}", r.wall);
}

#[test]
fn qemu_runner_passes_module_arguments() {
    // The test kernel ignores modules, but QEMU must accept the -initrd syntax (commas
    // escaped) and the kernel command line.
    let module = xtask::workspace::out_dir("testimage")
        .unwrap()
        .join("module,with,commas");
    std::fs::write(&module, b"module").unwrap();
    let spec = test_kernel("runner-modules", &image("modules ok\n", Some(0x10)))
        .kernel_args("a=1 b")
        .module(module, "x=1,y=2");
    assert_run(&boot(&spec), Exit::Success, &["modules ok"]);
}
