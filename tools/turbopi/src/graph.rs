//! `turbopi graph check`: reads a dataflow with dora's own descriptor types, builds a petgraph
//! graph of its nodes and edges, and reports every problem with the node and input it
//! concerns: unknown sources, inputs of the wrong kind for a turbo-pi stage, cycles, missing
//! checkpoints and prompts, and bad env values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dora_message::config::InputMapping;
use dora_message::descriptor::{Descriptor, EnvValue, Node};
use operators::checkpoint::Checkpoint;
use operators::{fsio, Config};
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

/// The turbo-pi node kinds, recognised by the file name of a node's `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Camera,
    Decode,
    Vision,
    Prefix,
    Denoise,
    Postprocess,
    Policy,
    ActionSink,
    /// Executes chunks at the control rate and asks the camera for the next observation.
    ActionQueue,
    /// openpi's websocket protocol in front of the policy: frames out, actions back in.
    OpenpiServer,
}

impl Kind {
    pub(crate) fn from_path(path: &str) -> Option<Kind> {
        let name = Path::new(path).file_name()?.to_str()?;
        let name = name.strip_suffix(".exe").unwrap_or(name);
        Some(match name {
            "camera" => Kind::Camera,
            "decode" => Kind::Decode,
            "vision" => Kind::Vision,
            "prefix" => Kind::Prefix,
            "denoise" => Kind::Denoise,
            "postprocess" => Kind::Postprocess,
            "policy" => Kind::Policy,
            "action-sink" => Kind::ActionSink,
            "action-queue" => Kind::ActionQueue,
            "openpi-server" => Kind::OpenpiServer,
            _ => return None,
        })
    }

    /// (input id, accepted message kinds, required).
    fn inputs(self) -> &'static [(&'static str, &'static [Msg], bool)] {
        use Msg::*;
        match self {
            Kind::Camera => &[("request", &[Request], false)],
            Kind::Decode => &[("frames", &[Frames], true)],
            Kind::Vision => &[("images", &[Images], true), ("release", &[Release], false)],
            Kind::Prefix => &[
                ("image_embeddings", &[ImageEmbeddings], true),
                ("release", &[Release], false),
                ("tokens", &[Tokens], false),
            ],
            Kind::Denoise => &[("kv_cache", &[KvCache], true), ("state", &[State], false)],
            Kind::Policy => &[
                ("images", &[Images], true),
                ("state", &[State], false),
                ("tokens", &[Tokens], false),
                ("guide", &[Guide], false),
            ],
            Kind::Postprocess => &[("actions", &[ModelActions], true)],
            Kind::ActionSink => &[("actions", &[ModelActions, RobotActions], true)],
            Kind::ActionQueue => &[("actions", &[ModelActions, RobotActions], true)],
            Kind::OpenpiServer => &[
                ("actions", &[ModelActions], true),
                (REJECTED_INPUTS, &[Rejections], false),
            ],
        }
    }

    /// The input of this kind that `input_id` is: its entry in [`Kind::inputs`].
    fn input(self, input_id: &str) -> Option<&'static (&'static str, &'static [Msg], bool)> {
        self.inputs().iter().find(|(name, _, _)| {
            *name == input_id
                || name
                    .strip_suffix('*')
                    .is_some_and(|prefix| input_id.starts_with(prefix))
        })
    }

    pub(crate) fn output(self, id: &str) -> Option<Msg> {
        Some(match (self, id) {
            (Kind::Camera, "frames") => Msg::Frames,
            (Kind::Camera, "state") => Msg::State,
            (Kind::Decode, "images") => Msg::Images,
            // A robot-side decode (`ENCODE: raw|jpeg`) passes resized frames to another decode.
            (Kind::Decode, "frames") => Msg::Frames,
            (Kind::Vision, "image_embeddings") => Msg::ImageEmbeddings,
            (Kind::Prefix, "kv_cache") => Msg::KvCache,
            (Kind::Denoise | Kind::Policy, "actions") => Msg::ModelActions,
            (Kind::Postprocess, "actions") => Msg::RobotActions,
            // One action per tick, in the space of the chunks it executes (model actions in
            // the shipped graphs: postprocess comes after the queue).
            (Kind::ActionQueue, "action") => Msg::ModelActions,
            (Kind::ActionQueue, "request") => Msg::Request,
            (Kind::ActionQueue, "guide") => Msg::Guide,
            (Kind::Prefix | Kind::Denoise, "release") => Msg::Release,
            (Kind::OpenpiServer, "images") => Msg::Images,
            (Kind::OpenpiServer, "state") => Msg::State,
            (Kind::OpenpiServer, "tokens") => Msg::Tokens,
            (Kind::Vision | Kind::Prefix | Kind::Denoise | Kind::Policy, "rejected") => {
                Msg::Rejections
            }
            _ => return None,
        })
    }
}

