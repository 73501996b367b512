//! `turbopi trace report` on a synthetic span file with known stage times: the table's
//! numbers, the Chrome trace's tracks and slices, the SVG and PNG plots, and bad inputs.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

fn turbopi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turbopi"))
        .args(args)
        .output()
        .expect("the turbopi binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn succeeds(args: &[&str]) -> String {
    let out = turbopi(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `args`, asserts failure without a panic, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = turbopi(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    stderr
}

const T0: u64 = 1_700_000_000_000_000_000;
const FRAME_NS: u64 = 100_000_000;
const GAP_NS: u64 = 500_000;
const FRAMES: u64 = 20;

/// Stage times of frame `i` in microseconds: (stage, wall, GPU).
fn stage_us(i: u64) -> Vec<(&'static str, u64, Option<u64>)> {
    vec![
        ("camera", 1_000, None),
        ("decode", 2_000 + 500 * (i % 5), None),
        ("vision", 10_000 + 1_000 * i, Some(8_000 + 1_000 * i)),
        ("prefix", 5_000, Some(4_500)),
        ("denoise", 40_000 + 2_000 * (i % 10), None),
        ("postprocess", 500, None),
        ("sink", 250, None),
    ]
}

/// Frames 0..20 hold every stage, back to back with 0.5 ms between them; frame 20 stops after
/// vision (a partial trace). Lines are shuffled, as several appending processes leave them.
fn synthetic_trace(path: &Path) {
    let mut lines = Vec::new();
    for i in 0..=FRAMES {
        let mut stages = stage_us(i);
        if i == FRAMES {
            stages.truncate(3);
        }
        let mut t = T0 + i * FRAME_NS;
        let mut parent: Option<String> = None;
        for (k, (name, wall, gpu)) in stages.into_iter().enumerate() {
            let span_id = format!("{:016x}", (i << 8) + k as u64 + 1);
            let mut rec = json!({
                "name": name,
                "trace_id": format!("{:032x}", 0xabc0_0000_u64 + i),
                "span_id": span_id,
                "node": if k < 2 { "camera" } else { "policy" },
                "seq": i,
                "backend": if gpu.is_some() { "cuda bf16" } else { "cpu f32" },
                "start_unix_ns": t,
                "end_unix_ns": t + wall * 1_000,
                "cpu_ms": wall as f64 / 1e3,
            });
            if let Some(p) = parent {
                rec["parent_span_id"] = json!(p);
            }
            if let Some(g) = gpu {
                rec["gpu_ms"] = json!(g as f64 / 1e3);
            }
            lines.push(rec.to_string());
            parent = Some(span_id);
            t += wall * 1_000 + GAP_NS;
        }
    }
    // 143 lines; 7919 is prime, so k -> k * 7919 mod n is a permutation.
    let n = lines.len();
    let shuffled: Vec<&str> = (0..n).map(|k| lines[(k * 7919 + 1) % n].as_str()).collect();
    assert_ne!(shuffled[0], lines[0], "the lines are shuffled");
    std::fs::write(path, shuffled.join("\n") + "\n\n").expect("write the trace");
}

/// The table row whose label is `label`, as numbers and `-`.
fn row<'a>(report: &'a str, label: &str) -> Vec<&'a str> {
    let line = report
        .lines()
        .find(|l| {
            l.strip_prefix(label)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{report}"));
    line[label.len()..].split_whitespace().collect()
}

#[test]
fn report_numbers_match_the_synthetic_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run.jsonl");
    synthetic_trace(&file);
    let out = succeeds(&["trace", "report", s(&file)]);

    let header = out.lines().next().unwrap_or("");
    assert!(header.contains("run.jsonl"), "{header}");
    assert!(header.contains("21 frames"), "{header}");
    assert!(header.contains("20 complete, 1 partial"), "{header}");
    // First span start (frame 0's camera) to last span end (the partial frame 20's vision,
    // 34 ms after its start at 2 s).
    assert!(header.contains("over 2.034 s"), "{header}");

    // Columns: spans, p50, p90, p99, mean, gpu p50, share.
    // vision: 10..=30 ms over 21 spans (the partial frame has it); nearest rank 11, 19, 21.
    // GPU: 8..=28 ms; share: 19.5 ms mean over the complete frames / 81.25 ms.
    assert_eq!(
        row(&out, "vision"),
        ["21", "20.000", "28.000", "30.000", "20.000", "18.000", "24.0%"]
    );
    // denoise: 40, 42, ..., 58, each twice; nearest rank 10, 18, 20.
    assert_eq!(
        row(&out, "denoise"),
        ["20", "48.000", "56.000", "58.000", "49.000", "-", "60.3%"]
    );
    // decode: 2, 2.5, 3, 3.5, 4 ms repeating over 21 frames.
    assert_eq!(
        row(&out, "decode"),
        ["21", "3.000", "4.000", "4.000", "2.952", "-", "3.7%"]
    );
    assert_eq!(
        row(&out, "prefix"),
        ["20", "5.000", "5.000", "5.000", "5.000", "4.500", "6.2%"]
    );
    assert_eq!(row(&out, "camera")[..2], ["21", "1.000"]);
    assert_eq!(row(&out, "sink")[..2], ["20", "0.250"]);
    // Six 0.5 ms gaps per frame.
    assert_eq!(
        row(&out, "between stages"),
        ["20", "3.000", "3.000", "3.000", "3.000", "-", "3.7%"]
    );
    // End to end of frame i: 61.75 + 0.5 (i mod 5) + i + 2 (i mod 10) ms, complete frames only.
    assert_eq!(
        row(&out, "end to end"),
        ["20", "80.250", "93.750", "100.750", "81.250", "-", "100.0%"]
    );

    // Stage rows in pipeline order, then between stages and end to end.
    let order: Vec<usize> = [
        "camera ",
        "decode ",
        "vision ",
        "prefix ",
        "denoise ",
        "postprocess ",
        "sink ",
        "between stages ",
        "end to end ",
    ]
    .iter()
    .map(|l| {
        out.lines()
            .position(|x| x.starts_with(l))
            .unwrap_or_else(|| panic!("no {l}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}\n{out}");
    assert!(out.contains("nearest rank"), "{out}");
}

#[test]
fn unknown_stages_follow_the_pipeline_alphabetically() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("extra.jsonl");
    let span = |name: &str, start: u64, end: u64| {
        json!({"name": name, "trace_id": "t1", "span_id": name, "node": "n", "seq": 0,
               "backend": "cpu", "start_unix_ns": start, "end_unix_ns": end, "cpu_ms": 0.0})
        .to_string()
    };
    let text = [
        span("zeta", 4_000_000, 5_000_000),
        span("sink", 3_000_000, 4_000_000),
        span("alpha", 2_000_000, 3_000_000),
        span("camera", 0, 1_000_000),
    ]
    .join("\n");
    std::fs::write(&file, text).unwrap();
    let out = succeeds(&["trace", "report", s(&file)]);
    let pos = |l: &str| out.lines().position(|x| x.starts_with(l)).unwrap();
    assert!(pos("camera ") < pos("sink ") && pos("sink ") < pos("alpha "));
    assert!(pos("alpha ") < pos("zeta "), "{out}");
    // One frame, 5 ms end to end of which 1 ms is a gap.
    assert_eq!(
        row(&out, "between stages"),
        ["1", "1.000", "1.000", "1.000", "1.000", "-", "20.0%"]
    );
}

#[test]
fn chrome_trace_has_a_track_per_stage_and_gpu_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run.jsonl");
    let chrome = tmp.path().join("run.chrome.json");
    synthetic_trace(&file);
    succeeds(&["trace", "report", s(&file), "--chrome", s(&chrome)]);

    let doc: Value = serde_json::from_slice(&std::fs::read(&chrome).unwrap()).unwrap();
    assert_eq!(doc["displayTimeUnit"], "ms");
    assert_eq!(doc.as_object().map(|o| o.len()), Some(2), "only two keys");
    let events = doc["traceEvents"].as_array().expect("traceEvents array");

    let process: Vec<&Value> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "process_name")
        .collect();
    assert_eq!(process.len(), 1);
    assert_eq!(process[0]["pid"], 1);
    assert_eq!(process[0]["args"]["name"], "turbo-pi");

    // Tracks by tid, and their sort index.
    let mut tracks: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| {
            (
                e["tid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    tracks.sort();
    let names: Vec<&str> = tracks.iter().map(|t| t.1.as_str()).collect();
    assert_eq!(
        names,
        [
            "camera",
            "decode",
            "vision",
            "vision (GPU)",
            "prefix",
            "prefix (GPU)",
            "denoise",
            "postprocess",
            "sink"
        ]
    );
    for (tid, _) in &tracks {
        let sort = events
            .iter()
            .find(|e| e["name"] == "thread_sort_index" && e["tid"] == json!(tid))
            .unwrap_or_else(|| panic!("no thread_sort_index for tid {tid}"));
        assert_eq!(sort["args"]["sort_index"], json!(tid));
    }

    let slices: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let count = |track: &str| slices.iter().filter(|e| e["name"] == track).count();
    let want = [
        ("camera", 21),
        ("decode", 21),
        ("vision", 21),
        ("vision (GPU)", 21),
        ("prefix", 20),
        ("prefix (GPU)", 20),
        ("denoise", 20),
        ("postprocess", 20),
        ("sink", 20),
    ];
    for (track, n) in want {
        assert_eq!(count(track), n, "slices on {track}");
    }
    assert_eq!(slices.len(), 184);
    for e in &slices {
        let (tid, name) = tracks
            .iter()
            .find(|t| json!(t.0) == e["tid"])
            .expect("slice on a named track");
        assert_eq!(e["name"], json!(name), "{e}");
        let gpu = name.ends_with("(GPU)");
        assert_eq!(e["cat"], if gpu { "gpu" } else { "cpu" }, "{e}");
        assert_eq!(e["pid"], 1);
        assert!(*tid >= 1);
        assert!(e["ts"].as_f64().unwrap() >= 1_000.0, "{e}");
    }

    // ts counts from 1 ms before the earliest span (frame 0's camera), as DevTools ignores
    // events at ts 0. Frame 3: camera 1 ms, gap, decode 3.5 ms, gap: vision starts 5.5 ms into
    // the frame, 305.5 ms after frame 0's camera, and lasts 13 ms; its GPU time (11 ms) ends
    // with it.
    let find = |track: &str, seq: u64| {
        slices
            .iter()
            .find(|e| e["name"] == track && e["args"]["seq"] == seq)
            .unwrap_or_else(|| panic!("no {track} slice of seq {seq}"))
    };
    let vision = find("vision", 3);
    assert_eq!(vision["ts"].as_f64(), Some(306_500.0), "{vision}");
    assert_eq!(vision["dur"].as_f64(), Some(13_000.0), "{vision}");
    assert_eq!(
        vision["args"],
        json!({"seq": 3, "trace_id": format!("{:032x}", 0xabc0_0003_u64),
               "node": "policy", "backend": "cuda bf16"})
    );
    let gpu = find("vision (GPU)", 3);
    assert_eq!(gpu["ts"].as_f64(), Some(308_500.0), "{gpu}");
    assert_eq!(gpu["dur"].as_f64(), Some(11_000.0), "{gpu}");
    assert_eq!(gpu["cat"], "gpu");
    let camera = find("camera", 0);
    assert_eq!(camera["ts"].as_f64(), Some(1_000.0));
    assert_eq!(camera["dur"].as_f64(), Some(1_000.0));
}

#[test]
fn plots_as_svg_and_png() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run.jsonl");
    synthetic_trace(&file);
    let svg = tmp.path().join("plot.svg");
    let png = tmp.path().join("plot.png");
    succeeds(&["trace", "report", s(&file), "--plot", s(&svg)]);
    succeeds(&["trace", "report", s(&file), "--plot", s(&png)]);

    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.trim_start().starts_with("<svg"), "{}", &text[..80]);
    assert!(text.trim_end().ends_with("</svg>"));
    for want in [
        "run.jsonl: 21 frames",
        "camera",
        "vision",
        "denoise",
        "sink",
        "end to end",
        "frame seq",
        "vision (n=21)",
        "denoise (n=20)",
    ] {
        assert!(text.contains(want), "no {want:?} in the SVG");
    }
    assert!(text.contains("<polyline"), "no line series in the SVG");

    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let img = image::load_from_memory(&bytes).expect("a decodable PNG");
    assert_eq!((img.width(), img.height()), (1200, 900));
    // Drawn on, not blank: white background plus lines, bars and text in colour.
    let rgb = img.to_rgb8();
    let colours: std::collections::BTreeSet<[u8; 3]> = rgb.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 20, "{} colours", colours.len());
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("run.jsonl");
    synthetic_trace(&good);

    // A corrupt line: file and line number.
    let text = std::fs::read_to_string(&good).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"name\": \"vision\", \"trace_id\": ";
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let err = fails(&["trace", "report", s(&bad)]);
    assert!(err.contains("bad.jsonl:3"), "{err}");

    // A span ending before it starts: file, line and field.
    let mut rec: Value = serde_json::from_str(lines[0]).unwrap();
    rec["end_unix_ns"] = json!(rec["start_unix_ns"].as_u64().unwrap() - 1);
    let backwards = tmp.path().join("backwards.jsonl");
    std::fs::write(&backwards, format!("{}\n{rec}\n", lines[1])).unwrap();
    let err = fails(&["trace", "report", s(&backwards)]);
    assert!(err.contains("backwards.jsonl:2"), "{err}");
    assert!(err.contains("end_unix_ns"), "{err}");

    // A negative GPU time.
    let mut rec: Value = serde_json::from_str(lines[0]).unwrap();
    rec["gpu_ms"] = json!(-1.0);
    let negative = tmp.path().join("negative.jsonl");
    std::fs::write(&negative, format!("{rec}\n")).unwrap();
    let err = fails(&["trace", "report", s(&negative)]);
    assert!(
        err.contains("negative.jsonl:1") && err.contains("gpu_ms"),
        "{err}"
    );

    // Empty, blank, missing.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = fails(&["trace", "report", s(&empty)]);
    assert!(
        err.contains("empty.jsonl") && err.contains("is empty"),
        "{err}"
    );
    let blank = tmp.path().join("blank.jsonl");
    std::fs::write(&blank, "\n  \n").unwrap();
    let err = fails(&["trace", "report", s(&blank)]);
    assert!(
        err.contains("blank.jsonl") && err.contains("no spans"),
        "{err}"
    );
    let missing = tmp.path().join("missing.jsonl");
    let err = fails(&["trace", "report", s(&missing)]);
    assert!(err.contains("missing.jsonl"), "{err}");

    // A plot format that is not SVG or PNG: named, and nothing written.
    let jpg = tmp.path().join("plot.jpg");
    let err = fails(&["trace", "report", s(&good), "--plot", s(&jpg)]);
    assert!(
        err.contains(".jpg") && err.contains(".svg or .png"),
        "{err}"
    );
    assert!(!jpg.exists());
    let err = fails(&[
        "trace",
        "report",
        s(&good),
        "--plot",
        s(&tmp.path().join("plot")),
    ]);
    assert!(err.contains("no extension"), "{err}");

    // An output that cannot be written names it.
    let nowhere = tmp.path().join("no-dir/out.json");
    let err = fails(&["trace", "report", s(&good), "--chrome", s(&nowhere)]);
    assert!(err.contains("no-dir/out.json"), "{err}");
}

/// `turbopi bench` and `turbopi infer` with `--trace-file`: one trace per frame, vision ->
/// prefix -> denoise chained, attributed to node `turbopi` and the backend; and the report
/// reads what they wrote.
#[test]
fn bench_and_infer_write_chained_stage_spans() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    succeeds(&[
        "checkpoint",
        "random",
        "--preset",
        "pi05-small",
        "--out",
        s(&ck),
    ]);
    let bench = dir.path().join("bench.jsonl");
    let args = [
        "bench",
        "--backend",
        "cpu",
        "--preset",
        "pi05-small",
        "--steps",
        "2",
    ];
    let args = [
        &args[..],
        &["--iters", "3", "--warmup", "1", "--trace-file", s(&bench)],
    ]
    .concat();
    succeeds(&args);
    let infer = dir.path().join("infer.jsonl");
    let obs = ck.join("observation");
    let out = dir.path().join("a.npy");
    succeeds(&[
        "infer",
        "--checkpoint",
        s(&ck),
        "--observation",
        s(&obs),
        "--steps",
        "2",
        "--out",
        s(&out),
        "--trace-file",
        s(&infer),
    ]);
    for (file, frames) in [(&bench, 3usize), (&infer, 1)] {
        let recs: Vec<Value> = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 3 * frames, "{}", file.display());
        let mut traces: Vec<&str> = recs
            .iter()
            .map(|r| r["trace_id"].as_str().unwrap())
            .collect();
        traces.sort();
        traces.dedup();
        assert_eq!(traces.len(), frames, "one trace per frame");
        for t in traces {
            let of = |name: &str| {
                recs.iter()
                    .find(|r| r["trace_id"] == t && r["name"] == name)
                    .unwrap_or_else(|| panic!("no {name} span in trace {t}"))
            };
            let (v, p, d) = (of("vision"), of("prefix"), of("denoise"));
            assert!(v.get("parent_span_id").is_none());
            assert_eq!(p["parent_span_id"], v["span_id"]);
            assert_eq!(d["parent_span_id"], p["span_id"]);
            assert_eq!(d["node"], "turbopi");
            assert_eq!(d["backend"], "cpu f32");
            assert!(v["end_unix_ns"].as_u64() <= p["start_unix_ns"].as_u64());
        }
        let report = succeeds(&["trace", "report", s(file)]);
        assert!(report.contains(&format!("{frames} frames")), "{report}");
    }
}
