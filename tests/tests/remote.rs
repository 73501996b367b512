//! graphs/remote.yml across two dora daemons on loopback (machines `robot` and `gpu`, each
//! with its own ports: tests::cluster), with the real dora CLI: the same actions per `seq` as
//! graphs/fused.yml on the same checkpoint and frames, bit for bit, with no seq gap; then the
//! robot side under faults on the GPU side. Killing the policy process: the sink reports the
//! silence within STALE_MS and dora's restart_policy brings the policy back, after which
//! actions resume. Killing the whole `gpu` daemon: the sink reports the silence within
//! STALE_MS and the robot's nodes keep running (the camera sends every frame, the robot's
//! decode handles every one); dora does not respawn the GPU side, so the dataflow is stopped
//! and started again on a restarted daemon, which delivers actions again.
//!
//! Needs the workspace built in release and the dora CLI (`.ci/run` does both). Every process
//! a cluster starts is killed when it drops, orphans included.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::cluster::{dataflow_id, kill_pid, node_log, Cluster};
use tests::dataflow::{
    dora, graph_env, ok, read_actions, require_graph_nodes, root, setup, summary, Setup,
};

const FRAMES: u64 = 8;
/// The watchdog of the fault runs: one and a half frame periods at 10 Hz, half the shortest
/// outage a kill causes (remote.yml restarts the policy after `restart_delay: 0.2` s, and a
/// fresh process takes more than 0.1 s to load and run a frame). On a loaded machine a late
/// frame can also pass it: such episodes are counted, only the fault's is checked.
const STALE_MS: u64 = 150;
/// How late past STALE_MS the fault's report may come: the sink wakes on a timer at
/// STALE_MS, but on a loaded 2-core CI machine a process can wait this long for the CPU.
const REPORT_SLACK_MS: f64 = 250.0;

fn remote_yml() -> std::path::PathBuf {
    root().join("graphs/remote.yml")
}

/// Spawns `cmd` with stdout and stderr to `log`.
fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    cmd.stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("dora starts")
}

