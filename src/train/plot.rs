//! Loss-curve plot (SVG): train and validation loss against the optimizer step.
//!
//! Conventions of [`render_loss_plot`] and [`write_loss_plot`]:
//! - points are `(step, loss)`; a point whose loss is NaN or infinite is skipped, and each series
//!   is drawn in step order (the input need not be sorted);
//! - train is a plain line; validation is a line with a filled circle at each point, in another
//!   colour, and is left out (line and legend entry) when it has no finite point; a train series
//!   with a single point gets a marker too, since a one-point line is invisible;
//! - the y range covers every finite loss of both series with a 5% margin, and is at least 10% of
//!   the largest |loss| wide (1.0 when every loss is 0), so all-equal values still get a band;
//!   it is then widened to the nearest ticks (multiples of a 1-2-5 step) outside it, so the
//!   axis ends on labelled ticks and every point lies between the lowest and highest label;
//!   y labels use as many decimals as the tick spacing needs, in scientific notation when the
//!   losses are below 1e-3 or from 1e5 on (absurd losses beyond +-f64::MAX/4 are drawn at the
//!   plot's edge rather than breaking the axis);
//! - no finite point at all (empty train and validation, or only NaN/inf) is not an error: the
//!   result is a valid chart with title, axes and legend, an empty plotting area and a
//!   "no finite loss values" note, so an end-of-run report always has its plot.
//!
//! The SVG is rendered by `plotters` (SVG backend only): text is emitted as SVG `<text>` and laid
//! out by the viewer, so no font files or system libraries are involved.
use crate::error::{Error, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Size of the chart in SVG user units (pixels).
const SIZE: (u32, u32) = (800, 500);
const TITLE: &str = "Training loss";
/// The matplotlib "tab:blue" and "tab:orange".
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALIDATION_COLOR: RGBColor = RGBColor(255, 127, 14);
const MARKER_RADIUS: u32 = 4;
const NO_DATA: &str = "no finite loss values";

/// Renders the loss plot (see the module docs) and writes it to `path` atomically
/// ([`crate::io::atomic::write_atomic`]): a failed write leaves an existing file intact.
///
/// Errors: [`Error::Io`] for `path` when drawing fails (the message says so) or the file cannot be
/// written (the directory must exist).
pub fn write_loss_plot(path: &Path, train: &[(u64, f64)], validation: &[(u64, f64)]) -> Result<()> {
    let svg = draw(train, validation).map_err(|msg| plot_error(path, msg))?;
    crate::io::atomic::write_atomic(path, svg.as_bytes())
}

/// Renders the loss plot (see the module docs) and returns the SVG document.
///
/// Errors: [`Error::Io`] (path `<loss plot>`, kind `Other`) if `plotters` fails to draw the chart;
/// no input makes it fail (non-finite values are skipped, empty series give an empty chart).
pub fn render_loss_plot(train: &[(u64, f64)], validation: &[(u64, f64)]) -> Result<String> {
    draw(train, validation).map_err(|msg| plot_error(Path::new("<loss plot>"), msg))
}

fn plot_error(path: &Path, msg: String) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!("drawing the loss plot failed: {msg}")),
    )
}

/// The finite points of `points`, sorted by step (stable: equal steps keep their order).
fn finite_sorted(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let mut v: Vec<(u64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    v.sort_by_key(|p| p.0);
    v
}

/// The x (step) range: `min..max`, widened by one step each way when it is a single step,
/// `0..1` when there are no steps.
fn x_range(steps: impl Iterator<Item = u64>) -> (u64, u64) {
    let (lo, hi) = steps.fold((u64::MAX, u64::MIN), |(lo, hi), s| (lo.min(s), hi.max(s)));
    if lo > hi {
        (0, 1)
    } else if lo == hi {
        (lo.saturating_sub(1), hi.saturating_add(1))
    } else {
        (lo, hi)
    }
}

/// The y (loss) range over finite `values`: 5% margin each side, at least 10% of the largest
/// |value| wide (1.0 when all are 0); `0..1` when there are none. Values are first clamped to
/// +-f64::MAX/4 and the range is computed on halves, so that its width stays finite: `plotters`
/// loops forever computing ticks over an infinite width.
fn y_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    let limit = f64::MAX / 4.0;
    let (lo, hi) = (lo.clamp(-limit, limit), hi.clamp(-limit, limit));
    let mid = lo / 2.0 + hi / 2.0;
    let magnitude = lo.abs().max(hi.abs());
    let min_half = if magnitude > 0.0 {
        magnitude * 0.05
    } else {
        0.5
    };
    let half = ((hi / 2.0 - lo / 2.0) * 1.1).max(min_half);
    (mid - half, mid + half)
}

