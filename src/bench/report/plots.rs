//! SVG plots drawn with `plotters`, returned as strings for inlining in the HTML page.

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
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

/// Lines (with points) of several series over a shared x axis: latency distributions
/// (percentile against value) and save time against memory size.
pub fn lines(title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<String, String> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let x_max = top(xs.fold(0.0, f64::max));
    let y_max = top(ys.fold(0.0, f64::max));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Horizontal bars, one per (label, value); `mark` draws a vertical reference line (1.0
/// on a ratio chart).
pub fn bars(
    title: &str,
    x_desc: &str,
    bars: &[(String, f64)],
    mark: Option<f64>,
) -> Result<String, String> {
    let n = bars.len().max(1);
    let x_max = top(bars.iter().map(|b| b.1).fold(mark.unwrap_or(0.0), f64::max));
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
            .build_cartesian_2d(0f64..x_max, (0..n).into_segmented())
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
            .x_desc(x_desc)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*v, SegmentValue::Exact(i + 1)),
                    ],
                    Palette99::pick(i).filled(),
                );
                bar.set_margin(5, 5, 0, 0);
                bar
            }))
            .map_err(err)?;
        if let Some(x) = mark {
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
        let svg = lines("t", "x", "y", &[s]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
        let svg = bars(
            "t",
            "x",
            &[("one".into(), 1.5), ("two".into(), 0.5)],
            Some(1.0),
        )
        .unwrap();
        assert!(svg.contains("one") && svg.contains("<rect"));
        // Degenerate input still draws.
        assert!(lines("t", "x", "y", &[]).is_ok());
        assert!(bars("t", "x", &[], None).is_ok());
    }
}
