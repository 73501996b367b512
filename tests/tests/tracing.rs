//! Traces end to end over OTLP/gRPC, into the receiver of `tests::otlp` on loopback: a
//! `node_common::trace::Tracer`'s spans with their parent links and attributes, then the
//! shipped dataflows under the real dora CLI, where every frame must come back as one trace
//! camera -> decode -> vision -> prefix -> denoise -> postprocess -> sink, each stage's span
//! from the node that ran it.
//!
//! The dataflow test needs the workspace built in release (`cargo build --release --workspace`)
//! and the dora CLI (`pip install dora-rs-cli==1.1.0`); `.ci/run` does both.

use std::collections::BTreeMap;
use std::time::Duration;

use node_common::trace::{
    TraceConfig, Tracer, ATTR_BACKEND, ATTR_CPU_MS, ATTR_GPU_MS, ATTR_NODE, ATTR_SEQ, STAGES,
};
use tests::dataflow::{
    dora, graph_env, ok, read_actions, require_graph_nodes, root, setup, summary, Setup,
};
use tests::otlp::{listing, Receiver, Span};

/// (trace id, span id) of a traceparent `00-<trace>-<span>-<flags>`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

#[test]
fn a_tracers_spans_reach_the_receiver_parented() {
    let receiver = Receiver::start().unwrap();
    let cfg = TraceConfig {
        otlp: Some(receiver.endpoint()),
        file: None,
    };
    let (camera_id, vision_id, prefix_id);
    {
        let tracer = Tracer::new("vision", "cpu f32", &cfg).unwrap();
        assert!(tracer.is_on());
        let camera = tracer.start("camera", 7, None);
        camera_id = camera.id().unwrap();
        camera.end();
        let mut vision = tracer.start("vision", 7, Some(camera_id));
        vision.set_gpu(Duration::from_micros(1500));
        vision_id = vision.id().unwrap();
        vision.end();
        let start = std::time::SystemTime::now();
        prefix_id = tracer
            .record(
                "prefix",
                7,
                Some(vision_id),
                start,
                Duration::from_millis(3),
                None,
            )
            .unwrap();
        // Dropping the tracer must have exported everything: a node exits right after.
    }
    let spans = receiver.spans();
    let all = listing(&spans);
    assert_eq!(spans.len(), 3, "spans received:\n{all}");
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span; received:\n{all}"))
    };
    let (camera, vision, prefix) = (by_name("camera"), by_name("vision"), by_name("prefix"));
    let (trace, camera_span) = ids(&camera_id.traceparent());
    assert_eq!((&camera.trace_id, &camera.span_id), (&trace, &camera_span));
    assert_eq!(camera.parent_span_id, None, "{all}");
    assert_eq!(vision.span_id, ids(&vision_id.traceparent()).1);
    assert_eq!(prefix.span_id, ids(&prefix_id.traceparent()).1);
    assert_eq!(
        vision.parent_span_id.as_ref(),
        Some(&camera.span_id),
        "{all}"
    );
    assert_eq!(
        prefix.parent_span_id.as_ref(),
        Some(&vision.span_id),
        "{all}"
    );
    for s in &spans {
        assert_eq!(s.trace_id, trace, "{all}");
        assert_eq!(s.service_name.as_deref(), Some("vision"), "{all}");
        assert_eq!(s.int(ATTR_SEQ), Some(7), "{all}");
        assert_eq!(s.str(ATTR_NODE), Some("vision"), "{all}");
        assert_eq!(s.str(ATTR_BACKEND), Some("cpu f32"), "{all}");
        assert!(s.double(ATTR_CPU_MS).is_some_and(|ms| ms >= 0.0), "{all}");
        assert!(
            s.start_unix_ns > 0 && s.start_unix_ns <= s.end_unix_ns,
            "{all}"
        );
    }
    assert_eq!(vision.double(ATTR_GPU_MS), Some(1.5), "{all}");
    assert_eq!(camera.attr(ATTR_GPU_MS), None, "{all}");
    assert!(
        prefix
            .double(ATTR_CPU_MS)
            .is_some_and(|ms| (ms - 3.0).abs() < 1e-9),
        "{all}"
    );
    assert_eq!(
        prefix.end_unix_ns - prefix.start_unix_ns,
        3_000_000,
        "{all}"
    );
}

