//! Serving graphs under the real dora CLI for the openpi-client tests: openpi-client's
//! folder, random checkpoints with a tokenizer and norm stats, a graph started with
//! `turbopi serve` on a free port, waited for until it says where it serves and stopped with
//! Ctrl-C, and the node processes it runs (from /proc).

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

/// A local port that is free now, below Linux's ephemeral range (32768-60999): a port the
/// system hands out for `bind(0)` (dora's daemons take theirs that way) could be given to
/// another process between this check and the server binding it. Successive calls in one
/// process give different ports; processes start at different offsets.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let salt = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..SPAN {
        let port = (LOW + (salt.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free local port in {LOW}..{}", LOW + SPAN)
}

/// A random checkpoint of `preset` in `dir/preset` with a tokenizer and norm stats
/// (tools/openpi/fixtures.py).
pub fn checkpoint(dir: &Path, preset: &str, seed: u64) -> PathBuf {
    checkpoint_with(dir, preset, seed, &[])
}

/// [`checkpoint`] with more flags for `turbopi checkpoint random` (`--config-schema openpi`,
/// `--dtype bf16`).
pub fn checkpoint_with(dir: &Path, preset: &str, seed: u64, flags: &[&str]) -> PathBuf {
    let ck = dir.join(preset);
    ok(
        Command::new(bin("turbopi"))
            .args(["checkpoint", "random", "--preset", preset, "--seed"])
            .arg(seed.to_string())
            .args(flags)
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

/// The graph variables a test may set, as `turbopi serve` flags.
const FLAGS: [(&str, &str); 6] = [
    ("TURBOPI_MAX_MESSAGE_MB", "--max-message-mb"),
    ("TURBOPI_REQUEST_TIMEOUT_S", "--request-timeout-s"),
    ("TURBOPI_BACKEND", "--backend"),
    ("TURBOPI_SEED", "--seed"),
    ("TURBOPI_MAX_BATCH", "--max-batch"),
    ("TURBOPI_BATCH_WINDOW_MS", "--batch-window-ms"),
];

/// A serving graph started by `turbopi serve`, stopped (SIGINT) on drop.
pub struct Served {
    child: Option<Child>,
    log: PathBuf,
    pub port: u16,
}

impl Served {
    /// `turbopi serve` of `graphs/GRAPH` (serve.yml, serve_split.yml: `--split`, or
    /// serve_in_process.yml: `--in-process`) serving `ck` for `robot` on a free local port,
    /// its output in `log`, with the `TURBOPI_*` settings `env` (as its flags); returns once
    /// it has said where it serves, checking that `/healthz` then answers.
    pub fn start(
        graph: &str,
        ck: &Path,
        robot: &str,
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Served {
        let port = free_port();
        let file = std::fs::File::create(&log).unwrap();
        dora(); // the CLI must be there; `turbopi serve` finds it the same way (DORA or PATH)
        let mut cmd = Command::new(bin("turbopi"));
        cmd.arg("serve")
            .arg("--checkpoint")
            .arg(ck)
            .args(["--robot", robot, "--host", "127.0.0.1", "--port"])
            .arg(port.to_string());
        match graph {
            "serve.yml" => {}
            "serve_split.yml" => {
                cmd.arg("--split");
            }
            "serve_in_process.yml" => {
                cmd.arg("--in-process");
            }
            other => panic!("no turbopi serve flag for graph {other}"),
        }
        for (k, v) in env {
            let (_, flag) = FLAGS
                .iter()
                .find(|(name, _)| name == k)
                .unwrap_or_else(|| panic!("{k}: no turbopi serve flag for it"));
            cmd.args([*flag, v.as_str()]);
        }
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("turbopi serve");
        let mut s = Served {
            child: Some(child),
            log,
            port,
        };
        let line = format!("serving {robot} on ws://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(180);
        while !s.log_text().lines().any(|l| l == line) {
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "turbopi serve ({graph}) exited with {status}:\n{}",
                    s.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{graph}: turbopi serve did not say `{line}` within 180 s:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            healthz(port).as_deref(),
            Some("OK\n"),
            "turbopi serve said it serves, but /healthz does not answer:\n{}",
            s.log_text()
        );
        s
    }

    /// The `turbopi serve` process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ctrl-C (SIGINT) to `turbopi serve`, which stops the dataflow (the nodes print their
    /// summaries) and exits 0; the log.
    pub fn stop(mut self) -> String {
        let status = self.interrupt();
        let log = self.log_text();
        assert!(
            status.is_some_and(|s| s.success()),
            "turbopi serve did not exit cleanly on SIGINT ({status:?}):\n{log}"
        );
        log
    }

    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        // turbopi serve gives dora run 30 s to stop the nodes, then ends what is left.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.interrupt();
    }
}

/// A process of one of the workspace's binaries (its executable under target/release/).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProcess {
    pub pid: u32,
    /// Clock ticks after boot (field 22 of /proc/PID/stat): a reused pid has another.
    pub start_time: u64,
    pub exe: PathBuf,
}

impl NodeProcess {
    /// The process still runs (a zombie counts: nobody has reaped it).
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(_, start)| start == self.start_time)
    }
}

/// (parent pid, start time) of a process, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    let fields: Vec<&str> = text[text.rfind(')')? + 2..].split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// The processes whose executable is under target/release/ and whose ancestors include
/// `root`, found by scanning /proc.
pub fn node_processes(root: u32) -> Vec<NodeProcess> {
    let release = self::root().join("target/release").canonicalize().unwrap();
    let parents: std::collections::HashMap<u32, (u32, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect();
    let descends = |mut pid: u32| {
        // Bounded: a pid cycle cannot occur, but a racing scan should not loop forever.
        for _ in 0..64 {
            match parents.get(&pid) {
                Some(&(ppid, _)) if ppid == root => return true,
                Some(&(ppid, _)) if ppid > 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    let mut found: Vec<NodeProcess> = parents
        .iter()
        .filter(|(&pid, _)| pid != root && descends(pid))
        .filter_map(|(&pid, &(_, start_time))| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            exe.starts_with(&release).then_some(NodeProcess {
                pid,
                start_time,
                exe,
            })
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
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
