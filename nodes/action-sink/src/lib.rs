//! Action sink: one JSON object per frame, `{"seq", "actions", "latency_ms", "t_ns"}`, to
//! `OUTPUT`, and a summary at stop (frames, gaps, capture-to-action latency p50/p99, and the
//! throughput between the first and the last frame). With `STALE_MS` it is also the robot's
//! watchdog: once actions have started, a silence of `STALE_MS` is reported (logged and
//! counted) while the sink keeps waiting, and the first action after it ends the episode.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{bail, Result, WrapErr};
use node_common::events::{recv_for, Waited};
use node_common::{env_or, expect_tensor, now_ns, report_rejected, Dim, FrameMeta, SeqGaps};

/// What the sink saw, printed at stop and written next to the output as `<OUTPUT>.summary.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub frames: u64,
    pub gaps: u64,
    pub rejected: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Frames per second between the first and the last frame received (NaN below 2 frames).
    pub fps: f64,
    /// Silences of `STALE_MS` or more after the first action, in order.
    pub stale: Vec<StaleEpisode>,
}

/// A time without actions, reported once `STALE_MS` had passed since the last one.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleEpisode {
    /// The frame of the last action before the silence.
    pub last_seq: u64,
    /// Wall time (ns since the Unix epoch) of that action and of the report.
    pub last_action_ns: u64,
    pub reported_ns: u64,
    /// The frame whose action ended it; None when the input ended first.
    pub resumed_seq: Option<u64>,
    /// From the last action to the next (or to the end of the input), in ms.
    pub silence_ms: f64,
}

/// The watchdog: the time of the last action and the episode in progress.
struct Watchdog {
    /// `STALE_MS`; None: off.
    limit: Option<Duration>,
    last: Option<(Instant, u64, u64)>,
    open: Option<StaleEpisode>,
    done: Vec<StaleEpisode>,
}

impl Watchdog {
    /// How long to wait for the next event before a check is due; None: wait as long as it
    /// takes (off, not armed by a first action yet, or already reported).
    fn wait(&self) -> Option<Duration> {
        match (self.limit, self.last, &self.open) {
            (Some(limit), Some((at, _, _)), None) => Some(limit.saturating_sub(at.elapsed())),
            _ => None,
        }
    }

    /// Reports a silence that has reached the limit.
    fn check(&mut self) {
        let (Some(limit), Some((at, seq, t_ns))) = (self.limit, self.last) else {
            return;
        };
        if self.open.is_some() || at.elapsed() < limit {
            return;
        }
        let episode = StaleEpisode {
            last_seq: seq,
            last_action_ns: t_ns,
            reported_ns: now_ns(),
            resumed_seq: None,
            silence_ms: at.elapsed().as_secs_f64() * 1e3,
        };
        eprintln!(
            "action-sink: STALE: no actions for {:.0} ms (STALE_MS={}) since frame {seq}; waiting for the policy",
            episode.silence_ms,
            limit.as_millis()
        );
        self.open = Some(episode);
    }

    /// An action of frame `seq` arrived at wall time `t_ns`.
    fn action(&mut self, seq: u64, t_ns: u64) {
        let now = Instant::now();
        if let Some(mut e) = self.open.take() {
            e.silence_ms = self
                .last
                .map_or(0.0, |(at, _, _)| (now - at).as_secs_f64() * 1e3);
            e.resumed_seq = Some(seq);
            eprintln!(
                "action-sink: actions resumed at frame {seq} after {:.0} ms without actions (last frame before: {})",
                e.silence_ms, e.last_seq
            );
            self.done.push(e);
        }
        self.last = Some((now, seq, t_ns));
    }

    /// The input ended: an episode still open lasts until now.
    fn finish(mut self) -> Vec<StaleEpisode> {
        if let Some(mut e) = self.open.take() {
            e.silence_ms = self
                .last
                .map_or(0.0, |(at, _, _)| at.elapsed().as_secs_f64() * 1e3);
            self.done.push(e);
        }
        self.done
    }
}

/// The sink's settings: `OUTPUT` and `STALE_MS` (0: no watchdog).
#[derive(Debug, Clone)]
pub struct Settings {
    pub output: PathBuf,
    pub stale_after: Option<Duration>,
}

/// The longest `STALE_MS` accepted: an hour.
pub const STALE_MS_MAX: u64 = 3_600_000;

impl Settings {
    pub fn from_env() -> Result<Self> {
        let stale_ms: u64 = env_or("STALE_MS", 0)?;
        Ok(Settings {
            output: env_or("OUTPUT", PathBuf::from("actions.jsonl"))?,
            stale_after: stale_after(stale_ms)?,
        })
    }
}

