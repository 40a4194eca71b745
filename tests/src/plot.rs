//! The incident lab's picture: throughput per flow over time, with the
//! moments that matter marked, as a PNG (plotters, no browser).

use std::path::Path;

use plotters::prelude::*;

/// One flow's samples: (seconds since start, Mbit/s).
pub struct Line<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Samples.
    pub points: &'a [(f64, f64)],
    /// Colour.
    pub color: RGBColor,
}

/// A vertical marker.
pub struct Marker<'a> {
    /// Seconds since start.
    pub at: f64,
    /// What happened.
    pub label: &'a str,
}

/// Why the chart could not be drawn.
#[derive(Debug)]
pub struct PlotError(pub String);

impl std::fmt::Display for PlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn font() -> Result<(), PlotError> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let bytes = std::fs::read(FONT)
            .map_err(|e| format!("{FONT}: {e} (apt install fonts-dejavu-core)"))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a usable TrueType font"))
    })
    .clone()
    .map_err(PlotError)
}

/// Draws `lines` and `markers` into a PNG at `path`.
pub fn draw(
    path: &Path,
    title: &str,
    lines: &[Line<'_>],
    markers: &[Marker<'_>],
) -> Result<(), PlotError> {
    font()?;
    let e = |e: &dyn std::fmt::Display| PlotError(format!("{}: {e}", path.display()));
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .chain(markers.iter().map(|m| m.at))
        .fold(1.0f64, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (1280, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the flows started")
        .y_desc("Mbit/s (iperf3 goodput, 1 s intervals)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, m) in markers.iter().enumerate() {
        let c = RGBColor(110, 110, 110);
        chart
            .draw_series(LineSeries::new(
                [(m.at, 0.0), (m.at, y_max)],
                c.stroke_width(1),
            ))
            .map_err(|x| e(&x))?;
        chart
            .draw_series(std::iter::once(Text::new(
                m.label.to_string(),
                // Staggered, so markers a second apart stay readable.
                (m.at + x_max * 0.004, y_max * (0.97 - 0.05 * (i % 3) as f64)),
                ("sans-serif", 15).into_font().color(&c),
            )))
            .map_err(|x| e(&x))?;
    }
    for l in lines {
        let color = l.color;
        chart
            .draw_series(LineSeries::new(
                l.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(l.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
