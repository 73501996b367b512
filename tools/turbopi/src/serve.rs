//! `turbopi serve`: openpi's websocket policy server for one checkpoint, in one command. It
//! runs `graphs/serve.yml` (or `serve_split.yml`, `serve_in_process.yml`) under `dora run` with the `TURBOPI_*`
//! variables the graph reads, says where it serves once `/healthz` answers, and on SIGINT or
//! SIGTERM stops the dataflow and makes sure that no process it started outlives it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use operators::backend::BackendKind;
use operators::checkpoint::Checkpoint;
use operators::config::Schema;
use operators::openpi::Robot;

/// `turbopi serve`'s flags. The server's settings carry the names of its env variables
/// (nodes/openpi-server/README.md).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint directory: model.safetensors, config.json (turbo-pi's or openpi's schema),
    /// and assets/<asset_id>/norm_stats.json, as openpi's converter leaves it (the tokenizer
    /// and norm stats are also looked for where openpi keeps them).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The observation and action format: libero, droid or aloha.
    #[arg(long)]
    pub robot: String,
    /// cpu, or cuda (node binaries built with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// The model stages in their own processes (graphs/serve_split.yml).
    #[arg(long, conflicts_with = "in_process")]
    pub split: bool,
    /// The model in the server's own process (graphs/serve_in_process.yml): same answers,
    /// no dataflow hop per request.
    #[arg(long)]
    pub in_process: bool,
    /// Noise seed: frame `seq` uses SEED + seq.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The dataflow to run (default: graphs/serve.yml, or serve_split.yml with --split, of the
    /// source tree this executable was built in).
    #[arg(long)]
    pub graph: Option<PathBuf>,
    /// Assets folder (default CHECKPOINT/assets).
    #[arg(long)]
    pub assets: Option<PathBuf>,
    /// Norm stats in ASSETS/ASSET_ID/norm_stats.json (default: openpi's asset id for the robot).
    #[arg(long)]
    pub asset_id: Option<String>,
    /// norm_stats.json, or `none` (overrides --assets / --asset-id).
    #[arg(long)]
    pub norm_stats: Option<String>,
    /// PaliGemma's tokenizer, a SentencePiece `.model` or a `tokenizer.json` (default: the
    /// search of docs/tokenizer.md: the checkpoint, then openpi's cache); `none`: only
    /// pre-tokenized prompts.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// pi0.5's discrete-state prompt (default: config.json's `discrete_state_input`, else
    /// true for pi0.5; openpi's pi05_libero was trained with false).
    #[arg(long)]
    pub discrete_state: Option<bool>,
    /// Delta-action mask in openpi's make_bool_mask notation (e.g. 6,-1), or none.
    #[arg(long)]
    pub delta_actions: Option<String>,
    /// Prompt for observations without one.
    #[arg(long)]
    pub default_prompt: Option<String>,
    /// Largest request the server reads, in MiB (default 16).
    #[arg(long)]
    pub max_message_mb: Option<u32>,
    /// Seconds a request may wait for its actions (default 60).
    #[arg(long)]
    pub request_timeout_s: Option<f64>,
    /// The most requests the policy runs as one batch, 1 to 8 (default 8).
    #[arg(long)]
    pub max_batch: Option<String>,
    /// Milliseconds the first request of a batch waits for more (default 0: a batch is the
    /// requests already waiting).
    #[arg(long)]
    pub batch_window_ms: Option<String>,
    /// With --in-process: microseconds the policy's thread keeps looking for the next
    /// request before it sleeps (default 0: it sleeps at once). A client in a closed loop
    /// sends again about a millisecond after its answer; a spin past that saves a thread
    /// wake-up per request for the CPU time of the spin.
    #[arg(long)]
    pub spin_us: Option<String>,
    /// Seconds to wait for `/healthz` after starting (loading a full-size model on the CPU
    /// takes a while).
    #[arg(long, default_value_t = 900)]
    pub start_timeout_s: u64,
    /// Seconds `dora run` gets to stop the nodes after an interrupt before they are killed.
    #[arg(long, default_value_t = 30)]
    pub stop_timeout_s: u64,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let robot: Robot = args
        .robot
        .parse()
        .map_err(|e: String| anyhow!("--robot: {e}"))?;
    let _: BackendKind = args.backend.parse().context("--backend")?;
    if let Some(v) = &args.max_batch {
        node_common::parse_max_batch(v).map_err(|e| anyhow!("--max-batch: {e}"))?;
    }
    if let Some(v) = &args.batch_window_ms {
        node_common::parse_batch_window_ms(v).map_err(|e| anyhow!("--batch-window-ms: {e}"))?;
    }
    if let Some(v) = &args.spin_us {
        node_common::parse_spin_us(v).map_err(|e| anyhow!("--spin-us: {e}"))?;
        if !args.in_process && args.graph.is_none() {
            bail!("--spin-us sets the in-process policy's thread: add --in-process");
        }
    }
    let ckpt_dir = checkpoint_dir(&args.checkpoint)?;
    let ckpt = Checkpoint::open(&ckpt_dir)
        .with_context(|| format!("cannot open checkpoint {}", ckpt_dir.display()))?;
    for field in &ckpt.unknown_config_fields {
        eprintln!(
            "warning: {}: unknown field `{field}` ignored",
            ckpt_dir.join("config.json").display()
        );
    }
    let discrete_state = match (args.discrete_state, &ckpt.config_schema) {
        (Some(b), _) => Some(b),
        (None, Schema::Openpi(read)) => read.discrete_state_input,
        (None, Schema::TurboPi) => None,
    };
    let model = if ckpt.config.pi05 { "pi0.5" } else { "pi0" };
    drop(ckpt);
    let graph = match &args.graph {
        Some(g) => g
            .canonicalize()
            .with_context(|| format!("--graph {}", g.display()))?,
        None => default_graph(if args.split {
            "serve_split.yml"
        } else if args.in_process {
            "serve_in_process.yml"
        } else {
            "serve.yml"
        })?,
    };
    check_node_binaries(&graph)?;
    let dora = dora_cli()?;
    let probe = probe_addr(&args.host, args.port)?;
    port_free(&args.host, args.port)?;

    let mut cmd = Command::new(&dora);
    cmd.arg("run").arg(&graph);
    cmd.env("TURBOPI_CHECKPOINT", &ckpt_dir)
        .env("TURBOPI_ROBOT", robot.name())
        .env("TURBOPI_HOST", &args.host)
        .env("TURBOPI_PORT", args.port.to_string())
        .env("TURBOPI_BACKEND", &args.backend)
        .env("TURBOPI_SEED", args.seed.to_string());
    let optional = [
        ("TURBOPI_ASSET_ID", args.asset_id.clone()),
        ("TURBOPI_NORM_STATS", args.norm_stats.clone()),
        (
            "TURBOPI_TOKENIZER",
            args.tokenizer.as_deref().map(path_text),
        ),
        ("TURBOPI_DEFAULT_PROMPT", args.default_prompt.clone()),
        (
            "TURBOPI_MAX_MESSAGE_MB",
            args.max_message_mb.map(|v| v.to_string()),
        ),
        (
            "TURBOPI_REQUEST_TIMEOUT_S",
            args.request_timeout_s.map(|v| v.to_string()),
        ),
        ("TURBOPI_MAX_BATCH", args.max_batch.clone()),
        ("TURBOPI_BATCH_WINDOW_MS", args.batch_window_ms.clone()),
        ("TURBOPI_SPIN_US", args.spin_us.clone()),
        // The graphs do not pass these to the server: under `dora run` every node inherits
        // this environment, and only openpi-server reads them.
        ("ASSETS", args.assets.as_deref().map(path_text)),
        ("DISCRETE_STATE", discrete_state.map(|b| b.to_string())),
        ("DELTA_ACTIONS", args.delta_actions.clone()),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            cmd.env(name, v);
        }
    }
    eprintln!(
        "turbopi serve: {model} from {} for {} on the {} backend, {} (dora run {})",
        ckpt_dir.display(),
        robot.name(),
        args.backend,
        if args.split {
            "one process per stage"
        } else if args.in_process {
            "the policy in the server's process"
        } else {
            "fused policy"
        },
        graph.display()
    );

    signals::install()?;
    // The dataflow gets its own process group, so a Ctrl-C at the terminal reaches only this
    // process, which forwards exactly one interrupt (a second one makes dora abort).
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", dora.display()))?;
    let started = Instant::now();
    let start_timeout = Duration::from_secs(args.start_timeout_s);
    let mut serving = false;
    let outcome: Result<()> = loop {
        if let Some(sig) = signals::received() {
            eprintln!("turbopi serve: {sig}: stopping the dataflow");
            break Ok(());
        }
        if let Some(status) = child.try_wait().context("waiting for dora run")? {
            let reaped = leftovers::end(child.id());
            break Err(anyhow!(
                "dora run exited with {status} {}{}",
                if serving {
                    "while serving"
                } else {
                    "before the server answered on /healthz (its output is above)"
                },
                reaped_note(reaped)
            ));
        }
        if !serving {
            if healthz_ok(probe) {
                serving = true;
                println!(
                    "serving {} on ws://{}:{}",
                    robot.name(),
                    args.host,
                    args.port
                );
                let _ = std::io::stdout().flush();
            } else if started.elapsed() > start_timeout {
                eprintln!(
                    "turbopi serve: /healthz did not answer within {} s: stopping",
                    args.start_timeout_s
                );
                let _ = stop(&mut child, Duration::from_secs(args.stop_timeout_s));
                bail!(
                    "the server did not answer on {probe} within {} s (--start-timeout-s)",
                    args.start_timeout_s
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    outcome?;
    let (status, reaped) = stop(&mut child, Duration::from_secs(args.stop_timeout_s))?;
    eprintln!(
        "turbopi serve: stopped (dora run exited with {status}){}",
        reaped_note(reaped)
    );
    Ok(())
}

fn reaped_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!("; {n} process(es) it left behind were ended"),
    }
}

fn path_text(p: &Path) -> String {
    p.display().to_string()
}

/// The checkpoint folder, absolute (the graph resolves relative paths against its own folder).
fn checkpoint_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!(
            "checkpoint {} does not exist or is not a folder (expected model.safetensors and config.json in it; openpi's examples/convert_jax_model_to_pytorch.py writes both)",
            dir.display()
        );
    }
    dir.canonicalize()
        .with_context(|| format!("checkpoint {}", dir.display()))
}

