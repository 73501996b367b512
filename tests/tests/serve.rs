//! openpi clients against the served dataflow, with the real dora CLI and openpi-client 0.1.2
//! from PyPI (tools/test.sh installs it into target/python/openpi-client):
//! - `graphs/serve.yml` (fused policy) serving LIBERO observations to a pi0.5 and DROID
//!   observations to a pi0, and `graphs/serve_split.yml` (one process per stage) serving the
//!   same DROID frames: openpi-client's `WebsocketClientPolicy` gets actions of the robot's
//!   shape, and each equals `turbopi infer --openpi` on the same packed observation with the
//!   frame's seed, bit for bit; `graphs/serve_in_process.yml` (the policy in the server's
//!   process) gives serve.yml's DROID answers bit for bit;
//! - malformed and hostile requests each get an error text and close code 1011 while a
//!   well-formed client on another connection keeps being served (tools/openpi/hostile.py);
//! - every graph runs under `turbopi serve`, and SIGINT to it stops the dataflow without
//!   leaving a node process behind (here serving a checkpoint whose config.json is openpi's);
//! - several openpi-clients at once (tools/openpi/load.py): the policy runs their requests in
//!   batches (`policy_timing.batch_size` > 1 seen), every answer equals `turbopi infer
//!   --openpi` on its own observation with its frame's seed, bit for bit, every frame seq is
//!   answered once, and bad requests sent meanwhile fail only their own clients (1011); the
//!   same against serve_in_process.yml;
//! - a checkpoint whose config.json is what openpi's converter writes (variant names only,
//!   here openpi's `dummy` test model) is inspected and runs as it comes; a wrong variant or
//!   size is refused, naming the field.
//!
//! Needs the workspace built in release, the dora CLI and Python 3 (`.ci/run` provides all).

use std::path::Path;
use std::process::{Command, Stdio};

use operators::npy;
use tests::dataflow::{bin, ok, root};
use tests::serving::{
    checkpoint, checkpoint_with, node_processes, openpi_client_path, python, Served,
};

const FRAMES: usize = 4;
const HORIZON: usize = 10;
/// The servers' message limit; DROID sends a 720p camera frame (2.8 MB).
const MAX_MESSAGE_MB: usize = 4;

/// openpi-client's WebsocketClientPolicy sends `FRAMES` observations; returns their folder.
fn client_check(served: &Served, robot: &str, py: &Path, out: &Path) {
    let status = python("client_check.py", py)
        .args(["--port", &served.port.to_string(), "--robot", robot])
        .args(["--horizon", &HORIZON.to_string()])
        .args(["--frames", &FRAMES.to_string(), "--out"])
        .arg(out)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "client_check.py ({robot}) failed; server log:\n{}",
        served.log_text()
    );
}

/// The robot actions `turbopi infer --openpi` gives for a saved observation with `seed`.
fn infer(ck: &Path, robot: &str, obs: &Path, seed: usize) -> npy::Array<f64> {
    let out = obs.with_extension("infer.npy");
    ok(
        Command::new(bin("turbopi"))
            .args(["infer", "--steps", "10", "--seed", &seed.to_string()])
            .arg("--checkpoint")
            .arg(ck)
            .arg("--openpi")
            .arg(obs)
            .args(["--robot", robot, "--out"])
            .arg(&out)
            .output()
            .unwrap(),
        "turbopi infer --openpi",
    );
    npy::read_f64(&out).unwrap()
}

/// Every served frame equals `turbopi infer` on the same observation, frame i (the server's
/// seq i) with seed SEED 0 + i.
fn same_as_infer(ck: &Path, robot: &str, frames: &Path, dims: usize, what: &str) {
    for i in 0..FRAMES {
        let got = npy::read_f64(&frames.join(format!("frame{i}.actions.npy"))).unwrap();
        assert_eq!(got.shape, vec![HORIZON, dims], "{what} frame {i}");
        assert!(got.data.iter().all(|v| v.is_finite()));
        let want = infer(ck, robot, &frames.join(format!("frame{i}.msgpack")), i);
        assert_eq!(got, want, "{what}: frame {i} differs from turbopi infer");
    }
    // Different frames, different actions (the comparison is not vacuous).
    let a = npy::read_f64(&frames.join("frame0.actions.npy")).unwrap();
    let b = npy::read_f64(&frames.join("frame1.actions.npy")).unwrap();
    assert_ne!(
        a.data, b.data,
        "{what}: frames 0 and 1 got the same actions"
    );
}

