//! The dashboard's charts: small SVG line charts rendered on the server (no chart library,
//! no script), one per series of [`History`], re-rendered each second and sent over the live
//! socket with the rest of the dashboard's region.
//!
//! Only presentation attributes (`fill`, `stroke`) are used, never `style`, so the page's
//! Content-Security-Policy needs no inline styles.

use maud::{html, Markup};

use super::format;
use crate::dashboard::{History, Sample};

/// Width and height of a chart's plot, in SVG units.
const WIDTH: f64 = 300.0;
const HEIGHT: f64 = 60.0;
/// Samples per plotted point: 900 one-second samples become 180 points (each the maximum of
/// its 5 seconds, so a spike is never averaged away).
const PER_POINT: usize = 5;

/// One chart: a title, how to read a sample, and how to print a value.
struct Series {
    id: &'static str,
    title: &'static str,
    value: fn(&Sample) -> f64,
    unit: fn(f64) -> String,
}

fn plain(value: f64) -> String {
    if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn per_second(value: f64) -> String {
    format!("{}/s", plain(value))
}

fn micros(value: f64) -> String {
    format::micros(value as u64)
}

fn bytes_per_second(value: f64) -> String {
    if value >= 1024.0 * 1024.0 {
        format!("{:.1} MiB/s", value / (1024.0 * 1024.0))
    } else if value >= 1024.0 {
        format!("{:.1} KiB/s", value / 1024.0)
    } else {
        format!("{value:.0} B/s")
    }
}

const SERIES: [Series; 8] = [
    Series { id: "commands", title: "Commands per second", value: |s| s.commands_per_second, unit: per_second },
    Series { id: "p50", title: "Dispatch p50", value: |s| s.p50_micros as f64, unit: micros },
    Series { id: "p99", title: "Dispatch p99", value: |s| s.p99_micros as f64, unit: micros },
    Series { id: "views", title: "Connected views", value: |s| s.views as f64, unit: plain },
    Series { id: "events", title: "Events stored", value: |s| s.events_stored as f64, unit: plain },
    Series { id: "lag", title: "Projection lag (events)", value: |s| s.lag as f64, unit: plain },
    Series { id: "frames", title: "Frames sent", value: |s| s.frames_per_second, unit: per_second },
    Series { id: "bytes", title: "Bytes sent", value: |s| s.bytes_per_second, unit: bytes_per_second },
];

/// Every chart of the dashboard over `history`.
pub fn dashboard_charts(history: &History) -> Vec<Markup> {
    SERIES.iter().map(|series| chart(series, history)).collect()
}

/// The points of one series: at most `History::CAPACITY / PER_POINT`, right-aligned so the
/// newest sample is at the right edge and an empty past stays empty.
fn points(series: &Series, history: &History) -> (Vec<(f64, f64)>, f64) {
    let values: Vec<f64> = history.samples().map(series.value).collect();
    let slots = History::CAPACITY / PER_POINT;
    let maxima: Vec<f64> =
        values.rchunks(PER_POINT).take(slots).map(|chunk| chunk.iter().copied().fold(0.0, f64::max)).collect();
    let top = maxima.iter().copied().fold(0.0, f64::max);
    let scale = if top > 0.0 { top } else { 1.0 };
    let step = WIDTH / (slots - 1) as f64;
    let points = maxima
        .iter()
        .enumerate()
        .map(|(i, value)| (WIDTH - i as f64 * step, HEIGHT - value / scale * HEIGHT))
        .rev()
        .collect();
    (points, top)
}

fn chart(series: &Series, history: &History) -> Markup {
    let (points, top) = points(series, history);
    let latest = history.samples().next_back().map_or(0.0, series.value);
    let polyline: String = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect::<Vec<_>>().join(" ");
    html! {
        figure.chart data-chart=(series.id) {
            figcaption { (series.title) ": " b.latest { ((series.unit)(latest)) } " (max " ((series.unit)(top)) ")" }
            svg xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } width="300" height="60"
                role="img" aria-label={ (series.title) ", last 15 minutes" } {
                rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="#f7f8fa" {}
                @if points.len() > 1 {
                    polyline points=(polyline) fill="none" stroke="#2453a6" stroke-width="1.5" {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dashboard::Snapshot;

    #[test]
    fn charts_are_svg_polylines_scaled_to_their_maximum() {
        let mut history = History::default();
        for views in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] {
            let snapshot = Snapshot { views, ..Snapshot::default() };
            history.record(&snapshot, Duration::from_secs(1));
        }
        let charts: Vec<String> = dashboard_charts(&history).into_iter().map(Markup::into_string).collect();
        assert_eq!(charts.len(), 8);
        let views = charts.iter().find(|c| c.contains("data-chart=\"views\"")).expect("views chart");
        assert!(views.contains("<polyline"), "{views}");
        assert!(views.contains("<b class=\"latest\">10</b>"), "{views}");
        assert!(!views.contains("style="), "no inline styles: {views}");
        let mut long = History::default();
        for _ in 0..2 * History::CAPACITY {
            long.record(&Snapshot::default(), Duration::from_secs(1));
        }
        let (points, _) = points(&SERIES[0], &long);
        assert_eq!(points.len(), History::CAPACITY / PER_POINT, "bounded whatever the uptime");
    }
}