/// Frames per run: enough for several traces, few enough to read a failure's listing.
const RUN_FRAMES: u64 = 4;

/// The stages that may run on a GPU (and then carry `turbopi.gpu_ms`).
const MODEL_STAGES: [&str; 3] = ["vision", "prefix", "denoise"];

/// The dora node that runs each stage in a graph.
fn stage_nodes(graph: &str) -> BTreeMap<&'static str, &'static str> {
    let fused = graph == "fused.yml";
    STAGES
        .iter()
        .map(|&stage| {
            let node = match stage {
                "sink" => "action-sink",
                s if fused && MODEL_STAGES.contains(&s) => "policy",
                s => s,
            };
            (stage, node)
        })
        .collect()
}

/// Everything wrong with `spans` as the traces of frames `seqs` (empty when right).
fn chain_problems(
    spans: &[Span],
    seqs: &[u64],
    nodes: &BTreeMap<&'static str, &'static str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut traces: BTreeMap<&str, Vec<&Span>> = BTreeMap::new();
    for s in spans {
        traces.entry(&s.trace_id).or_default().push(s);
    }
    let mut frame_traces = Vec::new();
    for &seq in seqs {
        let of_frame: Vec<&str> = traces
            .iter()
            .filter(|(_, ss)| ss.iter().any(|s| s.int(ATTR_SEQ) == Some(seq as i64)))
            .map(|(t, _)| *t)
            .collect();
        match of_frame.as_slice() {
            [trace] => frame_traces.push((seq, *trace)),
            _ => problems.push(format!(
                "frame {seq}: {} traces hold its spans, want 1: {of_frame:?}",
                of_frame.len()
            )),
        }
    }
    for (trace, ss) in &traces {
        if !frame_traces.iter().any(|(_, t)| t == trace) {
            problems.push(format!(
                "trace {trace} ({} spans) is no delivered frame's trace",
                ss.len()
            ));
        }
    }
    for (seq, trace) in frame_traces {
        let ss = &traces[trace];
        let mut chain: Vec<&Span> = Vec::new();
        for stage in STAGES {
            let of_stage: Vec<&&Span> = ss.iter().filter(|s| s.name == stage).collect();
            match of_stage.as_slice() {
                [s] => chain.push(s),
                _ => problems.push(format!(
                    "frame {seq}: {} {stage} spans in trace {trace}, want 1",
                    of_stage.len()
                )),
            }
        }
        for s in ss {
            if !STAGES.contains(&s.name.as_str()) {
                problems.push(format!("frame {seq}: a span of no stage: {}", s.name));
            }
            if s.int(ATTR_SEQ) != Some(seq as i64) {
                problems.push(format!(
                    "frame {seq}: the {} span has {ATTR_SEQ} {:?}",
                    s.name,
                    s.attr(ATTR_SEQ)
                ));
            }
        }
        if chain.len() != STAGES.len() {
            continue;
        }
        for (i, s) in chain.iter().enumerate() {
            let stage = STAGES[i];
            let node = nodes[stage];
            let want_parent = (i > 0).then(|| chain[i - 1].span_id.as_str());
            if s.parent_span_id.as_deref() != want_parent {
                problems.push(format!(
                    "frame {seq}: {stage}'s parent is {:?}, want {:?} ({})",
                    s.parent_span_id,
                    want_parent,
                    if i > 0 { STAGES[i - 1] } else { "none" }
                ));
            }
            if s.service_name.as_deref() != Some(node) {
                problems.push(format!(
                    "frame {seq}: {stage}'s service.name is {:?}, want {node:?}",
                    s.service_name
                ));
            }
            if s.str(ATTR_NODE) != Some(node) {
                problems.push(format!(
                    "frame {seq}: {stage}'s {ATTR_NODE} is {:?}, want {node:?}",
                    s.attr(ATTR_NODE)
                ));
            }
            if s.str(ATTR_BACKEND).is_none_or(str::is_empty) {
                problems.push(format!("frame {seq}: {stage} has no {ATTR_BACKEND}"));
            }
            if !s.double(ATTR_CPU_MS).is_some_and(|ms| ms >= 0.0) {
                problems.push(format!(
                    "frame {seq}: {stage}'s {ATTR_CPU_MS} is {:?}",
                    s.attr(ATTR_CPU_MS)
                ));
            }
            let gpu = s.attr(ATTR_GPU_MS);
            if !MODEL_STAGES.contains(&stage) && gpu.is_some() {
                problems.push(format!(
                    "frame {seq}: {stage} is no GPU stage but has {gpu:?}"
                ));
            }
            if gpu.is_some() && !s.double(ATTR_GPU_MS).is_some_and(|ms| ms >= 0.0) {
                problems.push(format!("frame {seq}: {stage}'s {ATTR_GPU_MS} is {gpu:?}"));
            }
            if s.start_unix_ns == 0 || s.start_unix_ns > s.end_unix_ns {
                problems.push(format!(
                    "frame {seq}: {stage} runs from {} to {}",
                    s.start_unix_ns, s.end_unix_ns
                ));
            }
            // A stage starts once its input arrived, which its parent sends before it ends:
            // so starts are ordered, ends need not be.
            if i > 0 && s.start_unix_ns < chain[i - 1].start_unix_ns {
                problems.push(format!(
                    "frame {seq}: {stage} starts {} ns before {} does",
                    chain[i - 1].start_unix_ns - s.start_unix_ns,
                    STAGES[i - 1]
                ));
            }
        }
    }
    problems
}

