//! `cargo xtask bench vmexit`: VM-exit round trips of Peregrine and of Linux/KVM, side by
//! side in the same emulator mode.
//!
//! - **Peregrine**: [`peregrine_spec`] — the VMM component `nul/vmm` (exit portals, the
//!   `vmm` library's exit handling) running `guests/test` in benchmark mode. (The root
//!   task's own `bench=vmexit` scenario measures the kernel path with a minimal handler.)
//! - **KVM**: [`crate::baseline_kvm`]: Linux with KVM in the same emulator runs
//!   `vmm-kvm` (`hosts/kvm`: the same VMM library and test machine as `nul/vmm`, bound
//!   to `/dev/kvm`) on the test guest in benchmark mode, so the two sides differ in the
//!   kernel and its binding alone. Under QEMU `-icount shift=0` the guest's rdtsc deltas
//!   are instruction counts of the whole round trip (KVM handles `cpuid` and the
//!   hypercall in its kernel; port-out, MMIO and HLT go to the machine in user space).

use std::time::Duration;

use anyhow::{bail, Result};

use crate::baseline_kvm::{run_kvm_guest, KvmGuest};
use crate::bench::{parse_bench_lines, Figure};
use crate::boot::{BootSpec, Emulator, Exit};
use crate::build::{Images, Profile};
use crate::workspace;

/// The figures of the benchmark (`vmexit_none` is the rdtsc pair alone, included in
/// every other figure).
pub const FIGURES: &[&str] = &[
    "vmexit_none",
    "vmexit_cpuid",
    "vmexit_pio_out",
    "vmexit_mmio",
    "vmexit_hypercall",
    "vmexit_hlt",
];

/// The mode string of both sides in QEMU (software SVM, TSC = instructions).
pub const MODE_QEMU: &str = "qemu-icount";
/// The mode string in Bochs (`corei7_skylake_x`: VMX with EPT; TSC ≈ instructions).
pub const MODE_BOCHS: &str = "bochs-vmx";

/// The mode string of runs in `emulator`.
pub fn mode(emulator: Emulator) -> &'static str {
    match emulator {
        Emulator::Qemu => MODE_QEMU,
        Emulator::Bochs => MODE_BOCHS,
    }
}

/// The boot spec of the Peregrine side: the VMM component `nul-vmm` running the test
/// guest (`guests/test`) in benchmark mode, the same guest the KVM runner runs; the
/// root's `test=vmm` waits for the VM's end.
pub fn peregrine_spec(images: &Images) -> BootSpec {
    BootSpec::new("bench-vmexit", images)
        .root_args("test=vmm")
        .module(
            images.vmm(),
            "name=vm guest=guest-test cpus=1 mem=16 mode=bench",
        )
        .module(images.guest_test(), "")
        .smp(1)
        .timeout(Duration::from_secs(300))
}

/// Runs the Peregrine side in `emulator` (QEMU with `-icount shift=0`) and returns its
/// figures.
pub fn peregrine_side(
    images: &Images,
    emulator: Emulator,
    kernel_args: &str,
) -> Result<Vec<Figure>> {
    let mut spec = peregrine_spec(images).kernel_args(kernel_args);
    if emulator == Emulator::Qemu {
        spec = spec.icount();
    } else {
        // Multiboot in Bochs reaches the kernel in seconds; the benchmark is short.
        spec.timeout = Duration::from_secs(240);
    }
    let result = crate::boot::run(emulator, &spec)?;
    if result.exit != Exit::Success {
        bail!(
            "the Peregrine vmexit benchmark did not succeed: {}",
            result.report()
        );
    }
    let mut figures: Vec<Figure> = parse_bench_lines(&result.serial, mode(emulator))
        .into_iter()
        .filter(|f| {
            ["vmexit_", "boot_", "mem_"]
                .iter()
                .any(|p| f.figure.starts_with(p))
        })
        .collect();
    figures.extend(boot_spans(&figures));
    if figures.is_empty() {
        bail!(
            "the Peregrine side printed no BENCH lines: {}",
            result.report()
        );
    }
    Ok(figures)
}

