//! `turbopi trace report`: reads the JSON-lines span file that the nodes write (`TRACE_FILE`),
//! prints per-stage latency statistics and optionally writes a Chrome trace (Perfetto,
//! chrome://tracing) and a latency plot (SVG or PNG).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use node_common::trace::{SpanRecord, STAGES};
use operators::fsio;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Per-stage latency of a span file: p50/p90/p99/mean per stage, end to end, between
    /// stages.
    ///
    /// Optionally writes a Chrome trace (open it in Perfetto or chrome://tracing) and a plot
    /// (.svg or .png).
    Report {
        /// JSON-lines span file, as the nodes write it with TRACE_FILE (or `turbopi infer
        /// --trace-file`).
        file: PathBuf,
        /// Write the spans as a Chrome Trace Event Format JSON file, one track per stage.
        #[arg(long, value_name = "OUT.json")]
        chrome: Option<PathBuf>,
        /// Write latency over frames and latency histograms; the extension (.svg or .png)
        /// picks the format.
        #[arg(long, value_name = "OUT.svg|OUT.png")]
        plot: Option<PathBuf>,
    },
}

pub fn run(cmd: TraceCommand) -> Result<()> {
    match cmd {
        TraceCommand::Report { file, chrome, plot } => {
            report(&file, chrome.as_deref(), plot.as_deref())
        }
    }
}

fn report(file: &Path, chrome: Option<&Path>, plot: Option<&Path>) -> Result<()> {
    let text = report_text(file, chrome, plot)?;
    // The files are written; a reader that stops early (`| head`) is not an error.
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// What `turbopi trace report` prints, after writing the Chrome trace and the plot when
/// asked for.
pub fn report_text(file: &Path, chrome: Option<&Path>, plot: Option<&Path>) -> Result<String> {
    // Refuse a bad plot name before any work.
    let plot = plot
        .map(|p| PlotFormat::of(p).map(|f| (p, f)))
        .transpose()?;
    let all = load(file)?;
    // Spans of frames a stage rejected carry no latency: they are counted apart.
    let (rejected, records): (Vec<SpanRecord>, Vec<SpanRecord>) =
        all.into_iter().partition(|r| r.rejected.is_some());
    if records.is_empty() {
        return Ok(rejected_text(&rejected));
    }
    let a = Analysis::new(&records);
    let mut text = a.table(file);
    text += &rejected_text(&rejected);
    if let Some(out) = chrome {
        write_chrome(out, &records, &a.stages)?;
        text += &format!("Chrome trace written to {}\n", out.display());
    }
    if let Some((out, format)) = plot {
        write_plot(out, format, file, &a)?;
        text += &format!("plot written to {}\n", out.display());
    }
    Ok(text)
}

/// The span records of `path`, checked; an error names the file, the line and the field.
///
/// Like `node_common::trace::read_records`, but keeps line numbers for the checks.
fn load(path: &Path) -> Result<Vec<SpanRecord>> {
    let text = fsio::read_string_limited(path, fsio::limit::TRACE_JSONL, "JSON-lines span")
        .with_context(|| format!("cannot read trace file {}", path.display()))?;
    if text.is_empty() {
        bail!("{}: the trace file is empty", path.display());
    }
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let rec: SpanRecord =
            serde_json::from_str(line).map_err(|e| anyhow!("{at}: not a span record: {e}"))?;
        check(&rec).map_err(|e| anyhow!("{at}: {e}"))?;
        records.push(rec);
    }
    if records.is_empty() {
        bail!("{}: no spans (only blank lines)", path.display());
    }
    Ok(records)
}