/// What flows along an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    Frames,
    State,
    Images,
    ImageEmbeddings,
    KvCache,
    ModelActions,
    RobotActions,
    /// CUDA IPC ring slots handed back to their producer.
    Release,
    /// A frame's prompt (i32 token ids with a `token_mask`).
    Tokens,
    /// Frames a stage refused, with the reason (Utf8), for the server to answer at once.
    Rejections,
    /// An action queue's request for the next observation (the frame's seq).
    Request,
    /// Real-time chunking's guide of a requested frame: the actions still planned and the
    /// delay in ticks.
    Guide,
}

/// The openpi server's inputs for rejections: any id starting with `rejected` (one per stage
/// that can refuse a frame, e.g. `rejected_vision`, `rejected_prefix`).
const REJECTED_INPUTS: &str = "rejected*";

impl Msg {
    fn describe(self) -> &'static str {
        match self {
            Msg::Frames => "camera frames (encoded or raw u8)",
            Msg::State => "robot state (f32 [action_dim])",
            Msg::Images => "images (u8 [num_images, size, size, 3])",
            Msg::ImageEmbeddings => "image embeddings (f32 [tokens, vlm_width])",
            Msg::KvCache => "the prefix K/V cache (f32 [layers, 2, len, kv_width])",
            Msg::ModelActions => "model actions (f32 [horizon, action_dim])",
            Msg::RobotActions => "robot actions (f32 [horizon, robot_dims])",
            Msg::Release => "ring slot releases (CUDA IPC)",
            Msg::Tokens => "prompt tokens (i32 [L] with token_mask)",
            Msg::Rejections => "rejected frames (Utf8 reason with the frame's seq)",
            Msg::Request => "observation requests (the seq of the frame to capture)",
            Msg::Guide => "RTC guides (f32 [leftover, action_dim] with delay_ticks)",
        }
    }
}

/// The result of a check: problems found, and the graph's size.
pub struct Report {
    pub nodes: usize,
    pub edges: usize,
    pub errors: Vec<String>,
}

fn env_str(v: &EnvValue) -> String {
    match v {
        EnvValue::Bool(b) => b.to_string(),
        EnvValue::Integer(i) => i.to_string(),
        EnvValue::Float(f) => f.to_string(),
        EnvValue::String(s) => s.clone(),
    }
}

/// The text of a dataflow file (a regular file of at most `fsio::limit::GRAPH_YAML`).
pub(crate) fn read_graph(file: &Path) -> Result<String> {
    fsio::read_string_limited(file, fsio::limit::GRAPH_YAML, "graph YAML")
        .with_context(|| format!("cannot read {}", file.display()))
}

/// Checks the dataflow in `file`.
pub fn check(file: &Path) -> Result<Report> {
    let text = read_graph(file)?;
    let desc: Descriptor = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not a valid dora dataflow", file.display()))?;
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(check_descriptor(&desc, &base))
}

