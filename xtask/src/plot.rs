//! The bar chart `cargo xtask bench` writes beside each JSON: one bar group per figure
//! and configuration, one bar per side (Peregrine and every baseline it has), on a
//! logarithmic axis (the sides differ by orders of magnitude). Drawn with `plotters`'
//! SVG backend alone: text is SVG `<text>`, so no font library is needed.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::bench::{Figure, Report};

/// The chart's data: groups (label) with one value per side, and the sides' names.
#[derive(Debug, Clone, PartialEq)]
pub struct Bars {
    /// The sides: `peregrine` first, then the baselines in order of appearance.
    pub sides: Vec<String>,
    /// Per group: its label (`figure` or `figure (config)`) and each side's value.
    pub groups: Vec<(String, Vec<Option<f64>>)>,
}

/// Groups `figures` by (figure, config), in row order.
pub fn bars(figures: &[Figure]) -> Bars {
    let mut sides = vec!["peregrine".to_string()];
    for f in figures {
        if !f.baseline_name.is_empty() && !sides.contains(&f.baseline_name) {
            sides.push(f.baseline_name.clone());
        }
    }
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for f in figures {
        if !keys.contains(&(f.figure.as_str(), f.config.as_str())) {
            keys.push((&f.figure, &f.config));
        }
    }
    let groups = keys
        .iter()
        .map(|&(figure, config)| {
            let rows: Vec<&Figure> = figures
                .iter()
                .filter(|f| f.figure == figure && f.config == config)
                .collect();
            let values = sides
                .iter()
                .enumerate()
                .map(|(i, side)| {
                    if i == 0 {
                        rows.iter().find_map(|f| f.peregrine)
                    } else {
                        rows.iter()
                            .filter(|f| f.baseline_name == *side)
                            .find_map(|f| f.baseline)
                    }
                })
                .collect();
            let label = match config.strip_prefix("mitigations=") {
                Some(m) => format!("{figure} ({m})"),
                None if config.is_empty() => figure.to_string(),
                None => format!("{figure} ({config})"),
            };
            (label, values)
        })
        .collect();
    Bars { sides, groups }
}

/// Colours of the sides, Peregrine's first.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `report` as an SVG bar chart into `path`, titled `title`.
pub fn write_svg(path: &Path, title: &str, report: &Report) -> Result<()> {
    let b = bars(&report.figures);
    let unit = report
        .figures
        .first()
        .map_or(String::new(), |f| f.unit.clone());
    let n = b.groups.len().max(1);
    let width = (160 + 70 * n as u32).max(640);
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let max = b
        .groups
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(1.0f64, |m, &v| m.max(v));
    let caption = format!(
        "{title}: {} ({}, {})",
        unit, report.provenance.mode, report.provenance.commit
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(130)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, (1f64..max * 2.0).log_scale())
        .map_err(e)?;
    let labels: Vec<String> = b.groups.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .y_desc(unit)
        .draw()
        .map_err(e)?;
    let width = 0.8 / b.sides.len() as f64;
    for (s, side) in b.sides.iter().enumerate() {
        let colour = COLOURS[s % COLOURS.len()];
        let rects = b.groups.iter().enumerate().filter_map(|(g, (_, v))| {
            let value = v[s]?;
            let x0 = g as f64 + 0.1 + width * s as f64;
            Some(Rectangle::new(
                [(x0, 1.0), (x0 + width * 0.9, value.max(1.0))],
                colour.filled(),
            ))
        });
        chart
            .draw_series(rects)
            .map_err(e)?
            .label(side.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::Provenance;

    fn row(figure: &str, config: &str, p: f64, name: &str, b: Option<f64>) -> Figure {
        Figure {
            figure: figure.into(),
            unit: "instructions".into(),
            mode: "qemu-icount".into(),
            config: config.into(),
            peregrine: Some(p),
            baseline_name: name.into(),
            baseline: b,
            ..Figure::default()
        }
    }

    #[test]
    fn groups_by_figure_and_config_with_every_baseline() {
        let f = [
            row(
                "ipc_rt_0w",
                "mitigations=on",
                784.0,
                "linux-pipe",
                Some(11524.0),
            ),
            row("ipc_rt_0w", "mitigations=on", 784.0, "seL4", Some(470.0)),
            row("ipc_rt_8w", "mitigations=on", 800.0, "", None),
            row("ipc_rt_0w", "mitigations=off", 724.0, "seL4", None),
        ];
        let b = bars(&f);
        assert_eq!(b.sides, ["peregrine", "linux-pipe", "seL4"]);
        assert_eq!(b.groups.len(), 3);
        assert_eq!(b.groups[0].0, "ipc_rt_0w (on)");
        assert_eq!(b.groups[0].1, [Some(784.0), Some(11524.0), Some(470.0)]);
        assert_eq!(b.groups[1].1, [Some(800.0), None, None]);
        assert_eq!(b.groups[2].0, "ipc_rt_0w (off)");
        assert_eq!(b.groups[2].1, [Some(724.0), None, None]);
    }

    #[test]
    fn writes_an_svg_with_text_elements() {
        let dir = std::env::temp_dir().join(format!("plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let report = Report {
            provenance: Provenance::sample(),
            figures: vec![row(
                "vmexit_cpuid",
                "mitigations=on",
                1009.0,
                "kvm",
                Some(3073.0),
            )],
        };
        write_svg(&path, "bench vmexit", &report).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("<text") && svg.contains("vmexit_cpuid (on)"));
        assert!(
            svg.contains("kvm\n</text>") || svg.contains(">kvm<"),
            "{svg}"
        );
        assert!(svg.matches("<rect").count() >= 3, "bars and legend");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
