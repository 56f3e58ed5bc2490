//! `cargo xtask bench ipc|vmexit|boot`: deterministic instruction counts under QEMU
//! `-icount` (`vmexit`: see [`crate::bench_vmexit`], `boot`: [`crate::bench_boot`]).
//!
//! The benchmark component (the root task started with `bench=<name>`) measures with
//! rdtsc and prints lines `BENCH <figure> <value> <unit>` (the minimum) and
//! `bench: <figure> min X median Y p99 Z …` (the distribution); under `-icount shift=0`
//! the TSC advances with instructions executed, so each value is the exact instruction
//! count of the path and repeats run to run. Results go to `<target>/bench/<name>.json`
//! as a [`Report`] (`{"provenance": {…}, "figures": [Figure…]}`, the same shape for every
//! benchmark) and a bar chart beside it (`<name>.svg`, [`crate::plot`]).
//!
//! Every benchmark runs Peregrine and its baselines with the mitigations on and with
//! `mitigations=off` (Peregrine's kernel command line, the Linux guests' command line,
//! seL4's two builds): each [`Figure`] says which in `config`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::boot::{BootSpec, Exit};
use crate::build::{Images, Profile};
use crate::provenance::Provenance;
use crate::workspace;

/// One row of a benchmark: a figure in one configuration, Peregrine's value beside one
/// baseline's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Figure {
    /// Name, e.g. `ipc_rt_0w` (0-word same-CPU IPC round trip).
    pub figure: String,
    /// Unit, e.g. `instructions` (icount) or `s`.
    pub unit: String,
    /// How it was measured: `qemu-icount`, `qemu-tcg`, `qemu-kvm`, `bochs-vmx`.
    pub mode: String,
    /// The configuration of both sides: `mitigations=on` (each side's default) or
    /// `mitigations=off`; empty where it does not apply.
    #[serde(default)]
    pub config: String,
    /// Peregrine's value (the minimum where there are samples).
    pub peregrine: Option<f64>,
    /// Which baseline `baseline` is: `linux-pipe`, `linux-futex`, `kvm`,
    /// `kvm-user-irqchip`, `seL4`, `qemu-direct`, `kvm-l1`; empty for none.
    #[serde(default)]
    pub baseline_name: String,
    /// The baseline's value in the same mode and configuration, when there is one.
    pub baseline: Option<f64>,
    /// Median of Peregrine's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median: Option<f64>,
    /// 99th percentile of Peregrine's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    /// Median of the baseline's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_median: Option<f64>,
    /// 99th percentile of the baseline's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_p99: Option<f64>,
    /// Peregrine's value over the baseline's, where a benchmark records it (`disk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Why a value is missing, e.g. `seL4 images not given`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    /// This figure as a baseline's: the value and distribution move to the baseline's
    /// fields, named `name`.
    pub fn into_baseline(self, name: &str) -> Figure {
        Figure {
            baseline_name: name.to_string(),
            baseline: self.peregrine,
            baseline_median: self.median,
            baseline_p99: self.p99,
            ratio: None,
            peregrine: None,
            median: None,
            p99: None,
            ..self
        }
    }

    /// With `config` set.
    pub fn with_config(self, config: &str) -> Figure {
        Figure {
            config: config.to_string(),
            ..self
        }
    }
}

/// What `<target>/bench/<name>.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Where the figures come from.
    pub provenance: Provenance,
    /// The rows.
    pub figures: Vec<Figure>,
}

/// The benchmarks `cargo xtask bench` knows.
pub const BENCHMARKS: &[&str] = &["ipc", "xcpu", "vmexit", "boot", "disk"];

/// The configuration of a run with the mitigations on (every side's default).
pub const MITIGATIONS_ON: &str = "mitigations=on";
/// The configuration of a run with `mitigations=off` on every side's command line.
pub const MITIGATIONS_OFF: &str = "mitigations=off";