/// `graphs/NAME` of the source tree the executable lives in (target/release/turbopi).
fn default_graph(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .and_then(|e| e.canonicalize())
        .context("cannot locate the turbopi executable")?;
    exe.ancestors()
        .skip(1)
        .map(|dir| dir.join("graphs").join(name))
        .find(|g| g.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no graphs/{name} in any folder above {}: pass --graph FILE",
                exe.display()
            )
        })
}

/// Every node's executable (`path:` relative to the graph) must exist: dora's own message
/// for a missing one comes late and buried in its log.
fn check_node_binaries(graph: &Path) -> Result<()> {
    let text = operators::fsio::read_string_limited(
        graph,
        operators::fsio::limit::GRAPH_YAML,
        "dataflow",
    )?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}", graph.display()))?;
    let base = graph.parent().unwrap_or(Path::new("."));
    let nodes = doc
        .get("nodes")
        .and_then(|n| n.as_sequence())
        .ok_or_else(|| anyhow!("{}: no `nodes` list", graph.display()))?;
    for node in nodes {
        let id = node.get("id").and_then(|v| v.as_str()).unwrap_or("?");
        let Some(path) = node.get("path").and_then(|v| v.as_str()) else {
            continue;
        };
        let exe = base.join(path);
        if path.contains('/') && !exe.is_file() {
            bail!(
                "{}: node `{id}`: {} is missing: build the nodes with `cargo build --release --workspace`{}",
                graph.display(),
                exe.display(),
                " (and `-p policy -p vision -p prefix -p denoise -p openpi-server --features cuda` for --backend cuda)"
            );
        }
    }
    Ok(())
}

