//! `turbopi graph check` on the shipped graphs and on bad fixtures: each bad graph fails with
//! a message naming the node and the input (or env variable) at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use operators::checkpoint::{tensor_specs, Checkpoint};
use operators::Config;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(file: &Path, env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turbopi"));
    cmd.args(["graph", "check"]).arg(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("turbopi runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/graphs")
        .join(name)
}

#[test]
fn good_fixture_passes() {
    let (ok, text) = check(&fixture("good.yml"), &[]);
    assert!(ok, "{text}");
    assert!(text.contains("ok (6 nodes, 5 edges)"), "{text}");
}

/// Real-time chunking on the GPU (BACKEND cuda with a `guide`, frames one at a time) is
/// accepted: the GPU guides with the Jacobian term dropped.
#[test]
fn rtc_on_cuda_passes() {
    let (ok, text) = check(&fixture("rtc_cuda.yml"), &[]);
    assert!(ok, "{text}");
    // With PIPELINE on, refused for the pipeline alone.
    let (ok, text) = check(&fixture("bad_rtc.yml"), &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("runs frames one at a time: unset PIPELINE"),
        "{text}"
    );
    assert!(!text.contains("BACKEND=cpu"), "{text}");
}

#[test]
fn ipc_fixture_with_release_loops_passes() {
    let (ok, text) = check(&fixture("ipc.yml"), &[]);
    assert!(ok, "{text}");
    assert!(text.contains("ok (6 nodes, 7 edges)"), "{text}");
}

fn plan(file: &Path, dot: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turbopi"))
        .args(["graph", "plan"])
        .arg(file)
        .arg("--dot")
        .arg(dot)
        .output()
        .expect("turbopi runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

#[test]
fn plan_places_stages_ranks_the_critical_path_and_sizes_rings() {
    let tmp = tempfile::tempdir().unwrap();
    let dot = tmp.path().join("plan.dot");
    let (ok, text) = plan(&fixture("ipc.yml"), &dot);
    assert!(ok, "{text}");
    let row = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no row `{needle}` in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    // Critical path: denoise (next to the actions) first, then prefix, then vision.
    assert_eq!(row("denoise ").last(), Some(&"0"), "{text}");
    assert_eq!(row("prefix ").last(), Some(&"1"), "{text}");
    assert_eq!(row("vision ").last(), Some(&"2"), "{text}");
    assert_eq!(row("camera ").last(), Some(&"-"), "{text}");
    // GPU-to-GPU edges by handle: nothing through the host; ring sizes from RING_SLOTS.
    let kv = row("prefix/kv_cache");
    assert!(kv.contains(&"cuda-ipc"), "{text}");
    assert!(text.contains("3 ring slots for a queue of 10"), "{text}");
    let emb = text
        .lines()
        .find(|l| l.starts_with("vision/image_embeddings"))
        .unwrap();
    assert!(
        emb.contains(" 0  cuda-ipc"),
        "no host bytes on an IPC edge: {emb}"
    );
    assert!(
        text.contains("3 GPU processes (vision, prefix, denoise) share the GPU"),
        "{text}"
    );
    let dot = std::fs::read_to_string(&dot).unwrap();
    assert!(
        dot.starts_with("digraph plan {") && dot.trim_end().ends_with('}'),
        "{dot}"
    );
    assert_eq!(dot.matches(" -> ").count(), 5, "{dot}");
    assert!(
        dot.contains("\"vision:vision\" -> \"prefix:prefix\" [label=\"cuda-ipc"),
        "{dot}"
    );

    // A fused node: its stages are chained in-process.
    let (ok, text) = plan(&root().join("graphs/fused.yml"), &tmp.path().join("f.dot"));
    assert!(ok, "{text}");
    assert!(
        text.contains("policy:vision") && text.contains("in-process"),
        "{text}"
    );

    // CUDA IPC between machines is refused, naming the edge.
    let (ok, text) = plan(&fixture("ipc_two_machines.yml"), &tmp.path().join("b.dot"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("edge `vision/image_embeddings` -> `prefix/image_embeddings`: TRANSPORT: cuda-ipc between machines `local` and `robot-b`"),
        "{text}"
    );
    let (ok, text) = check(&fixture("ipc_two_machines.yml"), &[]);
    assert!(!ok && text.contains("to another machine"), "{text}");
}

#[test]
fn bad_fixtures_fail_naming_node_and_input() {
    let cases: &[(&str, &[&str])] = &[
        (
            "unknown_source.yml",
            &[
                "node `vision` input `images`",
                "unknown source node `decoder`",
            ],
        ),
        (
            "unknown_output.yml",
            &[
                "node `vision` input `images`",
                "node `decode` has no output `imgs`",
            ],
        ),
        (
            "wrong_kind.yml",
            &[
                "node `denoise` input `kv_cache`",
                "expects the prefix K/V cache",
                "`decode/images` sends images",
            ],
        ),
        (
            "missing_input.yml",
            &["node `vision`: missing input `images`"],
        ),
        ("cycle.yml", &["cycle between nodes `planner`, `replanner`"]),
        (
            "missing_checkpoint.yml",
            &["node `vision`: env CHECKPOINT=", "no_such_model"],
        ),
        (
            "bad_env.yml",
            &[
                "node `denoise`: env STEPS=\"0\" must be a positive integer",
                "node `denoise`: env BACKEND=\"tpu\"",
                "node `denoise`: env PIPELINE=\"true\": only the policy node overlaps frames",
                "node `denoise`: env MAX_BATCH=\"2\": only the policy node batches frames",
            ],
        ),
        (
            "bad_ipc.yml",
            &[
                "node `denoise` input `kv_cache`: `prefix` sends CUDA IPC handles",
                "node `vision`: env RING_SLOTS=\"0\" must be between 1 and 64",
                "node `decode`: env TRANSPORT=\"cuda-ipc\": only the vision and prefix nodes",
            ],
        ),
        (
            "size_mismatch.yml",
            &["node `decode`: env IMAGE_SIZE=224 does not match the checkpoint's 32"],
        ),
        (
            "bad_queue.yml",
            &[
                "node `action-queue`: env MERGE: MERGE_WEIGHTS=\"0.5,1.5\": 1.5 is outside [0, 1]",
                "node `action-queue`: env REQUEST_THRESHOLD=\"0\" must be a positive integer",
                "node `action-queue`: env CONTROL_HZ=\"0\" must be a positive number",
                "node `action-queue`: output `action` must be declared",
                "node `camera` input `request`: expects observation requests",
            ],
        ),
        (
            "bad_rtc.yml",
            &[
                "node `action-queue`: env RTC=\"sometimes\": expected a boolean",
                "node `action-queue`: output `guide` is declared but RTC is off",
                "node `policy`: env RTC_BETA=\"-1\" must be a positive number",
                "node `policy`: input `guide` (real-time chunking) runs frames one at a time",
            ],
        ),
        (
            "bad_serve.yml",
            &[
                "node `openpi-server`: env ROBOT: unknown robot `franka`",
                "node `openpi-server`: env PORT=\"99999\" must be a port number",
                "node `openpi-server`: output `tokens` must be declared",
                "node `policy`: env PROMPT (a folder with tokens.npy and token_mask.npy) is required",
                "node `policy`: env MAX_BATCH=\"9\" must be a whole number from 1 to 8",
                "node `policy`: env BATCH_WINDOW_MS=\"-1\" must be a number of milliseconds from 0 to 10000",
            ],
        ),
        (
            "bad_in_process.yml",
            &[
                "node `openpi-server`: env BACKEND=\"tpu\" must be `cpu` or `cuda`",
                "node `openpi-server`: env STEPS=\"0\" must be a positive integer",
                "node `openpi-server`: env MAX_BATCH=\"9\" must be a whole number from 1 to 8",
                "node `openpi-server`: env DTYPE=\"fp16\": unknown dtype `fp16`; expected `f32`, `bf16` or `fp8`",
                "node `openpi-server`: env SPIN_US=\"2.5\" must be a whole number of microseconds from 0 to 100000",
                "node `openpi-server`: input `actions` is wired, but with POLICY=in-process",
                "node `server-b`: env POLICY=\"nearby\" must be `dataflow` or `in-process`",
                "node `server-b`: missing input `actions`",
            ],
        ),
    ];
    for (file, needles) in cases {
        let (ok, text) = check(&fixture(file), &[]);
        assert!(!ok, "{file} must fail:\n{text}");
        for n in *needles {
            assert!(text.contains(n), "{file}: `{n}` missing from:\n{text}");
        }
    }
}

/// A checkpoint directory whose `model.safetensors` has the full header of `cfg` and a sparse
/// data section: enough for the graph check (which reads config and header), no 7 GB write.
fn header_only_checkpoint(dir: &Path, cfg: &Config) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_pretty()).unwrap();
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for t in tensor_specs(cfg) {
        let n = t.shape.iter().product::<usize>() * 2;
        header.insert(t.key, serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + n]}));
        offset += n;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    use std::io::Write;
    let mut w = std::io::BufWriter::new(&f);
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&h).unwrap();
    drop(w);
    f.set_len((8 + h.len() + offset) as u64).unwrap();
    Checkpoint::open(dir).unwrap();
    operators::observation::write_sample(&dir.join("observation"), cfg, 0).unwrap();
}