/// The extra kernel command line of `config` (the same word on Peregrine and Linux).
pub fn config_args(config: &str) -> &str {
    if config == MITIGATIONS_OFF {
        MITIGATIONS_OFF
    } else {
        ""
    }
}

/// The unit of a figure printed without one: TSC ticks, which count instructions under
/// `-icount shift=0`.
pub fn default_unit(mode: &str) -> &'static str {
    if mode.ends_with("icount") {
        "instructions"
    } else {
        "ticks"
    }
}

/// A `bench: <figure> min X median Y [p99 Z] …` line's figure, median and p99.
fn parse_distribution(line: &str) -> Option<(&str, Option<f64>, Option<f64>)> {
    let at = line.find("bench: ")?;
    let mut words = line[at + 7..].split_whitespace();
    let name = words.next()?;
    let (mut median, mut p99) = (None, None);
    let rest: Vec<&str> = words.collect();
    for pair in rest.windows(2) {
        let value = pair[1].replace('_', "").parse::<f64>().ok();
        match pair[0] {
            "median" => median = value,
            "p99" => p99 = value,
            _ => {}
        }
    }
    Some((name, median, p99))
}

/// Parses `BENCH <figure> <value> [<unit>]` lines (possibly behind a console tag), with
/// the median and 99th percentile of a `bench: <figure> … median Y p99 Z` line of the
/// same figure.
pub fn parse_bench_lines(serial: &str, mode: &str) -> Vec<Figure> {
    let mut figures: Vec<Figure> = Vec::new();
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
            ..Figure::default()
        });
    }
    for (name, median, p99) in serial.lines().filter_map(parse_distribution) {
        if let Some(f) = figures.iter_mut().find(|f| f.figure == name) {
            f.median = median;
            f.p99 = p99;
        }
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

/// `median/p99`, or `-` without samples.
fn spread(median: Option<f64>, p99: Option<f64>) -> String {
    match (median, p99) {
        (None, None) => "-".into(),
        (m, p) => format!("{}/{}", number(m), number(p)),
    }
}

/// The table printed for `figures`: figure, configuration, Peregrine (with its median
/// and p99), the baseline by name (with its), ratio, unit, mode, and a note.
pub fn table(figures: &[Figure]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<20} {:<16} {:>10} {:>13}  {:<17} {:>10} {:>13} {:>6}  {:<12} mode",
        "figure",
        "config",
        "peregrine",
        "median/p99",
        "baseline",
        "value",
        "median/p99",
        "ratio",
        "unit"
    );
    for f in figures {
        let ratio = match (f.peregrine, f.baseline) {
            (Some(p), Some(b)) if b != 0.0 => format!("{:.2}", p / b),
            _ => "-".to_string(),
        };
        let name = if f.baseline_name.is_empty() {
            "-"
        } else {
            &f.baseline_name
        };
        let _ = write!(
            t,
            "{:<20} {:<16} {:>10} {:>13}  {:<17} {:>10} {:>13} {:>6}  {:<12} {}",
            f.figure,
            if f.config.is_empty() { "-" } else { &f.config },
            number(f.peregrine),
            spread(f.median, f.p99),
            name,
            number(f.baseline),
            spread(f.baseline_median, f.baseline_p99),
            ratio,
            f.unit,
            f.mode
        );
        if let Some(n) = &f.note {
            let _ = write!(t, "  ({n})");
        }
        t.push('\n');
    }
    t
}

/// Which baseline figure of the Linux guest a Peregrine IPC figure is compared with: a
/// same-CPU IPC round trip between two PDs with Linux's pipe round trip between two
/// processes, a call to a local EC of the same PD with the futex ping-pong between two
/// threads of one process.
pub fn baseline_for(figure: &str) -> Option<(&'static str, &'static str)> {
    if figure.contains("local") {
        Some(("linux_futex_rt", "linux-futex"))
    } else if figure == "ipc_rt_0w" {
        Some(("linux_pipe_rt", "linux-pipe"))
    } else {
        None
    }
}

