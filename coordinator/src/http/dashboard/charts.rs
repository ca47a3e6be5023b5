//! The dashboard's SVG line charts of the last hour: throughput, queue depth and each node's
//! speed, drawn server-side from the control plane's samples.

use std::fmt::Write as _;

use super::{esc, speed};
use crate::control::history::Sample;

/// Series colours, in order.
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

/// An SVG line chart of `series` over the samples' time span (x: sample index).
fn chart(id: &str, title: &str, points: usize, series: &[(String, Vec<Option<f64>>)]) -> String {
    const W: f64 = 360.0;
    const H: f64 = 120.0;
    const PAD: f64 = 24.0;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(0.0f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let n = points.max(2) as f64 - 1.0;
    let mut svg = format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" aria-label=\"{title}\">\
         <text x=\"4\" y=\"12\" class=\"title\">{title}</text>\
         <line x1=\"{PAD}\" y1=\"{bottom}\" x2=\"{W}\" y2=\"{bottom}\" class=\"axis\"/>\
         <text x=\"{PAD}\" y=\"26\" class=\"tick\">{top_label}</text>",
        h = H + 28.0,
        bottom = H,
        top_label = esc(&speed_or_plain(top)),
    );
    for (i, (name, values)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coords: Vec<String> = values
            .iter()
            .enumerate()
            .filter_map(|(x, v)| {
                v.map(|v| {
                    format!(
                        "{:.1},{:.1}",
                        PAD + (W - PAD) * x as f64 / n,
                        H - (H - 30.0) * v / top
                    )
                })
            })
            .collect();
        let last = values.iter().rev().flatten().next().copied().unwrap_or(0.0);
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>\
             <text x=\"{x}\" y=\"{y}\" fill=\"{color}\" class=\"legend\">{name}: {last}</text>",
            coords.join(" "),
            x = PAD + 110.0 * (i % 3) as f64,
            y = H + 14.0 + 12.0 * (i / 3) as f64,
            name = esc(name),
            last = esc(&speed_or_plain(last)),
        );
    }
    svg.push_str("</svg>");
    svg
}

fn speed_or_plain(v: f64) -> String {
    if v >= 1e3 {
        speed(v)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The charts section: throughput and failures per minute, queued and running jobs, and each
/// node's speed, one point per sample of `period_ms`.
pub(super) fn charts(history: &[Sample], period_ms: u64) -> String {
    let per_min = 60_000.0 / period_ms.max(1) as f64;
    let throughput = vec![
        (
            "images/min".to_string(),
            history
                .iter()
                .map(|s| Some(s.succeeded as f64 * per_min))
                .collect(),
        ),
        (
            "failed/min".to_string(),
            history
                .iter()
                .map(|s| Some(s.failed as f64 * per_min))
                .collect(),
        ),
    ];
    let queue = vec![
        (
            "queued".to_string(),
            history.iter().map(|s| Some(s.queued as f64)).collect(),
        ),
        (
            "running".to_string(),
            history.iter().map(|s| Some(s.running as f64)).collect(),
        ),
    ];
    let mut names: Vec<&str> = history
        .iter()
        .flat_map(|s| s.speeds.iter().map(|(n, _)| n.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let speeds: Vec<(String, Vec<Option<f64>>)> = names
        .iter()
        .map(|name| {
            (
                name.to_string(),
                history
                    .iter()
                    .map(|s| s.speeds.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
                    .collect(),
            )
        })
        .collect();
    let minutes = (history.len() as u64 * period_ms) as f64 / 60_000.0;
    format!(
        "<section class=\"charts\"><h2>Last hour <small>({} samples, {minutes:.1} min)</small></h2>{}{}{}</section>",
        history.len(),
        chart("chart-throughput", "throughput", history.len(), &throughput),
        chart("chart-queue", "queue depth", history.len(), &queue),
        chart(
            "chart-speed",
            "node speed (pixel-steps/s)",
            history.len(),
            &speeds
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_plot_every_sample() {
        let history: Vec<Sample> = (0..4)
            .map(|i| Sample {
                at_ms: i * 10_000,
                succeeded: i,
                failed: 0,
                queued: 3 - i as usize,
                running: 1,
                speeds: vec![("a".into(), 1000.0 * i as f64)],
            })
            .collect();
        let svg = charts(&history, 10_000);
        assert_eq!(svg.matches("<polyline").count(), 5);
        // 3 images in a 10 s sample are 18 per minute, the latest throughput.
        assert!(svg.contains("images/min: 18"), "{svg}");
        assert!(svg.contains("a: 3 k"), "{svg}");
        let points = |id: &str| {
            let at = svg.find(id).unwrap();
            svg[at..]
                .split("points=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .split(' ')
                .count()
        };
        assert_eq!(points("chart-queue"), 4);
    }
}
