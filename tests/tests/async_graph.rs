//! graphs/async.yml with the real dora CLI: the action-queue drives the camera by requests
//! and executes each chunk one action per tick. With the control rate and threshold set so
//! that the threshold covers the CPU model's delay many times over, no tick starves, every
//! request is answered, the sink gets one action per tick with no seq gap, and the executed
//! stream is exactly what the queue's logic makes of the policy's chunks (each from
//! `turbopi infer` on its frame) at the delays the run measured: replayed on a fake clock,
//! bit for bit, for both merge policies.
//!
//! graphs/async_rtc.yml adds real-time chunking: each request's guide (the actions still
//! planned and the delay) goes to the policy, whose chunk is guided toward it. Its executed
//! stream is replayed the same way with chunks from `Policy::infer_guided` on each request's
//! guide, bit for bit, and the guided chunks meet the old ones where they take over more
//! closely than the unguided chunks of the same frames do.
//!
//! Needs the workspace built in release and the dora CLI, as tests/tests/graphs.rs.

use std::process::Command;

use action_queue::queue::{simulate, ActionQueue, Merge, QueueConfig};
use operators::npy;
use tests::dataflow::{bin, dora, graph_env, ok, read_actions, root, setup, Setup, FRAMES, SIZE};

const RUN_FRAMES: u64 = 6;
/// 100 ms ticks: the tiny model's delay is a fraction of a tick, the threshold's margin is
/// five ticks, so a loaded CI machine does not starve the queue.
const CONTROL_HZ: &str = "10";
const THRESHOLD: usize = 6;
const WEIGHTS: &str = "0.75,0.5,0.25";

/// The model's actions (all 8 dims: postprocess comes after the queue) for frame `seq`, as
/// the graph computes them: the recorded cameras plus a masked black one, the prompt, noise
/// seed `seq`.
fn chunk(s: &Setup, seq: u64) -> Vec<f32> {
    let obs = observation(s, seq);
    let out = obs.join("actions.npy");
    ok(
        Command::new(bin("turbopi"))
            .args(["infer", "--steps", "10", "--seed", &seq.to_string()])
            .arg("--checkpoint")
            .arg(&s.checkpoint)
            .arg("--observation")
            .arg(&obs)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap(),
        "turbopi infer",
    );
    npy::read_f32(&out).unwrap().data
}

/// Frame `seq`'s observation as the graph builds it, written to a directory.
fn observation(s: &Setup, seq: u64) -> std::path::PathBuf {
    let obs = s.dir.join(format!("obs{seq}"));
    std::fs::create_dir_all(&obs).unwrap();
    let mut images = s.frames[seq as usize % FRAMES].clone();
    images.resize(3 * SIZE * SIZE * 3, 0);
    npy::write_u8(&obs.join("images.npy"), &[3, SIZE, SIZE, 3], &images).unwrap();
    npy::write_bool(&obs.join("image_masks.npy"), &[3], &[true, true, false]).unwrap();
    for f in ["tokens.npy", "token_mask.npy"] {
        std::fs::copy(s.prompt.join(f), obs.join(f)).unwrap();
    }
    obs
}

