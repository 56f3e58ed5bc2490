//! `cargo xtask test`: every check, cheapest first (fmt, clippy on host and bare-metal
//! crates, host unit tests, the linux-loader comparison on Debian's kernel, a brief run
//! of each fuzz target, image build,
//! emulator integration tests with the Linux guest's direct QEMU boot, the benchmark
//! regression gate [`crate::gate`]), then one summary line `N passed, N failed[, N
//! skipped]`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::build::Profile;
use crate::deps::{self, Tool};
use crate::workspace::TARGET;
use crate::workspace::{self, cargo, describe};

/// The package of the emulator integration tests.
pub const INTEGRATION_PACKAGE: &str = "peregrine-tests";

/// The linux-loader comparison (`vmm/tests/linux_loader.rs`): `#[ignore]`d in a plain
/// `cargo test`, run by its own step here, so the host unit tests step leaves it out
/// (counted once, where it runs).
const LINUX_LOADER_TEST: &str = "debian_bzimage_loads_the_same_with_linux_loader";

/// What names the emulator tests `--quick` leaves out (Bochs is the slow emulator).
const SLOW_TESTS: &str = "bochs";

/// Options of `cargo xtask test`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Leave out the slow Bochs tests.
    pub quick: bool,
    /// Run only tests whose name contains this (host and emulator tests alike).
    pub filter: Option<String>,
}

/// Counts from `test result:` lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tests passed.
    pub passed: u64,
    /// Tests failed.
    pub failed: u64,
    /// Tests ignored (listed with their reason by the test harness).
    pub ignored: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Parses a libtest closing line: `test result: ok. 3 passed; 1 failed; 2 ignored; …`.
pub fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    Some(counts)
}

/// The outcome of the whole suite.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Tests counted from the test runs.
    pub tests: Counts,
    /// Steps that failed (each counts as one failure).
    pub failed_steps: Vec<String>,
    /// Tests the suite itself left out (`--quick`'s Bochs tests), counted as skipped.
    pub left_out: Vec<String>,
}

impl Summary {
    /// Total failures: failed tests plus failed steps.
    pub fn failed(&self) -> u64 {
        self.tests.failed + self.failed_steps.len() as u64
    }

    /// Tests not run: ignored ones and those the suite left out.
    pub fn skipped(&self) -> u64 {
        self.tests.ignored + self.left_out.len() as u64
    }

    /// The closing line.
    pub fn line(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.tests.passed, self.failed());
        if self.skipped() > 0 {
            s += &format!(", {} skipped", self.skipped());
        }
        s
    }
}

/// Runs a command that prints libtest output, echoing it and summing its counts.
/// Returns the counts and whether the command succeeded.
fn run_tests(cmd: &mut Command) -> Result<(Counts, bool)> {
    cmd.stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut counts = Counts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(c) = parse_test_result(&line) {
            counts += c;
        }
    }
    Ok((counts, child.wait()?.success()))
}

/// A test step whose failures are already counted as failed tests.
#[derive(Debug)]
struct TestsFailed(u64);

impl std::fmt::Display for TestsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} test(s) failed", self.0)
    }
}

impl std::error::Error for TestsFailed {}

/// Runs libtest `cmd`, adding its counts to `counts`; fails if tests failed or the
/// command failed otherwise (e.g. did not compile).
fn test_step(cmd: &mut Command, counts: &mut Counts) -> Result<()> {
    let (c, ok) = run_tests(cmd)?;
    *counts += c;
    if c.failed > 0 {
        return Err(TestsFailed(c.failed).into());
    }
    anyhow::ensure!(ok, "{} failed", describe(cmd));
    Ok(())
}

fn step(summary: &mut Summary, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
    println!("xtask test: {name}");
    let start = Instant::now();
    let result = f();
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!("xtask test: {name}: ok ({secs:.1} s)");
            true
        }
        Err(e) => {
            println!("xtask test: {name}: FAILED ({secs:.1} s): {e:#}");
            // Failed tests are counted as such, not once more as a failed step.
            if e.downcast_ref::<TestsFailed>().is_none() {
                summary.failed_steps.push(name.to_string());
            }
            false
        }
    }
}

fn pkg_args(packages: &[String]) -> Vec<String> {
    packages
        .iter()
        .flat_map(|p| ["-p".to_string(), p.clone()])
        .collect()
}

