//! A serving soak with the real dora CLI: `graphs/serve.yml` (the openpi server in front of
//! the fused CPU policy, a random pi05-small checkpoint) under several openpi-client 0.1.2
//! clients, bad requests mixed in, and the policy process stopped (SIGSTOP) and resumed
//! (SIGCONT) at random moments, for `DURATION_S` seconds (tools/openpi/soak.py drives it; its
//! random choices come from `SEED`). What must hold:
//! - every well-formed request is answered with float64 actions `[HORIZON, 7]`, and a few of
//!   them (some sent while the policy was stopped) equal `turbopi infer --openpi` with the
//!   frame's seed, bit for bit;
//! - every bad request is refused with a text frame starting `turbo-pi: ` that names it, then
//!   close 1011;
//! - no frame is lost: the policy ran exactly the answered frames with no gap and rejected
//!   none, and the server counts as served and failed exactly what the clients saw;
//! - no request comes near `REQUEST_TIMEOUT_S`.
//!
//! No request a LIBERO client can send reaches the policy as a bad frame: the server checks
//! everything the policy checks (token ids, prompt length, shapes), and its two cameras are
//! always there, so even a prompt with no real token (all-false `tokenized_prompt_mask`, or
//! an empty `tokenized_prompt`) shows the model something. Those are sent as good requests and
//! must be answered; the policy's `rejected` path is tested in nodes/policy.
//!
//! Needs the workspace built in release, the dora CLI and Python 3 with openpi-client 0.1.2 in
//! target/python/openpi-client (tools/test.sh installs both).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use operators::npy;
use tests::dataflow::{bin, ok, root};
use tests::serving::{checkpoint, openpi_client_path, Served};

const HORIZON: usize = 10;
const MAX_MESSAGE_MB: usize = 4;
/// Well-formed openpi clients at once (plus one sending bad requests): a pause queues up to
/// this many frames, 3 messages each, at the policy.
const CLIENTS: usize = 6;
/// Seconds of load.
const DURATION_S: u64 = 35;
/// Seeds the soak's random choices: observations, the bad requests' order and moments, the
/// pauses' moments and lengths.
const SEED: u64 = 12;
/// The server's REQUEST_TIMEOUT_S. A request waits for the frames ahead of it (at most one per
/// other client: the policy runs them in order, tens of ms each here) and for at most one
/// pause (1 s); a third of the timeout is far above that and far below the timeout.
const REQUEST_TIMEOUT_S: u64 = 30;
const MAX_ROUND_TRIP_MS: f64 = REQUEST_TIMEOUT_S as f64 * 1e3 / 3.0;

/// The parent of every process (from /proc/PID/stat).
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            map.insert(pid, ppid);
        }
    }
    map
}

/// The `policy` node's process: the one descendant of `dora run` (pid `dora`) running
/// target/release/policy.
fn policy_pid(dora: u32) -> u32 {
    let exe = bin("policy").canonicalize().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let parents = parents();
        let mut found = vec![];
        let mut queue = VecDeque::from([dora]);
        while let Some(p) = queue.pop_front() {
            for (&child, _) in parents.iter().filter(|(_, &pp)| pp == p) {
                if std::fs::read_link(format!("/proc/{child}/exe"))
                    .ok()
                    .as_ref()
                    == Some(&exe)
                {
                    found.push(child);
                }
                queue.push_back(child);
            }
        }
        match found[..] {
            [pid] => return pid,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => panic!(
                "expected one process of {} under dora run (pid {dora}), found {found:?}",
                exe.display()
            ),
        }
    }
}

/// The number just before `label` in `line` (`... 12 frames rejected ...`).
fn count_before(line: &str, label: &str) -> Option<u64> {
    let (before, _) = line.split_once(label)?;
    before.trim_end().rsplit(' ').next()?.parse().ok()
}

/// The last line of `log` holding `needle`.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .rev()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in the dataflow's log:\n{log}"))
}