/// The hypervisor's own boot, from the stamps the root and the VMM print (TSC values,
/// instructions under icount): kernel entry → root → VMM → the guest's first
/// instruction, and the whole (`boot_kernel_to_guest`).
pub fn boot_spans(figures: &[Figure]) -> Vec<Figure> {
    let at = |name: &str| {
        figures
            .iter()
            .find(|f| f.figure == name)
            .and_then(|f| f.peregrine)
    };
    let stamps = [
        "boot_kernel_entry",
        "boot_root_start",
        "boot_vmm_start",
        "boot_guest_start",
    ];
    let spans = [
        ("boot_kernel_to_root", 0, 1),
        ("boot_root_to_vmm", 1, 2),
        ("boot_vmm_to_guest", 2, 3),
        ("boot_kernel_to_guest", 0, 3),
    ];
    let Some(unit) = figures
        .iter()
        .find(|f| f.figure == stamps[0])
        .map(|f| (f.unit.clone(), f.mode.clone()))
    else {
        return Vec::new();
    };
    spans
        .iter()
        .filter_map(|&(name, a, b)| {
            let (a, b) = (at(stamps[a])?, at(stamps[b])?);
            (b >= a).then(|| Figure {
                figure: name.into(),
                unit: unit.0.clone(),
                mode: unit.1.clone(),
                peregrine: Some(b - a),
                ..Figure::default()
            })
        })
        .collect()
}

/// The KVM side's baselines: `kvm` with KVM's in-kernel irqchip (`KVM_CREATE_IRQCHIP`,
/// as every real KVM VMM runs), `kvm-user-irqchip` without one (`hlt` goes to the
/// machine's HLT handler in user space, as on Peregrine, and it injects the wake-up).
pub const KVM_SIDES: [(&str, &str); 2] = [("kernel", "kvm"), ("user", "kvm-user-irqchip")];

/// Runs the KVM side of the benchmark in `config` (one Linux boot, the runner once per
/// irqchip set-up) and returns the kernel's provenance line and the figures (as
/// baselines named as in [`KVM_SIDES`]).
pub fn kvm_side(
    images: &Images,
    emulator: Emulator,
    config: &str,
) -> Result<(String, Vec<Figure>)> {
    let mut guest = KvmGuest::new("bench-vmexit-kvm", "bench");
    guest.irqchips = KVM_SIDES.iter().map(|(i, _)| *i).collect();
    guest.config = config.to_string();
    guest.runner_timeout_s = 600;
    if emulator == Emulator::Bochs {
        guest.timeout = Duration::from_secs(1200);
    }
    let r = run_kvm_guest(images, &guest, emulator)?;
    if r.status != Some(0) {
        bail!(
            "the KVM runner did not finish the benchmark (status {:?}): {}",
            r.status,
            r.run.report()
        );
    }
    Ok((r.kernel, kvm_figures(&r.run.serial, mode(emulator), config)))
}

/// The KVM side's figures of a serial log cut by [`crate::baseline_kvm::sections`].
pub fn kvm_figures(serial: &str, mode: &str, config: &str) -> Vec<Figure> {
    let mut out = Vec::new();
    for (label, text) in crate::baseline_kvm::sections(serial) {
        let Some((_, name)) = KVM_SIDES
            .iter()
            .find(|(i, _)| label == format!("irqchip={i}"))
        else {
            continue;
        };
        out.extend(
            parse_bench_lines(&text, mode)
                .into_iter()
                .filter(|f| f.figure.starts_with("vmexit_"))
                .map(|f| f.with_config(config).into_baseline(name)),
        );
    }
    out
}

