//! Running the shipped graphs with the real dora CLI: the release binaries, a small random
//! checkpoint and recorded frames in a temporary folder, the `TURBOPI_*` variables the
//! graphs read, and the action sink's output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use operators::npy;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A release binary of the workspace; panics with the build command when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = root().join("target/release").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first",
        p.display()
    );
    p
}

/// Checks that the node binaries of `demo.yml` and `fused.yml` are built.
pub fn require_graph_nodes() {
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
}

/// The dora CLI (`DORA` overrides the one on the PATH); panics when there is none.
pub fn dora() -> Command {
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

/// stdout and stderr of a command that must have succeeded.
pub fn ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

pub const CAMERAS: usize = 2;
pub const SIZE: usize = 32;
/// Recorded frames, replayed in a loop by the camera.
pub const FRAMES: usize = 4;

/// A temporary folder with a random pi05-small checkpoint, its prompt and recorded frames.
pub struct Setup {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub checkpoint: PathBuf,
    pub prompt: PathBuf,
    /// `FRAMES` frames of `CAMERAS` cameras, `SIZE`x`SIZE` RGB.
    pub frames: Vec<Vec<u8>>,
}

pub fn setup() -> Setup {
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

/// The variables the graphs read: this setup's checkpoint, prompt and frames, `max_frames`
/// frames, the sink's output at `output`.
pub fn graph_env(cmd: &mut Command, s: &Setup, output: &Path, max_frames: u64) {
    cmd.env("TURBOPI_CHECKPOINT", &s.checkpoint)
        .env("TURBOPI_PROMPT", &s.prompt)
        .env("TURBOPI_FRAMES", s.dir.join("frames.npy"))
        .env("TURBOPI_MAX_FRAMES", max_frames.to_string())
        .env("TURBOPI_OUTPUT", output);
}

/// (seq, actions rows) per line of an action-sink output.
pub fn read_actions(path: &Path) -> Vec<(u64, Vec<Vec<f32>>)> {
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

/// The sink's `<output>.summary.json`.
pub fn summary(output: &Path) -> serde_json::Value {
    let mut p = output.as_os_str().to_owned();
    p.push(".summary.json");
    let p = PathBuf::from(p);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
