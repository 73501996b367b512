//! Action sink: one JSON object per frame, `{"seq", "actions", "latency_ms", "t_ns"}`, to
//! `OUTPUT`, and a summary at stop (frames, gaps, capture-to-action latency p50/p99, and the
//! throughput between the first and the last frame).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{Result, WrapErr};
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
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let output: PathBuf = env_or("OUTPUT", PathBuf::from("actions.jsonl"))?;
    let summary = run_with(&output, node, events)?;
    println!(
        "action-sink: {} frames, {} gaps, {} rejected, latency p50 {:.2} ms, p99 {:.2} ms, {:.1} frames/s -> {}",
        summary.frames,
        summary.gaps,
        summary.rejected,
        summary.latency_p50_ms,
        summary.latency_p99_ms,
        summary.fps,
        output.display()
    );
    Ok(())
}

pub fn run_with(
    output: &std::path::Path,
    node: DoraNode,
    mut events: EventStream,
) -> Result<Summary> {
    let tracer = node_common::tracer(&node, "cpu")?;
    let file = File::create(output)
        .wrap_err_with(|| format!("env OUTPUT: cannot create {}", output.display()))?;
    let mut w = BufWriter::new(file);
    let mut gaps = SeqGaps::default();
    let mut latencies = Vec::new();
    let mut rejected = 0;
    let mut span: Option<(u64, u64)> = None;
    while let Some(event) = events.recv() {
        let Event::Input { id, metadata, data } = event else {
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
    };
    let mut path = output.as_os_str().to_owned();
    path.push(".summary.json");
    let json = serde_json::json!({
        "frames": summary.frames, "gaps": summary.gaps, "rejected": summary.rejected,
        "latency_p50_ms": summary.latency_p50_ms, "latency_p99_ms": summary.latency_p99_ms,
        "fps": if summary.fps.is_finite() { serde_json::json!(summary.fps) } else { serde_json::Value::Null },
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
        run_node("action-sink", events, |node, ev| {
            summary = Some(run_with(&path, node, ev)?);
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
}