fn check_descriptor(desc: &Descriptor, base: &Path) -> Report {
    let mut errors = Vec::new();
    let mut release_edges = 0;
    let mut graph: DiGraph<String, String> = DiGraph::new();
    let mut index: BTreeMap<String, (NodeIndex, &Node)> = BTreeMap::new();
    for node in &desc.nodes {
        let id = node.id.to_string();
        if index.contains_key(&id) {
            errors.push(format!("node `{id}`: defined twice"));
            continue;
        }
        index.insert(id.clone(), (graph.add_node(id), node));
    }
    let kind_of = |n: &Node| n.path.as_deref().and_then(Kind::from_path);

    for node in &desc.nodes {
        let id = node.id.to_string();
        let Some(&(to, _)) = index.get(&id) else {
            continue;
        };
        let kind = kind_of(node);
        for (input_id, input) in &node.inputs {
            let input_id = input_id.to_string();
            let InputMapping::User(m) = &input.mapping else {
                continue;
            };
            let (src, out) = (m.source.to_string(), m.output.to_string());
            let Some(&(from, src_node)) = index.get(&src) else {
                errors.push(format!("node `{id}` input `{input_id}`: unknown source node `{src}` (in `{src}/{out}`)"));
                continue;
            };
            if !src_node.outputs.iter().any(|o| o.to_string() == out) {
                errors.push(format!(
                    "node `{id}` input `{input_id}`: node `{src}` has no output `{out}` (its outputs: {})",
                    src_node.outputs.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
            // Slot releases and the actions answering a server flow against the data; they
            // are not part of the dataflow's order.
            if is_feedback(kind, &input_id) {
                release_edges += 1;
            } else {
                graph.add_edge(from, to, input_id.clone());
            }
            if transport_of(src_node).as_deref() == Some("cuda-ipc")
                && machine(src_node) != machine(node)
            {
                errors.push(format!(
                    "node `{id}` input `{input_id}`: `{src}` sends CUDA IPC handles (TRANSPORT: cuda-ipc) to another machine; CUDA IPC works within one machine (use TRANSPORT: host)"
                ));
            }
            if transport_of(src_node).as_deref() == Some("cuda-ipc") && backend_of(node) != "cuda" {
                errors.push(format!(
                    "node `{id}` input `{input_id}`: `{src}` sends CUDA IPC handles (TRANSPORT: cuda-ipc), which only a BACKEND: cuda node can read"
                ));
            }
            let Some(kind) = kind else { continue };
            let Some((_, accepted, _)) = kind.input(&input_id) else {
                errors.push(format!(
                    "node `{id}`: unknown input `{input_id}` for a {kind:?} node (it takes: {})",
                    kind.inputs()
                        .iter()
                        .map(|(n, _, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            };
            if let Some(sent) = kind_of(src_node).and_then(|k| k.output(&out)) {
                if !accepted.contains(&sent) {
                    errors.push(format!(
                        "node `{id}` input `{input_id}`: expects {}, but `{src}/{out}` sends {}",
                        accepted
                            .iter()
                            .map(|m| m.describe())
                            .collect::<Vec<_>>()
                            .join(" or "),
                        sent.describe()
                    ));
                }
            }
        }
        if let Some(kind) = kind {
            // A server with the policy in its own process gets no actions from the dataflow.
            let answers_itself = kind == Kind::OpenpiServer && in_process(node);
            for (name, _, required) in kind.inputs() {
                if *required
                    && !answers_itself
                    && !node.inputs.keys().any(|k| k.to_string() == *name)
                {
                    errors.push(format!("node `{id}`: missing input `{name}`"));
                }
            }
            check_env(&id, kind, node, base, &mut errors);
        }
    }

    check_placement(desc, &mut errors);

    for scc in tarjan_scc(&graph) {
        let self_loop = scc.len() == 1 && graph.find_edge(scc[0], scc[0]).is_some();
        if scc.len() > 1 || self_loop {
            let mut names: Vec<&str> = scc.iter().map(|i| graph[*i].as_str()).collect();
            names.sort();
            errors.push(format!(
                "cycle between nodes {}",
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Report {
        nodes: graph.node_count(),
        edges: graph.edge_count() + release_edges,
        errors,
    }
}

/// The machine a node is placed on (`deploy: machine`), if any.
pub(crate) fn machine(node: &Node) -> Option<String> {
    node.deploy.as_ref().and_then(|d| d.machine.clone())
}

/// Whether the node is pinned to a daemon (by machine or by labels).
fn pinned(node: &Node) -> bool {
    node.deploy
        .as_ref()
        .is_some_and(|d| d.machine.is_some() || !d.labels.is_empty())
}

/// Once any node is pinned to a daemon, dora 1.1 starts every node of the dataflow in
/// `<daemon's folder>/_work/<session>` joined with its `deploy: working_dir`, not in the
/// dataflow's folder: a relative `path` then resolves only with a `working_dir`.
fn check_placement(desc: &Descriptor, errors: &mut Vec<String>) {
    if !desc.nodes.iter().any(pinned) {
        return;
    }
    for node in &desc.nodes {
        let relative = node.path.as_deref().is_some_and(|p| {
            let p = Path::new(p);
            p.is_relative() && p.components().count() > 1
        });
        let working_dir = node.deploy.as_ref().and_then(|d| d.working_dir.as_ref());
        if relative && working_dir.is_none() {
            errors.push(format!(
                "node `{}`: relative path `{}` in a dataflow placed on machines needs `deploy: working_dir` (dora 1.1 starts such nodes in the daemon's `_work/<session>` folder; graphs/remote.yml uses `working_dir: ../../graphs` with each daemon started in the repository root)",
                node.id,
                node.path.as_deref().unwrap_or_default()
            ));
        }
    }
}

/// Inputs that close a loop by design: CUDA IPC slot releases, the actions and rejections
/// that answer the openpi server's frames, and an action queue's requests to the camera and
/// guides to the policy.
pub(crate) fn is_feedback(kind: Option<Kind>, input_id: &str) -> bool {
    input_id == "release"
        || (kind == Some(Kind::Camera) && input_id == "request")
        || (kind == Some(Kind::Policy) && input_id == "guide")
        || (kind == Some(Kind::OpenpiServer)
            && (input_id == "actions" || input_id.starts_with("rejected")))
}

pub(crate) fn env_of(node: &Node, key: &str) -> Option<String> {
    node.env.as_ref()?.get(key).map(env_str)
}

fn transport_of(node: &Node) -> Option<String> {
    env_of(node, "TRANSPORT")
}

/// An openpi-server that runs the policy itself (`POLICY: in-process`).
fn in_process(node: &Node) -> bool {
    env_of(node, "POLICY").as_deref() == Some("in-process")
}

fn backend_of(node: &Node) -> String {
    env_of(node, "BACKEND").unwrap_or_else(|| "cpu".into())
}

fn check_env(id: &str, kind: Kind, node: &Node, base: &Path, errors: &mut Vec<String>) {
    // An empty value is unset, as the nodes read it (`${VAR:-}` in a graph).
    let env: BTreeMap<String, String> = node
        .env
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), env_str(v)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let mut err = |msg: String| errors.push(format!("node `{id}`: {msg}"));
    let path = |v: &str| -> PathBuf { base.join(v) };
    let positive = |name: &str, err: &mut dyn FnMut(String)| {
        if let Some(v) = env.get(name) {
            if !v.parse::<u64>().is_ok_and(|n| n > 0) {
                err(format!("env {name}={v:?} must be a positive integer"));
            }
        }
    };
    let uint = |name: &str, err: &mut dyn FnMut(String)| {
        if let Some(v) = env.get(name) {
            if v.parse::<u64>().is_err() {
                err(format!("env {name}={v:?} must be a non-negative integer"));
            }
        }
    };

    let mut config: Option<Config> = None;
    if matches!(
        kind,
        Kind::Vision | Kind::Prefix | Kind::Denoise | Kind::Policy | Kind::OpenpiServer
    ) {
        match env.get("CHECKPOINT") {
            None => err("env CHECKPOINT is required".into()),
            Some(v) => match Checkpoint::open(&path(v)) {
                Ok(c) => config = Some(c.config),
                Err(e) => err(format!("env CHECKPOINT={v:?}: {e}")),
            },
        }
        // The server reads BACKEND only when it runs the policy itself.
        let reads_backend = kind != Kind::OpenpiServer || in_process(node);
        if let (Some(b), true) = (env.get("BACKEND"), reads_backend) {
            if b != "cpu" && b != "cuda" {
                err(format!("env BACKEND={b:?} must be `cpu` or `cuda`"));
            }
        }
    }
    if let Some(t) = env.get("TRANSPORT") {
        if !matches!(kind, Kind::Vision | Kind::Prefix) {
            err(format!(
                "env TRANSPORT={t:?}: only the vision and prefix nodes send device tensors"
            ));
        } else if t != "host" && t != "cuda-ipc" {
            err(format!("env TRANSPORT={t:?} must be `host` or `cuda-ipc`"));
        } else if t == "cuda-ipc" && env.get("BACKEND").map(String::as_str) != Some("cuda") {
            err("env TRANSPORT=cuda-ipc needs BACKEND=cuda".into());
        }
    }
    if let Some(v) = env.get("RING_SLOTS") {
        if !v.parse::<u64>().is_ok_and(|n| (1..=64).contains(&n)) {
            err(format!("env RING_SLOTS={v:?} must be between 1 and 64"));
        }
    }
    let tokens_wired = node.inputs.keys().any(|k| k.to_string() == "tokens");
    if matches!(kind, Kind::Prefix | Kind::Policy) {
        match env.get("PROMPT") {
            None if tokens_wired => {}
            None => {
                err("env PROMPT (a folder with tokens.npy and token_mask.npy) is required".into())
            }
            Some(v) => {
                for f in ["tokens.npy", "token_mask.npy"] {
                    if !path(v).join(f).is_file() {
                        err(format!("env PROMPT={v:?}: {f} not found"));
                    }
                }
                if let Some(cfg) = &config {
                    if let Err(e) = operators::observation::load_prompt(&path(v), cfg) {
                        err(format!("env PROMPT={v:?}: {e}"));
                    }
                }
            }
        }
    }
    match kind {
        Kind::Camera => {
            if let Some(v) = env.get("RATE_HZ") {
                if !v.parse::<f64>().is_ok_and(|r| r.is_finite() && r > 0.0) {
                    err(format!("env RATE_HZ={v:?} must be a positive number"));
                }
            }
            uint("MAX_FRAMES", &mut err);
            if let Some(v) = env.get("START_DELAY_S") {
                if !v
                    .parse::<f64>()
                    .is_ok_and(|d| d.is_finite() && (0.0..=3600.0).contains(&d))
                {
                    err(format!(
                        "env START_DELAY_S={v:?} must be between 0 and 3600 seconds"
                    ));
                }
            }
            positive("CAMERAS", &mut err);
            positive("SYNTHETIC_CAMERAS", &mut err);
            positive("SYNTHETIC_SIZE", &mut err);
            for name in ["FRAMES", "STATE"] {
                if let Some(v) = env.get(name) {
                    if !path(v).exists() {
                        err(format!("env {name}={v:?} does not exist"));
                    }
                }
            }
        }
        Kind::Decode => {
            positive("NUM_IMAGES", &mut err);
            positive("IMAGE_SIZE", &mut err);
            let encode = env.get("ENCODE").map_or("none", String::as_str);
            let output = match encode {
                "none" => Some("images"),
                "raw" | "jpeg" => Some("frames"),
                other => {
                    err(format!(
                        "env ENCODE={other:?} must be `none` (the model's images), `raw` or `jpeg` (frames for a decode node on another machine)"
                    ));
                    None
                }
            };
            if let Some(out) = output {
                if !node.outputs.iter().any(|o| o.to_string() == out) {
                    err(format!(
                        "env ENCODE={encode:?} sends on output `{out}`, which is not declared"
                    ));
                }
            }
            if let Some(v) = env.get("JPEG_QUALITY") {
                if !v.parse::<u8>().is_ok_and(|q| (1..=100).contains(&q)) {
                    err(format!("env JPEG_QUALITY={v:?} must be between 1 and 100"));
                }
            }
        }
        Kind::ActionQueue => {
            if let Some(v) = env.get("CONTROL_HZ") {
                if !v
                    .parse::<f64>()
                    .is_ok_and(|r| r.is_finite() && r > 0.0 && r <= 10_000.0)
                {
                    err(format!(
                        "env CONTROL_HZ={v:?} must be a positive number up to 10000"
                    ));
                }
            }
            positive("REQUEST_THRESHOLD", &mut err);
            positive("REQUEST_TIMEOUT_TICKS", &mut err);
            uint("DELAY_TICKS", &mut err);
            let merge = env.get("MERGE").map_or("latest", String::as_str);
            if let Err(e) = action_queue::queue::Merge::parse(
                merge,
                env.get("MERGE_WEIGHTS").map(String::as_str),
            ) {
                err(format!("env MERGE: {e}"));
            }
            if !node.outputs.iter().any(|o| o.to_string() == "action") {
                err("output `action` must be declared (one action per tick)".into());
            }
            let rtc = match env.get("RTC") {
                Some(v) => operators::settings::parse_bool("RTC", v).unwrap_or_else(|e| {
                    err(e.to_string());
                    false
                }),
                None => false,
            };
            let guides = node.outputs.iter().any(|o| o.to_string() == "guide");
            if rtc && !guides {
                err(
                    "env RTC=true: output `guide` must be declared (the policy's `guide` input)"
                        .into(),
                );
            }
            if guides && !rtc {
                err("output `guide` is declared but RTC is off: a policy joining frames with guides would wait for every frame".into());
            }
        }
        Kind::ActionSink => {
            if let Some(v) = env.get("STALE_MS") {
                if !v.parse::<u64>().is_ok_and(|ms| ms <= 3_600_000) {
                    err(format!(
                        "env STALE_MS={v:?} must be a number of milliseconds from 0 (off) to 3600000"
                    ));
                }
            }
        }
        Kind::Denoise | Kind::Policy => {
            positive("STEPS", &mut err);
            uint("SEED", &mut err);
            if let Some(p) = env.get("PIPELINE") {
                if kind != Kind::Policy {
                    err(format!(
                        "env PIPELINE={p:?}: only the policy node overlaps frames"
                    ));
                } else {
                    match operators::settings::parse_bool("PIPELINE", p) {
                        Err(e) => err(e.to_string()),
                        Ok(true) if env.get("BACKEND").map(String::as_str) != Some("cuda") => {
                            err("env PIPELINE=true needs BACKEND=cuda".into())
                        }
                        Ok(_) => {}
                    }
                }
            }
            for (name, parse) in [
                (
                    "MAX_BATCH",
                    (|v| node_common::parse_max_batch(v).map(|_| ()))
                        as fn(&str) -> std::result::Result<(), String>,
                ),
                ("BATCH_WINDOW_MS", |v| {
                    node_common::parse_batch_window_ms(v).map(|_| ())
                }),
            ] {
                if let Some(v) = env.get(name) {
                    if kind != Kind::Policy {
                        err(format!(
                            "env {name}={v:?}: only the policy node batches frames"
                        ));
                    } else if let Err(e) = parse(v) {
                        err(e);
                    }
                }
            }
            if let Some(v) = env.get("RTC_BETA") {
                if !v.parse::<f64>().is_ok_and(|b| b.is_finite() && b > 0.0) {
                    err(format!("env RTC_BETA={v:?} must be a positive number"));
                }
            }
            // BACKEND=cuda takes a guide too: it guides with the Jacobian term dropped
            // (docs/rtc.md).
            if node.inputs.keys().any(|k| k.to_string() == "guide")
                && env.get("PIPELINE").is_some_and(|p| {
                    operators::settings::parse_bool("PIPELINE", p).unwrap_or(false)
                })
            {
                err(
                    "input `guide` (real-time chunking) runs frames one at a time: unset PIPELINE"
                        .into(),
                );
            }
            check_dtype(&env, &mut err);
        }
        Kind::Postprocess => {
            positive("ACTION_DIM", &mut err);
            positive("ACTION_DIMS", &mut err);
            let parse =
                |k: &str, d: u64| env.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(d);
            let (ad, robot) = (parse("ACTION_DIM", 32), parse("ACTION_DIMS", 0));
            if robot > ad {
                err(format!("env ACTION_DIMS={robot} exceeds ACTION_DIM={ad}"));
            }
            if let Some(n) = env.get("NORM") {
                if n != "zscore" && n != "quantile" {
                    err(format!(
                        "env NORM={n:?} must be `zscore` (pi0) or `quantile` (pi0.5)"
                    ));
                }
            }
            match (env.get("NORM_STATS"), env.get("NORM")) {
                (Some(p), _) if !path(p).is_file() => {
                    err(format!("env NORM_STATS={p:?} does not exist"))
                }
                (Some(_), None) => err("env NORM_STATS needs NORM (`zscore` or `quantile`)".into()),
                _ => {}
            }
        }
        Kind::OpenpiServer => {
            match env.get("ROBOT") {
                None => err("env ROBOT is required: libero, droid or aloha".into()),
                Some(r) => {
                    if let Err(e) = r.parse::<operators::openpi::Robot>() {
                        err(format!("env ROBOT: {e}"));
                    }
                }
            }
            if let Some(v) = env.get("PORT") {
                if v.parse::<u16>().is_err() {
                    err(format!("env PORT={v:?} must be a port number (0-65535)"));
                }
            }
            positive("MAX_MESSAGE_MB", &mut err);
            if let Some(v) = env.get("REQUEST_TIMEOUT_S") {
                if !v.parse::<f64>().is_ok_and(|t| t.is_finite() && t > 0.0) {
                    err(format!(
                        "env REQUEST_TIMEOUT_S={v:?} must be a positive number"
                    ));
                }
            }
            for name in ["DISCRETE_STATE", "ADAPT_TO_PI"] {
                if let Some(v) = env.get(name) {
                    if let Err(e) = operators::settings::parse_bool(name, v) {
                        err(e.to_string());
                    }
                }
            }
            if let Some(v) = env.get("DELTA_ACTIONS") {
                if let Err(e) = operators::openpi::parse_delta_mask(v) {
                    err(format!("env DELTA_ACTIONS: {e}"));
                }
            }
            if let Some(v) = env.get("METADATA") {
                if !serde_json::from_str::<serde_json::Value>(v).is_ok_and(|m| m.is_object()) {
                    err(format!("env METADATA={v:?} must be a JSON object"));
                }
            }
            for name in ["TOKENIZER", "ASSETS"] {
                if let Some(v) = env.get(name) {
                    let opted_out = name == "TOKENIZER" && v == "none";
                    if !opted_out && !path(v).exists() {
                        err(format!("env {name}={v:?} does not exist"));
                    }
                }
            }
            if let Some(v) = env.get("NORM_STATS") {
                if v != "none" && !path(v).is_file() {
                    err(format!("env NORM_STATS={v:?} does not exist"));
                }
            }
            let in_process = match env.get("POLICY").map(String::as_str) {
                None | Some("dataflow") => false,
                Some("in-process") => true,
                Some(p) => {
                    err(format!(
                        "env POLICY={p:?} must be `dataflow` or `in-process`"
                    ));
                    false
                }
            };
            if in_process {
                positive("STEPS", &mut err);
                uint("SEED", &mut err);
                check_in_process_policy(&env, node, &mut err);
            }
            for wanted in ["images", "tokens"].into_iter().filter(|_| !in_process) {
                if !node.outputs.iter().any(|o| o.to_string() == wanted) {
                    err(format!(
                        "output `{wanted}` must be declared (the frames and prompts it sends)"
                    ));
                }
            }
        }
        _ => {}
    }
}

/// `DTYPE`, where set, is a precision the nodes know (`f32`, `bf16`, `fp8`).
fn check_dtype(env: &BTreeMap<String, String>, err: &mut dyn FnMut(String)) {
    if let Some(d) = env.get("DTYPE") {
        if let Err(e) = d.parse::<operators::backend::Precision>() {
            err(format!("env DTYPE={d:?}: {e}"));
        }
    }
}

/// An openpi-server with `POLICY: in-process`: the policy node's settings it reads (besides
/// BACKEND, STEPS and SEED), and no `actions` from the dataflow (its frames never go out).
fn check_in_process_policy(
    env: &BTreeMap<String, String>,
    node: &Node,
    err: &mut dyn FnMut(String),
) {
    check_dtype(env, err);
    if let Some(Err(e)) = env
        .get("MAX_BATCH")
        .map(|v| node_common::parse_max_batch(v))
    {
        err(e);
    }
    if let Some(Err(e)) = env
        .get("BATCH_WINDOW_MS")
        .map(|v| node_common::parse_batch_window_ms(v))
    {
        err(e);
    }
    if let Some(Err(e)) = env.get("SPIN_US").map(|v| node_common::parse_spin_us(v)) {
        err(e);
    }
    if node.inputs.keys().any(|k| k.to_string() == "actions") {
        err("input `actions` is wired, but with POLICY=in-process the server answers its requests itself (its frames never enter the dataflow): remove the input or set POLICY=dataflow".into());
    }
}

/// Checks that every decode node's IMAGE_SIZE / NUM_IMAGES and every postprocess node's
/// ACTION_DIM agree with the checkpoint of the model nodes downstream / upstream of them.
pub fn check_consistency(file: &Path, report: &mut Report) -> Result<()> {
    let text = read_graph(file)?;
    let desc: Descriptor = serde_yaml::from_str(&text)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let env_of = |n: &Node, k: &str| n.env.as_ref().and_then(|e| e.get(k)).map(env_str);
    let configs: Vec<Config> = desc
        .nodes
        .iter()
        .filter(|n| {
            matches!(
                n.path.as_deref().and_then(Kind::from_path),
                Some(Kind::Vision | Kind::Policy | Kind::Denoise)
            )
        })
        .filter_map(|n| env_of(n, "CHECKPOINT"))
        .filter_map(|c| Checkpoint::open(&base.join(c)).ok().map(|c| c.config))
        .collect();
    let Some(cfg) = configs.first() else {
        return Ok(());
    };
    for node in &desc.nodes {
        let id = node.id.to_string();
        let kind = node.path.as_deref().and_then(Kind::from_path);
        let expect = |k: &str, want: usize, default: usize, report: &mut Report| {
            let got = env_of(node, k)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default);
            if got != want {
                report.errors.push(format!(
                    "node `{id}`: env {k}={got} does not match the checkpoint's {want}"
                ));
            }
        };
        match kind {
            Some(Kind::Decode) => {
                expect("NUM_IMAGES", cfg.num_images, 3, report);
                // A decode that passes frames on (ENCODE: raw|jpeg) may send them at any
                // size: the decode that makes the model's images resizes them.
                if env_of(node, "ENCODE").is_none_or(|e| e.is_empty() || e == "none") {
                    expect("IMAGE_SIZE", cfg.image_size, 224, report);
                }
            }
            Some(Kind::Postprocess) => expect("ACTION_DIM", cfg.action_dim, 32, report),
            _ => {}
        }
    }
    Ok(())
}