/// The y ticks of a chart whose losses span `lo..hi` (a [`y_range`]): multiples of a 1, 2 or 5
/// times a power of ten step, 5 to 12 intervals, from the last one at or below `lo` to the
/// first at or above `hi` (just `[lo, hi]` where the step underflows, near f64's smallest
/// values); the axis runs from the first to the last. Without ticks ending the
/// axis, `plotters` labels only the multiples inside it: a first loss of 4.01 was drawn above
/// the top label, 3.9.
fn y_ticks(lo: f64, hi: f64) -> Vec<f64> {
    // Halves keep the width finite at +-f64::MAX/4 (see `y_range`).
    let raw = (hi / 2.0 - lo / 2.0) / 5.0;
    let unit = 10f64.powi(raw.log10().floor() as i32);
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * unit)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * unit);
    let (first, last) = ((lo / step).floor(), (hi / step).ceil());
    let intervals = last - first;
    if !(step > 0.0 && (1.0..=12.0).contains(&intervals)) {
        return vec![lo, hi];
    }
    let ticks: Vec<f64> = (0..=intervals as i64)
        .map(|i| (first + i as f64) * step)
        .collect();
    let ends = (ticks[0], ticks[ticks.len() - 1]);
    if ends.0 <= lo && hi <= ends.1 && ends.1.is_finite() && ends.0.is_finite() {
        ticks
    } else {
        vec![lo, hi]
    }
}

/// The y axis: linear from the first tick to the last, labelled at the ticks (bold lines) with a
/// light line half-way between each two.
struct YAxis {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl YAxis {
    /// `ticks`: at least two, ascending.
    fn new(ticks: Vec<f64>) -> Self {
        let linear = (ticks[0]..ticks[ticks.len() - 1]).into();
        Self { linear, ticks }
    }
}

impl Ranged for YAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            (self.ticks.windows(2))
                .map(|w| w[0] / 2.0 + w[1] / 2.0)
                .collect()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.linear.range()
    }
}

/// Formats a y tick label of a chart whose y range is `range`: enough decimals to tell ticks
/// about `(range.1 - range.0) / 10` apart, scientific notation for magnitudes below 1e-3 or
/// from 1e5 on (the default `plotters` format prints at most 5 decimals and no exponent, so
/// losses of 1e-6 would all read "0.0").
fn y_label(v: f64, range: (f64, f64)) -> String {
    let magnitude = range.0.abs().max(range.1.abs());
    let step = (range.1 - range.0) / 10.0;
    let scientific = magnitude > 0.0 && !(1e-3..1e5).contains(&magnitude);
    let unit = if scientific {
        10f64.powi(magnitude.log10().floor() as i32)
    } else {
        1.0
    };
    let decimals = (-(step / unit).log10()).ceil().clamp(0.0, 12.0) as usize;
    if scientific {
        format!("{v:.decimals$e}")
    } else {
        format!("{v:.decimals$}")
    }
}