/// The dora CLI: `DORA` (as in the tests) or `dora` on the PATH; it must answer --version.
fn dora_cli() -> Result<PathBuf> {
    let set = std::env::var_os("DORA");
    let dora = PathBuf::from(set.clone().unwrap_or_else(|| "dora".into()));
    const INSTALL: &str = "pip install dora-rs-cli==1.1.0";
    match Command::new(&dora).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(dora),
        Ok(out) => bail!(
            "`{} --version` failed ({}): reinstall the dora CLI with `{INSTALL}`",
            dora.display(),
            out.status
        ),
        Err(e) if set.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no dora CLI on PATH: install it with `{INSTALL}` (or set DORA to its path)")
        }
        Err(e) => bail!(
            "the dora CLI `{}` cannot be run ({e}): install it with `{INSTALL}`",
            dora.display()
        ),
    }
}

/// Where to ask for `/healthz`: the host itself, or loopback for a wildcard address.
fn probe_addr(host: &str, port: u16) -> Result<SocketAddr> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--host {host}: not an address"))?
        .next()
        .ok_or_else(|| anyhow!("--host {host}: no address"))?;
    Ok(match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], port)),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
        }
        _ => addr,
    })
}

/// Refuses a port something already listens on (the server would fail later, in its log).
fn port_free(host: &str, port: u16) -> Result<()> {
    match TcpListener::bind((host, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {port} on {host} is busy: another process listens there (an earlier `turbopi serve`?); stop it or pick another --port"
        ),
        Err(e) => bail!("cannot listen on {host}:{port}: {e}"),
    }
}

