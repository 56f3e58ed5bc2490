//! seL4 beside Peregrine in `cargo xtask bench ipc --sel4 DIR`: seL4's kernel and
//! sel4bench's IPC benchmark (built elsewhere: `DIR/README.md`) booted in the same QEMU
//! mode as Peregrine's benchmark (`-cpu EPYC -smp 1 -icount shift=0`), from
//! `DIR/mitigation-on/` (seL4's x86_64 default) and `DIR/mitigation-off/`
//! (`KernelSkimWindow=OFF`), each beside Peregrine's figures of the same configuration.
//!
//! The image prints sel4bench's JSON between `JSON OUTPUT` and `END JSON OUTPUT` (QEMU
//! is stopped at the end line: seL4 never powers off) and one `RT_RESULT … per_rt_min=N`
//! line. Rows (baseline `seL4`): `ipc_rt_0w` beside the round trip `per_rt_min` (a
//! `seL4_Call`/`seL4_ReplyRecv` ping-pong between two address spaces, libsel4 stubs
//! included, like ours); `ipc_call_0w`/`ipc_reply_0w` beside sel4bench's one-way
//! inter-address-space `seL4_Call`/`seL4_ReplyRecv` (kernel only), and `ipc_call_10w`/
//! `ipc_reply_10w` beside its 10-word (slowpath) figures when it has them; Peregrine's
//! value of a figure it does not print stays empty.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bench::{Figure, MITIGATIONS_OFF};
use crate::boot::{BootSpec, Exit, Output};

/// The kernel image in each build's directory.
pub const KERNEL: &str = "kernel-x86_64-pc99";
/// The root task with the benchmark.
pub const APP: &str = "sel4benchapp-image-x86_64-pc99";
/// The note of the row that stands for seL4 when no images were given.
pub const NOT_GIVEN: &str = "seL4 images not given";
/// The mode of every figure.
const MODE: &str = "qemu-icount";
/// Where sel4bench's JSON ends.
const JSON_END: &str = "END JSON OUTPUT";

/// The build directory under `DIR` for a configuration.
pub fn build_dir(config: &str) -> &'static str {
    if config == MITIGATIONS_OFF {
        "mitigation-off"
    } else {
        "mitigation-on"
    }
}

/// `text` without ANSI escape sequences (`ESC [ … letter`) and carriage returns.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// seL4's figures from one run's serial output.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sel4Figures {
    /// `per_rt_min` of the `RT_RESULT` line.
    pub round_trip: Option<f64>,
    /// (figure, min, median) of the one-way inter-address-space results.
    pub one_way: Vec<(String, f64, Option<f64>)>,
}

/// Parses `RT_RESULT … per_rt_min=N` and sel4bench's JSON (between `JSON OUTPUT` and
/// `END JSON OUTPUT`) of `serial`.
pub fn parse(serial: &str) -> Result<Sel4Figures> {
    let text = strip_ansi(serial);
    let round_trip = text.lines().find_map(|l| {
        let rest = &l[l.find("RT_RESULT")?..];
        let v = &rest[rest.find("per_rt_min=")? + "per_rt_min=".len()..];
        let end = v
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(v.len());
        v[..end].parse::<f64>().ok()
    });
    let start = text
        .lines()
        .position(|l| l.trim() == "JSON OUTPUT")
        .context("no `JSON OUTPUT` line")?;
    let rest: String = text.lines().skip(start + 1).collect::<Vec<_>>().join("\n");
    let end = rest.find(JSON_END).context("no `END JSON OUTPUT`")?;
    let json: Value = serde_json::from_str(rest[..end].trim()).context("sel4bench's JSON")?;
    let mut one_way = Vec::new();
    for bench in json.as_array().into_iter().flatten() {
        for r in bench["Results"].as_array().into_iter().flatten() {
            if r["Same vspace?"] != Value::Bool(false) {
                continue;
            }
            let kind = match r["Function"].as_str() {
                Some("seL4_Call") => "call",
                Some("seL4_ReplyRecv") => "reply",
                _ => continue,
            };
            let (Some(words), Some(min)) = (r["IPC length"].as_u64(), r["Min"].as_f64()) else {
                continue;
            };
            let name = format!("ipc_{kind}_{words}w");
            if !one_way.iter().any(|(n, _, _)| *n == name) {
                one_way.push((name, min, r["Median"].as_f64()));
            }
        }
    }
    Ok(Sel4Figures {
        round_trip,
        one_way,
    })
}