/// The frames stages rejected: how many per stage, and the first few with their reasons.
fn rejected_text(rejected: &[SpanRecord]) -> String {
    if rejected.is_empty() {
        return String::new();
    }
    let mut per_stage: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rejected {
        *per_stage.entry(r.name.as_str()).or_default() += 1;
    }
    let mut out = format!(
        "rejected frames: {} ({})\n",
        rejected.len(),
        per_stage
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    const SHOWN: usize = 5;
    for r in rejected.iter().take(SHOWN) {
        let why = r.rejected.as_deref().unwrap_or_default();
        let why: String = why.chars().take(200).collect();
        out += &format!("  seq {} at {} ({}): {why}\n", r.seq, r.name, r.node);
    }
    if rejected.len() > SHOWN {
        out += &format!("  ... and {} more\n", rejected.len() - SHOWN);
    }
    out
}

/// The longest stage name accepted (bytes): the nodes' names are a few characters, and the
/// table pads every row to the longest one.
const MAX_NAME_BYTES: usize = 256;

fn check(r: &SpanRecord) -> Result<(), String> {
    if r.name.trim().is_empty() {
        return Err("field `name` is empty".into());
    }
    if r.name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "field `name` is {} bytes long, more than the {MAX_NAME_BYTES} a stage name may have",
            r.name.len()
        ));
    }
    if r.trace_id.trim().is_empty() {
        return Err("field `trace_id` is empty".into());
    }
    if r.end_unix_ns < r.start_unix_ns {
        return Err(format!(
            "field `end_unix_ns` ({}) is before `start_unix_ns` ({})",
            r.end_unix_ns, r.start_unix_ns
        ));
    }
    if let Some(g) = r.gpu_ms {
        if !g.is_finite() || g < 0.0 {
            return Err(format!(
                "field `gpu_ms` is {g}: expected a non-negative number"
            ));
        }
    }
    Ok(())
}

/// Nearest-rank percentile of ascending `sorted` values: the smallest value with at least
/// `p`% of the values at or below it, `sorted[ceil(p/100 * n) - 1]` (no interpolation, so
/// it is always a measured value: p50 of [1, 2, 3, 4] is 2). None when empty.
fn nearest_rank(sorted: &[f64], p: u32) -> Option<f64> {
    let n = sorted.len();
    // Integer ranks: `0.07 * 100.0` is 7.000000000000001 in floating point.
    let rank = (p.min(100) as usize * n).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// Count, nearest-rank p50/p90/p99 and mean of a set of durations (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Summary {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
}