/// The rows of one configuration: per figure (in [`FIGURES`] order, then any other),
/// Peregrine's value beside each KVM set-up's of the same mode and unit, or alone.
pub fn merge(peregrine: &[Figure], kvm: &[Figure]) -> Vec<Figure> {
    let mut names: Vec<&str> = FIGURES.to_vec();
    for f in peregrine.iter().chain(kvm) {
        if !names.contains(&f.figure.as_str()) {
            names.push(&f.figure);
        }
    }
    let mut out = Vec::new();
    for name in names {
        let p = peregrine.iter().find(|f| f.figure == name);
        let bases: Vec<&Figure> = kvm.iter().filter(|f| f.figure == name).collect();
        let Some(first) = p.or(bases.first().copied()) else {
            continue;
        };
        let own = Figure {
            figure: name.to_string(),
            unit: first.unit.clone(),
            mode: first.mode.clone(),
            config: first.config.clone(),
            peregrine: p.and_then(|f| f.peregrine),
            median: p.and_then(|f| f.median),
            p99: p.and_then(|f| f.p99),
            ..Figure::default()
        };
        let matching: Vec<&&Figure> = bases
            .iter()
            .filter(|k| k.mode == own.mode && k.unit == own.unit)
            .collect();
        if matching.is_empty() {
            out.push(own);
            continue;
        }
        for k in matching {
            out.push(Figure {
                baseline_name: k.baseline_name.clone(),
                baseline: k.baseline,
                baseline_median: k.baseline_median,
                baseline_p99: k.baseline_p99,
                ..own.clone()
            });
        }
    }
    out
}

