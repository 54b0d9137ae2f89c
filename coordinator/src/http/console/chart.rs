//! The overview's two charts, drawn as SVG by our own code: tasks completed per minute
//! (bars) and the queue's length (a line). Pure: data in, markup out.

use std::fmt::Write;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 170.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// How the points are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartKind {
    /// One bar per point, `bar_width` x-units wide, starting at the point's x.
    Bars { bar_width: u32 },
    /// A line through the points with the area under it shaded.
    Line,
}

/// One chart: points `(x, y)` with `x` in seconds inside `[from, to]`.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub kind: ChartKind,
    /// Said by screen readers and as the tooltip of the whole chart.
    pub label: &'a str,
    /// What one y unit is, for each point's tooltip (`"tasks"`).
    pub unit: &'a str,
    pub from: f64,
    pub to: f64,
    pub points: &'a [(f64, f64)],
}

/// The smallest 1, 2 or 5 × 10^k at or above `max` (and at least 1): the y axis' top.
pub fn nice_ceiling(max: f64) -> f64 {
    if !max.is_finite() || max <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * magnitude)
}

fn fmt_number(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Chart<'_> {
    /// The chart as an `<svg>` element that scales to its container's width.
    pub fn svg(&self) -> String {
        let span = (self.to - self.from).max(1.0);
        let top = nice_ceiling(self.points.iter().map(|p| p.1).fold(0.0, f64::max));
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let x = |t: f64| LEFT + ((t - self.from) / span).clamp(0.0, 1.0) * plot_w;
        let y = |v: f64| TOP + plot_h - (v / top).clamp(0.0, 1.0) * plot_h;
        let mut out = String::new();
        let label = escape(self.label);
        let _ = write!(
            out,
            r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{label}"><title>{label}</title>"#
        );
        // Grid and y labels: 0, half, top.
        for v in [0.0, top / 2.0, top] {
            let gy = y(v);
            let _ = write!(
                out,
                r#"<line class="c-grid" x1="{LEFT}" x2="{}" y1="{gy:.1}" y2="{gy:.1}"/><text class="c-axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                WIDTH - RIGHT,
                LEFT - 6.0,
                gy + 4.0,
                fmt_number(v)
            );
        }
        // X labels: minutes before `to`.
        let minutes = (span / 60.0).round() as i64;
        for (t, text) in [
            (self.from, format!("-{minutes} min")),
            (self.from + span / 2.0, format!("-{} min", minutes / 2)),
            (self.to, "now".to_string()),
        ] {
            let anchor = if t == self.from {
                "start"
            } else if t == self.to {
                "end"
            } else {
                "middle"
            };
            let _ = write!(
                out,
                r#"<text class="c-axis" x="{:.1}" y="{}" text-anchor="{anchor}">{text}</text>"#,
                x(t),
                HEIGHT - 6.0
            );
        }
        let unit = escape(self.unit);
        match self.kind {
            ChartKind::Bars { bar_width } => {
                for &(t, v) in self.points {
                    if t + f64::from(bar_width) <= self.from || t >= self.to || v <= 0.0 {
                        continue;
                    }
                    // A bar covers its interval, cut to the window (the current minute
                    // ends at "now").
                    let (bx, by) = (x(t), y(v));
                    let w = (x(t + f64::from(bar_width)) - bx - 1.0).max(1.5);
                    let _ = write!(
                        out,
                        r#"<rect class="c-bar" x="{bx:.1}" y="{by:.1}" width="{w:.1}" height="{:.1}"><title>{} {unit}</title></rect>"#,
                        (TOP + plot_h - by).max(0.0),
                        fmt_number(v)
                    );
                }
            }
            ChartKind::Line => {
                let inside: Vec<(f64, f64)> = self
                    .points
                    .iter()
                    .filter(|p| p.0 >= self.from && p.0 <= self.to)
                    .map(|&(t, v)| (x(t), y(v)))
                    .collect();
                if let (Some(first), Some(last)) = (inside.first(), inside.last()) {
                    let mut line = String::new();
                    for (px, py) in &inside {
                        let _ = write!(line, "{px:.1},{py:.1} ");
                    }
                    let base = TOP + plot_h;
                    let _ = write!(
                        out,
                        r#"<polygon class="c-area" points="{:.1},{base:.1} {line}{:.1},{base:.1}"/><polyline class="c-line" points="{}"/>"#,
                        first.0,
                        last.0,
                        line.trim_end()
                    );
                    if let Some(&(_, v)) = self.points.last() {
                        let _ = write!(
                            out,
                            r#"<circle class="c-dot" cx="{:.1}" cy="{:.1}" r="3"><title>{} {unit} now</title></circle>"#,
                            last.0,
                            last.1,
                            fmt_number(v)
                        );
                    }
                }
            }
        }
        out.push_str("</svg>");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
    }

    #[test]
    fn bars_one_per_nonzero_point_inside_the_window() {
        let points = [(0.0, 3.0), (60.0, 0.0), (120.0, 7.0), (9999.0, 5.0)];
        let svg = Chart {
            kind: ChartKind::Bars { bar_width: 60 },
            label: "Completed <per> minute",
            unit: "tasks",
            from: 0.0,
            to: 1800.0,
            points: &points,
        }
        .svg();
        assert_eq!(svg.matches("<rect").count(), 2);
        assert!(svg.contains("<title>7 tasks</title>"));
        assert!(svg.contains("Completed &lt;per&gt; minute"));
        // The y axis tops out at the nice ceiling of the largest point inside.
        assert!(svg.contains(">10</text>"));
    }

    #[test]
    fn a_line_ends_at_the_last_point() {
        let points = [(0.0, 0.0), (900.0, 4.0), (1800.0, 2.0)];
        let svg = Chart {
            kind: ChartKind::Line,
            label: "Queue length",
            unit: "pending",
            from: 0.0,
            to: 1800.0,
            points: &points,
        }
        .svg();
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("<title>2 pending now</title>"));
        let empty = Chart {
            points: &[],
            ..Chart {
                kind: ChartKind::Line,
                label: "Queue length",
                unit: "pending",
                from: 0.0,
                to: 1800.0,
                points: &points,
            }
        }
        .svg();
        assert!(!empty.contains("<polyline"));
    }
}