/// Runs the suite and prints the summary; the caller exits non-zero when
/// `summary.failed() > 0`.
pub fn run(opts: &Options) -> Result<Summary> {
    let start = Instant::now();
    let mut summary = Summary::default();
    let meta = workspace::metadata()?;
    let host = meta.host_packages();
    let bare = meta.bare_metal_packages();
    let unit: Vec<String> = host
        .iter()
        .filter(|p| *p != INTEGRATION_PACKAGE)
        .cloned()
        .collect();
    let filter: Vec<String> = opts.filter.iter().cloned().collect();

    let tools: &[Tool] = if opts.quick {
        &[Tool::Qemu, Tool::Iasl, Tool::Cxx, Tool::Cc, Tool::Ext4]
    } else {
        &[
            Tool::Qemu,
            Tool::Bochs,
            Tool::Grub,
            Tool::Iasl,
            Tool::Cxx,
            Tool::Cc,
            Tool::Ext4,
        ]
    };
    step(&mut summary, "host tools", || {
        deps::ensure(tools)?;
        deps::ensure_rust_target()
    });
    step(&mut summary, "fmt", || {
        workspace::run_checked(cargo().args(["fmt", "--all", "--", "--check"]))
    });
    step(&mut summary, "clippy (host)", || {
        workspace::run_checked(cargo().arg("clippy").args(pkg_args(&host)).args([
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    });
    step(&mut summary, "clippy (x86_64-unknown-none)", || {
        workspace::run_checked(
            cargo()
                .args(["clippy", "--release", "--target", TARGET])
                .args(pkg_args(&bare))
                .args(["--", "-D", "warnings"]),
        )
    });
    let mut counts = Counts::default();
    let mut left_out = Vec::new();
    step(&mut summary, "host unit tests", || {
        let (c, ok) = run_tests(
            cargo()
                .args(["test", "--no-fail-fast"])
                .args(pkg_args(&unit))
                .arg("--")
                .args(&filter)
                .args(["--skip", LINUX_LOADER_TEST]),
        )?;
        counts += c;
        anyhow::ensure!(ok || c.failed > 0, "cargo test failed before running tests");
        Ok(())
    });
    // The boot-protocol comparison with linux-loader needs Debian's bzImage, which a
    // plain `cargo test` does not fetch (there the test is ignored, saying why).
    step(&mut summary, "linux-loader comparison", || {
        let kernel = crate::guest_linux::debian_kernel()?;
        test_step(
            cargo()
                .env("PEREGRINE_LINUX_KERNEL", &kernel)
                .args(["test", "-p", "peregrine-vmm", "--test", "linux_loader"])
                .args(["--", "--ignored"])
                .args(&filter),
            &mut counts,
        )
    });
    step(&mut summary, "fuzz targets", || xtask_fuzz_briefly(&filter));
    let built = step(&mut summary, "build images", || {
        crate::build::build(Profile::Release).map(|_| ())
    });
    if built {
        step(&mut summary, "emulator integration tests", || {
            let mut cmd = cargo();
            cmd.args(["test", "--no-fail-fast", "-p", INTEGRATION_PACKAGE, "--"])
                .args(&filter);
            if opts.quick {
                let slow = list_tests(INTEGRATION_PACKAGE, &filter)?
                    .into_iter()
                    .filter(|t| t.contains(SLOW_TESTS));
                for t in slow {
                    println!("xtask test: --quick: skipped {t}");
                    left_out.push(t);
                }
                cmd.args(["--skip", SLOW_TESTS]);
            }
            test_step(&mut cmd, &mut counts)
        });
        // Peregrine's side of `bench ipc` and `bench vmexit` (QEMU SVM, and Bochs VT-x
        // unless --quick), held to bench/expected.json (no baselines: about half a
        // minute). A filter that does not name it skips it.
        if filter.iter().all(|f| "bench gate".contains(f.as_str())) {
            step(&mut summary, "bench gate", || {
                crate::gate::check(!opts.quick)
            });
        } else {
            println!("xtask test: the filter leaves out the bench gate");
        }
    } else {
        println!("xtask test: emulator integration tests not run: the images did not build");
    }
    summary.tests = counts;
    summary.left_out = left_out;
    let total = start.elapsed();
    if !summary.failed_steps.is_empty() {
        println!(
            "xtask test: failed steps: {}",
            summary.failed_steps.join(", ")
        );
    }
    println!("xtask test: total {}", fmt_duration(total));
    println!("{}", summary.line());
    Ok(summary)
}

/// The tests of `package` that `filter` selects, by name (`cargo test -- --list`).
fn list_tests(package: &str, filter: &[String]) -> Result<Vec<String>> {
    let mut cmd = cargo();
    cmd.args(["test", "-q", "-p", package, "--", "--list"])
        .args(filter);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        describe(&cmd),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(listed_tests(&String::from_utf8_lossy(&out.stdout)))
}

/// The test names in libtest's `--list` output (`name: test` lines; benchmarks and
/// the closing count left out).
pub fn listed_tests(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// Seconds each fuzz target runs in `cargo xtask test` (`$PEREGRINE_FUZZ_SECS`).
const FUZZ_SECS: u64 = 10;

/// Builds the fuzz targets and runs each briefly (a filter that names none skips them).
fn xtask_fuzz_briefly(filter: &[String]) -> Result<()> {
    let secs = std::env::var("PEREGRINE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FUZZ_SECS);
    let targets: Vec<String> = crate::fuzz::TARGETS
        .iter()
        .map(|t| t.to_string())
        .filter(|t| {
            filter
                .iter()
                .all(|f| t.contains(f.as_str()) || "fuzz".contains(f.as_str()))
        })
        .collect();
    if targets.is_empty() {
        println!("xtask test: the filter names no fuzz target");
        return Ok(());
    }
    crate::fuzz::run(&targets, secs)
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_closing_lines() {
        let c = parse_test_result(
            "test result: FAILED. 3 passed; 1 failed; 10 ignored; 0 measured; 2 filtered out; \
             finished in 0.01s",
        )
        .unwrap();
        assert_eq!(
            c,
            Counts {
                passed: 3,
                failed: 1,
                ignored: 10
            }
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }

    #[test]
    fn summary_line_counts_failed_steps_and_skips() {
        let mut s = Summary {
            tests: Counts {
                passed: 5,
                failed: 0,
                ignored: 0,
            },
            ..Default::default()
        };
        assert_eq!(s.line(), "5 passed, 0 failed");
        s.failed_steps.push("fmt".into());
        s.tests.ignored = 2;
        assert_eq!(s.line(), "5 passed, 1 failed, 2 skipped");
        // Tests the suite left out count as skipped beside the ignored ones.
        s.left_out.push("bochs_boot".into());
        assert_eq!(s.line(), "5 passed, 1 failed, 3 skipped");
    }

    #[test]
    fn lists_test_names() {
        let list = "boot_smp1: test\nbochs_boot: test\nsome_bench: benchmark\n\n\
                    2 tests, 1 benchmark\n";
        assert_eq!(listed_tests(list), ["boot_smp1", "bochs_boot"]);
        assert!(listed_tests("0 tests, 0 benchmarks\n").is_empty());
    }
}