/// Draws the chart into an SVG string; the error is `plotters`' message. One function: plotters'
/// builder calls (mesh, axes, both series, legend) read top to bottom as the picture is layered,
/// and split apart they would only pass the chart context along.
fn draw(train: &[(u64, f64)], validation: &[(u64, f64)]) -> std::result::Result<String, String> {
    let train = finite_sorted(train);
    let validation = finite_sorted(validation);
    let (x0, x1) = x_range(train.iter().chain(&validation).map(|p| p.0));
    let (lo, hi) = y_range(train.iter().chain(&validation).map(|p| p.1));
    let ticks = y_ticks(lo, hi);
    let (y0, y1) = (ticks[0], ticks[ticks.len() - 1]);
    let err = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(TITLE, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, YAxis::new(ticks))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .y_label_formatter(&|v| y_label(*v, (y0, y1)))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .max_light_lines(4)
            .draw()
            .map_err(err)?;

        let train_style = TRAIN_COLOR.stroke_width(2);
        chart
            .draw_series(LineSeries::new(train.iter().copied(), train_style))
            .map_err(err)?
            .label("train")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], train_style));
        if train.len() == 1 {
            chart
                .draw_series(
                    (train.iter()).map(|&p| Circle::new(p, MARKER_RADIUS, TRAIN_COLOR.filled())),
                )
                .map_err(err)?;
        }

        if !validation.is_empty() {
            let style = VALIDATION_COLOR.stroke_width(2);
            chart
                .draw_series(LineSeries::new(validation.iter().copied(), style))
                .map_err(err)?
                .label("validation")
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (20, 0)], style)
                        + Circle::new((10, 0), MARKER_RADIUS, VALIDATION_COLOR.filled())
                });
            chart
                .draw_series(
                    (validation.iter())
                        .map(|&p| Circle::new(p, MARKER_RADIUS, VALIDATION_COLOR.filled())),
                )
                .map_err(err)?;
        }

        if train.is_empty() && validation.is_empty() {
            let style = ("sans-serif", 18)
                .into_font()
                .color(&BLACK.mix(0.6))
                .pos(Pos::new(HPos::Center, VPos::Center));
            let (xs, ys) = chart.plotting_area().get_pixel_range();
            let centre = ((xs.start + xs.end) / 2, (ys.start + ys.end) / 2);
            root.draw(&Text::new(NO_DATA, centre, style)).map_err(err)?;
        }

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train_curve(n: u64) -> Vec<(u64, f64)> {
        (0..n).map(|s| (s, 3.0 / (1.0 + s as f64 * 0.1))).collect()
    }

    /// The `points` attribute of every `<polyline>` stroked in `color`, as (x, y) pairs.
    fn polylines(svg: &str, color: RGBColor) -> Vec<Vec<(i32, i32)>> {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.split("<polyline")
            .skip(1)
            .map(|tag| &tag[..tag.find("/>").expect("polyline is self-closing")])
            .filter(|tag| tag.contains(&stroke))
            .map(|tag| {
                let start = tag.find("points=\"").expect("points attribute") + "points=\"".len();
                let end = start + tag[start..].find('"').unwrap();
                (tag[start..end].split_whitespace())
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    /// The longest polyline in `color`: the data series (legend swatches have 2 points).
    fn series_points(svg: &str, color: RGBColor) -> Vec<(i32, i32)> {
        let mut lines = polylines(svg, color);
        lines.sort_by_key(|l| l.len());
        lines.pop().unwrap_or_default()
    }

    fn filled_circles(svg: &str, color: RGBColor) -> usize {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        (svg.split("<circle").skip(1))
            .filter(|tag| tag[..tag.find("/>").unwrap()].contains(&fill))
            .count()
    }

    /// The content of every `<text>` element, trimmed (the backend puts it on its own line).
    fn texts(svg: &str) -> Vec<String> {
        (svg.split("<text").skip(1))
            .map(|tag| {
                let body = &tag[tag.find('>').unwrap() + 1..];
                body[..body.find("</text>").unwrap()].trim().to_string()
            })
            .collect()
    }

    fn has_text(svg: &str, text: &str) -> bool {
        texts(svg).iter().any(|t| t == text)
    }

    fn assert_svg_document(svg: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for label in [TITLE, "step", "loss"] {
            assert!(has_text(svg, label), "no {label:?} in {:?}", texts(svg));
        }
        assert!(
            !svg.contains("NaN") && !svg.contains("inf"),
            "non-finite number in the SVG"
        );
    }

    #[test]
    fn renders_title_axes_legend_and_both_series() {
        let train = train_curve(50);
        let validation: Vec<(u64, f64)> = (0..50)
            .step_by(10)
            .map(|s| (s, 3.2 / (1.0 + s as f64 * 0.08)))
            .collect();
        let svg = render_loss_plot(&train, &validation).unwrap();
        assert_svg_document(&svg);
        assert!(has_text(&svg, "train"));
        assert!(has_text(&svg, "validation"));
        assert!(!svg.contains(NO_DATA));
        assert_eq!(series_points(&svg, TRAIN_COLOR).len(), 50);
        assert_eq!(series_points(&svg, VALIDATION_COLOR).len(), 5);
        // One marker per validation point plus the legend swatch; none on the train line.
        assert_eq!(filled_circles(&svg, VALIDATION_COLOR), 5 + 1);
        assert_eq!(filled_circles(&svg, TRAIN_COLOR), 0);
        // Decreasing loss: SVG y grows downward, so the train line's y must not decrease.
        let pts = series_points(&svg, TRAIN_COLOR);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn non_finite_points_are_skipped() {
        let mut train = train_curve(20);
        train[3].1 = f64::NAN;
        train[7].1 = f64::INFINITY;
        train[11].1 = f64::NEG_INFINITY;
        let validation = vec![(0, 3.0), (10, f64::NAN), (19, 1.5)];
        let svg = render_loss_plot(&train, &validation).unwrap();
        assert_svg_document(&svg);
        assert_eq!(series_points(&svg, TRAIN_COLOR).len(), 17);
        assert_eq!(series_points(&svg, VALIDATION_COLOR).len(), 2);
        assert_eq!(filled_circles(&svg, VALIDATION_COLOR), 2 + 1);
    }

    #[test]
    fn empty_validation_draws_train_only() {
        let svg = render_loss_plot(&train_curve(10), &[]).unwrap();
        assert_svg_document(&svg);
        assert!(has_text(&svg, "train"));
        assert!(!svg.contains("validation"));
        assert!(polylines(&svg, VALIDATION_COLOR).is_empty());
        assert_eq!(series_points(&svg, TRAIN_COLOR).len(), 10);
        // All-NaN validation is the same as none.
        let nan_only = render_loss_plot(&train_curve(10), &[(5, f64::NAN)]).unwrap();
        assert_eq!(nan_only, svg);
    }

    #[test]
    fn single_points_get_markers() {
        let svg = render_loss_plot(&[(0, 2.5)], &[(0, 2.6)]).unwrap();
        assert_svg_document(&svg);
        assert_eq!(filled_circles(&svg, TRAIN_COLOR), 1);
        assert_eq!(filled_circles(&svg, VALIDATION_COLOR), 1 + 1);
        let svg = render_loss_plot(&[(u64::MAX, 1.0)], &[]).unwrap();
        assert_svg_document(&svg);
    }

    #[test]
    fn all_equal_values_get_a_padded_range() {
        let (lo, hi) = y_range([2.0, 2.0, 2.0].into_iter());
        assert!(lo < 2.0 && 2.0 < hi && hi - lo >= 0.2 - 1e-12, "{lo}..{hi}");
        let (lo, hi) = y_range([0.0].into_iter());
        assert_eq!((lo, hi), (-0.5, 0.5));
        let (lo, hi) = y_range([1.0, 3.0].into_iter());
        assert!(
            (lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12,
            "{lo}..{hi}"
        );
        for extreme in [
            [-f64::MAX, f64::MAX],
            [f64::MAX, f64::MAX],
            [-f64::MAX, 0.0],
        ] {
            let (lo, hi) = y_range(extreme.into_iter());
            assert!(lo < hi && (hi - lo).is_finite(), "{extreme:?}: {lo}..{hi}");
        }
        assert_eq!(x_range([7, 7].into_iter()), (6, 8));
        assert_eq!(x_range([0].into_iter()), (0, 1));
        assert_eq!(x_range(std::iter::empty()), (0, 1));

        let flat: Vec<(u64, f64)> = (0..10).map(|s| (s, 1.25)).collect();
        let svg = render_loss_plot(&flat, &[]).unwrap();
        assert_svg_document(&svg);
        let pts = series_points(&svg, TRAIN_COLOR);
        assert_eq!(pts.len(), 10);
        assert!(pts.iter().all(|p| p.1 == pts[0].1));
    }

    /// The pixel y of each y tick label (`<text>` elements right of nothing but the axis: those
    /// whose x is left of the plotting area).
    fn y_tick_pixels(svg: &str) -> Vec<i32> {
        (svg.split("<text").skip(1))
            .filter_map(|tag| {
                let attrs = &tag[..tag.find('>').unwrap()];
                let num = |name: &str| -> Option<i32> {
                    let start = attrs.find(&format!(" {name}=\""))? + name.len() + 3;
                    attrs[start..start + attrs[start..].find('"')?].parse().ok()
                };
                let body = tag[tag.find('>').unwrap() + 1..].trim_start();
                let label = &body[..body.find('<').unwrap()].trim();
                (num("x")? < 79 && label.parse::<f64>().is_ok()).then(|| num("y"))?
            })
            .collect()
    }

    #[test]
    fn every_point_lies_between_the_lowest_and_highest_y_label() {
        // The FAQ demo's curves: the first training loss (4.01) was drawn above the top label.
        let train = vec![
            (2, 4.008),
            (4, 3.78),
            (6, 3.45),
            (8, 3.55),
            (10, 3.25),
            (12, 3.25),
            (14, 3.35),
            (16, 3.23),
            (18, 3.25),
            (20, 3.32),
            (22, 3.26),
            (24, 3.12),
        ];
        let validation = vec![(0, 3.856), (12, 3.11), (24, 3.02)];
        let mut cases = vec![(train, validation)];
        let mut x = 0.37f64;
        for n in [3usize, 17, 60] {
            let curve = (0..n as u64)
                .map(|s| {
                    x = (x * 7.13 + 0.29).fract();
                    (s, 0.2 + 9.0 * x / (1.0 + s as f64))
                })
                .collect();
            cases.push((curve, vec![(0, 9.7)]));
        }
        cases.push((vec![(1, 1e-6), (2, 3e-6)], vec![]));
        cases.push((vec![(1, 2.0), (2, 2.0)], vec![]));
        for (train, validation) in cases {
            let svg = render_loss_plot(&train, &validation).unwrap();
            let ticks = y_tick_pixels(&svg);
            assert!(ticks.len() >= 3, "{:?}", texts(&svg));
            let (top, bottom) = (*ticks.iter().min().unwrap(), *ticks.iter().max().unwrap());
            for color in [TRAIN_COLOR, VALIDATION_COLOR] {
                let points = series_points(&svg, color);
                assert!(points.len() >= 2 || color == VALIDATION_COLOR);
                for (_, y) in points {
                    // Text y is the label's centre; one pixel of rounding either way.
                    assert!(
                        top - 1 <= y && y <= bottom + 1,
                        "{y} outside {top}..{bottom}"
                    );
                }
            }
        }
        let ticks = y_ticks(2.9, 4.1);
        assert_eq!(ticks.len(), 8, "{ticks:?}");
        assert!((ticks[0] - 2.8).abs() < 1e-12, "{ticks:?}");
        assert!((ticks[7] - 4.2).abs() < 1e-12, "{ticks:?}");
        assert_eq!(
            y_ticks(0.0, f64::MIN_POSITIVE),
            vec![0.0, f64::MIN_POSITIVE]
        );
    }

    #[test]
    fn y_labels_follow_the_scale() {
        assert_eq!(y_label(1.5, (0.4, 3.2)), "1.5");
        assert_eq!(y_label(1.22, (1.1875, 1.3125)), "1.22");
        assert_eq!(y_label(2.0, (0.0, 100.0)), "2");
        assert_eq!(y_label(1.5e-6, (0.9e-6, 2.1e-6)), "1.5e-6");
        assert_eq!(y_label(3.0e6, (1.0e6, 5.0e6)), "3.0e6");
        assert_eq!(y_label(0.0, (-0.5, 0.5)), "0.0");
        // Ticks of a near-flat curve stay distinct.
        let (lo, hi) = y_range([0.3, 0.3].into_iter());
        let (a, b) = (y_label(lo, (lo, hi)), y_label(hi, (lo, hi)));
        assert_ne!(a, b);
    }

    #[test]
    fn extreme_values_render() {
        for train in [
            vec![(0, -f64::MAX), (1, f64::MAX), (2, 1e-300)],
            vec![(0, f64::MAX), (1, f64::MAX)],
            vec![(0, 1e-300), (1, 2e-300)],
            vec![(0, f64::MIN_POSITIVE), (1, 0.0)],
            vec![(0, 1e6), (1, 1e6 + 1e-6)],
        ] {
            let svg = render_loss_plot(&train, &[]).unwrap();
            assert_svg_document(&svg);
            assert!(
                texts(&svg).len() > 3 + 2,
                "no tick labels: {:?}",
                texts(&svg)
            );
        }
    }

    #[test]
    fn unsorted_input_is_drawn_in_step_order() {
        let mut train = train_curve(30);
        train.reverse();
        train.swap(4, 17);
        let svg = render_loss_plot(&train, &[]).unwrap();
        let pts = series_points(&svg, TRAIN_COLOR);
        assert_eq!(pts.len(), 30);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn no_finite_points_give_an_empty_chart() {
        for (train, validation) in [
            (vec![], vec![]),
            (vec![(0, f64::NAN), (1, f64::INFINITY)], vec![(0, f64::NAN)]),
        ] {
            let svg = render_loss_plot(&train, &validation).unwrap();
            assert_svg_document(&svg);
            assert!(has_text(&svg, NO_DATA));
            assert!(has_text(&svg, "train"));
            assert!(series_points(&svg, TRAIN_COLOR).len() <= 2); // legend swatch only
        }
        // Validation only: drawn, no note.
        let svg = render_loss_plot(&[], &[(10, 2.0), (20, 1.5)]).unwrap();
        assert!(!svg.contains(NO_DATA));
        assert_eq!(series_points(&svg, VALIDATION_COLOR).len(), 2);
    }

    #[test]
    fn writes_the_file_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        std::fs::write(&path, "old").unwrap();
        let (train, validation) = (train_curve(25), vec![(0, 3.1), (24, 1.4)]);
        write_loss_plot(&path, &train, &validation).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written, render_loss_plot(&train, &validation).unwrap());
        // Replaced in place, no temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("loss.svg")]);

        let missing = dir.path().join("no-such-dir").join("loss.svg");
        match write_loss_plot(&missing, &train, &validation).unwrap_err() {
            Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
    }
}
