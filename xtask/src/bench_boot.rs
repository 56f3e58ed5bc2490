//! `cargo xtask bench boot`: the Linux guest (`guests/linux`, every `/init` test) booted
//! by Peregrine's VMM and, as the baseline, directly by QEMU, both under QEMU's software
//! emulation (`-cpu EPYC`, one vCPU, 256 MiB). Figures: the guest's uptime at the
//! marker (`boot_marker`, seconds of the guest's own clock), the emulator's wall time
//! for the whole run up to the power-off (`boot_wall`), and the `read` test's
//! sequential read of the 8-MiB virtio disk (`virtio_read_8m`, ms). Wall-clock figures
//! on a shared machine: compare them within one run of the command only.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::{write_results, Figure};
use crate::boot::BootSpec;
use crate::build::{self, Profile};
use crate::linux::{self, Figures};

const MODE: &str = "qemu-tcg";

fn figures_of(f: Figures, peregrine: bool) -> Vec<Figure> {
    let fig = |name: &str, unit: &str, v: Option<f64>| Figure {
        figure: name.into(),
        unit: unit.into(),
        mode: MODE.into(),
        peregrine: if peregrine { v } else { None },
        baseline: if peregrine { None } else { v },
    };
    vec![
        fig("boot_marker", "seconds", Some(f.marker_s)),
        fig("boot_wall", "seconds", Some(f.wall_s)),
        fig("virtio_read_8m", "ms", f.read.map(|(ms, _)| ms as f64)),
    ]
}

/// Runs the benchmark, prints the table and writes `<target>/bench/boot.json`.
pub fn bench() -> Result<Vec<Figure>> {
    let guest = linux::prepare()?;
    let images = build::build(Profile::Release)?;
    let spec = BootSpec::new("bench-boot", &images).timeout(Duration::from_secs(300));
    let spec = linux::with_vmm(spec, images.vmm(), &guest, 1, linux::ALL_TESTS, "");
    let r = crate::qemu::run_qemu(&spec)?;
    if !r.serial.contains("vmm: guest powered off") {
        bail!("Peregrine's Linux VM did not power off: {}", r.report());
    }
    let ours = linux::figures(&r).context("no marker on Peregrine")?;
    let direct = linux::check_qemu(&guest, 1, linux::ALL_TESTS)?;
    let base = linux::figures(&direct).context("no marker in the direct boot")?;
    let mut figures = figures_of(ours, true);
    for (f, b) in figures.iter_mut().zip(figures_of(base, false)) {
        f.baseline = b.baseline;
    }
    write_results("boot", &figures, "qemu")?;
    Ok(figures)
}