impl Summary {
    fn of(mut v: Vec<f64>) -> Option<Self> {
        v.sort_by(f64::total_cmp);
        Some(Summary {
            n: v.len(),
            p50: nearest_rank(&v, 50)?,
            p90: nearest_rank(&v, 90)?,
            p99: nearest_rank(&v, 99)?,
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

/// The spans of one frame.
struct Frame {
    seq: u64,
    start_ns: u64,
    end_ns: u64,
    /// Duration per stage (ms), summed when a stage has several spans in the frame.
    stages: BTreeMap<String, f64>,
}

impl Frame {
    fn e2e_ms(&self) -> f64 {
        ns_to_ms(self.end_ns - self.start_ns)
    }
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

struct StageRow {
    name: String,
    spans: Summary,
    gpu_p50: Option<f64>,
    /// Mean over complete frames, for the share of end to end.
    mean_in_complete: Option<f64>,
}

struct Analysis {
    /// Stage names in report order: [`STAGES`] order, then unknown names alphabetically.
    stages: Vec<String>,
    rows: Vec<StageRow>,
    /// By seq, then start.
    frames: Vec<Frame>,
    complete: usize,
    e2e: Option<Summary>,
    between: Option<Summary>,
    first_ns: u64,
    last_ns: u64,
}

/// [`STAGES`] first in pipeline order, then other names alphabetically.
fn stage_order<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let present: BTreeSet<&str> = names.collect();
    let known = STAGES.iter().copied().filter(|s| present.contains(s));
    let unknown = present.iter().copied().filter(|s| !STAGES.contains(s));
    known.chain(unknown).map(str::to_string).collect()
}

impl Analysis {
    /// `records` must be non-empty and checked by [`load`].
    fn new(records: &[SpanRecord]) -> Self {
        let stages = stage_order(records.iter().map(|r| r.name.as_str()));
        let mut by_trace: BTreeMap<&str, Frame> = BTreeMap::new();
        for r in records {
            let f = by_trace.entry(&r.trace_id).or_insert_with(|| Frame {
                seq: r.seq,
                start_ns: r.start_unix_ns,
                end_ns: r.end_unix_ns,
                stages: BTreeMap::new(),
            });
            f.seq = f.seq.min(r.seq);
            f.start_ns = f.start_ns.min(r.start_unix_ns);
            f.end_ns = f.end_ns.max(r.end_unix_ns);
            *f.stages.entry(r.name.clone()).or_default() += r.duration_ms();
        }
        let mut frames: Vec<Frame> = by_trace.into_values().collect();
        frames.sort_by_key(|f| (f.seq, f.start_ns));
        let is_complete = |f: &Frame| f.stages.len() == stages.len();
        let complete: Vec<&Frame> = frames.iter().filter(|f| is_complete(f)).collect();
        let e2e = Summary::of(complete.iter().map(|f| f.e2e_ms()).collect());
        let between = Summary::of(
            complete
                .iter()
                .map(|f| f.e2e_ms() - f.stages.values().sum::<f64>())
                .collect(),
        );
        let rows = stages
            .iter()
            .filter_map(|s| {
                let of_stage = || records.iter().filter(move |r| &r.name == s);
                let spans = Summary::of(of_stage().map(SpanRecord::duration_ms).collect())?;
                let gpu = Summary::of(of_stage().filter_map(|r| r.gpu_ms).collect());
                let in_complete: Vec<f64> = complete
                    .iter()
                    .filter_map(|f| f.stages.get(s).copied())
                    .collect();
                let mean_in_complete = (!in_complete.is_empty())
                    .then(|| in_complete.iter().sum::<f64>() / in_complete.len() as f64);
                Some(StageRow {
                    name: s.clone(),
                    spans,
                    gpu_p50: gpu.map(|g| g.p50),
                    mean_in_complete,
                })
            })
            .collect();
        let first_ns = records.iter().map(|r| r.start_unix_ns).min().unwrap_or(0);
        let last_ns = records.iter().map(|r| r.end_unix_ns).max().unwrap_or(0);
        Analysis {
            stages,
            rows,
            complete: complete.len(),
            frames,
            e2e,
            between,
            first_ns,
            last_ns,
        }
    }

    fn share(&self, mean: Option<f64>) -> String {
        match (mean, self.e2e) {
            (Some(m), Some(e)) if e.mean > 0.0 => format!("{:.1}%", 100.0 * m / e.mean),
            _ => "-".into(),
        }
    }

    /// The report: a header line, the per-stage table, and how to read it.
    fn table(&self, file: &Path) -> String {
        let mut out = format!(
            "{}: {} frames over {:.3} s ({} complete, {} partial)\n",
            file.display(),
            self.frames.len(),
            ns_to_ms(self.last_ns - self.first_ns) / 1e3,
            self.complete,
            self.frames.len() - self.complete,
        );
        let width = self
            .stages
            .iter()
            .map(String::len)
            .chain(["between stages".len()])
            .max()
            .unwrap_or(0);
        out += &format!(
            "{:<width$} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}\n",
            "stage", "spans", "p50 ms", "p90 ms", "p99 ms", "mean ms", "gpu p50 ms", "share"
        );
        let line = |name: &str, s: &Summary, gpu: Option<f64>, share: String| {
            let gpu = gpu.map_or("-".into(), |g| format!("{g:.3}"));
            format!(
                "{name:<width$} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {gpu:>10} {share:>7}\n",
                s.n, s.p50, s.p90, s.p99, s.mean
            )
        };
        for r in &self.rows {
            out += &line(&r.name, &r.spans, r.gpu_p50, self.share(r.mean_in_complete));
        }
        match (&self.between, &self.e2e) {
            (Some(b), Some(e)) => {
                out += &line("between stages", b, None, self.share(Some(b.mean)));
                out += &line("end to end", e, None, self.share(Some(e.mean)));
            }
            _ => {
                out += &format!(
                    "end to end: no complete frame (none holds all of {})\n",
                    self.stages.join(", ")
                )
            }
        }
        out += "percentiles: nearest rank (no interpolation)\n\
                end to end: last span end - first span start of a complete frame (one holding \
                every stage)\n\
                between stages: end to end - the sum of its stages (queueing, transport)\n\
                share: mean over complete frames / mean end to end\n";
        out
    }
}

/// Writes the Chrome Trace Event Format (`{"traceEvents": [...], "displayTimeUnit": "ms"}`):
/// process 1 "turbo-pi", one track (tid) per stage in report order, each span an "X" event
/// named after its track, `ts`/`dur` in µs, args {seq, trace_id, node, backend}. `ts` counts
/// from [`TS_LEAD_US`] before the earliest span start, which keeps the numbers small. A stage
/// with any `gpu_ms` gets a "<stage> (GPU)" track right after it: CUDA events give a
/// duration, not host timestamps, so its slices are drawn ending at the span's end.
/// Where the earliest span starts in a Chrome trace (µs): Chrome DevTools' trace engine
/// leaves events at ts 0 out of the window it opens on, which would cut the first slice off.
const TS_LEAD_US: f64 = 1000.0;

fn write_chrome(out: &Path, records: &[SpanRecord], stages: &[String]) -> Result<()> {
    let events = chrome_events(records, stages);
    let doc = json!({"traceEvents": events, "displayTimeUnit": "ms"});
    let file = fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = BufWriter::new(file);
    serde_json::to_writer(&mut w, &doc)
        .map_err(anyhow::Error::from)
        .and_then(|()| w.flush().map_err(Into::into))
        .with_context(|| format!("writing {}", out.display()))
}

fn chrome_events(records: &[SpanRecord], stages: &[String]) -> Vec<Value> {
    // A GPU slice longer than its span starts before it: the origin covers that too, so
    // every ts is non-negative. Integer nanoseconds: an f64 of a Unix time in ns is only
    // good to 256 ns.
    let gpu_start = |r: &SpanRecord| {
        r.gpu_ms
            .map(|g| r.end_unix_ns.saturating_sub((g * 1e6) as u64))
    };
    let origin = records
        .iter()
        .map(|r| r.start_unix_ns.min(gpu_start(r).unwrap_or(u64::MAX)))
        .min()
        .unwrap_or(0);
    let us = |ns: u64| TS_LEAD_US + ns.saturating_sub(origin) as f64 / 1e3;
    let mut events = vec![json!({
        "name": "process_name", "ph": "M", "pid": 1, "args": {"name": "turbo-pi"}
    })];
    let mut slices = Vec::new();
    let mut tid = 0u32;
    for stage in stages {
        let mut spans: Vec<&SpanRecord> = records.iter().filter(|r| &r.name == stage).collect();
        spans.sort_by_key(|r| (r.start_unix_ns, r.seq));
        let has_gpu = spans.iter().any(|r| r.gpu_ms.is_some());
        for gpu in [false, true] {
            if gpu && !has_gpu {
                continue;
            }
            let track = if gpu {
                format!("{stage} (GPU)")
            } else {
                stage.clone()
            };
            tid += 1;
            events.push(json!({
                "name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}
            }));
            events.push(json!({
                "name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid,
                "args": {"sort_index": tid}
            }));
            for r in &spans {
                let (cat, ts, dur) = match (gpu, r.gpu_ms) {
                    (false, _) => (
                        "cpu",
                        us(r.start_unix_ns),
                        (r.end_unix_ns - r.start_unix_ns) as f64 / 1e3,
                    ),
                    (true, Some(g)) => ("gpu", us(r.end_unix_ns) - g * 1e3, g * 1e3),
                    (true, None) => continue,
                };
                slices.push(json!({
                    "name": track, "cat": cat, "ph": "X", "pid": 1, "tid": tid,
                    "ts": ts, "dur": dur,
                    "args": {"seq": r.seq, "trace_id": r.trace_id, "node": r.node,
                             "backend": r.backend},
                }));
            }
        }
    }
    events.extend(slices);
    events
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlotFormat {
    Svg,
    Png,
}

impl PlotFormat {
    fn of(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext.to_ascii_lowercase().as_str() {
            "svg" => Ok(PlotFormat::Svg),
            "png" => Ok(PlotFormat::Png),
            "" => bail!("--plot {}: no extension; use .svg or .png", path.display()),
            other => bail!(
                "--plot {}: unknown extension `.{other}`; use .svg or .png",
                path.display()
            ),
        }
    }
}

const PLOT_SIZE: (u32, u32) = (1200, 900);
const FONT: &str = "sans-serif";

fn write_plot(out: &Path, format: PlotFormat, file: &Path, a: &Analysis) -> Result<()> {
    // Text is laid out (SVG) and rasterised (PNG) with the built-in font, never a system one.
    plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the built-in DejaVu Sans font does not load"))?;
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let title = format!("{name}: {} frames", a.frames.len());
    let drawn = || format!("drawing {}", out.display());
    match format {
        PlotFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
                draw(&root, &title, a).with_context(drawn)?;
                root.present()
                    .map_err(|e| anyhow!("{e}"))
                    .with_context(drawn)?;
            }
            fs::write(out, svg).with_context(|| format!("cannot write {}", out.display()))
        }
        PlotFormat::Png => {
            let root = BitMapBackend::new(out, PLOT_SIZE).into_drawing_area();
            draw(&root, &title, a).with_context(drawn)?;
            root.present()
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("cannot write {}", out.display()))
        }
    }
}

/// Tableau 10: distinct on white, also for lines two pixels wide.
const COLORS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// A plotted quantity: its name, colour and (frame seq, ms) points.
type Series = (String, RGBColor, Vec<(f64, f64)>);

fn stage_color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Tick labels with as many decimals as the magnitude needs.
fn fmt_ms(v: &f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// Top: latency per frame (log ms) per stage and end to end, legend on the right. Bottom:
/// one histogram per stage and end to end (small multiples, each with its own range).
fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, a: &Analysis) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, (FONT, 26)).map_err(e)?;
    let (top, bottom) = root.split_vertically(45.percent_height());