/// `turbopi checkpoint random --preset pi05-small` in `dir/small`: (checkpoint, its observation).
fn small_checkpoint(dir: &Path) -> (PathBuf, PathBuf) {
    let small = dir.join("small");
    let out = Command::new(env!("CARGO_BIN_EXE_turbopi"))
        .args(["checkpoint", "random", "--preset", "pi05-small", "--out"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(out.status.success());
    let prompt = small.join("observation");
    (small, prompt)
}

#[test]
fn shipped_graphs_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let (small, prompt) = small_checkpoint(tmp.path());
    for g in ["demo.yml", "fused.yml", "async.yml", "async_rtc.yml"] {
        let (ok, text) = check(
            &root().join("graphs").join(g),
            &[("TURBOPI_CHECKPOINT", &small), ("TURBOPI_PROMPT", &prompt)],
        );
        assert!(ok, "{g}: {text}");
        // async.yml's request edge (queue -> camera) closes a loop by design.
        assert!(!text.contains("cycle"), "{g}: {text}");
    }
    // The openpi server graphs: a loop by design (server -> policy -> server), per-frame
    // prompts instead of PROMPT.
    for g in ["serve.yml", "serve_split.yml", "serve_in_process.yml"] {
        let (ok, text) = check(
            &root().join("graphs").join(g),
            &[("TURBOPI_CHECKPOINT", &small)],
        );
        assert!(ok, "{g}: {text}");
        assert!(!text.contains("cycle"), "{g}: {text}");
    }
    let full = tmp.path().join("pi05");
    header_only_checkpoint(&full, &Config::pi05());
    let prompt = full.join("observation");
    for g in [
        "thor_pipelined.yml",
        "split_gpu.yml",
        "fused_gpu.yml",
        "async_gpu.yml",
    ] {
        let (ok, text) = check(
            &root().join("graphs").join(g),
            &[("TURBOPI_CHECKPOINT", &full), ("TURBOPI_PROMPT", &prompt)],
        );
        assert!(ok, "{g}: {text}");
    }
    // Without a checkpoint the same graph names what is missing.
    let missing = tmp.path().join("nothing-here");
    for (g, node) in [
        ("thor_pipelined.yml", "policy"),
        ("split_gpu.yml", "vision"),
    ] {
        let (ok, text) = check(
            &root().join("graphs").join(g),
            &[("TURBOPI_CHECKPOINT", &missing)],
        );
        assert!(!ok);
        assert!(
            text.contains(&format!("node `{node}`: env CHECKPOINT=")),
            "{g}: {text}"
        );
    }
}

/// graphs/remote.yml: `plan` lists what runs on each machine and the edges that cross the
/// network with their bytes per frame and per second at the camera's rate; `check` passes
/// it and refuses a placed graph whose relative node paths have no `working_dir`, or a
/// decode whose `ENCODE` it cannot send.
#[test]
fn remote_graph_places_nodes_on_machines_and_sizes_the_network_edges() {
    let tmp = tempfile::tempdir().unwrap();
    let (small, prompt) = small_checkpoint(tmp.path());
    let env: [(&str, &Path); 2] = [("TURBOPI_CHECKPOINT", &small), ("TURBOPI_PROMPT", &prompt)];
    let remote = root().join("graphs/remote.yml");
    let (ok, text) = check(&remote, &env);
    assert!(ok, "{text}");

    let plan_with = |encoding: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_turbopi"))
            .args(["graph", "plan"])
            .arg(&remote)
            .arg("--dot")
            .arg(tmp.path().join("remote.dot"))
            .env("TURBOPI_CHECKPOINT", &small)
            .env("TURBOPI_IMAGE_ENCODING", encoding)
            .env("TURBOPI_SEND_SIZE", "224")
            .env("TURBOPI_RATE_HZ", "20")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    };
    let text = plan_with("raw");
    // The machine table's rows, and the rows of the edges across the network (the edge
    // table lists every edge too, without machines).
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle) && (l.contains(" -> ") || !needle.contains('/')))
            .unwrap_or_else(|| panic!("no line starting with {needle:?} in:\n{text}"))
            .to_string()
    };
    assert!(line("robot ").contains("camera, decode, postprocess, action-sink"));
    assert!(line("gpu ").contains("gpu-decode, policy"));
    // Two synthetic cameras resized to 224 x 224 RGB: 301,056 bytes, 20 times a second.
    let frames = line("decode/frames");
    assert!(
        frames.contains("robot -> gpu")
            && frames.contains("301.1 kB")
            && frames.contains("6.02 MB/s"),
        "{frames}"
    );
    // The small model's 10 x 8 f32 actions.
    let actions = line("policy/actions");
    assert!(
        actions.contains("gpu -> robot")
            && actions.contains("320 B")
            && actions.contains("6.4 kB/s"),
        "{actions}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("camera/frames") && l.contains(" -> ")),
        "only the edges across machines are listed as such:\n{text}"
    );
    let text = plan_with("jpeg");
    assert!(
        text.lines()
            .any(|l| l.starts_with("decode/frames") && l.contains("JPEG: at most this")),
        "{text}"
    );

    // Without `working_dir`, dora 1.1 would look for the binaries in the daemon's _work
    // folder: refused, naming the node.
    let yaml = std::fs::read_to_string(&remote).unwrap();
    let bare = tmp.path().join("graphs/remote_bare.yml");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    std::fs::write(&bare, yaml.replace(", working_dir: ../../graphs", "")).unwrap();
    let (ok, text) = check(&bare, &env);
    assert!(!ok);
    assert!(
        text.contains("node `camera`: relative path `../target/release/camera` in a dataflow placed on machines needs `deploy: working_dir`"),
        "{text}"
    );
    let bad = tmp.path().join("graphs/remote_bad_encode.yml");
    std::fs::write(&bad, yaml.replace("${TURBOPI_IMAGE_ENCODING:-raw}", "png")).unwrap();
    let (ok, text) = check(&bad, &env);
    assert!(!ok);
    assert!(text.contains("env ENCODE=\"png\" must be"), "{text}");
}
