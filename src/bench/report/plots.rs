//! SVG plots drawn with `plotters`, returned as strings for inlining in the HTML page.

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One named series of (x, y) points.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

const SIZE: (u32, u32) = (760, 380);

fn err(e: impl std::fmt::Display) -> String {
    format!("drawing a plot: {e}")
}

/// Upper end of an axis that shows `max` with some headroom (never an empty range).
fn top(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.1
    } else {
        1.0
    }
}

/// The y axis of a line plot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// From 0.
    Linear,
    /// Logarithmic, for latencies spanning orders of magnitude.
    Log,
}

/// Lines (with points) of several series over a shared x axis from 0 to `x_max` (the
/// largest x when None): latency distributions (percentile against value, log scale) and
/// save time against memory size.
pub fn lines(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    x_max: Option<f64>,
    scale: Scale,
) -> Result<String, String> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let x_max = x_max.unwrap_or_else(|| top(xs.fold(0.0, f64::max)));
    let y_max = top(ys().fold(0.0, f64::max));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64);
        if scale == Scale::Log {
            let y_min = ys().filter(|y| *y > 0.0).fold(f64::INFINITY, f64::min);
            let y_min = if y_min.is_finite() && y_min < y_max {
                y_min / 1.5
            } else {
                y_max / 10.0
            };
            let mut chart = builder
                .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()
                .map_err(err)?;
            for (i, s) in series.iter().enumerate() {
                // A log axis has no 0: such samples sit on the axis floor.
                let points: Vec<(f64, f64)> =
                    s.points.iter().map(|&(x, y)| (x, y.max(y_min))).collect();
                draw_series(&mut chart, i, &s.name, &points)?;
            }
            legend(&mut chart)?;
        } else {
            let mut chart = builder
                .build_cartesian_2d(0f64..x_max, 0f64..y_max)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()
                .map_err(err)?;
            for (i, s) in series.iter().enumerate() {
                draw_series(&mut chart, i, &s.name, &s.points)?;
            }
            legend(&mut chart)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

type Chart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// One series: a line through its points, and the points.
fn draw_series<Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'_, '_, Y>,
    i: usize,
    name: &str,
    points: &[(f64, f64)],
) -> Result<(), String> {
    let color = Palette99::pick(i).to_rgba();
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
        .map_err(err)?;
    Ok(())
}

fn legend<'a, 'b, Y: Ranged<ValueType = f64>>(chart: &mut Chart<'a, 'b, Y>) -> Result<(), String>
where
    'b: 'a,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Horizontal bars, one per (label, value); `mark` draws a vertical reference line (1.0
/// on a ratio chart).
pub fn bars(
    title: &str,
    x_desc: &str,
    bars: &[(String, f64)],
    mark: Option<f64>,
    scale: Scale,
) -> Result<String, String> {
    let n = bars.len().max(1);
    // A log axis is drawn as a linear axis of log10 values, labelled with the values.
    let log = scale == Scale::Log;
    let to_x = |v: f64| if log { v.max(1e-9).log10() } else { v };
    let values = || bars.iter().map(|b| b.1).chain(mark);
    let (x_min, x_max) = if log {
        let lo = values()
            .fold(f64::INFINITY, f64::min)
            .max(1e-9)
            .log10()
            .floor();
        let hi = values().fold(0.0, f64::max).max(1e-9).log10().ceil();
        (lo.min(hi - 1.0), hi)
    } else {
        (0.0, top(values().fold(0.0, f64::max)))
    };
    let x_label = |x: &f64| {
        if log {
            super::super::compare::number(10f64.powf(*x))
        } else {
            super::super::compare::number(*x)
        }
    };
    let height = (80 + 34 * n as u32).max(160);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(300)
            // A segmented 0..k has k + 1 slots.
            .build_cartesian_2d(x_min..x_max, (0..n - 1).into_segmented())
            .map_err(err)?;
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&label)
            .x_label_formatter(&x_label)
            .x_desc(x_desc)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let mut bar = Rectangle::new(
                    [
                        (x_min, SegmentValue::Exact(i)),
                        (to_x(*v), SegmentValue::Exact(i + 1)),
                    ],
                    Palette99::pick(i).filled(),
                );
                bar.set_margin(5, 5, 0, 0);
                bar
            }))
            .map_err(err)?;
        if let Some(x) = mark.map(to_x) {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                    BLACK.stroke_width(1),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_svg() {
        let s = Series {
            name: "a".into(),
            points: vec![(50.0, 1.0), (100.0, 2.0)],
        };
        let svg = lines("t", "x", "y", &[s], Some(100.0), Scale::Log).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
        let two = [("one".to_string(), 1.5), ("two".to_string(), 0.5)];
        let svg = bars("t", "x", &two, Some(1.0), Scale::Log).unwrap();
        assert!(svg.contains("one") && svg.contains("<rect"));
        // Degenerate input still draws.
        assert!(lines("t", "x", "y", &[], None, Scale::Linear).is_ok());
        assert!(lines("t", "x", "y", &[], None, Scale::Log).is_ok());
        assert!(bars("t", "x", &two, None, Scale::Linear).is_ok());
        assert!(bars("t", "x", &[], None, Scale::Linear).is_ok());
        assert!(bars("t", "x", &[], Some(1.0), Scale::Log).is_ok());
    }
}
