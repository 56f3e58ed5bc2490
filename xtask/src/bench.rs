//! `cargo xtask bench ipc|vmexit`: deterministic instruction counts under QEMU `-icount`
//! (`vmexit`: see [`crate::bench_vmexit`]).
//!
//! The benchmark component (the root task started with `bench=<name>`) measures with
//! rdtsc and prints lines `BENCH <figure> <value> <unit>`; under `-icount shift=0` the
//! TSC advances with instructions executed, so each value is the exact instruction count
//! of the path and repeats run to run. Results go to `<target>/bench/<name>.json` as a
//! list of [`Figure`]s, the same shape for every benchmark.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::boot::{BootSpec, Exit};
use crate::build::{Images, Profile};
use crate::workspace;

/// One benchmark figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Name, e.g. `ipc_rt_0w` (0-word same-CPU IPC round trip).
    pub figure: String,
    /// Unit, e.g. `instructions` (icount) or `cycles` (KVM).
    pub unit: String,
    /// How it was measured: `qemu-icount`, `qemu-kvm`, `bochs`.
    pub mode: String,
    /// Peregrine's value.
    pub peregrine: Option<f64>,
    /// The baseline's value in the same mode, when there is one.
    pub baseline: Option<f64>,
}

/// The benchmarks `cargo xtask bench` knows.
pub const BENCHMARKS: &[&str] = &["ipc", "xcpu", "vmexit", "boot"];

/// The unit of a figure printed without one: TSC ticks, which count instructions under
/// `-icount shift=0`.
pub fn default_unit(mode: &str) -> &'static str {
    if mode.ends_with("icount") {
        "instructions"
    } else {
        "ticks"
    }
}

/// Parses `BENCH <figure> <value> [<unit>]` lines (possibly behind a console tag).
pub fn parse_bench_lines(serial: &str, mode: &str) -> Vec<Figure> {
    let mut figures = Vec::new();
    for line in serial.lines() {
        let Some(at) = line.find("BENCH ") else {
            continue;
        };
        let words: Vec<&str> = line[at + 6..].split_whitespace().collect();
        let (name, value, unit) = match words[..] {
            [name, value, unit, ..] => (name, value, unit),
            [name, value] => (name, value, default_unit(mode)),
            _ => continue,
        };
        // Under -icount shift=0 a TSC tick is an instruction.
        let unit = match unit {
            "tsc-ticks" | "ticks" if mode.ends_with("icount") => "instructions",
            u => u,
        };
        let Ok(value) = value.replace('_', "").parse::<f64>() else {
            continue;
        };
        figures.push(Figure {
            figure: name.to_string(),
            unit: unit.to_string(),
            mode: mode.to_string(),
            peregrine: Some(value),
            baseline: None,
        });
    }
    figures
}

fn number(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| {
        if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    })
}

/// The table printed for `figures`: figure, Peregrine, baseline, ratio, mode.
pub fn table(figures: &[Figure]) -> String {
    table_with(figures, "baseline")
}

/// [`table`] with the baseline's column named `baseline` (e.g. `kvm`).
pub fn table_with(figures: &[Figure], baseline: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<24} {:>14} {:>14} {:>8}  {:<14} mode",
        "figure", "peregrine", baseline, "ratio", "unit"
    );
    for f in figures {
        let ratio = match (f.peregrine, f.baseline) {
            (Some(p), Some(b)) if b != 0.0 => format!("{:.2}", p / b),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            t,
            "{:<24} {:>14} {:>14} {:>8}  {:<14} {}",
            f.figure,
            number(f.peregrine),
            number(f.baseline),
            ratio,
            f.unit,
            f.mode
        );
    }
    t
}

/// Which baseline figure a Peregrine figure is compared with: a same-CPU IPC round trip
/// between two PDs with Linux's pipe round trip between two processes, a call to a local
/// EC of the same PD with the futex ping-pong between two threads of one process.
pub fn baseline_for(figure: &str) -> Option<&'static str> {
    if figure.contains("local") {
        Some("linux_futex_rt")
    } else if figure == "ipc_rt_0w" {
        Some("linux_pipe_rt")
    } else {
        None
    }
}

/// Fills `baseline` of the Peregrine figures from the baseline figures (same mode and
/// unit) and appends the baseline figures themselves.
pub fn merge(mut figures: Vec<Figure>, baseline: Vec<Figure>) -> Vec<Figure> {
    for f in &mut figures {
        f.baseline = baseline_for(&f.figure)
            .and_then(|b| {
                baseline
                    .iter()
                    .find(|x| x.figure == b && x.mode == f.mode && x.unit == f.unit)
            })
            .and_then(|b| b.baseline);
    }
    figures.extend(baseline);
    figures
}

/// How `bench ipc` and `bench vmexit` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Extra kernel command line of Peregrine's side, e.g. `mitigations=off`.
    pub kernel_args: String,
    /// Whether the baseline (Linux, Linux/KVM) runs too.
    pub baseline: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kernel_args: String::new(),
            baseline: true,
        }
    }
}