/// The robot actions `turbopi infer --openpi` gives for a saved observation with `seed`.
fn infer(ck: &Path, obs: &Path, seed: u64) -> npy::Array<f64> {
    let out = obs.with_extension(format!("seed{seed}.npy"));
    ok(
        Command::new(bin("turbopi"))
            .args(["infer", "--steps", "10", "--seed", &seed.to_string()])
            .arg("--checkpoint")
            .arg(ck)
            .arg("--openpi")
            .arg(obs)
            .args(["--robot", "libero", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
        "turbopi infer --openpi",
    );
    npy::read_f64(&out).unwrap()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn serving_soak_with_bad_requests_and_a_paused_policy() {
    let started = Instant::now();
    for b in ["openpi-server", "policy", "turbopi"] {
        bin(b);
    }
    let py = openpi_client_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ck = checkpoint(dir, "pi05-small", 11);
    let env = [
        ("TURBOPI_MAX_MESSAGE_MB", MAX_MESSAGE_MB.to_string()),
        ("TURBOPI_REQUEST_TIMEOUT_S", REQUEST_TIMEOUT_S.to_string()),
    ];
    let served = Served::start("serve.yml", &ck, "libero", dir.join("serve.log"), &env);
    let policy = policy_pid(served.pid());

    let out = Command::new("python3")
        .arg(root().join("tools/openpi/soak.py"))
        .env("PYTHONPATH", &py)
        .args(["--port", &served.port.to_string()])
        .args(["--horizon", &HORIZON.to_string()])
        .args(["--max-message-mb", &MAX_MESSAGE_MB.to_string()])
        .args(["--duration", &DURATION_S.to_string()])
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--pause-pid", &policy.to_string()])
        .arg("--out")
        .arg(dir.join("checked"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    // Whatever happened to the driver, the policy must not stay stopped.
    let _ = Command::new("kill")
        .args(["-CONT", &policy.to_string()])
        .status();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "soak.py ({}) printed no summary ({e}):\n{stdout}\nlog:\n{}",
            out.status,
            served.log_text()
        )
    });
    let log = served.stop();
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert!(
        out.status.success() && r["failures"].as_array().is_some_and(|f| f.is_empty()),
        "soak.py failed: {}\nlog:\n{log}",
        r["failures"]
    );

    // Every good request answered; enough of them, and of every kind, to mean something.
    let (good, bad, pauses) = (&r["good"], &r["bad"], &r["pauses"]);
    let answered = u(&good["answered"]);
    assert_eq!(answered, u(&good["sent"]), "{good}");
    assert!(
        answered >= 10 * CLIENTS as u64,
        "only {answered} good requests: {good}"
    );
    for variant in ["prompt", "tokenized prompt", "prompt mask all false"] {
        assert!(
            u(&good["by_variant"][variant]) > 0,
            "no `{variant}` request: {good}"
        );
    }
    // Every bad request refused, and every kind of bad request sent at least once.
    let refused = u(&bad["refused"]);
    assert_eq!(refused, u(&bad["sent"]), "{bad}");
    for case in bad["cases"].as_array().unwrap() {
        let case = case.as_str().unwrap();
        assert!(
            u(&bad["by_reason"][case]) > 0,
            "`{case}` was never sent: {bad}"
        );
    }
    // The policy was really stopped, again and again.
    let injected = u(&pauses["injected"]);
    assert!(injected >= 10, "{pauses}");
    assert_eq!(u(&pauses["confirmed_stopped"]), injected, "{pauses}");
    assert!(f(&pauses["max_s"]) <= 1.5, "{pauses}");
    // Bounded time per request.
    for (what, rt) in [
        ("good", &good["round_trip_ms"]),
        ("bad", &bad["round_trip_ms"]),
    ] {
        assert!(
            f(&rt["max"]) < MAX_ROUND_TRIP_MS,
            "a {what} request took {} ms (REQUEST_TIMEOUT_S {REQUEST_TIMEOUT_S}): {rt}",
            rt["max"]
        );
    }

    // No frame lost: the policy ran exactly the answered frames, in order, rejected none; the
    // server counts what the clients saw, and nothing timed out or arrived unasked.
    let summary = line_with(&log, "frames rejected,");
    let frames = count_before(summary, " frames,");
    let gaps = count_before(summary, " gaps,");
    let rejected = count_before(summary, " frames rejected,");
    let refused_msgs = count_before(summary, " messages refused");
    assert_eq!(
        (frames, gaps, rejected, refused_msgs),
        (Some(answered), Some(0), Some(0), Some(0)),
        "policy summary: {summary}"
    );
    let server = line_with(&log, " requests served, ");
    assert_eq!(
        (
            count_before(server, " requests served"),
            count_before(server, " failed")
        ),
        (Some(answered), Some(refused)),
        "server summary: {server}"
    );
    let closings = log
        .lines()
        .filter(|l| l.contains("; closing with 1011"))
        .count();
    assert_eq!(closings as u64, refused, "failed requests in the log");
    for never in [
        "no actions for this observation",
        "the policy rejected this observation",
        "with no request waiting",
        "rejected frame",
        "rejected message",
    ] {
        assert!(!log.contains(never), "the log holds {never:?}:\n{log}");
    }

    // Checked frames equal `turbopi infer` with their frame's seed (SEED 0 + seq); the seq
    // lies in the window the driver bounded it to.
    let checked = r["checked"].as_array().unwrap();
    assert!(checked.len() >= 2, "{checked:?}");
    assert!(
        checked.iter().any(|c| c["during_pause"] == true),
        "{checked:?}"
    );
    let mut seqs = vec![];
    for c in checked {
        let obs = PathBuf::from(c["observation"].as_str().unwrap());
        let got = npy::read_f64(Path::new(c["actions"].as_str().unwrap())).unwrap();
        let (lo, hi) = (u(&c["seq_lo"]), u(&c["seq_hi"]));
        assert!(lo <= hi && hi < answered, "{c}");
        let seq = (lo..=hi).find(|&seq| infer(&ck, &obs, seq) == got);
        let seq = seq.unwrap_or_else(|| {
            panic!(
                "{}: no seed in {lo}..={hi} gives the served actions",
                obs.display()
            )
        });
        seqs.push(seq);
    }

    let rt = &good["round_trip_ms"];
    println!(
        "soak: {CLIENTS} clients for {DURATION_S} s (seed {SEED}): {answered} good requests answered {}, {refused} bad refused {}, {injected} pauses of the policy ({:.1} s in all); round trip p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; frames {seqs:?} equal turbopi infer; {:.0} s in all",
        good["by_variant"],
        bad["by_reason"],
        f(&pauses["total_s"]),
        f(&rt["p50"]),
        f(&rt["p99"]),
        f(&rt["max"]),
        started.elapsed().as_secs_f64(),
    );
}