/// The rows of one configuration: seL4's figures beside `peregrine`'s.
pub fn figures(s: &Sel4Figures, config: &str, peregrine: &[Figure]) -> Vec<Figure> {
    let mut rows = Vec::new();
    let mut push = |name: &str, value: Option<f64>, median: Option<f64>| {
        let p = peregrine.iter().find(|f| f.figure == name);
        rows.push(Figure {
            figure: name.to_string(),
            unit: "instructions".into(),
            mode: MODE.into(),
            config: config.to_string(),
            peregrine: p.and_then(|p| p.peregrine),
            median: p.and_then(|p| p.median),
            p99: p.and_then(|p| p.p99),
            baseline_name: "seL4".into(),
            baseline: value,
            baseline_median: median,
            ..Figure::default()
        });
    };
    push("ipc_rt_0w", s.round_trip, None);
    for (name, min, median) in &s.one_way {
        push(name, Some(*min), *median);
    }
    rows
}

/// The seL4 kernel's version as `DIR/README.md` names it.
fn version(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("README.md"))
        .ok()
        .and_then(|r| {
            r.lines()
                .find(|l| l.starts_with("| seL4 kernel |"))
                .and_then(|l| l.split('|').nth(2))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown version".into())
}

/// The boot spec of one build: seL4's kernel with the benchmark as its one module, in
/// Peregrine's QEMU mode (1 GiB, as seL4's README runs it).
pub fn spec(build: &Path, config: &str) -> BootSpec {
    BootSpec {
        name: format!("bench-sel4-{}", build_dir(config)),
        kernel: build.join(KERNEL),
        kernel_args: String::new(),
        modules: vec![(build.join(APP), String::new())],
        smp: 1,
        memory_mib: 1024,
        cpu_model: None,
        icount: true,
        allow_kvm: false,
        timeout: Duration::from_secs(180),
        extra_qemu_args: Vec::new(),
        output: Output::Capture,
    }
}

/// The seL4 rows of `config` and the kernel's provenance line: seL4 booted from `dir`'s
/// build for `config`, or, without `dir` or that build, one row that says so.
pub fn rows(
    dir: Option<&Path>,
    config: &str,
    peregrine: &[Figure],
) -> Result<(Vec<Figure>, Option<String>)> {
    let build: Option<PathBuf> = dir
        .map(|d| d.join(build_dir(config)))
        .filter(|b| b.join(KERNEL).is_file() && b.join(APP).is_file());
    let Some(build) = build else {
        let note = match dir {
            None => NOT_GIVEN.to_string(),
            Some(d) => format!("{NOT_GIVEN}: no {KERNEL} and {APP} in {}", d.display()),
        };
        let mut row = figures(&Sel4Figures::default(), config, peregrine);
        row[0].note = Some(note);
        return Ok((row, None));
    };
    let spec = spec(&build, config);
    let r = crate::qemu::run_qemu_until(&spec, Some(JSON_END))?;
    if r.exit != Exit::Success {
        bail!(
            "seL4's benchmark did not reach {JSON_END:?}: {}",
            r.report()
        );
    }
    let s = parse(&r.serial).with_context(|| format!("seL4's output: {}", r.report()))?;
    let kernel = format!(
        "seL4 {} ({})",
        version(dir.unwrap_or(&build)),
        build.join(KERNEL).display()
    );
    Ok((figures(&s, config, peregrine), Some(kernel)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{parse_bench_lines, MITIGATIONS_ON};

    /// The real output of `mitigation-off/` (QEMU 7.2.22), cut short: the allocator's
    /// lines and the raw samples left out, the one-way results kept.
    const SAMPLE: &str = "\r\n\u{1b}[;1m\u{1b}[37mse\u{1b}[32mL4\u{1b}[37m Benchmark\u{1b}[0m\r\n\
ipc Benchmarks\r\n==============\r\n\r\n\
\u{1b}[0m\u{1b}[33mRT_RESULT inter-AS seL4_Call+ReplyRecv (libsel4 stubs) rdtsc-bracketed: \
min_single=458 max_single=458 loop1000_min=450016 loop1000_max=450016 (per_rt_min=450.016) \
empty_rdtsc_pair_min=3\u{1b}[0m\u{1b}[0m\u{1b}[33m\r\n\
\u{1b}[0mJSON OUTPUT\r\n\
[{\"Benchmark\": \"One way IPC microbenchmarks\", \"Results\": [\
{\"Function\": \"seL4_Call\", \"Direction\": \"client->server\", \"Same vspace?\": true, \
\"IPC length\": 0, \"Min\": 196, \"Median\": 196.0, \"Samples\": 16}, \
{\"Function\": \"seL4_Call\", \"Direction\": \"client->server\", \"Same vspace?\": false, \
\"IPC length\": 0, \"Min\": 198, \"Median\": 198.0, \"Samples\": 16}, \
{\"Function\": \"seL4_ReplyRecv\", \"Direction\": \"server->client\", \"Same vspace?\": false, \
\"IPC length\": 0, \"Min\": 225, \"Median\": 225.0, \"Samples\": 16}, \
{\"Function\": \"seL4_Send\", \"Direction\": \"client->server\", \"Same vspace?\": false, \
\"IPC length\": 0, \"Min\": 709, \"Median\": 709.0, \"Samples\": 16}, \
{\"Function\": \"seL4_Call\", \"Direction\": \"client->server\", \"Same vspace?\": false, \
\"IPC length\": 10, \"Min\": 811, \"Median\": 811.0, \"Samples\": 16}, \
{\"Function\": \"seL4_ReplyRecv\", \"Direction\": \"server->client\", \"Same vspace?\": false, \
\"IPC length\": 10, \"Min\": 778, \"Median\": 778.0, \"Samples\": 16}]}]END JSON OUTPUT\r\n\
All is well in the universe.\r\n";

    #[test]
    fn parses_sel4bench_output() {
        let s = parse(SAMPLE).unwrap();
        assert_eq!(s.round_trip, Some(450.016));
        let names: Vec<(&str, f64)> = s.one_way.iter().map(|(n, v, _)| (n.as_str(), *v)).collect();
        assert_eq!(
            names,
            [
                ("ipc_call_0w", 198.0),
                ("ipc_reply_0w", 225.0),
                ("ipc_call_10w", 811.0),
                ("ipc_reply_10w", 778.0)
            ]
        );
        assert!(parse("RT_RESULT per_rt_min=1\n").is_err(), "no JSON");
        assert_eq!(strip_ansi("\u{1b}[0;33mA\r\nB\u{1b}[0m"), "A\nB");
    }

    #[test]
    fn rows_beside_peregrine() {
        let p = parse_bench_lines(
            "BENCH ipc_rt_0w 784 instructions\nbench: ipc_rt_0w min 784 median 790 p99 800\n",
            "qemu-icount",
        );
        let f = figures(&parse(SAMPLE).unwrap(), MITIGATIONS_OFF, &p);
        assert_eq!(f.len(), 5);
        assert_eq!(f[0].figure, "ipc_rt_0w");
        assert_eq!(
            (f[0].peregrine, f[0].baseline),
            (Some(784.0), Some(450.016))
        );
        assert_eq!(f[0].median, Some(790.0));
        assert_eq!(f[0].config, MITIGATIONS_OFF);
        assert_eq!(f[0].baseline_name, "seL4");
        assert_eq!((f[1].peregrine, f[1].baseline), (None, Some(198.0)));
        assert_eq!(f[4].figure, "ipc_reply_10w");
        assert_eq!(build_dir(MITIGATIONS_OFF), "mitigation-off");
        assert_eq!(build_dir(MITIGATIONS_ON), "mitigation-on");
    }

    #[test]
    fn missing_images_are_a_row_not_a_failure() {
        let p = parse_bench_lines("BENCH ipc_rt_0w 784\n", "qemu-icount");
        let (rows, kernel) = rows(None, MITIGATIONS_ON, &p).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].note.as_deref(), Some(NOT_GIVEN));
        assert_eq!((rows[0].peregrine, rows[0].baseline), (Some(784.0), None));
        assert_eq!(kernel, None);
        let (rows, _) = rows_in("/nonexistent/sel4", &p);
        assert!(rows[0].note.as_deref().unwrap().starts_with(NOT_GIVEN));
    }

    fn rows_in(dir: &str, p: &[Figure]) -> (Vec<Figure>, Option<String>) {
        rows(Some(Path::new(dir)), MITIGATIONS_OFF, p).unwrap()
    }

    #[test]
    fn spec_is_peregrines_mode() {
        let s = spec(Path::new("/s/mitigation-on"), MITIGATIONS_ON);
        let a = crate::qemu::qemu_args(&s, Path::new("/tmp/l"), false).join(" ");
        assert!(
            a.starts_with("-machine q35 -cpu EPYC -smp 1 -m 1024M -icount shift=0"),
            "{a}"
        );
        assert!(
            a.contains("-kernel /s/mitigation-on/kernel-x86_64-pc99"),
            "{a}"
        );
        assert!(
            a.contains("-initrd /s/mitigation-on/sel4benchapp-image-x86_64-pc99"),
            "{a}"
        );
    }
}