/// Waits for `child` at most `limit`; kills it and panics with its log past that.
fn wait_child(mut child: Child, limit: Duration, log: &Path) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd` to its end (at most `limit`), as `Output`.
fn run_limited(mut cmd: Command, limit: Duration, log: &Path) -> Output {
    cmd.stdin(Stdio::null());
    let child = spawn_logged(cmd, log);
    let status = wait_child(child, limit, log);
    let text = std::fs::read(log).unwrap_or_default();
    Output {
        status,
        stdout: text,
        stderr: vec![],
    }
}

/// Lines of the sink's output so far.
fn actions_so_far(output: &Path) -> usize {
    std::fs::read_to_string(output)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// The sink's `t_ns` of each line, by seq.
fn receive_times(output: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(output)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["seq"].as_u64()?, v["t_ns"].as_u64()?))
        })
        .collect()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `dora start graphs/remote.yml` on `cluster` for `frames` frames, sink output at `output`.
fn start_remote(
    cluster: &Cluster,
    s: &Setup,
    name: &str,
    output: &Path,
    frames: u64,
    extra: &[(&str, &str)],
) -> Command {
    let yml = remote_yml();
    let mut cmd = cluster.cli(&["start", "--attach", "--name", name, yml.to_str().unwrap()]);
    graph_env(&mut cmd, s, output, frames);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// One test, so that the clusters never overlap on a 2-core machine.
#[test]
fn remote_graph_across_two_daemons() {
    require_graph_nodes();
    let s = setup();
    let t = Instant::now();
    same_actions_as_the_fused_graph(&s);
    eprintln!(
        "remote: bit-for-bit runs took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    policy_killed_and_restarted(&s);
    eprintln!(
        "remote: policy kill took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    gpu_daemon_killed(&s);
    eprintln!(
        "remote: gpu daemon kill took {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn same_actions_as_the_fused_graph(s: &Setup) {
    let check = Command::new(tests::dataflow::bin("turbopi"))
        .args(["graph", "check"])
        .arg(remote_yml())
        .env("TURBOPI_CHECKPOINT", &s.checkpoint)
        .env("TURBOPI_PROMPT", &s.prompt)
        .output()
        .unwrap();
    ok(check, "turbopi graph check graphs/remote.yml");

    let fused_out = s.dir.join("fused.jsonl");
    let mut cmd = dora();
    cmd.arg("run").arg(root().join("graphs/fused.yml"));
    graph_env(&mut cmd, s, &fused_out, FRAMES);
    ok(cmd.output().unwrap(), "dora run graphs/fused.yml");
    let fused = read_actions(&fused_out);
    assert_eq!(fused.len() as u64, FRAMES);

    let cluster = Cluster::start(&["robot", "gpu"], &[]);
    for encoding in ["raw", "jpeg"] {
        let output = s.dir.join(format!("remote-{encoding}.jsonl"));
        let log = s.dir.join(format!("remote-{encoding}.log"));
        let cmd = start_remote(
            &cluster,
            s,
            &format!("remote-{encoding}"),
            &output,
            FRAMES,
            &[("TURBOPI_IMAGE_ENCODING", encoding)],
        );
        let text = ok(
            run_limited(cmd, Duration::from_secs(180), &log),
            &format!("dora start graphs/remote.yml ({encoding})"),
        );
        // Placement: the robot's nodes ran under daemon `robot`, the policy under `gpu`.
        for (node, machine) in [
            ("camera", "robot"),
            ("decode", "robot"),
            ("gpu-decode", "gpu"),
            ("policy", "gpu"),
            ("action-sink", "robot"),
        ] {
            let line = format!("{node} on daemon `{machine}`");
            assert!(text.contains(&line), "{encoding}: no `{line}` in:\n{text}");
        }
        let sum = summary(&output);
        assert_eq!(sum["frames"], FRAMES, "{encoding}: {sum}");
        assert_eq!(sum["gaps"], 0, "{encoding}: {sum}");
        assert_eq!(sum["rejected"], 0, "{encoding}: {sum}");
        let remote = read_actions(&output);
        assert_eq!(remote.len() as u64, FRAMES, "{encoding}");
        assert!(remote
            .iter()
            .flat_map(|(_, r)| r)
            .flatten()
            .all(|v| v.is_finite()));
        if encoding == "raw" {
            for (seq, rows) in &remote {
                let want = fused.iter().find(|(q, _)| q == seq).map(|(_, r)| r);
                assert_eq!(
                    Some(rows),
                    want,
                    "remote.yml frame {seq} differs from fused.yml"
                );
            }
        }
    }
}

/// The first stale episode reported after `t_kill`: the fault's.
fn fault_episode(sum: &serde_json::Value, t_kill: u64) -> &serde_json::Value {
    sum["stale"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reported_ns"].as_u64().unwrap() > t_kill)
        .unwrap_or_else(|| panic!("no stale episode reported after the kill: {sum}"))
}

/// A stale report came between STALE_MS and STALE_MS + REPORT_SLACK_MS after the last action.
fn assert_reported_in_time(episode: &serde_json::Value) {
    let last = episode["last_action_ns"].as_u64().unwrap();
    let reported = episode["reported_ns"].as_u64().unwrap();
    let after_ms = (reported - last) as f64 / 1e6;
    assert!(
        (STALE_MS as f64..STALE_MS as f64 + REPORT_SLACK_MS).contains(&after_ms),
        "reported {after_ms:.1} ms after the last action (STALE_MS={STALE_MS}): {episode}"
    );
}

/// Starts `graphs/remote.yml` as `name` for `run` frames with the watchdog at STALE_MS and
/// waits until `first` actions have arrived: (sink output, log, the attached `dora start`).
fn start_fault_run(
    cluster: &Cluster,
    s: &Setup,
    name: &str,
    run: u64,
    first: usize,
) -> (std::path::PathBuf, std::path::PathBuf, Child) {
    let output = s.dir.join(format!("{name}.jsonl"));
    let log = s.dir.join(format!("{name}.log"));
    let stale = STALE_MS.to_string();
    let cmd = start_remote(
        cluster,
        s,
        name,
        &output,
        run,
        &[("TURBOPI_STALE_MS", &stale)],
    );
    let child = spawn_logged(cmd, &log);
    cluster.wait_until(
        Duration::from_secs(120),
        &format!("{first} actions arrive"),
        |_| actions_so_far(&output) >= first,
    );
    (output, log, child)
}

fn policy_killed_and_restarted(s: &Setup) {
    const RUN: u64 = 60;
    let cluster = Cluster::start(&["robot", "gpu"], &[]);
    let (output, log, child) = start_fault_run(&cluster, s, "policy-kill", RUN, 15);
    let policy = cluster.pids_of("policy");
    assert_eq!(policy.len(), 1, "one policy process: {policy:?}");
    let t_kill = now_ns();
    kill_pid(policy[0]);
    // The run ends by itself: the camera stops after RUN frames and the restarted policy
    // drains what is left.
    wait_child(child, Duration::from_secs(120), &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("camera: sent 60 frames"),
        "the camera kept its pace:\n{text}"
    );
    assert!(
        text.contains("restart"),
        "dora restarted the policy:\n{text}"
    );
    let after_kill = receive_times(&output)
        .into_iter()
        .filter(|(_, t)| *t > t_kill)
        .count();
    let sum = summary(&output);
    eprintln!("remote: policy killed: {sum}");
    assert!(
        after_kill >= 10,
        "actions resumed: {after_kill} after the kill: {sum}"
    );
    let episodes = sum["stale"].as_array().unwrap();
    let outage = episodes
        .iter()
        .find(|e| {
            let last = e["last_action_ns"].as_u64().unwrap();
            last <= t_kill + 50_000_000 && e["resumed_seq"].is_u64()
        })
        .unwrap_or_else(|| panic!("no stale episode around the kill: {sum}"));
    for e in episodes {
        assert_reported_in_time(e);
    }
    // Frames lost with the killed process are seq gaps, nothing else is.
    assert_eq!(
        sum["frames"].as_u64().unwrap() + sum["gaps"].as_u64().unwrap(),
        RUN,
        "{sum}"
    );
    assert!(outage["silence_ms"].as_f64().unwrap() >= STALE_MS as f64);
}

fn gpu_daemon_killed(s: &Setup) {
    const RUN: u64 = 50;
    let mut cluster = Cluster::start(&["robot", "gpu"], &[]);
    let (output, log, child) = start_fault_run(&cluster, s, "daemon-kill", RUN, 10);
    let t_kill = now_ns();
    cluster.kill_daemon("gpu");
    // The robot's nodes go on: the camera sends all its frames and the robot's decode
    // handles each of them, with nothing to send them to.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let id = dataflow_id(&text).unwrap_or_else(|| panic!("no dataflow id in:\n{text}"));
    cluster.wait_until(
        Duration::from_secs(60),
        "the camera sent every frame",
        |_| {
            node_log(&id, "camera")
                .iter()
                .any(|l| l.contains(&format!("sent {RUN} frames")))
        },
    );
    // The sink has been silent since the kill; stopping the dataflow ends it (the robot's
    // side does not wait forever for a daemon that is gone).
    let stop = cluster
        .cli(&["stop", "daemon-kill", "--grace-duration", "5s"])
        .output()
        .unwrap();
    eprintln!(
        "remote: dora stop with the gpu daemon gone: {} {}",
        stop.status,
        String::from_utf8_lossy(&stop.stderr).trim()
    );
    wait_child(child, Duration::from_secs(60), &log);
    let decode = node_log(&id, "decode");
    assert!(
        decode
            .iter()
            .any(|l| l.contains(&format!("{RUN} frames, 0 gaps"))),
        "the robot's decode handled every frame: {decode:?}"
    );
    let sum = summary(&output);
    eprintln!("remote: gpu daemon killed: {sum}");
    let outage = fault_episode(&sum, t_kill);
    assert_reported_in_time(outage);
    assert!(
        outage["resumed_seq"].is_null(),
        "no action after the kill: {sum}"
    );
    let orphans = cluster.pids_of("policy");
    eprintln!(
        "remote: policy processes left running by the killed daemon: {}",
        orphans.len()
    );

    // Recovery is a new run: the daemon restarted under the same machine id takes the GPU
    // nodes of a new start.
    cluster.start_daemon("gpu");
    let output = s.dir.join("daemon-restarted.jsonl");
    let log = s.dir.join("daemon-restarted.log");
    let cmd = start_remote(&cluster, s, "daemon-restarted", &output, FRAMES, &[]);
    ok(
        run_limited(cmd, Duration::from_secs(180), &log),
        "dora start graphs/remote.yml after the gpu daemon's restart",
    );
    let sum = summary(&output);
    assert_eq!(sum["frames"], FRAMES, "{sum}");
    assert_eq!(sum["gaps"], 0, "{sum}");
}