/// `STALE_MS` as a limit: None for 0, an error past [`STALE_MS_MAX`].
pub fn stale_after(ms: u64) -> Result<Option<Duration>> {
    if ms > STALE_MS_MAX {
        bail!(
            "env STALE_MS={ms} must be at most {STALE_MS_MAX} (an hour); 0 turns the watchdog off"
        );
    }
    Ok((ms > 0).then(|| Duration::from_millis(ms)))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let settings = Settings::from_env()?;
    let summary = run_with(&settings, node, events)?;
    let stale = match settings.stale_after {
        None => String::new(),
        Some(_) => format!(
            ", {} stale episodes (longest {:.0} ms)",
            summary.stale.len(),
            summary
                .stale
                .iter()
                .map(|e| e.silence_ms)
                .fold(0.0, f64::max)
        ),
    };
    println!(
        "action-sink: {} frames, {} gaps, {} rejected, latency p50 {:.2} ms, p99 {:.2} ms, {:.1} frames/s{stale} -> {}",
        summary.frames,
        summary.gaps,
        summary.rejected,
        summary.latency_p50_ms,
        summary.latency_p99_ms,
        summary.fps,
        settings.output.display()
    );
    Ok(())
}

pub fn run_with(settings: &Settings, node: DoraNode, mut events: EventStream) -> Result<Summary> {
    let output = settings.output.as_path();
    let tracer = node_common::tracer(&node, "cpu")?;
    let file = File::create(output)
        .wrap_err_with(|| format!("env OUTPUT: cannot create {}", output.display()))?;
    let mut w = BufWriter::new(file);
    let mut gaps = SeqGaps::default();
    let mut latencies = Vec::new();
    let mut rejected = 0;
    let mut span: Option<(u64, u64)> = None;
    let mut watchdog = Watchdog {
        limit: settings.stale_after,
        last: None,
        open: None,
        done: Vec::new(),
    };
    loop {
        // With the watchdog armed, wake up when the silence reaches STALE_MS; otherwise block
        // until the next event.
        let event = match recv_for(&mut events, watchdog.wait()) {
            Waited::Closed => break,
            Waited::TimedOut => None,
            Waited::Event(event) => Some(event),
        };
        watchdog.check();
        let Some(Event::Input { id, metadata, data }) = event else {
            continue;
        };
        if id.as_str() != "actions" {
            continue;
        }
        let md = &metadata.parameters;
        let result = (|| -> Result<()> {
            let meta = FrameMeta::from_metadata("actions", md)?;
            let stage = tracer.start("sink", meta.seq, meta.trace);
            let (shape, a) =
                expect_tensor::<f32>("actions", md, &data, "float32", &[Dim::Any, Dim::Any])?;
            if let Some(bad) = a.iter().position(|v| !v.is_finite()) {
                eyre::bail!(
                    "input `actions`: frame {} has a non-finite value at index {bad}",
                    meta.seq
                );
            }
            gaps.observe(meta.seq);
            let t_ns = now_ns();
            watchdog.action(meta.seq, t_ns);
            let latency_ms = t_ns.saturating_sub(meta.t_capture_ns) as f64 / 1e6;
            latencies.push(latency_ms);
            span = Some(span.map_or((t_ns, t_ns), |(first, _)| (first, t_ns)));
            let rows: Vec<&[f32]> = a.chunks_exact(shape[1].max(1)).collect();
            let line = serde_json::json!({
                "seq": meta.seq, "actions": rows, "latency_ms": latency_ms, "t_ns": t_ns,
            });
            writeln!(w, "{line}")?;
            w.flush()?;
            stage.end();
            Ok(())
        })();
        if let Err(e) = result {
            rejected += 1;
            report_rejected("action-sink", &e);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let stale = watchdog.finish();
    let summary = Summary {
        frames: gaps.frames,
        gaps: gaps.gaps,
        rejected,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
        fps: match span {
            Some((first, last)) if last > first && latencies.len() > 1 => {
                (latencies.len() - 1) as f64 / ((last - first) as f64 / 1e9)
            }
            _ => f64::NAN,
        },
        stale,
    };
    let mut path = output.as_os_str().to_owned();
    path.push(".summary.json");
    let json = serde_json::json!({
        "frames": summary.frames, "gaps": summary.gaps, "rejected": summary.rejected,
        "latency_p50_ms": summary.latency_p50_ms, "latency_p99_ms": summary.latency_p99_ms,
        "fps": if summary.fps.is_finite() { serde_json::json!(summary.fps) } else { serde_json::Value::Null },
        "stale_ms": settings.stale_after.map(|d| d.as_millis() as u64),
        "stale_episodes": summary.stale.len(),
        "stale": summary.stale.iter().map(|e| serde_json::json!({
            "last_seq": e.last_seq, "last_action_ns": e.last_action_ns,
            "reported_ns": e.reported_ns, "resumed_seq": e.resumed_seq,
            "silence_ms": e.silence_ms,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&path, format!("{json}\n")).wrap_err("writing the summary")?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_common::testing::{event, json, run_node, TensorInput};

    #[test]
    fn writes_one_line_per_frame_counts_gaps_and_rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let msg = |seq, shape: &'static [usize], dtype: &'static str, v: &[f32]| TensorInput {
            id: "actions",
            seq,
            shape,
            dtype,
            arrow_type: "Float32",
            values: json(v),
            extra: vec![],
        };
        let events = vec![
            event(0.0, msg(0, &[2, 2], "float32", &[1.0, 2.0, 3.0, 4.0])),
            event(0.01, msg(1, &[2, 2], "uint8", &[1.0, 2.0, 3.0, 4.0])),
            event(0.02, msg(3, &[1, 2], "float32", &[5.0, 6.0])),
        ];
        let mut summary = None;
        let settings = Settings {
            output: path.clone(),
            stale_after: None,
        };
        run_node("action-sink", events, |node, ev| {
            summary = Some(run_with(&settings, node, ev)?);
            Ok(())
        })
        .unwrap();
        let summary = summary.unwrap();
        assert_eq!((summary.frames, summary.gaps, summary.rejected), (2, 2, 1));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["seq"], 0);
        assert_eq!(
            lines[0]["actions"],
            serde_json::json!([[1.0, 2.0], [3.0, 4.0]])
        );
        assert!(lines[1]["latency_ms"].as_f64().unwrap() > 0.0);
        let t0 = lines[0]["t_ns"].as_u64().unwrap();
        let t1 = lines[1]["t_ns"].as_u64().unwrap();
        assert!(t1 >= t0, "receive times go forward");
        assert!(summary.fps.is_finite() && summary.fps > 0.0, "{summary:?}");
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("a.jsonl.summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(s["gaps"], 2);
    }

    /// With STALE_MS the sink reports a silence once it reaches the limit, keeps running,
    /// and closes the episode at the next action; the silence before the first action (the
    /// model loading) does not count. The gap here (900 ms) is three times the limit and
    /// the actions around it 20 ms apart, so scheduling delays cannot change the outcome.
    #[test]
    fn a_silence_past_stale_ms_is_reported_and_recovered_from() {
        let dir = tempfile::tempdir().unwrap();
        let msg = |seq| TensorInput {
            id: "actions",
            seq,
            shape: &[1, 2],
            dtype: "float32",
            arrow_type: "Float32",
            values: json(&[1.0f32, 2.0]),
            extra: vec![],
        };
        let events = vec![
            event(0.4, msg(0)),
            event(0.42, msg(1)),
            event(1.32, msg(5)),
            event(1.34, msg(6)),
        ];
        let settings = Settings {
            output: dir.path().join("a.jsonl"),
            stale_after: stale_after(300).unwrap(),
        };
        let mut summary = None;
        run_node("action-sink", events, |node, ev| {
            summary = Some(run_with(&settings, node, ev)?);
            Ok(())
        })
        .unwrap();
        let summary = summary.unwrap();
        assert_eq!((summary.frames, summary.gaps), (4, 3));
        assert_eq!(summary.stale.len(), 1, "{summary:?}");
        let e = &summary.stale[0];
        assert_eq!((e.last_seq, e.resumed_seq), (1, Some(5)));
        let reported_after_ms = (e.reported_ns - e.last_action_ns) as f64 / 1e6;
        assert!(
            (300.0..900.0).contains(&reported_after_ms),
            "reported {reported_after_ms} ms after the last action"
        );
        assert!(e.silence_ms >= 800.0, "{e:?}");
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("a.jsonl.summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(s["stale_episodes"], 1);
        assert_eq!(s["stale"][0]["resumed_seq"], 5);
        assert_eq!(s["stale_ms"], 300);

        let err = stale_after(STALE_MS_MAX + 1).unwrap_err().to_string();
        assert!(err.contains("STALE_MS=3600001"), "{err}");
        assert_eq!(stale_after(0).unwrap(), None);
    }
}
