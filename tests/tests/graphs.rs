//! The shipped dataflows end to end with the real dora CLI: `demo.yml` (one node per stage)
//! and `fused.yml` (one policy node) on the same recorded frames, each action checked
//! bit for bit against `turbopi infer` on the same frame, seed and prompt; and the demo under
//! `dora up` + `dora start --attach`.
//!
//! Needs the workspace built in release (`cargo build --release --workspace`) and the dora CLI
//! (`pip install dora-rs-cli==1.1.0`); `.ci/run` does both.

use std::process::Command;

use operators::npy;
use tests::dataflow::{
    bin, dora, graph_env, ok, read_actions, require_graph_nodes, root, setup, summary, Setup,
    FRAMES, SIZE,
};

const RUN_FRAMES: u64 = 6;

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
    require_graph_nodes();
    let s = setup();
    let mut results = Vec::new();
    for graph in ["demo.yml", "fused.yml"] {
        let output = s.dir.join(format!("{graph}.jsonl"));
        let mut cmd = dora();
        cmd.arg("run").arg(root().join("graphs").join(graph));
        graph_env(&mut cmd, &s, &output, RUN_FRAMES);
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
    graph_env(&mut up, &s, &output, RUN_FRAMES);
    ok(up.output().unwrap(), "dora up");
    let mut start = dora();
    start
        .args(["start", "--attach", "--name", "turbopi-demo-test"])
        .arg(root().join("graphs/demo.yml"))
        .current_dir(&s.dir);
    graph_env(&mut start, &s, &output, RUN_FRAMES);
    let result = start.output().unwrap();
    let mut down = dora();
    let _ = down.arg("destroy").current_dir(&s.dir).output();
    ok(result, "dora start --attach");
    let sum = summary(&output);
    assert_eq!(sum["frames"], RUN_FRAMES, "{sum}");
    assert_eq!(sum["gaps"], 0, "{sum}");
    assert_eq!(read_actions(&output).len() as u64, RUN_FRAMES);
}