/// `cargo xtask bench vmexit [--emulator bochs]`: both sides in `emulator` in each of
/// `opts.configs` (the KVM side unless `opts` leaves the baseline out; Peregrine's with
/// `opts.kernel_args` too), the table, and `<target>/bench/vmexit.json` (with its chart),
/// where this mode's entries replace those of an earlier run in the same mode (entries
/// of other modes stay).
pub fn bench(emulator: Emulator, opts: &crate::bench::Options) -> Result<Vec<Figure>> {
    let images = crate::build::build(Profile::Release)?;
    let mut figures = Vec::new();
    let mut kernels = Vec::new();
    let mut failed = Vec::new();
    for config in &opts.configs {
        let peregrine = peregrine_side(&images, emulator, &opts.peregrine_args(config))
            .map(|f| {
                f.into_iter()
                    .map(|f| f.with_config(config))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|e| {
                failed.push(format!("Peregrine ({config}): {e:#}"));
                Vec::new()
            });
        let kvm = if opts.baseline {
            match kvm_side(&images, emulator, config) {
                Ok((kernel, f)) => {
                    kernels.push(kernel);
                    f
                }
                Err(e) => {
                    failed.push(format!("the KVM baseline ({config}): {e:#}"));
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        figures.extend(merge(&peregrine, &kvm));
    }
    kernels.dedup();
    let path = workspace::out_dir("bench")?.join("vmexit.json");
    let (earlier, from) = crate::bench::read_report(&path).map_or((Vec::new(), None), |r| {
        let from = format!(
            "from an earlier run (at or before {}, {})",
            r.provenance.commit, r.provenance.date
        );
        (r.figures, Some(from))
    });
    let all = replace_mode(earlier, &figures, mode(emulator), from.as_deref());
    let provenance = crate::provenance::Provenance::now(mode(emulator), kernels);
    crate::bench::write_results(
        "vmexit",
        &crate::bench::Report {
            provenance,
            figures: all,
        },
    )?;
    if !failed.is_empty() {
        bail!("bench vmexit: failed: {}", failed.join("; "));
    }
    Ok(figures)
}

/// `earlier` without its entries in `mode`, followed by `new`. The entries kept (other
/// modes: the other emulator's last run) get the note `from` unless they have one: the
/// report's provenance is the new run's, so a kept row says that it is older.
pub fn replace_mode(
    earlier: Vec<Figure>,
    new: &[Figure],
    mode: &str,
    from: Option<&str>,
) -> Vec<Figure> {
    let mut all: Vec<Figure> = earlier
        .into_iter()
        .filter(|f| f.mode != mode)
        .map(|mut f| {
            if f.note.is_none() {
                f.note = from.map(str::to_string);
            }
            f
        })
        .collect();
    all.extend_from_slice(new);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_spans_from_the_stamps() {
        let serial = "BENCH boot_kernel_entry 1000 tsc-ticks\n[root] BENCH boot_root_start 1500 tsc-ticks\n[vm] BENCH boot_vmm_start 1800 tsc-ticks\n[vm] BENCH boot_guest_start 2000 tsc-ticks\n";
        let f = parse_bench_lines(serial, MODE_QEMU);
        let s = boot_spans(&f);
        let v: Vec<(&str, f64)> = s
            .iter()
            .map(|f| (f.figure.as_str(), f.peregrine.unwrap()))
            .collect();
        assert_eq!(
            v,
            [
                ("boot_kernel_to_root", 500.0),
                ("boot_root_to_vmm", 300.0),
                ("boot_vmm_to_guest", 200.0),
                ("boot_kernel_to_guest", 1000.0)
            ]
        );
        assert!(s.iter().all(|f| f.unit == "instructions"));
        // A missing stamp leaves out the spans it bounds, nothing else.
        let partial = parse_bench_lines(
            "BENCH boot_kernel_entry 1000\nBENCH boot_root_start 1500\n",
            MODE_QEMU,
        );
        assert_eq!(boot_spans(&partial).len(), 1);
    }

    #[test]
    fn replace_mode_keeps_other_modes() {
        let e = parse_bench_lines("BENCH vmexit_hlt 1 tsc-ticks\n", MODE_QEMU);
        let b = parse_bench_lines("BENCH vmexit_hlt 2 tsc-ticks\n", MODE_BOCHS);
        let n = parse_bench_lines("BENCH vmexit_hlt 3 tsc-ticks\n", MODE_QEMU);
        let all = replace_mode([e, b.clone()].concat(), &n, MODE_QEMU, Some("from x"));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].peregrine, b[0].peregrine);
        assert_eq!(all[0].note.as_deref(), Some("from x"), "a kept row says so");
        assert_eq!(all[1].peregrine, Some(3.0));
        assert_eq!(all[1].note, None);
        assert_eq!(mode(Emulator::Bochs), "bochs-vmx");
    }

    #[test]
    fn merge_pairs_figures_in_order() {
        let p: Vec<Figure> = parse_bench_lines(
            "BENCH vmexit_hlt 9000 tsc-ticks\nBENCH vmexit_cpuid 3000 tsc-ticks\n",
            MODE_QEMU,
        )
        .into_iter()
        .map(|f| f.with_config("mitigations=on"))
        .collect();
        let log = "KVMRUN config irqchip=kernel\nBENCH vmexit_cpuid 2810 tsc-ticks\n\
                   bench: vmexit_cpuid min 2810 median 2900 p99 3000\n\
                   BENCH vmexit_pio_out 3365 tsc-ticks\nKVMRUN status 0\n\
                   KVMRUN config irqchip=user\nBENCH vmexit_cpuid 2811 tsc-ticks\n";
        let k = kvm_figures(log, MODE_QEMU, "mitigations=on");
        assert_eq!(k.len(), 3);
        assert_eq!(k[0].baseline_name, "kvm");
        assert_eq!(k[0].baseline_median, Some(2900.0));
        assert_eq!(k[2].baseline_name, "kvm-user-irqchip");
        let m = merge(&p, &k);
        let names: Vec<(&str, &str)> = m
            .iter()
            .map(|f| (f.figure.as_str(), f.baseline_name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("vmexit_cpuid", "kvm"),
                ("vmexit_cpuid", "kvm-user-irqchip"),
                ("vmexit_pio_out", "kvm"),
                ("vmexit_hlt", "")
            ]
        );
        assert_eq!(m[0].peregrine, Some(3000.0));
        assert_eq!(m[0].baseline, Some(2810.0));
        assert_eq!(m[1].peregrine, Some(3000.0));
        assert_eq!(m[1].baseline, Some(2811.0));
        assert_eq!(m[0].unit, "instructions");
        assert_eq!(m[0].config, "mitigations=on");
        assert_eq!(m[2].peregrine, None);
        assert_eq!(m[2].baseline, Some(3365.0));
        assert_eq!(m[3].baseline, None);
    }
}