/// True when `GET /healthz` at `addr` answers 200.
fn healthz_ok(addr: SocketAddr) -> bool {
    let ask = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut r = Vec::new();
        s.take(4096).read_to_end(&mut r)?;
        Ok(r.starts_with(b"HTTP/1.1 200"))
    };
    ask().unwrap_or(false)
}

/// One interrupt to `dora run` (it stops the nodes), a wait of `grace`, then SIGKILL to its
/// process group; last, every process it left behind is ended. Returns dora's exit status
/// and how many leftovers were ended.
fn stop(child: &mut Child, grace: Duration) -> Result<(ExitStatus, usize)> {
    let pid = child.id();
    signals::send(pid as i32, signals::SIGINT);
    let deadline = Instant::now() + grace;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for dora run")? {
            break status;
        }
        if Instant::now() > deadline || signals::count() > 1 {
            eprintln!(
                "turbopi serve: dora run did not stop{}: killing it",
                if signals::count() > 1 {
                    " before a second signal"
                } else {
                    " in time"
                }
            );
            signals::send(-(pid as i32), signals::SIGKILL);
            break child.wait().context("waiting for dora run")?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((status, leftovers::end(pid)))
}

/// Ending what `dora run` leaves behind. This process is made a child subreaper
/// ([`signals::install`]), so a node that outlives `dora run` is re-parented here and not
/// to init: it is found by its parent (this process) or by dora's process group.
mod leftovers {
    use std::time::{Duration, Instant};

    use super::signals;

