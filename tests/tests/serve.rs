//! openpi clients against the served dataflow, with the real dora CLI and openpi-client 0.1.2
//! from PyPI (tools/test.sh installs it into target/python/openpi-client):
//! - `graphs/serve.yml` (fused policy) serving LIBERO observations to a pi0.5 and DROID
//!   observations to a pi0, and `graphs/serve_split.yml` (one process per stage) serving the
//!   same DROID frames: openpi-client's `WebsocketClientPolicy` gets actions of the robot's
//!   shape, and each equals `turbopi infer --openpi` on the same packed observation with the
//!   frame's seed, bit for bit;
//! - malformed and hostile requests each get an error text and close code 1011 while a
//!   well-formed client on another connection keeps being served (tools/openpi/hostile.py).
//!
//! Needs the workspace built in release, the dora CLI and Python 3 (`.ci/run` provides all).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use operators::npy;
use tests::dataflow::{bin, dora, ok, root};

const FRAMES: usize = 4;
const HORIZON: usize = 10;
/// The servers' message limit; DROID sends a 720p camera frame (2.8 MB).
const MAX_MESSAGE_MB: usize = 4;

/// PYTHONPATH holding openpi-client 0.1.2 and its dependencies.
fn openpi_client_path() -> PathBuf {
    let p = std::env::var_os("OPENPI_CLIENT_PYTHONPATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/python/openpi-client"));
    let out = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m, openpi_client.websocket_client_policy; print(m.version('openpi-client'))",
        ])
        .env("PYTHONPATH", &p)
        .output()
        .expect("python3 is required");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && version == "0.1.2",
        "openpi-client 0.1.2 is not importable from {} (found {version:?}): run tools/test.sh, which installs it with pip\n{}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

fn python(script: &str, pythonpath: &Path) -> Command {
    let mut c = Command::new("python3");
    c.arg(root().join("tools/openpi").join(script))
        .env("PYTHONPATH", pythonpath);
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A random checkpoint with a tokenizer and norm stats (tools/openpi/fixtures.py).
fn checkpoint(dir: &Path, preset: &str, seed: u64) -> PathBuf {
    let ck = dir.join(preset);
    ok(
        Command::new(bin("turbopi"))
            .args(["checkpoint", "random", "--preset", preset, "--seed"])
            .arg(seed.to_string())
            .arg("--out")
            .arg(&ck)
            .output()
            .unwrap(),
        "turbopi checkpoint random",
    );
    ok(
        Command::new("python3")
            .arg(root().join("tools/openpi/fixtures.py"))
            .arg(&ck)
            .output()
            .unwrap(),
        "tools/openpi/fixtures.py",
    );
    ck
}

/// A graph running under `dora run`, stopped (Ctrl-C) on drop.
struct Served {
    child: Option<Child>,
    log: PathBuf,
    port: u16,
}

impl Served {
    fn start(graph: &str, ck: &Path, robot: &str, log: PathBuf) -> Served {
        let port = free_port();
        let file = std::fs::File::create(&log).unwrap();
        let child = dora()
            .arg("run")
            .arg(root().join("graphs").join(graph))
            .env("TURBOPI_CHECKPOINT", ck)
            .env("TURBOPI_ROBOT", robot)
            .env("TURBOPI_HOST", "127.0.0.1")
            .env("TURBOPI_PORT", port.to_string())
            .env("TURBOPI_MAX_MESSAGE_MB", MAX_MESSAGE_MB.to_string())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("dora run");
        let mut s = Served {
            child: Some(child),
            log,
            port,
        };
        s.wait_healthy(graph);
        s
    }

    fn wait_healthy(&mut self, graph: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "dora run {graph} exited with {status}:\n{}",
                    self.log_text()
                );
            }
            if healthz(self.port).as_deref() == Some("OK\n") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{graph}: /healthz did not answer within 120 s:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C to `dora run`, which stops the nodes; returns the log.
    fn stop(mut self) -> String {
        self.interrupt();
        self.log_text()
    }

    fn interrupt(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.interrupt();
    }
}

/// The body of `GET /healthz`, None when nothing answers.
fn healthz(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

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
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // LIBERO on pi0.5: quantile norm stats, the discrete-state prompt, a pre-tokenized prompt,
    // images of other sizes and layouts; then the hostile requests on the same server.
    let pi05 = checkpoint(dir, "pi05-small", 11);
    for graph in ["serve.yml", "serve_split.yml"] {
        let out = Command::new(bin("turbopi"))
            .args(["graph", "check"])
            .arg(root().join("graphs").join(graph))
            .env("TURBOPI_CHECKPOINT", &pi05)
            .output()
            .unwrap();
        ok(out, &format!("turbopi graph check {graph}"));
    }
    let served = Served::start("serve.yml", &pi05, "libero", dir.join("libero.log"));
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
    let served = Served::start("serve.yml", &pi0, "droid", dir.join("droid.log"));
    let droid = dir.join("droid");
    client_check(&served, "droid", &py, &droid);
    served.stop();
    same_as_infer(&pi0, "droid", &droid, 8, "serve.yml droid pi0");

    let served = Served::start("serve_split.yml", &pi0, "droid", dir.join("split.log"));
    let split = dir.join("split");
    client_check(&served, "droid", &py, &split);
    served.stop();
    for i in 0..FRAMES {
        let a = npy::read_f64(&droid.join(format!("frame{i}.actions.npy"))).unwrap();
        let b = npy::read_f64(&split.join(format!("frame{i}.actions.npy"))).unwrap();
        assert_eq!(a, b, "serve_split.yml frame {i} differs from serve.yml");
    }
}