    // Per-stage series (stage colour), then end to end (black) over complete frames.
    let mut series: Vec<Series> = a
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let pts = a
                .frames
                .iter()
                .filter_map(|f| f.stages.get(s).map(|&ms| (f.seq as f64, ms)))
                .collect();
            (s.clone(), stage_color(i), pts)
        })
        .collect();
    let complete = a.frames.iter().filter(|f| f.stages.len() == a.stages.len());
    series.push((
        "end to end".into(),
        BLACK,
        complete.map(|f| (f.seq as f64, f.e2e_ms())).collect(),
    ));

    let all = || series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    if x0.is_finite() && x0 >= x1 {
        (x0, x1) = (x0 - 1.0, x0 + 1.0);
    } else if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    // Log scale: stages span from microseconds (camera) to tens of ms (denoise).
    let floor = 1e-4;
    let y_min = all()
        .map(|p| p.1)
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let y_max = all().map(|p| p.1).fold(floor, f64::max);
    let y0 = if y_min.is_finite() {
        (y_min / 1.5).max(floor)
    } else {
        floor
    };
    let y1 = (y_max * 1.5).max(y0 * 10.0);

    let (plot_area, legend_area) = top.split_horizontally(PLOT_SIZE.0 as i32 - 190);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption("latency per frame (ms, log scale)", (FONT, 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("frame seq")
        .y_desc("ms")
        // Whole frame numbers only: no repeated labels on a short run.
        .x_labels(((x1 - x0) as usize).saturating_add(1).clamp(2, 10))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&fmt_ms)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(e)?;
    for (_, color, pts) in &series {
        let pts = pts.iter().map(|&(x, y)| (x, y.max(y0)));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(e)?;
        // Dots where frames are few enough to tell apart (and a lone frame shows at all).
        if pts.len() <= 60 {
            chart
                .draw_series(pts.map(|p| Circle::new(p, 3, color.filled())))
                .map_err(e)?;
        }
    }
    // The legend beside the chart, where it hides no line.
    for (i, (name, color, _)) in series.iter().enumerate() {
        let y = 60 + 24 * i as i32;
        legend_area
            .draw(&PathElement::new(
                vec![(8, y), (36, y)],
                color.stroke_width(3),
            ))
            .map_err(e)?;
        legend_area
            .draw(&Text::new(name.as_str(), (44, y - 8), (FONT, 15)))
            .map_err(e)?;
    }

    let bottom = bottom
        .titled("latency histograms (x: ms, y: frames)", (FONT, 18))
        .map_err(e)?;
    let n = series.len();
    // Two rows while panels stay wide enough to read.
    let cols = if n <= 4 { n } else { n.div_ceil(2).min(5) };
    let rows = n.div_ceil(cols);
    for ((name, color, pts), cell) in series.iter().zip(bottom.split_evenly((rows, cols))) {
        histogram(&cell, name, *color, pts).map_err(e)?;
    }
    Ok(())
}