fn summary_of(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Largest jump (max over dims) between consecutive rows.
fn max_jump(rows: &[Vec<f32>]) -> f32 {
    rows.windows(2)
        .map(|w| action_queue::queue::jump(&w[1], &w[0]))
        .fold(0.0, f32::max)
}

/// The graph's nodes and `turbopi` (for the chunks), built.
fn build_nodes() {
    for b in [
        "camera",
        "decode",
        "policy",
        "action-queue",
        "postprocess",
        "action-sink",
        "turbopi",
    ] {
        bin(b);
    }
}

/// A run's queue and sink summaries agree on a clean run of `RUN_FRAMES` chunks: no tick
/// starved, every chunk merged, nothing refused or lost, one sink frame per executed action.
fn check_clean_run(q: &serde_json::Value, sink: &serde_json::Value, what: &str, log: &str) {
    assert_eq!(q["starved"], 0, "{what}: ticks starved: {q}\n{log}");
    assert_eq!(q["chunks"], RUN_FRAMES, "{what}: {q}\n{log}");
    assert_eq!(
        (&q["rejected"], &q["chunk_gaps"]),
        (&0.into(), &0.into()),
        "{q}"
    );
    assert_eq!(sink["frames"], q["executed"], "{what}: {sink} {q}");
    assert_eq!(
        (&sink["gaps"], &sink["rejected"]),
        (&0.into(), &0.into()),
        "{sink}"
    );
}

/// The inference delay of each chunk (by seq) the run measured.
fn measured_delays(q: &serde_json::Value) -> Vec<u64> {
    let delays: Vec<u64> = q["delay_ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    assert_eq!(delays.len() as u64, RUN_FRAMES);
    delays
}

/// The graph's action-queue, for a replay on a fake clock.
fn replay_queue(merge: Merge) -> ActionQueue {
    ActionQueue::new(QueueConfig {
        threshold: THRESHOLD,
        merge,
        initial_delay: 0,
        delay_window: action_queue::DELAY_WINDOW,
        request_timeout: 250,
    })
    .unwrap()
}

#[test]
fn async_graph_runs_without_starvation_and_executes_the_merged_chunks() {
    build_nodes();
    let s = setup();
    let chunks: Vec<Vec<f32>> = (0..RUN_FRAMES).map(|seq| chunk(&s, seq)).collect();
    let dims = 8;
    for merge in ["latest", "weighted"] {
        let output = s.dir.join(format!("async-{merge}.jsonl"));
        let queue_summary = s.dir.join(format!("queue-{merge}.json"));
        let mut cmd = dora();
        cmd.arg("run").arg(root().join("graphs/async.yml"));
        graph_env(&mut cmd, &s, &output, RUN_FRAMES);
        cmd.env("TURBOPI_CONTROL_HZ", CONTROL_HZ)
            .env("TURBOPI_REQUEST_THRESHOLD", THRESHOLD.to_string())
            .env("TURBOPI_MERGE", merge)
            .env("TURBOPI_MERGE_WEIGHTS", WEIGHTS)
            .env("TURBOPI_QUEUE_SUMMARY", &queue_summary);
        let log = ok(
            cmd.output().unwrap(),
            &format!("dora run async.yml ({merge})"),
        );
        let q = summary_of(&queue_summary);
        let sink = tests::dataflow::summary(&output);
        assert_eq!(q["merge"], merge, "{q}");
        check_clean_run(&q, &sink, merge, &log);

        let executed = read_actions(&output);
        let ticks: Vec<u64> = executed.iter().map(|(seq, _)| *seq).collect();
        let first = ticks[0];
        assert_eq!(
            ticks,
            (first..first + ticks.len() as u64).collect::<Vec<_>>()
        );
        let stream: Vec<Vec<f32>> = executed.iter().map(|(_, r)| r[0].clone()).collect();

        // The same chunks through the queue's logic on a fake clock, at the measured delays.
        let delays = measured_delays(&q);
        let mut replay = replay_queue(Merge::parse(merge, Some(WEIGHTS)).unwrap());
        let ticks_run = q["ticks"].as_u64().unwrap();
        let replayed: Vec<Vec<f32>> = simulate(
            &mut replay,
            ticks_run,
            dims,
            |r| delays.get(r.seq as usize).copied().unwrap_or(u64::MAX / 2),
            |r| chunks.get(r.seq as usize).cloned().unwrap_or_default(),
        )
        .into_iter()
        .filter_map(|t| t.action.map(|a| a[..7].to_vec()))
        .collect();
        assert_eq!(replayed.len(), stream.len(), "{merge}");
        assert_eq!(
            replayed, stream,
            "{merge}: the executed actions differ from the replay"
        );
        let r = replay.stats();
        assert_eq!(
            (r.boundaries, r.starved),
            (q["boundaries"].as_u64().unwrap(), 0),
            "{merge}: {r:?} {q}"
        );
        println!(
            "async.yml {merge}: {} ticks at {CONTROL_HZ} Hz, {} actions, 0 starved, delays {:?} ticks, max jump at boundaries {} (naive switch {}), within chunks {}, whole stream {}",
            q["ticks"], q["executed"], delays, q["boundary_jump_max"], q["naive_jump_max"], q["within_jump_max"], max_jump(&stream)
        );
    }
}

#[test]
fn rtc_graph_guides_each_chunk_toward_what_is_still_planned() {
    use operators::observation::{noise_from_seed, Observation};
    use operators::rtc::Guide;
    build_nodes();
    let s = setup();
    let unguided: Vec<Vec<f32>> = (0..RUN_FRAMES).map(|seq| chunk(&s, seq)).collect();
    let dims = 8;
    let output = s.dir.join("async-rtc.jsonl");
    let queue_summary = s.dir.join("queue-rtc.json");
    let mut cmd = dora();
    cmd.arg("run").arg(root().join("graphs/async_rtc.yml"));
    graph_env(&mut cmd, &s, &output, RUN_FRAMES);
    cmd.env("TURBOPI_CONTROL_HZ", CONTROL_HZ)
        .env("TURBOPI_REQUEST_THRESHOLD", THRESHOLD.to_string())
        .env("TURBOPI_QUEUE_SUMMARY", &queue_summary);
    let log = ok(cmd.output().unwrap(), "dora run async_rtc.yml");
    let q = summary_of(&queue_summary);
    let sink = tests::dataflow::summary(&output);
    assert_eq!(q["merge"], "latest", "{q}");
    check_clean_run(&q, &sink, "rtc", &log);
    let stream: Vec<Vec<f32>> = read_actions(&output)
        .into_iter()
        .map(|(_, r)| r[0].clone())
        .collect();
    let delays = measured_delays(&q);
    let ticks_run = q["ticks"].as_u64().unwrap();
    let queue = || replay_queue(Merge::Latest);
    let delay_of = |r: &action_queue::queue::Request| {
        delays.get(r.seq as usize).copied().unwrap_or(u64::MAX / 2)
    };

    // The replay with each request's chunk guided as the policy node guides it.
    let ckpt = operators::checkpoint::Checkpoint::open(&s.checkpoint).unwrap();
    let cfg = ckpt.config.clone();
    let policy = operators::Policy::load(&ckpt, |_, _| {}).unwrap();
    let mut closeness = Vec::new();
    let mut guided_replay = queue();
    let replayed: Vec<Vec<f32>> = simulate(&mut guided_replay, ticks_run, dims, delay_of, |r| {
        let Some(free) = unguided.get(r.seq as usize) else {
            return Vec::new();
        };
        let rows = (r.leftover.len() / dims).min(cfg.action_horizon);
        if rows == 0 {
            return free.clone();
        }
        let guide = Guide {
            prefix: r.leftover[..rows * dims].to_vec(),
            delay: (r.delay_ticks as usize).min(rows),
            beta: 5.0,
        };
        let obs = Observation::load(&observation(&s, r.seq), &cfg).unwrap();
        let (guided, _) = policy
            .infer_guided(&obs, &noise_from_seed(&cfg, r.seq), 10, &guide)
            .unwrap();
        // The first max(d, 1) actions against the leftover: guided and unguided.
        let n = guide.delay.max(1) * dims;
        let dist = |a: &[f32]| {
            (0..n)
                .map(|i| (a[i] - guide.prefix[i]).abs())
                .fold(0.0f32, f32::max)
        };
        closeness.push((r.seq, guide.delay, dist(&guided), dist(free)));
        guided
    })
    .into_iter()
    .filter_map(|t| t.action.map(|a| a[..7].to_vec()))
    .collect();
    assert_eq!(replayed.len(), stream.len());
    assert_eq!(
        replayed, stream,
        "the executed actions differ from the guided replay"
    );

    // The unguided chunks at the same delays: where the new chunk takes over, the guided
    // chunks are closer to the old ones.
    let mut free_replay = queue();
    simulate(&mut free_replay, ticks_run, dims, delay_of, |r| {
        unguided.get(r.seq as usize).cloned().unwrap_or_default()
    });
    let (g, f) = (guided_replay.stats(), free_replay.stats());
    println!(
        "async_rtc.yml: {} ticks at {CONTROL_HZ} Hz, 0 starved, delays {delays:?} ticks; old vs new chunk where the new takes over: RTC {:.4}, unguided {:.4}; first max(d, 1) actions vs the leftover (seq, d, guided, unguided): {closeness:?}",
        q["ticks"], g.switch_gap_max, f.switch_gap_max
    );
    assert!(!closeness.is_empty(), "no request was guided: {q}");
    for &(seq, _, guided, free) in &closeness {
        assert!(
            guided < free,
            "frame {seq}: guided {guided} vs unguided {free}"
        );
    }
    assert!(
        g.switch_gap_max < f.switch_gap_max,
        "RTC {} vs unguided {}",
        g.switch_gap_max,
        f.switch_gap_max
    );
}
