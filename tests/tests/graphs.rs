//! The shipped dataflows end to end with the real dora CLI: `demo.yml` (one node per stage)
//! and `fused.yml` (one policy node) on the same recorded frames, each action checked
//! bit for bit against `turbopi infer` on the same frame, seed and prompt; and the demo under
//! `dora up` + `dora start --attach`.
//!
//! Needs the workspace built in release (`cargo build --release --workspace`) and the dora CLI
//! (`pip install dora-rs-cli==1.1.0`); `.ci/run` does both.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use operators::npy;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin(name: &str) -> PathBuf {
    let p = root().join("target/release").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
        p.display()
    );
    p
}

fn dora() -> Command {
    let dora = std::env::var("DORA").unwrap_or_else(|_| "dora".into());
    let ok = Command::new(&dora)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the dora CLI is required: pip install dora-rs-cli==1.1.0 (or set DORA)"
    );
    Command::new(dora)
}

fn ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    checkpoint: PathBuf,
    prompt: PathBuf,
    frames: Vec<Vec<u8>>,
}

const CAMERAS: usize = 2;
const SIZE: usize = 32;
const FRAMES: usize = 4;
const RUN_FRAMES: u64 = 6;

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let checkpoint = dir.join("ck");
    ok(
        Command::new(bin("turbopi"))
            .args([
                "checkpoint",
                "random",
                "--preset",
                "pi05-small",
                "--seed",
                "5",
                "--out",
            ])
            .arg(&checkpoint)
            .output()
            .unwrap(),
        "turbopi checkpoint random",
    );
    // Recorded frames: 4 frames of 2 cameras, replayed in a loop.
    let per = CAMERAS * SIZE * SIZE * 3;
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|f| (0..per).map(|i| ((i * 7 + f * 61) % 256) as u8).collect())
        .collect();
    npy::write_u8(
        &dir.join("frames.npy"),
        &[FRAMES, CAMERAS, SIZE, SIZE, 3],
        &frames.concat(),
    )
    .unwrap();
    let prompt = checkpoint.join("observation");
    Setup {
        _tmp: tmp,
        dir,
        checkpoint,
        prompt,
        frames,
    }
}

fn graph_env(cmd: &mut Command, s: &Setup, output: &Path) {
    cmd.env("TURBOPI_CHECKPOINT", &s.checkpoint)
        .env("TURBOPI_PROMPT", &s.prompt)
        .env("TURBOPI_FRAMES", s.dir.join("frames.npy"))
        .env("TURBOPI_MAX_FRAMES", RUN_FRAMES.to_string())
        .env("TURBOPI_OUTPUT", output);
}

/// (seq, actions rows) per line of an action-sink output.
fn read_actions(path: &Path) -> Vec<(u64, Vec<Vec<f32>>)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let rows = v["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect();
            (v["seq"].as_u64().unwrap(), rows)
        })
        .collect()
}

fn summary(output: &Path) -> serde_json::Value {
    let mut p = output.as_os_str().to_owned();
    p.push(".summary.json");
    serde_json::from_str(&std::fs::read_to_string(PathBuf::from(p)).unwrap()).unwrap()
}

/// `turbopi infer` on frame `seq` exactly as the graphs see it: the recorded cameras plus a
/// black, masked third camera; the prompt; noise from seed `seq` (SEED 0 + seq).
fn infer(s: &Setup, seq: u64) -> Vec<Vec<f32>> {
    let obs = s.dir.join(format!("obs{seq}"));
    std::fs::create_dir_all(&obs).unwrap();
    let mut images = s.frames[seq as usize % FRAMES].clone();
    images.resize(3 * SIZE * SIZE * 3, 0);
    npy::write_u8(&obs.join("images.npy"), &[3, SIZE, SIZE, 3], &images).unwrap();
    npy::write_bool(&obs.join("image_masks.npy"), &[3], &[true, true, false]).unwrap();
    for f in ["tokens.npy", "token_mask.npy"] {
        std::fs::copy(s.prompt.join(f), obs.join(f)).unwrap();
    }
    let out = obs.join("actions.npy");
    ok(
        Command::new(bin("turbopi"))
            .args([
                "infer",
                "--steps",
                "10",
                "--seed",
                &seq.to_string(),
                "--checkpoint",
            ])
            .arg(&s.checkpoint)
            .arg("--observation")
            .arg(&obs)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap(),
        "turbopi infer",
    );
    let a = npy::read_f32(&out).unwrap();
    a.data
        .chunks_exact(a.shape[1])
        .map(|r| r[..7].to_vec())
        .collect()
}

/// One test, so the dora runs never overlap: `dora run` (its own daemon) first, then the
/// coordinator started by `dora up`, torn down last.
#[test]
fn dataflows_with_the_dora_cli() {
    demo_and_fused_equal_turbopi_infer_bit_for_bit();
    demo_under_dora_up_and_start_attach();
}

fn demo_and_fused_equal_turbopi_infer_bit_for_bit() {
    for b in [
        "camera",
        "decode",
        "vision",
        "prefix",
        "denoise",
        "postprocess",
        "policy",
        "action-sink",
    ] {
        bin(b);
    }
    let s = setup();
    let mut results = Vec::new();
    for graph in ["demo.yml", "fused.yml"] {
        let output = s.dir.join(format!("{graph}.jsonl"));
        let mut cmd = dora();
        cmd.arg("run").arg(root().join("graphs").join(graph));
        graph_env(&mut cmd, &s, &output);
        let log = ok(cmd.output().unwrap(), &format!("dora run {graph}"));
        assert!(log.contains("action-sink"), "{log}");
        let sum = summary(&output);
        assert_eq!(sum["frames"], RUN_FRAMES, "{graph}: {sum}");
        assert_eq!(sum["gaps"], 0, "{graph}: {sum}");
        assert_eq!(sum["rejected"], 0, "{graph}: {sum}");
        let actions = read_actions(&output);
        assert_eq!(actions.len() as u64, RUN_FRAMES);
        results.push(actions);
    }
    for (seq, rows) in &results[0] {
        let want = infer(&s, *seq);
        assert_eq!(rows.len(), 10, "action_horizon rows");
        assert!(rows.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(
            rows, &want,
            "demo.yml frame {seq} differs from turbopi infer"
        );
        let fused = results[1].iter().find(|(q, _)| q == seq).map(|(_, r)| r);
        assert_eq!(
            fused,
            Some(&want),
            "fused.yml frame {seq} differs from turbopi infer"
        );
    }
}

fn demo_under_dora_up_and_start_attach() {
    let s = setup();
    let output = s.dir.join("attach.jsonl");
    // The coordinator and daemon parse the dataflow too: give them the same variables.
    let mut up = dora();
    up.arg("up").current_dir(&s.dir);
    graph_env(&mut up, &s, &output);
    ok(up.output().unwrap(), "dora up");
    let mut start = dora();
    start
        .args(["start", "--attach", "--name", "turbopi-demo-test"])
        .arg(root().join("graphs/demo.yml"))
        .current_dir(&s.dir);
    graph_env(&mut start, &s, &output);
    let result = start.output().unwrap();
    let mut down = dora();
    let _ = down.arg("destroy").current_dir(&s.dir).output();
    ok(result, "dora start --attach");
    let sum = summary(&output);
    assert_eq!(sum["frames"], RUN_FRAMES, "{sum}");
    assert_eq!(sum["gaps"], 0, "{sum}");
    assert_eq!(read_actions(&output).len() as u64, RUN_FRAMES);
}