/// Fills the baseline of the Peregrine figures from the Linux guest's figures of the same
/// mode, unit and configuration (`linux`: as [`parse_bench_lines`] returns them).
pub fn merge(mut figures: Vec<Figure>, linux: &[Figure]) -> Vec<Figure> {
    for f in &mut figures {
        let Some((b, name)) = baseline_for(&f.figure) else {
            continue;
        };
        if let Some(x) = linux
            .iter()
            .find(|x| x.figure == b && x.mode == f.mode && x.unit == f.unit && x.config == f.config)
        {
            f.baseline_name = name.to_string();
            f.baseline = x.peregrine;
            f.baseline_median = x.median;
            f.baseline_p99 = x.p99;
        }
    }
    figures
}

/// How `bench ipc` and `bench vmexit` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The configurations to measure (see [`config_args`]); by default both.
    pub configs: Vec<String>,
    /// Extra kernel command line of Peregrine's side, e.g. `fpu=lazy`, added to the
    /// configuration's.
    pub kernel_args: String,
    /// Whether the baselines (Linux, Linux/KVM, seL4) run too.
    pub baseline: bool,
    /// seL4's images (`mitigation-on/`, `mitigation-off/`; `bench ipc` only).
    pub sel4: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            configs: vec![MITIGATIONS_ON.into(), MITIGATIONS_OFF.into()],
            kernel_args: String::new(),
            baseline: true,
            sel4: None,
        }
    }
}

