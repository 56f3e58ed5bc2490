//! Emulator integration tests: shared helpers.
//!
//! The tests boot the system through the xtask library, exactly as `cargo xtask run`
//! does. The images are built once per test binary; emulator runs are serialised (CI has
//! two cores, and an SMP guest under QEMU's software emulation uses them all), so
//! `cargo test -p peregrine-tests` needs no `--test-threads=1`.
//!
//! A missing emulator is installed when running as root (see `xtask::deps`); otherwise
//! the test fails naming the Debian packages, it never passes silently.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

pub use xtask::boot::{BootSpec, Emulator, Exit, RunResult};
use xtask::build::{Images, Profile};
use xtask::testimage::TestImage;

/// The release images, built (and their Multiboot header checked) once per process.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    let built = IMAGES.get_or_init(|| xtask::build(Profile::Release).map_err(|e| format!("{e:#}")));
    match built {
        Ok(images) => images,
        Err(e) => panic!("building the images failed: {e}"),
    }
}

/// The Linux guest (`guests/linux`: kernel, initramfs, disk), prepared once per process.
pub fn linux_guest() -> &'static xtask::linux::Guest {
    static GUEST: OnceLock<Result<xtask::linux::Guest, String>> = OnceLock::new();
    match GUEST.get_or_init(|| xtask::linux::prepare().map_err(|e| format!("{e:#}"))) {
        Ok(g) => g,
        Err(e) => panic!("preparing the Linux guest failed: {e}"),
    }
}

/// The default system (kernel + root task), named `name` for its log files.
pub fn system(name: &str) -> BootSpec {
    BootSpec::new(name, images())
}

/// Adds a `nul-test` module (the test component) per argument string, e.g.
/// `"role=echo cpu=0"`.
pub fn with_test_components(mut spec: BootSpec, args: &[&str]) -> BootSpec {
    for a in args {
        spec = spec.module(images().test_component(), a);
    }
    spec
}

/// Held while an emulator runs: one at a time per test binary. Tests that run the
/// emulator themselves (through `xtask::storage`, say) hold it too.
pub fn one_emulator() -> MutexGuard<'static, ()> {
    static EMULATOR: Mutex<()> = Mutex::new(());
    EMULATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boots `spec` in `emulator`, one run at a time; panics if the emulator cannot run.
pub fn boot_in(emulator: Emulator, spec: &BootSpec) -> RunResult {
    let _one_at_a_time = one_emulator();
    match xtask::boot::run(emulator, spec) {
        Ok(r) => {
            eprintln!(
                "{}: {:?} after {:.1} s",
                spec.name,
                r.exit,
                r.wall.as_secs_f64()
            );
            r
        }
        Err(e) => panic!("could not run {emulator:?} for {}: {e:#}", spec.name),
    }
}

/// Boots `spec` in QEMU.
pub fn boot(spec: &BootSpec) -> RunResult {
    boot_in(Emulator::Qemu, spec)
}

/// Asserts that the run ended with `expected` and its serial log has every marker.
pub fn assert_run(r: &RunResult, expected: Exit, markers: &[&str]) {
    assert_eq!(r.exit, expected, "unexpected exit\n{}", r.report());
    for m in markers {
        assert!(
            r.serial.contains(m),
            "serial log lacks {m:?}\n{}",
            r.report()
        );
    }
}

/// Asserts success, no failure markers, and every marker present.
pub fn assert_success(r: &RunResult, markers: &[&str]) {
    assert_run(r, Exit::Success, markers);
    assert!(
        r.failures().is_empty(),
        "failure markers: {:?}\n{}",
        r.failures(),
        r.report()
    );
}

/// Writes the hand-assembled test kernel `image` to a file named `name` and returns a
/// spec that boots it alone (no modules).
pub fn test_kernel(name: &str, image: &TestImage) -> BootSpec {
    let dir = xtask::workspace::out_dir("testimage").expect("target directory");
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, image.bytes()).expect("writing the test kernel");
    BootSpec {
        name: name.to_string(),
        kernel: path,
        kernel_args: String::new(),
        modules: Vec::new(),
        smp: 1,
        memory_mib: 128,
        cpu_model: None,
        icount: false,
        allow_kvm: false,
        timeout: Duration::from_secs(30),
        extra_qemu_args: Vec::new(),
        output: xtask::boot::Output::Capture,
    }
}
