//! Charts drawn on the server as inline SVG: no script, no library, readable as text (every bar
//! carries a `<title>` with its numbers, and a table follows each chart).

use maud::{Markup, html};

/// One stacked bar: a label and a count per series, in the series' order.
pub struct Bar {
    pub label: String,
    pub values: Vec<i64>,
}

/// Series names and their CSS classes (colours come from the stylesheet).
pub struct Series<'a> {
    pub names: &'a [&'a str],
    pub classes: &'a [&'a str],
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 8.0;

/// A round axis maximum at or above `max` (1, 2 or 5 times a power of ten).
fn nice_max(max: i64) -> i64 {
    if max <= 0 {
        return 1;
    }
    let mut step = 1i64;
    loop {
        for m in [1, 2, 5] {
            if step.saturating_mul(m) >= max {
                return step.saturating_mul(m);
            }
        }
        step = step.saturating_mul(10);
    }
}

/// The non-empty parts of one stacked bar, bottom up: `(class, top y, bottom y)`.
fn segments<'a>(
    values: &[i64],
    classes: &[&'a str],
    y_of: &impl Fn(i64) -> f64,
) -> Vec<(&'a str, f64, f64)> {
    let mut base = 0;
    let mut parts = Vec::new();
    for (j, &value) in values.iter().enumerate() {
        if value > 0 {
            parts.push((
                classes.get(j).copied().unwrap_or(""),
                y_of(base + value),
                y_of(base),
            ));
        }
        base += value.max(0);
    }
    parts
}

/// Stacked vertical bars over time; every `label_every`-th bar is labelled below.
pub fn stacked_bars(id: &str, bars: &[Bar], series: &Series<'_>, label_every: usize) -> Markup {
    let max = nice_max(
        bars.iter()
            .map(|b| b.values.iter().sum::<i64>())
            .max()
            .unwrap_or(0),
    );
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    let bar_w = (slot * 0.8).max(1.0);
    let y_of = |v: i64| TOP + plot_h - plot_h * v as f64 / max as f64;
    html! {
        svg id=(id) class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-label=(format!("{} over time", series.names.join(", "))) {
            @for tick in [0, max / 2, max] {
                line class="grid" x1=(LEFT) x2=(WIDTH - 8.0) y1=(y_of(tick)) y2=(y_of(tick)) {}
                text class="axis" x=(LEFT - 4.0) y=(y_of(tick) + 4.0) text-anchor="end" { (tick) }
            }
            @for (i, bar) in bars.iter().enumerate() {
                @let x = LEFT + slot * i as f64 + (slot - bar_w) / 2.0;
                g class="bar" {
                    title {
                        (bar.label) ": "
                        @for (j, name) in series.names.iter().enumerate() {
                            @if j > 0 { ", " }
                            (name) " " (bar.values.get(j).copied().unwrap_or(0))
                        }
                    }
                    @for (class, top, bottom) in segments(&bar.values, series.classes, &y_of) {
                        rect class=(class) x=(format!("{x:.1}")) y=(format!("{top:.1}"))
                            width=(format!("{bar_w:.1}")) height=(format!("{:.1}", bottom - top)) {}
                    }
                }
                @if label_every > 0 && i % label_every == 0 {
                    text class="axis" x=(format!("{:.1}", x + bar_w / 2.0)) y=(HEIGHT - 6.0) text-anchor="middle" { (bar.label) }
                }
            }
        }
        ul class="legend" {
            @for (j, name) in series.names.iter().enumerate() {
                li { span class=(format!("swatch {}", series.classes.get(j).copied().unwrap_or(""))) {} (name) }
            }
        }
    }
}

/// Horizontal bars, one per row: label, count, a bar scaled to the largest.
pub fn horizontal_bars(id: &str, rows: &[(String, i64)], class: &str) -> Markup {
    let max = rows.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let row_h = 22.0;
    let height = row_h * rows.len().max(1) as f64 + 4.0;
    let label_w = 230.0;
    let plot_w = WIDTH - label_w - 70.0;
    html! {
        svg id=(id) class="chart" viewBox=(format!("0 0 {WIDTH} {height}")) role="img" aria-label="counts" {
            @for (i, (label, n)) in rows.iter().enumerate() {
                @let y = 2.0 + row_h * i as f64;
                g class="bar" {
                    title { (label) ": " (n) }
                    text class="axis" x=(label_w - 6.0) y=(y + 15.0) text-anchor="end" { (label) }
                    rect class=(class) x=(label_w) y=(y + 3.0)
                        width=(format!("{:.1}", (plot_w * *n as f64 / max as f64).max(1.0))) height=(row_h - 6.0) {}
                    text class="axis" x=(format!("{:.1}", label_w + (plot_w * *n as f64 / max as f64).max(1.0) + 6.0)) y=(y + 15.0) { (n) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(1), 1);
        assert_eq!(nice_max(3), 5);
        assert_eq!(nice_max(7), 10);
        assert_eq!(nice_max(101), 200);
        assert_eq!(nice_max(4_999), 5_000);
    }

    #[test]
    fn a_stacked_bar_draws_each_non_zero_series_with_its_numbers() {
        let bars = [
            Bar {
                label: "07:00".into(),
                values: vec![5, 0, 2],
            },
            Bar {
                label: "08:00".into(),
                values: vec![0, 0, 0],
            },
        ];
        let series = Series {
            names: &["ALLOW", "REVIEW", "DENY"],
            classes: &["allow", "review", "deny"],
        };
        let svg = stacked_bars("verdicts", &bars, &series, 1).into_string();
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(svg.contains("07:00: ALLOW 5, REVIEW 0, DENY 2"), "{svg}");
        assert!(svg.contains(r#"class="deny""#));
        // Labels are escaped like any text.
        let bars = [Bar {
            label: "<b>".into(),
            values: vec![1],
        }];
        let svg = stacked_bars("x", &bars, &series, 1).into_string();
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"));
    }
}