impl Options {
    /// Peregrine's kernel command line in `config`.
    pub fn peregrine_args(&self, config: &str) -> String {
        [config_args(config), self.kernel_args.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs benchmark `name` (see [`BENCHMARKS`]) and its baselines, prints the table and
/// writes `<target>/bench/<name>.json` and `.svg`. Fails if Peregrine's run failed (the
/// baselines' figures are still written) or a baseline failed.
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
    if name == "disk" {
        return crate::bench_disk::bench(crate::bench_disk::RUNS, crate::bench_disk::RANDOM_SECS);
    }
    let images = crate::build::build(Profile::Release)?;
    let mut figures = Vec::new();
    let mut failed = Vec::new();
    let mut kernels = Vec::new();
    // The Linux and seL4 baselines are IPC round trips on one CPU: `xcpu` has none.
    let baselines = opts.baseline && name == "ipc";
    for config in &opts.configs {
        let peregrine = peregrine_ipc(&images, name, &opts.peregrine_args(config))
            .map(|f| f.into_iter().map(|f| f.with_config(config)).collect());
        let linux = if baselines {
            crate::baseline::run(config).map(|(k, f)| {
                kernels.push(k);
                f
            })
        } else {
            Ok(Vec::new())
        };
        let peregrine: Vec<Figure> = peregrine.unwrap_or_else(|e: anyhow::Error| {
            failed.push(format!("Peregrine ({config}): {e:#}"));
            Vec::new()
        });
        let linux = linux.unwrap_or_else(|e| {
            failed.push(format!("the Linux baseline ({config}): {e:#}"));
            Vec::new()
        });
        let sel4 = if baselines {
            crate::sel4::rows(opts.sel4.as_deref(), config, &peregrine)
        } else {
            Ok((Vec::new(), None))
        };
        figures.extend(merge(peregrine, &linux));
        match sel4 {
            Ok((rows, kernel)) => {
                figures.extend(rows);
                kernels.extend(kernel);
            }
            Err(e) => failed.push(format!("seL4 ({config}): {e:#}")),
        }
    }
    if name == "ipc" {
        // The kernel image's footprint beside the IPC figures (one build: no config).
        match crate::image_size::figures(&images.kernel()) {
            Ok(f) => figures.extend(f),
            Err(e) => failed.push(format!("the kernel image's sizes: {e:#}")),
        }
    }
    sort_rows(&mut figures);
    kernels.sort();
    kernels.dedup();
    let provenance = Provenance::now("qemu-icount", kernels);
    write_results(
        name,
        &Report {
            provenance,
            figures: figures.clone(),
        },
    )?;
    if !failed.is_empty() {
        bail!("bench {name}: failed: {}", failed.join("; "));
    }
    Ok(figures)
}

/// Orders rows by configuration (as given), then figure (first appearance), then the
/// baseline's name, keeping rows of one figure together.
pub fn sort_rows(figures: &mut [Figure]) {
    let mut order: Vec<String> = Vec::new();
    for f in figures.iter() {
        if !order.contains(&f.figure) {
            order.push(f.figure.clone());
        }
    }
    let configs: Vec<String> = {
        let mut c: Vec<String> = Vec::new();
        for f in figures.iter() {
            if !c.contains(&f.config) {
                c.push(f.config.clone());
            }
        }
        c
    };
    let pos = |v: &[String], s: &str| v.iter().position(|x| x == s).unwrap_or(usize::MAX);
    figures.sort_by(|a, b| {
        (pos(&configs, &a.config), pos(&order, &a.figure))
            .cmp(&(pos(&configs, &b.config), pos(&order, &b.figure)))
    });
}

/// Writes `<target>/bench/<name>.json` and the chart `<name>.svg` beside it and prints
/// the table.
pub fn write_results(name: &str, report: &Report) -> Result<PathBuf> {
    let dir = workspace::out_dir("bench")?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    let svg = dir.join(format!("{name}.svg"));
    crate::plot::write_svg(&svg, &format!("bench {name}"), report)?;
    print!("{}", table(&report.figures));
    println!("wrote {} and {}", path.display(), svg.display());
    Ok(path)
}

/// Reads a report written by [`write_results`]; `None` if there is none or it has an
/// older shape.
pub fn read_report(path: &Path) -> Option<Report> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Boots the system with the root task's `bench=<name>` under `-icount shift=0 -smp 1`
/// (`-smp 2` for the cross-CPU figures of `xcpu`; kernel command line `kernel_args`)
/// and collects its `BENCH` lines.
pub fn peregrine_ipc(images: &Images, name: &str, kernel_args: &str) -> Result<Vec<Figure>> {
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
                      BENCH-MEDIAN ipc_local 430\n\
                      [root] bench: ipc_rt_0w min 812 median 820 p99 900 (1000 iterations)\n\
                      bench: ipc_local min 420 median 430 (1000 iterations)\n";
        let f = parse_bench_lines(serial, "qemu-icount");
        assert_eq!(f.len(), 3);
        assert_eq!(f[2].unit, "instructions");
        assert_eq!(f[2].peregrine, Some(420.0));
        assert_eq!((f[2].median, f[2].p99), (Some(430.0), None));
        assert_eq!(f[0].figure, "ipc_rt_0w");
        assert_eq!(f[0].peregrine, Some(812.0));
        assert_eq!((f[0].median, f[0].p99), (Some(820.0), Some(900.0)));
        assert_eq!(f[1].peregrine, Some(1020.0));
        assert_eq!(f[1].median, None);
        assert_eq!(f[1].unit, "instructions");
        assert_eq!(f[1].mode, "qemu-icount");
    }

    #[test]
    fn merge_fills_baselines_by_figure_and_config() {
        let p: Vec<Figure> = parse_bench_lines(
            "BENCH ipc_rt_0w 800 instructions\nBENCH ipc_rt_local_0w 500 instructions\n\
             BENCH ipc_rt_8w 900 instructions\n",
            "qemu-icount",
        )
        .into_iter()
        .map(|f| f.with_config(MITIGATIONS_OFF))
        .collect();
        let linux = |config: &str, pipe: u32| {
            parse_bench_lines(
                &format!(
                    "BENCH linux_pipe_rt {pipe} instructions\nBENCH linux_futex_rt 10000 \
                     instructions\nbench: linux_pipe_rt min {pipe} median 13500 p99 20000\n"
                ),
                "qemu-icount",
            )
            .into_iter()
            .map(|f| f.with_config(config))
            .collect::<Vec<_>>()
        };
        let b = [linux(MITIGATIONS_ON, 14000), linux(MITIGATIONS_OFF, 13000)].concat();
        let m = merge(p, &b);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].baseline, Some(13000.0), "the same configuration's");
        assert_eq!(m[0].baseline_name, "linux-pipe");
        assert_eq!(m[0].baseline_median, Some(13500.0));
        assert_eq!(m[0].baseline_p99, Some(20000.0));
        assert_eq!(m[1].baseline, Some(10000.0));
        assert_eq!(m[1].baseline_name, "linux-futex");
        assert_eq!(m[2].baseline, None);
        assert_eq!(m[2].baseline_name, "");
    }

    #[test]
    fn json_shape_and_table() {
        let mut f = parse_bench_lines(
            "BENCH ipc_rt_0w 800 instructions\nbench: ipc_rt_0w min 800 median 810 p99 990\n",
            "qemu-icount",
        );
        f[0].baseline = Some(1600.0);
        f[0].baseline_name = "linux-pipe".into();
        f[0].config = MITIGATIONS_ON.into();
        let report = Report {
            provenance: Provenance::sample(),
            figures: f.clone(),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["provenance"]["mode"], "qemu-icount");
        let o = &json["figures"][0];
        assert_eq!(o["figure"], "ipc_rt_0w");
        assert_eq!(o["unit"], "instructions");
        assert_eq!(o["mode"], "qemu-icount");
        assert_eq!(o["config"], "mitigations=on");
        assert_eq!(o["peregrine"], 800.0);
        assert_eq!(o["median"], 810.0);
        assert_eq!(o["p99"], 990.0);
        assert_eq!(o["baseline"], 1600.0);
        assert_eq!(o["baseline_name"], "linux-pipe");
        assert!(o.get("baseline_p99").is_none(), "absent, not null");
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
        let t = table(&f);
        let row = t.lines().nth(1).unwrap();
        assert!(row.contains("0.50"), "{t}");
        assert!(row.contains("810/990") && row.contains("linux-pipe"), "{t}");
        assert!(row.contains("mitigations=on"), "{t}");
        f[0].baseline = None;
        f[0].note = Some("seL4 images not given".into());
        let t = table(&f);
        assert!(t.contains("(seL4 images not given)"), "{t}");
        assert_eq!(
            serde_json::to_value(&f).unwrap()[0]["baseline"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn configurations_give_kernel_arguments() {
        let mut o = Options::default();
        assert_eq!(o.configs, [MITIGATIONS_ON, MITIGATIONS_OFF]);
        assert_eq!(o.peregrine_args(MITIGATIONS_ON), "");
        assert_eq!(o.peregrine_args(MITIGATIONS_OFF), "mitigations=off");
        o.kernel_args = "x=1".into();
        assert_eq!(o.peregrine_args(MITIGATIONS_OFF), "mitigations=off x=1");
        assert_eq!(o.peregrine_args(MITIGATIONS_ON), "x=1");
    }

    #[test]
    fn rows_sort_by_config_then_figure() {
        let row = |figure: &str, config: &str, base: &str| Figure {
            figure: figure.into(),
            config: config.into(),
            baseline_name: base.into(),
            ..Figure::default()
        };
        let mut f = vec![
            row("a", MITIGATIONS_ON, "linux"),
            row("b", MITIGATIONS_ON, ""),
            row("a", MITIGATIONS_OFF, "linux"),
            row("a", MITIGATIONS_ON, "seL4"),
        ];
        sort_rows(&mut f);
        let got: Vec<(&str, &str, &str)> = f
            .iter()
            .map(|f| {
                (
                    f.figure.as_str(),
                    f.config.as_str(),
                    f.baseline_name.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a", MITIGATIONS_ON, "linux"),
                ("a", MITIGATIONS_ON, "seL4"),
                ("b", MITIGATIONS_ON, ""),
                ("a", MITIGATIONS_OFF, "linux"),
            ]
        );
    }
}