fn served_count(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("requests served"))?;
    let (before, _) = line.split_once(" requests served")?;
    before.rsplit(' ').next()?.parse().ok()
}

#[test]
fn openpi_clients_against_the_served_dataflow() {
    for b in [
        "openpi-server",
        "policy",
        "vision",
        "prefix",
        "denoise",
        "turbopi",
    ] {
        bin(b);
    }
    let py = openpi_client_path();
    let limit = [("TURBOPI_MAX_MESSAGE_MB", MAX_MESSAGE_MB.to_string())];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // LIBERO on pi0.5: quantile norm stats, the discrete-state prompt, a pre-tokenized prompt,
    // images of other sizes and layouts; then the hostile requests on the same server.
    let pi05 = checkpoint(dir, "pi05-small", 11);
    for graph in ["serve.yml", "serve_split.yml", "serve_in_process.yml"] {
        let out = Command::new(bin("turbopi"))
            .args(["graph", "check"])
            .arg(root().join("graphs").join(graph))
            .env("TURBOPI_CHECKPOINT", &pi05)
            .output()
            .unwrap();
        ok(out, &format!("turbopi graph check {graph}"));
    }
    let served = Served::start("serve.yml", &pi05, "libero", dir.join("libero.log"), &limit);
    let libero = dir.join("libero");
    client_check(&served, "libero", &py, &libero);
    let report = dir.join("hostile.json");
    let status = python("hostile.py", &py)
        .args(["--port", &served.port.to_string()])
        .args(["--horizon", &HORIZON.to_string(), "--max-message-mb"])
        .arg(MAX_MESSAGE_MB.to_string())
        .arg("--report")
        .arg(&report)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "hostile.py failed; server log:\n{}",
        served.log_text()
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{r}");
    assert!(cases.iter().all(|c| c["close_code"] == 1011), "{r}");
    assert!(
        r["steady_client_served"].as_u64().unwrap() >= cases.len() as u64 / 2,
        "{r}"
    );
    let log = served.stop();
    let n = served_count(&log).unwrap_or_else(|| panic!("no summary in the log:\n{log}"));
    assert!(n as usize >= FRAMES + 12, "{n} requests served:\n{log}");
    same_as_infer(&pi05, "libero", &libero, 7, "serve.yml libero pi0.5");

    // DROID on pi0 (z-score, the state into the action expert), fused then split.
    let pi0 = checkpoint(dir, "pi0-small", 12);
    let served = Served::start("serve.yml", &pi0, "droid", dir.join("droid.log"), &limit);
    let droid = dir.join("droid");
    client_check(&served, "droid", &py, &droid);
    served.stop();
    same_as_infer(&pi0, "droid", &droid, 8, "serve.yml droid pi0");

    let served = Served::start(
        "serve_split.yml",
        &pi0,
        "droid",
        dir.join("split.log"),
        &limit,
    );
    let split = dir.join("split");
    client_check(&served, "droid", &py, &split);
    served.stop();

    // The policy in the server's process: the same answers, no dataflow hop.
    let served = Served::start(
        "serve_in_process.yml",
        &pi0,
        "droid",
        dir.join("in_process.log"),
        &limit,
    );
    let in_process = dir.join("in_process");
    client_check(&served, "droid", &py, &in_process);
    let log = served.stop();
    assert!(log.contains("the policy in this process (cpu f32"), "{log}");
    // The policy's host wall time comes with its stage times, and holds them, where one
    // call ran the frame (the policy node, the in-process policy); the split graph's
    // stages are three nodes, so no call is the frame's.
    for (graph, frames, has_wall) in [
        ("serve.yml", &droid, true),
        ("serve_split.yml", &split, false),
        ("serve_in_process.yml", &in_process, true),
    ] {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(frames.join("summary.json")).unwrap())
                .unwrap();
        for f in summary["frames"].as_array().unwrap() {
            let timing = &f["policy_timing"];
            match (timing["infer_ms"].as_f64(), timing["wall_ms"].as_f64()) {
                (Some(stages), Some(wall)) if has_wall => {
                    assert!(
                        wall >= stages,
                        "{graph}: wall {wall} ms < stages {stages} ms"
                    )
                }
                (Some(_), None) if !has_wall => {}
                _ => panic!("{graph}: policy_timing {timing}"),
            }
        }
    }
    for (graph, frames) in [
        ("serve_split.yml", &split),
        ("serve_in_process.yml", &in_process),
    ] {
        for i in 0..FRAMES {
            let a = npy::read_f64(&droid.join(format!("frame{i}.actions.npy"))).unwrap();
            let b = npy::read_f64(&frames.join(format!("frame{i}.actions.npy"))).unwrap();
            assert_eq!(a, b, "{graph} frame {i} differs from serve.yml");
        }
    }
}