fn histogram<DB: DrawingBackend>(
    cell: &DrawingArea<DB, Shift>,
    name: &str,
    color: RGBColor,
    pts: &[(f64, f64)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    const BINS: usize = 20;
    let mut values: Vec<f64> = pts.iter().map(|p| p.1).collect();
    values.sort_by(f64::total_cmp);
    let lo = values.first().copied().unwrap_or(f64::INFINITY);
    // The range ends at the p99 value so that a few outliers (the first frame, say) do not
    // squash the rest into one bar; what lies above is counted in the last bar.
    let hi = nearest_rank(&values, 99).unwrap_or(f64::NEG_INFINITY);
    let above = values.iter().filter(|&&v| v > hi).count();
    let (lo, hi) = match (lo.is_finite(), hi - lo > 1e-9) {
        (false, _) => (0.0, 1.0),
        (true, true) => (lo, hi),
        // One value: a visible bar around it (latency is never negative).
        (true, false) => {
            let pad = (lo.abs() * 0.1).max(0.01);
            ((lo - pad).max(0.0), lo + pad)
        }
    };
    let width = (hi - lo) / BINS as f64;
    let mut counts = [0u32; BINS];
    for v in &values {
        let b = (((v - lo) / width) as usize).min(BINS - 1);
        counts[b] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0) + 1;
    let mut chart = ChartBuilder::on(cell)
        .caption(
            if above > 0 {
                format!("{name} (n={}; last bar +{above} > p99)", values.len())
            } else {
                format!("{name} (n={})", values.len())
            },
            (FONT, 15),
        )
        .margin(8)
        .margin_right(24)
        .x_label_area_size(26)
        .y_label_area_size(40)
        .build_cartesian_2d(lo..hi, 0u32..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(4)
        .y_labels(4)
        .x_label_formatter(&fmt_ms)
        .label_style((FONT, 12))
        .draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(b, &c)| {
        let x = lo + b as f64 * width;
        Rectangle::new([(x, 0), (x + width, c)], color.mix(0.75).filled())
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_measured_values() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        // rank = ceil(p/100 * 20)
        assert_eq!(nearest_rank(&v, 50), Some(10.0));
        assert_eq!(nearest_rank(&v, 90), Some(18.0));
        assert_eq!(nearest_rank(&v, 99), Some(20.0));
        assert_eq!(nearest_rank(&v, 100), Some(20.0));
        assert_eq!(nearest_rank(&v, 0), Some(1.0));
        assert_eq!(nearest_rank(&v, 1), Some(1.0));
        assert_eq!(nearest_rank(&v, 6), Some(2.0));
        // No interpolation: p50 of four values is the second, not 2.5.
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0, 4.0], 50), Some(2.0));
        assert_eq!(nearest_rank(&[7.5], 99), Some(7.5));
        assert_eq!(nearest_rank(&[], 50), None);
    }

    #[test]
    fn nearest_rank_ranks_are_exact_integers() {
        // 0.07 * 100 is 7.000000000000001 in f64; a float rank would give 8.
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        for p in 1..=100 {
            assert_eq!(nearest_rank(&v, p), Some(f64::from(p)), "p{p}");
        }
    }

    #[test]
    fn summary_sorts_and_averages() {
        let s = Summary::of(vec![3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]).unwrap();
        assert_eq!(s.n, 8);
        assert_eq!(s.p50, 3.0);
        assert_eq!(s.p90, 9.0);
        assert_eq!(s.p99, 9.0);
        assert_eq!(s.mean, 31.0 / 8.0);
        assert!(Summary::of(Vec::new()).is_none());
    }

    #[test]
    fn stages_in_pipeline_order_then_alphabetical() {
        let names = ["sink", "zeta", "camera", "alpha", "denoise", "camera"];
        assert_eq!(
            stage_order(names.into_iter()),
            ["camera", "denoise", "sink", "alpha", "zeta"]
        );
    }

    fn span_line(name: &str) -> String {
        json!({
            "name": name, "trace_id": "00000000000000000000000000000001",
            "span_id": "0000000000000001", "node": "n", "seq": 0, "backend": "cpu",
            "start_unix_ns": 1_000_000_u64, "end_unix_ns": 3_000_000_u64, "cpu_ms": 2.0
        })
        .to_string()
    }

    /// Spans of rejected frames are left out of the latency table and listed with their
    /// reasons; a trace of nothing but rejections still reports them.
    #[test]
    fn rejected_frames_are_counted_apart_from_latencies() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spans.jsonl");
        let rejected = json!({
            "name": "vision", "trace_id": "00000000000000000000000000000002",
            "span_id": "0000000000000002", "node": "policy", "seq": 7, "backend": "cpu",
            "start_unix_ns": 5_000_000_u64, "end_unix_ns": 5_000_000_u64, "cpu_ms": 0.0,
            "rejected": "frame 7: dropped incomplete, its `tokens` never arrived"
        })
        .to_string();
        std::fs::write(&file, format!("{}\n{rejected}\n", span_line("vision"))).unwrap();
        let text = report_text(&file, None, None).unwrap();
        assert!(text.contains("rejected frames: 1 (vision: 1)"), "{text}");
        assert!(
            text.contains("seq 7 at vision (policy): frame 7: dropped incomplete"),
            "{text}"
        );
        // The latency row counts the one served frame only.
        assert!(text.contains("vision              1"), "{text}");
        std::fs::write(&file, format!("{rejected}\n")).unwrap();
        let text = report_text(&file, None, None).unwrap();
        assert!(text.starts_with("rejected frames: 1"), "{text}");
    }

    /// A 64 KiB stage name used to reach the table's `{:<width$}` and panic with
    /// "Formatting argument out of range"; names are bounded when the file is read.
    #[test]
    fn refuses_stage_names_too_long_for_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spans.jsonl");
        let long = "v".repeat(65536);
        std::fs::write(
            &file,
            format!("{}\n{}\n", span_line("vision"), span_line(&long)),
        )
        .unwrap();
        let err = format!("{:#}", report_text(&file, None, None).unwrap_err());
        assert!(
            err.contains("spans.jsonl:2: field `name` is 65536 bytes long, more than the 256 a stage name may have"),
            "{err}"
        );
        let longest = "v".repeat(MAX_NAME_BYTES);
        std::fs::write(&file, span_line(&longest)).unwrap();
        let text = report_text(&file, None, None).unwrap();
        assert!(text.contains(&format!("{longest}      1")), "{text}");
    }

    #[test]
    fn refuses_a_trace_file_that_is_a_directory_or_device() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", report_text(dir.path(), None, None).unwrap_err());
        assert!(
            err.contains("is a directory; expected a JSON-lines span file"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let err = format!(
                "{:#}",
                report_text(Path::new("/dev/zero"), None, None).unwrap_err()
            );
            assert!(err.contains("/dev/zero: is not a regular file"), "{err}");
        }
    }

    #[test]
    fn plot_format_from_extension() {
        assert_eq!(PlotFormat::of(Path::new("a.svg")).unwrap(), PlotFormat::Svg);
        assert_eq!(PlotFormat::of(Path::new("a.PNG")).unwrap(), PlotFormat::Png);
        let err = PlotFormat::of(Path::new("a.jpg")).unwrap_err().to_string();
        assert!(err.contains(".jpg"), "{err}");
        assert!(PlotFormat::of(Path::new("plot")).is_err());
    }
}
