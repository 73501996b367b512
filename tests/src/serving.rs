//! Serving graphs under the real dora CLI for the openpi-client tests: openpi-client's
//! folder, random checkpoints with a tokenizer and norm stats, and a graph started with
//! `dora run` on a free port, waited for on `/healthz` and stopped with Ctrl-C.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::dataflow::{bin, dora, ok, root};

/// PYTHONPATH holding openpi-client 0.1.2 and its dependencies (tools/test.sh installs them
/// into target/python/openpi-client; `OPENPI_CLIENT_PYTHONPATH` overrides).
pub fn openpi_client_path() -> PathBuf {
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

/// `python3 tools/openpi/SCRIPT` with openpi-client on its path.
pub fn python(script: &str, pythonpath: &Path) -> Command {
    let mut c = Command::new("python3");
    c.arg(root().join("tools/openpi").join(script))
        .env("PYTHONPATH", pythonpath);
    c
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A random checkpoint of `preset` in `dir/preset` with a tokenizer and norm stats
/// (tools/openpi/fixtures.py).
pub fn checkpoint(dir: &Path, preset: &str, seed: u64) -> PathBuf {
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

/// A serving graph running under `dora run`, stopped (Ctrl-C) on drop.
pub struct Served {
    child: Option<Child>,
    log: PathBuf,
    pub port: u16,
}

impl Served {
    /// `dora run graphs/GRAPH` serving `ck` for `robot` on a free local port, its output in
    /// `log`, with the extra `TURBOPI_*` variables `env`; returns once `/healthz` answers.
    pub fn start(
        graph: &str,
        ck: &Path,
        robot: &str,
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Served {
        let port = free_port();
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = dora();
        cmd.arg("run")
            .arg(root().join("graphs").join(graph))
            .env("TURBOPI_CHECKPOINT", ck)
            .env("TURBOPI_ROBOT", robot)
            .env("TURBOPI_HOST", "127.0.0.1")
            .env("TURBOPI_PORT", port.to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("dora run");
        let mut s = Served {
            child: Some(child),
            log,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while healthz(port).as_deref() != Some("OK\n") {
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                panic!("dora run {graph} exited with {status}:\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{graph}: /healthz did not answer within 120 s:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    /// The `dora run` process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C to `dora run`, which stops the nodes (they print their summaries); the log.
    pub fn stop(mut self) -> String {
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
pub fn healthz(port: u16) -> Option<String> {
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