/// Runs `graph` with the dora CLI, its nodes exporting to a fresh receiver; checks its traces.
fn graph_traces_one_chain_per_frame(s: &Setup, graph: &str) {
    let receiver = Receiver::start().unwrap();
    let output = s.dir.join(format!("{graph}.jsonl"));
    let mut cmd = dora();
    cmd.arg("run").arg(root().join("graphs").join(graph));
    graph_env(&mut cmd, s, &output, RUN_FRAMES);
    // Only the standard variable: with DORA_OTLP_ENDPOINT dora's own exporters would send
    // their spans too.
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint());
    for var in [
        "DORA_OTLP_ENDPOINT",
        "DORA_JAEGER_TRACING",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "TRACE_FILE",
    ] {
        cmd.env_remove(var);
    }
    let log = ok(cmd.output().unwrap(), &format!("dora run {graph}"));
    let sum = summary(&output);
    assert_eq!(sum["frames"], RUN_FRAMES, "{graph}: {sum}\n{log}");
    assert_eq!(sum["gaps"], 0, "{graph}: {sum}\n{log}");
    let seqs: Vec<u64> = read_actions(&output).iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs.len() as u64,
        RUN_FRAMES,
        "{graph}: {}",
        output.display()
    );

    // The nodes exported before they exited and `dora run` waited for them; the wait only
    // covers a request still being answered.
    let want = seqs.len() * STAGES.len();
    let mut spans = receiver.wait_for(want, Duration::from_secs(5));
    spans.sort_by(|a, b| (&a.trace_id, a.start_unix_ns).cmp(&(&b.trace_id, b.start_unix_ns)));
    let all = listing(&spans);
    assert!(
        !spans.is_empty(),
        "{graph}: no span reached {} (do the nodes see OTEL_EXPORTER_OTLP_ENDPOINT from \
         `dora run`'s environment?)\n{log}",
        receiver.endpoint()
    );
    let mut problems = chain_problems(&spans, &seqs, &stage_nodes(graph));
    if spans.len() != want {
        problems.insert(
            0,
            format!(
                "{} spans, want {want} ({} frames x {} stages)",
                spans.len(),
                seqs.len(),
                STAGES.len()
            ),
        );
    }
    assert!(
        problems.is_empty(),
        "{graph} (frames {seqs:?}):\n  {}\nspans received:\n{all}",
        problems.join("\n  ")
    );
}