/// Runs benchmark `name` (see [`BENCHMARKS`]) and its baseline, prints the table and
/// writes `<target>/bench/<name>.json`. Fails if Peregrine's run failed (the baseline's
/// figures are still written) or the baseline failed.
pub fn bench(name: &str, opts: &Options) -> Result<Vec<Figure>> {
    if !BENCHMARKS.contains(&name) {
        bail!(
            "unknown benchmark {name:?} (known: {})",
            BENCHMARKS.join(", ")
        );
    }
    if name == "vmexit" {
        return crate::bench_vmexit::bench(crate::boot::Emulator::Qemu, opts);
    }
    if name == "boot" {
        return crate::bench_boot::bench(None, crate::bench_boot::RUNS);
    }
    let peregrine = crate::build::build(Profile::Release)
        .and_then(|images| peregrine_ipc(&images, name, &opts.kernel_args));
    // TODO: with usable KVM, also measure both sides in cycles (mode `qemu-kvm`).
    let baseline = if opts.baseline {
        crate::baseline::run()
    } else {
        Ok(Vec::new())
    };
    let figures = merge(
        peregrine.as_ref().cloned().unwrap_or_default(),
        baseline.as_ref().cloned().unwrap_or_default(),
    );
    write_results(name, &figures, "baseline")?;
    peregrine.context("the Peregrine side of the benchmark failed")?;
    baseline.context("the Linux baseline failed")?;
    Ok(figures)
}

/// Writes `<target>/bench/<name>.json` and prints the table (baseline column named
/// `baseline`).
pub fn write_results(name: &str, figures: &[Figure], baseline: &str) -> Result<PathBuf> {
    let path = workspace::out_dir("bench")?.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(figures)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    print!("{}", table_with(figures, baseline));
    println!("wrote {}", path.display());
    Ok(path)
}

/// Boots the system with the root task's `bench=<name>` under `-icount shift=0 -smp 1`
/// (`-smp 2` for the cross-CPU figures of `xcpu`; kernel command line `kernel_args`)
/// and collects its `BENCH` lines.
fn peregrine_ipc(images: &Images, name: &str, kernel_args: &str) -> Result<Vec<Figure>> {
    let spec = BootSpec::new(&format!("bench-{name}"), images)
        .kernel_args(kernel_args)
        .root_args(&format!("bench={name}"))
        .module(images.test_component(), "role=benchsrv cpu=0")
        .smp(if name == "xcpu" { 2 } else { 1 })
        .icount()
        .timeout(Duration::from_secs(300));
    let result = crate::qemu::run_qemu(&spec)?;
    if result.exit != Exit::Success {
        bail!("benchmark run did not succeed: {}", result.report());
    }
    let figures = parse_bench_lines(&result.serial, "qemu-icount");
    if figures.is_empty() {
        bail!("the benchmark printed no BENCH lines: {}", result.report());
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_lines_with_and_without_tags() {
        let serial = "boot\nBENCH ipc_rt_0w 812 instructions\n[root] BENCH ipc_rt_8w 1_020 \
                      tsc-ticks\nBENCH broken\nBENCH x notanumber y\nBENCH ipc_local 420\n\
                      BENCH-MEDIAN ipc_local 430\n";
        let f = parse_bench_lines(serial, "qemu-icount");
        assert_eq!(f.len(), 3);
        assert_eq!(f[2].unit, "instructions");
        assert_eq!(f[2].peregrine, Some(420.0));
        assert_eq!(f[0].figure, "ipc_rt_0w");
        assert_eq!(f[0].peregrine, Some(812.0));
        assert_eq!(f[1].peregrine, Some(1020.0));
        assert_eq!(f[1].unit, "instructions");
        assert_eq!(f[1].mode, "qemu-icount");
    }

    #[test]
    fn merge_fills_baselines_by_figure() {
        let p = parse_bench_lines("BENCH ipc_rt_0w 800 instructions\nBENCH ipc_local_rt 500 instructions\nBENCH ipc_rt_8w 900 instructions\n", "qemu-icount");
        let b: Vec<Figure> = parse_bench_lines(
            "BENCH linux_pipe_rt 13000 instructions\nBENCH linux_futex_rt 10000 instructions\n",
            "qemu-icount",
        )
        .into_iter()
        .map(|f| Figure {
            baseline: f.peregrine,
            peregrine: None,
            ..f
        })
        .collect();
        let m = merge(p, b);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].baseline, Some(13000.0));
        assert_eq!(m[1].baseline, Some(10000.0));
        assert_eq!(m[2].baseline, None);
        assert_eq!(m[3].figure, "linux_pipe_rt");
        assert_eq!(m[3].peregrine, None);
    }

    #[test]
    fn json_shape_and_table() {
        let mut f = parse_bench_lines("BENCH ipc_rt_0w 800 instructions\n", "qemu-icount");
        f[0].baseline = Some(1600.0);
        let json = serde_json::to_value(&f).unwrap();
        let o = &json[0];
        assert_eq!(o["figure"], "ipc_rt_0w");
        assert_eq!(o["unit"], "instructions");
        assert_eq!(o["mode"], "qemu-icount");
        assert_eq!(o["peregrine"], 800.0);
        assert_eq!(o["baseline"], 1600.0);
        let t = table(&f);
        assert!(t.contains("0.50"), "{t}");
        let k = table_with(&f, "kvm");
        assert!(k.lines().next().unwrap().contains(" kvm "), "{k}");
        f[0].baseline = None;
        assert_eq!(
            serde_json::to_value(&f).unwrap()[0]["baseline"],
            serde_json::Value::Null
        );
    }
}