/// Concurrent clients, batched: `CLIENTS` closed-loop openpi-clients of `REQUESTS` requests
/// each, and one client sending bad requests, against serve.yml with a batching window long
/// enough that requests arriving together share a batch.
#[test]
fn concurrent_clients_are_batched_and_get_their_own_actions() {
    concurrent_clients("serve.yml");
}

/// The same against the policy in the server's process (serve_in_process.yml).
#[test]
fn concurrent_clients_of_the_in_process_policy() {
    concurrent_clients("serve_in_process.yml");
}

fn concurrent_clients(graph: &str) {
    const CLIENTS: usize = 4;
    const REQUESTS: usize = 3;
    for b in ["openpi-server", "policy", "turbopi"] {
        bin(b);
    }
    let py = openpi_client_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ck = checkpoint(dir, "pi05-small", 13);
    let env = [
        ("TURBOPI_MAX_MESSAGE_MB", MAX_MESSAGE_MB.to_string()),
        ("TURBOPI_MAX_BATCH", "4".to_string()),
        ("TURBOPI_BATCH_WINDOW_MS", "250".to_string()),
        ("TURBOPI_SEED", "100".to_string()),
    ];
    let served = Served::start(graph, &ck, "libero", dir.join("load.log"), &env);
    let out = dir.join("load");
    let report = dir.join("load.json");
    let status = python("load.py", &py)
        .args(["--port", &served.port.to_string(), "--robot", "libero"])
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--requests", &REQUESTS.to_string()])
        .args([
            "--bad-clients",
            "1",
            "--horizon",
            &HORIZON.to_string(),
            "--out",
        ])
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "load.py failed ({graph}); server log:\n{}",
        served.log_text()
    );
    let log = served.stop();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["requests"], CLIENTS * REQUESTS, "{r}");
    assert!(r["bad_requests_failed"].as_u64().unwrap_or(0) >= 1, "{r}");
    let sizes = r["batch_sizes"].as_object().unwrap();
    assert!(
        sizes.keys().any(|k| k.parse::<usize>().unwrap_or(0) > 1),
        "no request ran in a batch of more than one: {r}\n{log}"
    );
    assert!(log.contains("batches: "), "{log}");
    let requests: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("requests.json")).unwrap()).unwrap();
    // Counted and lossless: every frame seq answered once, bad requests never got one.
    let mut frames: Vec<u64> = requests
        .iter()
        .map(|q| q["frame"].as_u64().unwrap())
        .collect();
    frames.sort();
    assert_eq!(frames, (0..(CLIENTS * REQUESTS) as u64).collect::<Vec<_>>());
    for q in &requests {
        let file = q["file"].as_str().unwrap();
        let frame = q["frame"].as_u64().unwrap() as usize;
        let got = npy::read_f64(&out.join(format!("{file}.actions.npy"))).unwrap();
        let want = infer(
            &ck,
            "libero",
            &out.join(format!("{file}.msgpack")),
            100 + frame,
        );
        assert_eq!(
            got, want,
            "{graph}: {file} (frame {frame}, batch of {}) differs from turbopi infer on its own",
            q["batch_size"]
        );
    }
}

/// `turbopi checkpoint random --config-schema openpi`: openpi's dummy model (Gemmas of width
/// 64 behind the full SigLIP So400m/14), its config.json as openpi's converter writes it.
const OPENPI_DUMMY: [&str; 4] = ["--dtype", "bf16", "--config-schema", "openpi"];