    /// (pid, parent pid, process group, state) of every process, from /proc/*/stat.
    fn processes() -> Vec<(i32, i32, i32, char)> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return vec![];
        };
        dir.filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split_whitespace();
            let state = f.next()?.chars().next()?;
            let ppid = f.next()?.parse().ok()?;
            let pgrp = f.next()?.parse().ok()?;
            Some((pid, ppid, pgrp, state))
        })
        .collect()
    }

    /// Live processes that are ours to end: children of this process (dora run is waited
    /// for already, so these are re-parented leftovers); without a subreaper, the members of
    /// dora's process group.
    fn survivors(dora: i32) -> Vec<i32> {
        let me = std::process::id() as i32;
        let subreaper = signals::is_subreaper();
        processes()
            .into_iter()
            .filter(|&(pid, ppid, pgrp, _)| {
                pid != me && (ppid == me || (!subreaper && pgrp == dora))
            })
            .filter(|&(_, _, _, state)| state != 'Z')
            .map(|(pid, ..)| pid)
            .collect()
    }

    /// SIGTERM to every survivor, SIGKILL to those alive after 5 s, then reaps the zombies
    /// that are this process's children. Returns how many there were.
    pub fn end(dora: u32) -> usize {
        let dora = dora as i32;
        let first = survivors(dora);
        for &pid in &first {
            signals::send(pid, signals::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            signals::reap();
            let left = survivors(dora);
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for pid in left {
                    signals::send(pid, signals::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(100));
                signals::reap();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        first.len()
    }
}

/// SIGINT / SIGTERM noted by an async-signal-safe handler and polled by the serve loop; the
/// few libc calls this needs (std links libc; the crate has no binding of its own).
mod signals {
    use std::os::raw::{c_int, c_ulong};
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

    pub const SIGINT: c_int = 2;
    pub const SIGKILL: c_int = 9;
    pub const SIGTERM: c_int = 15;
    const PR_SET_CHILD_SUBREAPER: c_int = 36;
    const WNOHANG: c_int = 1;
    const SIG_ERR: usize = usize::MAX;

    extern "C" {
        fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
        fn kill(pid: c_int, sig: c_int) -> c_int;
        fn prctl(option: c_int, ...) -> c_int;
        fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    }

    static LAST: AtomicI32 = AtomicI32::new(0);
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static SUBREAPER: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(sig: c_int) {
        // Only lock-free atomics: async-signal-safe.
        LAST.store(sig, Ordering::SeqCst);
        COUNT.fetch_add(1, Ordering::SeqCst);
    }

    /// Catches SIGINT and SIGTERM, and makes this process the subreaper of its descendants.
    pub fn install() -> anyhow::Result<()> {
        for sig in [SIGINT, SIGTERM] {
            // SAFETY: `on_signal` only touches atomics, which is async-signal-safe; glibc's
            // and musl's `signal` install it with BSD semantics (kept after delivery,
            // interrupted system calls restarted).
            if unsafe { signal(sig, on_signal) } == SIG_ERR {
                anyhow::bail!("cannot install a handler for signal {sig}");
            }
        }
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and changes only how
        // orphaned descendants are re-parented. Failure (a kernel before 3.4) is tolerated:
        // leftovers are then looked for by their process group.
        let ok = unsafe { prctl(PR_SET_CHILD_SUBREAPER, 1 as c_ulong) } == 0;
        SUBREAPER.store(ok, Ordering::SeqCst);
        Ok(())
    }

    /// Whether orphaned descendants are re-parented to this process.
    pub fn is_subreaper() -> bool {
        SUBREAPER.load(Ordering::SeqCst)
    }

    /// The name of the last signal received, if any.
    pub fn received() -> Option<&'static str> {
        match LAST.load(Ordering::SeqCst) {
            0 => None,
            SIGINT => Some("interrupted (SIGINT)"),
            SIGTERM => Some("terminated (SIGTERM)"),
            _ => Some("signal"),
        }
    }

    /// How many signals have arrived.
    pub fn count() -> usize {
        COUNT.load(Ordering::SeqCst)
    }

    /// `kill(pid, sig)`; a process that is already gone is not an error here.
    pub fn send(pid: c_int, sig: c_int) {
        // SAFETY: kill has no memory-safety preconditions; callers pass a pid they started
        // (or its process group, negated), never 0 or -1.
        if pid != 0 && pid != -1 {
            unsafe { kill(pid, sig) };
        }
    }

    /// Reaps every exited child (zombies left by re-parented processes).
    pub fn reap() {
        let mut status: c_int = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks. std's `Child` for
        // dora run has been waited for already, so no status it needs is taken here.
        while unsafe { waitpid(-1, &mut status, WNOHANG) } > 0 {}
    }
}