/// One test, so the dora runs never overlap.
#[test]
fn dataflows_trace_one_parented_chain_per_frame() {
    require_graph_nodes();
    let s = setup();
    for graph in ["demo.yml", "fused.yml"] {
        graph_traces_one_chain_per_frame(&s, graph);
    }
}

/// The checker itself: a right set of chains passes, and each kind of damage is named.
#[test]
fn the_chain_check_names_what_is_wrong() {
    let nodes = stage_nodes("demo.yml");
    let chain = |seq: u64, trace: &str| -> Vec<Span> {
        STAGES
            .iter()
            .enumerate()
            .map(|(i, &stage)| {
                let mut attributes = BTreeMap::new();
                let attr = tests::otlp::AttrValue::Int(seq as i64);
                attributes.insert(ATTR_SEQ.to_string(), attr);
                attributes.insert(
                    ATTR_NODE.to_string(),
                    tests::otlp::AttrValue::String(nodes[stage].into()),
                );
                attributes.insert(
                    ATTR_BACKEND.to_string(),
                    tests::otlp::AttrValue::String("cpu f32".into()),
                );
                attributes.insert(ATTR_CPU_MS.to_string(), tests::otlp::AttrValue::Double(0.5));
                Span {
                    trace_id: trace.repeat(32),
                    span_id: format!("{seq:08x}{i:08x}"),
                    parent_span_id: (i > 0).then(|| format!("{seq:08x}{:08x}", i - 1)),
                    name: stage.into(),
                    start_unix_ns: 100 + 10 * i as u64,
                    end_unix_ns: 120 + 10 * i as u64,
                    attributes,
                    service_name: Some(nodes[stage].into()),
                }
            })
            .collect()
    };
    let good: Vec<Span> = [chain(0, "a"), chain(1, "b")].concat();
    assert_eq!(chain_problems(&good, &[0, 1], &nodes), Vec::<String>::new());

    let damaged = |damage: &dyn Fn(&mut Vec<Span>), want: &str| {
        let mut spans = good.clone();
        damage(&mut spans);
        let problems = chain_problems(&spans, &[0, 1], &nodes);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "want a problem naming {want:?}, got {problems:?}"
        );
    };
    // A stage that started a new trace (its parent's context lost on the way).
    damaged(
        &|s| {
            s[3].trace_id = "c".repeat(32);
            s[3].parent_span_id = None;
        },
        "frame 0: 2 traces",
    );
    damaged(&|s| drop(s.remove(8)), "frame 1: 0 decode spans");
    damaged(&|s| s.push(s[4].clone()), "frame 0: 2 denoise spans");
    damaged(
        &|s| s[5].parent_span_id = s[3].parent_span_id.clone(),
        "frame 0: postprocess's parent",
    );
    damaged(
        &|s| s[0].parent_span_id = Some("1".repeat(16)),
        "camera's parent",
    );
    damaged(
        &|s| s[13].service_name = Some("sink".into()),
        "sink's service.name",
    );
    damaged(
        &|s| {
            s[2].attributes
                .insert(ATTR_SEQ.into(), tests::otlp::AttrValue::Int(1));
        },
        "frame 1: 2 traces",
    );
    damaged(
        &|s| {
            s[1].attributes
                .insert(ATTR_GPU_MS.into(), tests::otlp::AttrValue::Double(1.0));
        },
        "decode is no GPU stage",
    );
    damaged(&|s| s[2].start_unix_ns = 50, "vision starts");
    damaged(&|s| s[2].end_unix_ns = 1, "vision runs from");
    damaged(&|s| s.extend(chain(2, "d")), "no delivered frame's trace");
}
