//! Line charts to PNG with plotters (bitmap backend, text through ab_glyph with a font file of
//! a Debian package).
use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// The font (Debian package `fonts-dejavu-core`, installed by `cargo xtask setup`).
const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

const WIDTH: u32 = 1000;
const HEIGHT_PER_PLOT: u32 = 380;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// How a chart's values are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// As they are.
    Linear,
    /// Seconds, on a logarithmic scale, labelled µs / ms / s.
    LogSeconds,
    /// A ratio, shown in per cent.
    Percent,
}

/// One line: its legend and its (seconds since the start, value) points.
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The lines of one axis.
pub struct Side {
    pub desc: String,
    pub axis: Axis,
    pub lines: Vec<Line>,
}

/// One chart: a title, lines on the left axis, and maybe more on a right axis.
pub struct Plot {
    pub title: String,
    pub left: Side,
    pub right: Option<Side>,
}

/// Registers the font once; plotters draws no text without it.
pub fn load_font() -> Result<()> {
    let bytes = std::fs::read(FONT_FILE).with_context(|| {
        format!("cannot read {FONT_FILE}: install the Debian package fonts-dejavu-core (cargo xtask setup)")
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT_FILE} is not a font plotters can read"))
}

fn shown(axis: Axis, v: f64) -> Option<f64> {
    match axis {
        Axis::Linear => Some(v),
        Axis::Percent => Some(v * 100.0),
        Axis::LogSeconds => (v > 0.0).then(|| v.log10()),
    }
}

fn label(axis: Axis, y: f64) -> String {
    match axis {
        Axis::Linear => {
            if y.abs() >= 10.0 || (y - y.round()).abs() < 1e-9 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        }
        Axis::Percent => format!("{y:.2} %"),
        Axis::LogSeconds => {
            let s = 10f64.powf(y);
            if s >= 1.0 {
                format!("{s:.2} s")
            } else if s >= 1e-3 {
                format!("{:.1} ms", s * 1e3)
            } else {
                format!("{:.0} µs", s * 1e6)
            }
        }
    }
}

/// The y range of a side's values (as shown), padded; `None` when it has no point.
fn y_range(side: &Side) -> Option<(f64, f64)> {
    let values = side
        .lines
        .iter()
        .flat_map(|l| &l.points)
        .filter_map(|&(_, v)| shown(side.axis, v));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return None;
    }
    Some(match side.axis {
        // Headroom above the lines for the legend.
        Axis::LogSeconds => (lo - 0.2, hi + 0.2 + 0.25 * (hi - lo + 0.4)),
        _ => {
            let lo = lo.min(0.0);
            let hi = if hi > lo { hi * 1.35 } else { lo + 1.0 };
            (lo, hi)
        }
    })
}

fn points(axis: Axis, line: &Line) -> Vec<(f64, f64)> {
    line.points
        .iter()
        .filter_map(|&(t, v)| shown(axis, v).map(|y| (t, y)))
        .collect()
}

/// Draws `plots` stacked in one PNG at `path`, over `seconds` of time.
pub fn picture(path: &Path, heading: &str, plots: &[Plot], seconds: f64) -> Result<()> {
    let height = HEIGHT_PER_PLOT * u32::try_from(plots.len())? + 40;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(heading, (FONT, 24).into_font())?;
    let areas = root.split_evenly((plots.len(), 1));
    for (plot, area) in plots.iter().zip(areas) {
        let Some((lo, hi)) = y_range(&plot.left) else {
            // Only with --prometheus: a run of our own fails on a panel without data.
            area.draw_text(
                &format!("{}: no data in this time range", plot.title),
                &(FONT, 18).into_font().color(&BLACK),
                (40, 40),
            )?;
            continue;
        };
        let mut builder = ChartBuilder::on(&area);
        builder
            .caption(&plot.title, (FONT, 18).into_font())
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .right_y_label_area_size(if plot.right.is_some() { 80 } else { 10 });
        let chart = builder.build_cartesian_2d(0f64..seconds, lo..hi)?;
        let (r_lo, r_hi) = plot.right.as_ref().and_then(y_range).unwrap_or((0.0, 1.0));
        let mut chart = chart.set_secondary_coord(0f64..seconds, r_lo..r_hi);
        let left_axis = plot.left.axis;
        chart
            .configure_mesh()
            // No minor grid: it triples the size of the PNG.
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .x_desc("seconds since the start")
            .y_desc(plot.left.desc.as_str())
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| label(left_axis, *y))
            .label_style((FONT, 13).into_font())
            .axis_desc_style((FONT, 14).into_font())
            .draw()?;
        for (color, line) in plot.left.lines.iter().enumerate() {
            let c = COLORS[color % COLORS.len()];
            // The first line is wider: a line drawn over an equal one leaves it visible.
            let width = if color == 0 { 4 } else { 2 };
            let style = ShapeStyle::from(c).stroke_width(width);
            chart
                .draw_series(LineSeries::new(points(left_axis, line), style))?
                .label(line.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        if let Some(right) = &plot.right {
            let right_axis = right.axis;
            chart
                .configure_secondary_axes()
                .y_desc(right.desc.as_str())
                .y_label_formatter(&|y| label(right_axis, *y))
                .label_style((FONT, 13).into_font())
                .axis_desc_style((FONT, 14).into_font())
                .draw()?;
            // Dashed and black: the right axis's lines may follow a left one exactly.
            for line in &right.lines {
                let style = ShapeStyle::from(BLACK).stroke_width(2);
                let dashed = DashedLineSeries::new(points(right_axis, line), 8, 6, style);
                chart
                    .draw_secondary_series(dashed)?
                    .label(line.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 13).into_font())
            .draw()?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