/// `turbopi ARGS`: (success, stdout + stderr).
fn turbopi(args: &[&str], paths: &[&Path]) -> (bool, String) {
    let out = Command::new(bin("turbopi"))
        .args(args)
        .args(paths)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openpi_config_json_as_the_converter_writes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("pi05-dummy");
    let mut args = vec!["checkpoint", "random", "--preset", "pi05-dummy"];
    args.extend(OPENPI_DUMMY);
    args.push("--out");
    let (done, out) = turbopi(&args, &[&ck]);
    assert!(done, "{out}");
    // Byte for byte what the converter's `json.dump(config_dict, f, indent=2)` writes for
    // openpi's Pi0Config(pi05=True, paligemma_variant="dummy", action_expert_variant="dummy").
    let config_path = ck.join("config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert_eq!(
        text.trim_end(),
        r#"{
  "action_dim": 32,
  "action_horizon": 50,
  "paligemma_variant": "dummy",
  "action_expert_variant": "dummy",
  "precision": "bfloat16"
}"#
    );
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();

    let (done, out) = turbopi(&["checkpoint", "inspect"], &[&ck]);
    assert!(done, "{out}");
    for line in [
        "schema     openpi config.json (paligemma_variant dummy, action_expert_variant dummy)",
        "pi05 = true from model.safetensors (`time_mlp_in.weight`",
        "max_token_len = 200 (openpi's default for pi0.5)",
        "\"vision_width\": 1152",
        "\"vlm_width\": 64",
        "valid: all",
    ] {
        assert!(out.contains(line), "inspect lacks `{line}`:\n{out}");
    }

    // One real camera: SigLIP So400m/14 on the CPU is what costs here.
    let obs = ck.join("observation");
    npy::write_bool(&obs.join("image_masks.npy"), &[3], &[true, false, false]).unwrap();
    let actions = tmp.path().join("actions.npy");
    let (done, out) = turbopi(
        &["infer", "--steps", "2", "--checkpoint"],
        &[
            &ck,
            Path::new("--observation"),
            &obs,
            Path::new("--out"),
            &actions,
        ],
    );
    assert!(done, "{out}");
    let a = npy::read_f32(&actions).unwrap();
    assert_eq!(a.shape, vec![50, 32]);
    assert!(a.data.iter().all(|v| v.is_finite()) && a.data.iter().any(|v| *v != 0.0));

    // Refused, naming the field: by inspect, infer and serve alike (serve before starting
    // anything).
    let good = std::fs::read_to_string(&config_path).unwrap();
    for (field, value, msg) in [
        (
            "paligemma_variant",
            serde_json::json!("gemma_7b"),
            "field `paligemma_variant`: unknown variant `gemma_7b`",
        ),
        (
            "action_dim",
            serde_json::json!(0),
            "field `action_dim` must be positive",
        ),
        (
            "vlm_width",
            serde_json::json!(2048),
            "field `vlm_width` = 2048 disagrees with paligemma_variant `dummy`, which gives 64",
        ),
    ] {
        let mut bad = config.clone();
        bad[field] = value;
        std::fs::write(&config_path, bad.to_string()).unwrap();
        for args in [
            vec!["checkpoint", "inspect"],
            vec!["serve", "--robot", "libero", "--checkpoint"],
        ] {
            let (done, out) = turbopi(&args, &[&ck]);
            assert!(!done && out.contains(msg), "{args:?} with {field}: {out}");
            assert!(out.contains("config.json"), "{out}");
        }
    }
    std::fs::write(&config_path, good).unwrap();
}

#[test]
fn sigint_to_turbopi_serve_leaves_no_node_behind() {
    for b in ["openpi-server", "policy", "turbopi"] {
        bin(b);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Served as it comes: config.json in openpi's schema, read by the server and the policy.
    let ck = checkpoint_with(dir, "pi05-dummy", 4, &OPENPI_DUMMY);
    let served = Served::start("serve.yml", &ck, "libero", dir.join("serve.log"), &[]);
    // The policy has loaded its weights once it names its backend.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while !served.log_text().contains("policy: cpu f32") {
        assert!(
            std::time::Instant::now() < deadline,
            "the policy did not load within 180 s:\n{}",
            served.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let before = node_processes(served.pid());
    let mut names: Vec<String> = before
        .iter()
        .filter_map(|p| Some(p.exe.file_name()?.to_str()?.to_string()))
        .collect();
    names.sort();
    assert_eq!(names, ["openpi-server", "policy"], "{before:?}");
    let log = served.stop();
    assert!(
        log.contains("turbopi serve: interrupted (SIGINT): stopping the dataflow"),
        "{log}"
    );
    // The nodes stopped on dora's stop event: each printed its summary.
    assert!(log.contains("requests served"), "{log}");
    assert!(log.contains("frames rejected"), "{log}");
    let left: Vec<_> = before.iter().filter(|p| p.alive()).collect();
    assert!(left.is_empty(), "{left:?} outlived turbopi serve:\n{log}");
}
