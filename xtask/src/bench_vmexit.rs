//! `cargo xtask bench vmexit`: VM-exit round trips of Peregrine and of Linux/KVM, side by
//! side in the same emulator mode.
//!
//! - **Peregrine**: [`peregrine_spec`] — the VMM component `nul/vmm` (exit portals, the
//!   `vmm` library's exit handling) running `guests/test` in benchmark mode. (The root
//!   task's own `bench=vmexit` scenario measures the kernel path with a minimal handler.)
//! - **KVM**: [`crate::baseline_kvm`]: Linux with KVM in the same emulator runs
//!   `kvm-runner` on the test guest in benchmark mode. Under QEMU `-icount shift=0` the
//!   guest's rdtsc deltas are instruction counts of the whole round trip (KVM handles
//!   `cpuid` and the hypercall in its kernel; port-out, MMIO and HLT go to the runner in
//!   user space).

use std::time::Duration;

use anyhow::{bail, Context, Result};

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
    let figures: Vec<Figure> = parse_bench_lines(&result.serial, mode(emulator))
        .into_iter()
        .filter(|f| f.figure.starts_with("vmexit_"))
        .collect();
    if figures.is_empty() {
        bail!(
            "the Peregrine side printed no BENCH lines: {}",
            result.report()
        );
    }
    Ok(figures)
}

/// Runs the KVM side of the benchmark and returns its figures (as baselines).
pub fn kvm_side(images: &Images, emulator: Emulator) -> Result<Vec<Figure>> {
    let mut guest = KvmGuest::new("bench-vmexit-kvm", "bench");
    if emulator == Emulator::Bochs {
        guest.timeout = Duration::from_secs(900);
    }
    let r = run_kvm_guest(images, &guest, emulator)?;
    if r.status != Some(0) {
        bail!(
            "the KVM runner did not finish the benchmark (status {:?}): {}",
            r.status,
            r.run.report()
        );
    }
    Ok(parse_bench_lines(&r.run.serial, mode(emulator))
        .into_iter()
        .filter(|f| f.figure.starts_with("vmexit_"))
        .map(|f| Figure {
            baseline: f.peregrine,
            peregrine: None,
            ..f
        })
        .collect())
}

/// One entry per figure: Peregrine's value with KVM's of the same figure, mode and unit.
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
        let k = kvm.iter().find(|f| f.figure == name);
        let Some(first) = p.or(k) else { continue };
        out.push(Figure {
            figure: name.to_string(),
            unit: first.unit.clone(),
            mode: first.mode.clone(),
            peregrine: p.and_then(|f| f.peregrine),
            baseline: k
                .filter(|k| k.mode == first.mode && k.unit == first.unit)
                .and_then(|f| f.baseline),
        });
    }
    out
}

/// `cargo xtask bench vmexit [--emulator bochs]`: both sides in `emulator` (the KVM side
/// unless `opts` leaves the baseline out; Peregrine's with `opts.kernel_args`), the
/// table, and `<target>/bench/vmexit.json`, where this mode's entries replace those of
/// an earlier run in the same mode (entries of other modes stay).
pub fn bench(emulator: Emulator, opts: &crate::bench::Options) -> Result<Vec<Figure>> {
    let images = crate::build::build(Profile::Release)?;
    let peregrine = peregrine_side(&images, emulator, &opts.kernel_args);
    let kvm = if opts.baseline {
        kvm_side(&images, emulator)
    } else {
        Ok(Vec::new())
    };
    let figures = merge(
        peregrine.as_ref().map(Vec::as_slice).unwrap_or_default(),
        kvm.as_ref().map(Vec::as_slice).unwrap_or_default(),
    );
    let path = workspace::out_dir("bench")?.join("vmexit.json");
    let earlier: Vec<Figure> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let all = replace_mode(earlier, &figures, mode(emulator));
    crate::bench::write_results("vmexit", &all, "kvm")?;
    peregrine.context("the Peregrine side of the benchmark failed")?;
    kvm.context("the KVM baseline failed")?;
    Ok(figures)
}

/// `earlier` without its entries in `mode`, followed by `new`.
pub fn replace_mode(earlier: Vec<Figure>, new: &[Figure], mode: &str) -> Vec<Figure> {
    let mut all: Vec<Figure> = earlier.into_iter().filter(|f| f.mode != mode).collect();
    all.extend_from_slice(new);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_mode_keeps_other_modes() {
        let e = parse_bench_lines("BENCH vmexit_hlt 1 tsc-ticks\n", MODE_QEMU);
        let b = parse_bench_lines("BENCH vmexit_hlt 2 tsc-ticks\n", MODE_BOCHS);
        let n = parse_bench_lines("BENCH vmexit_hlt 3 tsc-ticks\n", MODE_QEMU);
        let all = replace_mode([e, b.clone()].concat(), &n, MODE_QEMU);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], b[0]);
        assert_eq!(all[1].peregrine, Some(3.0));
        assert_eq!(mode(Emulator::Bochs), "bochs-vmx");
    }

    #[test]
    fn merge_pairs_figures_in_order() {
        let p = parse_bench_lines(
            "BENCH vmexit_hlt 9000 tsc-ticks\nBENCH vmexit_cpuid 3000 tsc-ticks\n",
            MODE_QEMU,
        );
        let k: Vec<Figure> = parse_bench_lines(
            "BENCH vmexit_cpuid 2810 tsc-ticks\nBENCH vmexit_pio_out 3365 tsc-ticks\n",
            MODE_QEMU,
        )
        .into_iter()
        .map(|f| Figure {
            baseline: f.peregrine,
            peregrine: None,
            ..f
        })
        .collect();
        let m = merge(&p, &k);
        let names: Vec<&str> = m.iter().map(|f| f.figure.as_str()).collect();
        assert_eq!(names, ["vmexit_cpuid", "vmexit_pio_out", "vmexit_hlt"]);
        assert_eq!(m[0].peregrine, Some(3000.0));
        assert_eq!(m[0].baseline, Some(2810.0));
        assert_eq!(m[0].unit, "instructions");
        assert_eq!(m[1].peregrine, None);
        assert_eq!(m[1].baseline, Some(3365.0));
        assert_eq!(m[2].baseline, None);
    }
}
