//! `turbopi trace report FILE --chrome OUT.json` read back by an independent consumer of the
//! Chrome Trace Event Format: Chrome DevTools' own trace engine (the Performance panel's), run by
//! Node through `tools/trace_consumer/check.mjs`. The consumer must find one track per stage (and
//! one per GPU stage for spans with GPU time), each with one slice per frame, of the right total
//! duration. Needs Node.js and `npm ci --prefix tools/trace_consumer` (tools/test.sh runs it);
//! without them the tests fail and say so.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const INSTALL: &str = "install Node.js (Debian: `apt-get install -y nodejs`) and the consumer \
                       (`npm ci --prefix tools/trace_consumer`); tools/test.sh does both";

fn consumer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../trace_consumer/check.mjs")
}

/// Runs the consumer on a Chrome trace and returns what it found.
fn consume(chrome: &Path) -> Value {
    let script = consumer_script();
    assert!(
        script.is_file(),
        "{} is missing: the trace consumer is part of the repository",
        script.display()
    );
    let out = match Command::new("node").arg(&script).arg(chrome).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run `node` ({e}): {INSTALL}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the trace consumer failed on {} ({}): {stderr}\n(if it is not installed: {INSTALL})",
        chrome.display(),
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the trace consumer printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The tracks the consumer found, in tid order: (process name, track name, track).
fn tracks(found: &Value) -> Vec<(String, String, Value)> {
    found["processes"]
        .as_array()
        .expect("`processes` array")
        .iter()
        .flat_map(|p| {
            let process = p["name"].as_str().unwrap_or("").to_string();
            p["tracks"]
                .as_array()
                .expect("`tracks` array")
                .iter()
                .map(move |t| {
                    let name = t["name"].as_str().unwrap_or("").to_string();
                    (process.clone(), name, t.clone())
                })
        })
        .collect()
}

/// One frame's stage timings, in milliseconds: (stage, wall ms, GPU ms).
type Frame = Vec<(&'static str, f64, Option<f64>)>;

/// A JSON-lines span file of `frames`: each frame's stages run back to back, parented in order,
/// frames 50 ms apart; `seq` starts at `first_seq`.
fn span_file(path: &Path, first_seq: u64, frames: &[Frame]) {
    let t0: u64 = 1_700_000_000_000_000_000;
    let mut lines = String::new();
    for (f, frame) in frames.iter().enumerate() {
        let seq = first_seq + f as u64;
        let trace_id = format!("{:032x}", 0x7a11_0000_u64 + seq);
        let mut start = t0 + f as u64 * 50_000_000;
        let mut parent: Option<String> = None;
        for (i, &(stage, ms, gpu_ms)) in frame.iter().enumerate() {
            let span_id = format!("{:016x}", (seq << 8) + i as u64 + 1);
            let end = start + (ms * 1e6) as u64;
            let mut span = json!({
                "name": stage,
                "trace_id": trace_id,
                "span_id": span_id,
                "node": stage,
                "seq": seq,
                "backend": if gpu_ms.is_some() { "cuda bf16" } else { "cpu f32" },
                "start_unix_ns": start,
                "end_unix_ns": end,
                "cpu_ms": ms,
            });
            if let Some(p) = &parent {
                span["parent_span_id"] = json!(p);
            }
            if let Some(g) = gpu_ms {
                span["gpu_ms"] = json!(g);
            }
            lines.push_str(&span.to_string());
            lines.push('\n');
            parent = Some(span_id);
            start = end;
        }
    }
    std::fs::write(path, lines).expect("write the span file");
}

fn report_chrome(spans: &Path, chrome: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_turbopi"))
        .args(["trace", "report"])
        .arg(spans)
        .arg("--chrome")
        .arg(chrome)
        .output()
        .expect("the turbopi binary runs");
    assert!(
        out.status.success(),
        "turbopi trace report --chrome failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(chrome.is_file(), "--chrome wrote no {}", chrome.display());
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-3 * (1.0 + b.abs())
}

#[test]
fn devtools_trace_engine_finds_every_stage_track_and_its_slices() {
    // Three frames (seq 4..=6). vision runs on the GPU in every frame, denoise in the last two
    // (frame 4 ran it on the CPU), prefix never: so GPU tracks for vision (3 slices) and denoise
    // (2 slices), none for prefix.
    let frames: Vec<Frame> = (0..3)
        .map(|f| {
            let k = f as f64;
            vec![
                ("camera", 0.5 + 0.01 * k, None),
                ("decode", 1.25 + 0.02 * k, None),
                ("vision", 8.0 + 0.5 * k, Some(6.5 + 0.25 * k)),
                ("prefix", 4.0 + 0.125 * k, None),
                ("denoise", 20.0 + k, (f > 0).then_some(17.5 + k)),
                ("postprocess", 0.75, None),
                ("sink", 0.25 + 0.01 * k, None),
            ]
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let spans = tmp.path().join("spans.jsonl");
    let chrome = tmp.path().join("trace.chrome.json");
    span_file(&spans, 4, &frames);
    report_chrome(&spans, &chrome);

    let found = consume(&chrome);
    assert!(
        found["warnings"].as_array().is_some_and(|w| w.is_empty()),
        "the trace engine warned: {}",
        found["warnings"]
    );

    // What each track must hold: name, slice count, total ms, seqs.
    let mut want: Vec<(String, usize, f64, Vec<u64>)> = Vec::new();
    for (i, &(stage, _, _)) in frames[0].iter().enumerate() {
        let wall: f64 = frames.iter().map(|f| f[i].1).sum();
        want.push((stage.to_string(), frames.len(), wall, vec![4, 5, 6]));
        let gpu: Vec<(u64, f64)> = frames
            .iter()
            .enumerate()
            .filter_map(|(f, fr)| fr[i].2.map(|g| (4 + f as u64, g)))
            .collect();
        if !gpu.is_empty() {
            want.push((
                format!("{stage} (GPU)"),
                gpu.len(),
                gpu.iter().map(|g| g.1).sum(),
                gpu.iter().map(|g| g.0).collect(),
            ));
        }
    }

    let got = tracks(&found);
    let names: Vec<&str> = got.iter().map(|(_, n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        names, want_names,
        "tracks the trace engine found, in tid order (full answer: {found})"
    );
    for ((process, name, track), (_, count, total_ms, seqs)) in got.iter().zip(&want) {
        assert_eq!(process, "turbo-pi", "process of track {name}");
        let slices = track["slices"].as_array().expect("`slices` array");
        assert_eq!(
            slices.len(),
            1,
            "track {name} holds slices of one name, its own: {track}"
        );
        let slice = &slices[0];
        assert_eq!(slice["name"], json!(name), "slice name on track {name}");
        assert_eq!(
            slice["count"],
            json!(count),
            "slices drawn on track {name} (one per frame; a slice overlapping another \
             is dropped): {track}"
        );
        assert_eq!(
            track["entries"],
            json!(count),
            "events on track {name}: {track}"
        );
        assert_eq!(
            track["max_depth"],
            json!(1),
            "nested slices on {name}: {track}"
        );
        let total = slice["total_ms"].as_f64().expect("total_ms");
        assert!(
            close(total, *total_ms),
            "total time on track {name}: {total} ms, expected {total_ms} ms"
        );
        assert_eq!(slice["seqs"], json!(seqs), "frames (seq) on track {name}");
    }

    // The slices cover the recorded time: first span start to last span end, in microseconds.
    let slices: Vec<&Value> = got
        .iter()
        .flat_map(|(_, _, t)| t["slices"].as_array().expect("`slices` array"))
        .collect();
    let first = slices
        .iter()
        .map(|s| s["start_us"].as_f64().expect("start_us"))
        .fold(f64::INFINITY, f64::min);
    let last = slices
        .iter()
        .map(|s| s["end_us"].as_f64().expect("end_us"))
        .fold(f64::NEG_INFINITY, f64::max);
    let last_frame: f64 = frames[2].iter().map(|s| s.1).sum();
    let want_us = 2.0 * 50_000.0 + last_frame * 1000.0;
    assert!(
        (last - first - want_us).abs() <= 1.0,
        "slices span {} us, expected {want_us} us",
        last - first
    );
    // The window the Performance panel opens on holds every slice. It leaves events at ts 0
    // out, so a trace whose first slice starts at 0 opens with that slice cut off.
    let (min, max) = (
        found["bounds_us"]["min"].as_f64().expect("bounds min"),
        found["bounds_us"]["max"].as_f64().expect("bounds max"),
    );
    assert!(
        min <= first && max >= last,
        "DevTools' trace window is {min}..{max} us but the slices run {first}..{last} us \
         (an event at ts 0 does not count toward the window)"
    );
}

/// The consumer is a real check: a hand-written trace with a missing thread name, a slice
/// overlapping another on its track, and a nested slice is read back as such.
#[test]
fn consumer_reports_what_a_reader_would_see() {
    let tmp = tempfile::tempdir().unwrap();
    let chrome = tmp.path().join("hand.json");
    let x = |tid: u32, name: &str, ts: f64, dur: f64, seq: u64| {
        json!({"ph": "X", "name": name, "cat": "cpu", "pid": 7, "tid": tid, "ts": ts, "dur": dur,
               "args": {"seq": seq}})
    };
    let trace = json!({"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "turbo-pi"}},
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "vision"}},
        x(1, "vision", 1000.0, 500.0, 0),
        x(1, "vision", 1200.0, 500.0, 1), // starts inside seq 0, ends after it: dropped
        x(1, "vision", 2000.0, 250.0, 2),
        x(2, "denoise", 1000.0, 800.0, 0), // no thread_name: a track without a name
        x(2, "denoise", 1100.0, 100.0, 0), // nested in the slice above
    ], "displayTimeUnit": "ms"});
    std::fs::write(&chrome, trace.to_string()).unwrap();

    let found = consume(&chrome);
    let got = tracks(&found);
    let names: Vec<(&str, &str)> = got
        .iter()
        .map(|(p, n, _)| (p.as_str(), n.as_str()))
        .collect();
    assert_eq!(names, [("turbo-pi", "vision"), ("turbo-pi", "")], "{found}");
    let vision = &got[0].2;
    assert_eq!(vision["entries"], json!(3), "{vision}");
    assert_eq!(vision["slices"][0]["count"], json!(2), "{vision}");
    assert_eq!(vision["slices"][0]["seqs"], json!([0, 2]), "{vision}");
    assert!(close(
        vision["slices"][0]["total_ms"].as_f64().unwrap(),
        0.75
    ));
    let denoise = &got[1].2;
    assert_eq!(denoise["max_depth"], json!(2), "{denoise}");
    assert_eq!(denoise["slices"][0]["count"], json!(2), "{denoise}");
}
