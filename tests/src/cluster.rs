//! A dora coordinator and named daemons on this host, each on ports of its own, for the
//! dataflows placed on several machines (graphs/remote.yml). The daemons reach each other over
//! explicit zenoh endpoints on loopback (no multicast: other dora instances on the host stay
//! out), as two hosts would. Every process started here carries `TURBOPI_CLUSTER_ID=<unique>`
//! in its environment, which nodes inherit from their daemon; dropping the cluster stops its
//! dataflows, tears the daemons down and kills by pid whatever still carries the mark (a node
//! whose daemon was killed keeps running, reparented to init).

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dataflow::{dora, root};

/// The environment variable that marks a cluster's processes.
pub const MARKER: &str = "TURBOPI_CLUSTER_ID";

struct Daemon {
    child: Option<Child>,
    local_port: u16,
    zenoh_port: u16,
}

pub struct Cluster {
    _tmp: tempfile::TempDir,
    /// The daemons' working folder; their logs are in `dir/out/`.
    pub dir: PathBuf,
    /// The coordinator's port.
    pub port: u16,
    marker: String,
    env: Vec<(String, OsString)>,
    coordinator: Option<Child>,
    /// In start order: each daemon dials the zenoh endpoints of those before it.
    daemons: Vec<(String, Daemon)>,
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl Cluster {
    /// A coordinator and one daemon per machine id, in order, each registered before the
    /// next starts; `env` is given to all of them (and so to every node).
    pub fn start(machines: &[&str], env: &[(&str, OsString)]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("daemons");
        std::fs::create_dir_all(&dir).unwrap();
        // dora 1.1 runs the nodes of a placed dataflow in `<daemon's folder>/_work/<session>`
        // joined with `working_dir` (remote.yml: ../../graphs): a `graphs` link here leads
        // them to the real graphs/ without writing into the source tree.
        std::os::unix::fs::symlink(root().join("graphs"), dir.join("graphs")).unwrap();
        let marker = format!(
            "test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let mut cluster = Cluster {
            _tmp: tmp,
            dir,
            port: free_port(),
            marker,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            coordinator: None,
            daemons: Vec::new(),
        };
        let log = cluster.log_file("coordinator");
        let child = cluster
            .command()
            .args(["coordinator", "--store", "memory", "--port"])
            .arg(cluster.port.to_string())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dora coordinator starts");
        cluster.coordinator = Some(child);
        for m in machines {
            cluster.daemons.push((
                m.to_string(),
                Daemon {
                    child: None,
                    local_port: free_port(),
                    zenoh_port: free_port(),
                },
            ));
            cluster.start_daemon(m);
        }
        cluster
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.log")))
            .unwrap()
    }

    /// The log of the coordinator or of a daemon (by machine id), as far as written.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// The dora CLI with the cluster's environment and mark, in the daemons' folder.
    fn command(&self) -> Command {
        let mut cmd = dora();
        cmd.current_dir(&self.dir)
            .env(MARKER, &self.marker)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// `dora ARGS --coordinator-port PORT` as a client of this cluster (not marked: it is
    /// the caller's to wait for).
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = dora();
        cmd.args(args)
            .arg("--coordinator-port")
            .arg(self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// (Re)starts the daemon of `machine` and waits until the coordinator lists it.
    pub fn start_daemon(&mut self, machine: &str) {
        let i = self
            .daemons
            .iter()
            .position(|(m, _)| m == machine)
            .unwrap_or_else(|| panic!("no daemon `{machine}` in this cluster"));
        let d = &self.daemons[i].1;
        let mut cmd = self.command();
        cmd.args(["daemon", "--machine-id", machine, "--zenoh-no-multicast"])
            .arg("--coordinator-port")
            .arg(self.port.to_string())
            .arg("--local-listen-port")
            .arg(d.local_port.to_string())
            .arg("--zenoh-listen")
            .arg(format!("127.0.0.1:{}", d.zenoh_port));
        for (_, earlier) in &self.daemons[..i] {
            cmd.arg("--zenoh-connect")
                .arg(format!("tcp/127.0.0.1:{}", earlier.zenoh_port));
        }
        let log = self.log_file(&format!("daemon-{machine}"));
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dora daemon starts");
        self.daemons[i].1.child = Some(child);
        self.wait_until(Duration::from_secs(60), "the daemon registers", |c| {
            c.connected().iter().any(|m| m == machine)
        });
    }

    /// Kills the daemon of `machine` (SIGKILL, as a crash or a power cut would), not its nodes.
    pub fn kill_daemon(&mut self, machine: &str) {
        let d = self
            .daemons
            .iter_mut()
            .find(|(m, _)| m == machine)
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("no daemon `{machine}` in this cluster"));
        if let Some(mut child) = d.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The machine ids of the daemons the coordinator lists.
    pub fn connected(&self) -> Vec<String> {
        let Ok(out) = self.cli(&["cluster", "status"]).output() else {
            return vec![];
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let id = l.split_whitespace().next()?;
                // `<machine>-<uuid v7>`: the machine id is what precedes the last 5 fields.
                let parts: Vec<&str> = id.split('-').collect();
                (parts.len() > 5).then(|| parts[..parts.len() - 5].join("-"))
            })
            .collect()
    }

    /// Polls `done` every 100 ms until it holds; panics naming `what` after `limit`.
    pub fn wait_until(&self, limit: Duration, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting until {what}; coordinator log:\n{}",
                    self.log("coordinator")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of the processes that carry this cluster's mark.
    pub fn marked_pids(&self) -> Vec<u32> {
        let want = format!("{MARKER}={}", self.marker);
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return vec![];
        };
        procs
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()))
            })
            .collect()
    }

    /// Pids of this cluster's processes running the executable `name` (a node binary).
    pub fn pids_of(&self, name: &str) -> Vec<u32> {
        self.marked_pids()
            .into_iter()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .and_then(|p| Some(p.file_name()?.to_str()? == name))
                    .unwrap_or(false)
            })
            .collect()
    }
}

/// Sends SIGKILL to `pid` (a process of a cluster, found by its mark).
pub fn kill_pid(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let quiet = |mut c: Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        quiet(self.cli(&["stop", "--all", "--grace-duration", "2s"]));
        quiet(self.cli(&["down", "--force"]));
        for child in self
            .daemons
            .iter_mut()
            .filter_map(|(_, d)| d.child.as_mut())
            .chain(self.coordinator.as_mut())
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Nodes left by a killed daemon, and anything the teardown missed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.marked_pids();
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            left.into_iter().for_each(kill_pid);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The dataflow id `dora start` printed.
pub fn dataflow_id(start_output: &str) -> Option<String> {
    start_output.split_whitespace().find_map(|w| {
        let w = w.trim_matches(|c: char| !c.is_ascii_hexdigit() && c != '-');
        (w.len() == 36 && w.matches('-').count() == 4).then(|| w.to_string())
    })
}

/// The lines of a node's log (`graphs/out/<dataflow>/log_<node>.jsonl`) as their messages.
pub fn node_log(dataflow: &str, node: &str) -> Vec<String> {
    let path: PathBuf = Path::new(&root())
        .join("graphs/out")
        .join(dataflow)
        .join(format!("log_{node}.jsonl"));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(v["msg"].as_str()?.to_string())
        })
        .collect()
}
