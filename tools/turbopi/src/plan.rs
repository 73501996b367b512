//! `turbopi graph plan`: where a dataflow's stages run and how tensors move between them.
//! Reads the graph with dora's descriptor types into petgraph, places every stage (node,
//! machine, backend), ranks the GPU stages by their distance to the action output (the
//! critical path first: the stage closest to the actions gets the highest stream priority),
//! and gives every edge its transport (in-process inside a fused node, CUDA IPC between GPU
//! processes on one machine, host Arrow buffers otherwise) with the bytes it moves per frame
//! and the ring it needs. Prints a table and Graphviz DOT, and flags placements that cannot
//! work or will drop frames. Across machines (`deploy: machine`) it lists what runs where and
//! the edges that cross the network, with their bytes per frame and per second at the
//! camera's rate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use dora_message::config::{InputMapping, DEFAULT_QUEUE_SIZE};
use dora_message::descriptor::{Descriptor, Node};
use operators::checkpoint::Checkpoint;
use operators::Config;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::graph::{env_of, is_feedback, read_graph, Kind, Msg};

/// A stage of the policy and where it runs.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub node: String,
    pub stage: &'static str,
    pub machine: String,
    pub backend: String,
    /// GPU stages: rank on the critical path to the actions (0 = highest stream priority).
    pub priority: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct EdgePlan {
    pub from: String,
    pub to: String,
    pub msg: Option<Msg>,
    pub transport: &'static str,
    /// Bytes of one frame's message at most (None when the checkpoint is not readable).
    pub bytes: Option<usize>,
    /// Bytes of it that cross host memory.
    pub host_bytes: Option<usize>,
    pub ring_slots: Option<usize>,
    pub queue_size: usize,
    /// Producer and consumer run on different machines: the message crosses the network.
    pub cross_machine: Option<(String, String)>,
    /// The message is JPEG: `bytes` is its raw bound, the wire carries less.
    pub jpeg: bool,
}

pub struct Plan {
    pub stages: Vec<StagePlan>,
    pub edges: Vec<EdgePlan>,
    /// Every node by machine (`local`: no `deploy: machine`).
    pub machines: BTreeMap<String, Vec<String>>,
    /// The camera's frame rate (`RATE_HZ`, default 10), when the graph has a camera.
    pub rate_hz: Option<f64>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
}

fn stages_of(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Camera => &["camera"],
        Kind::Decode => &["decode"],
        Kind::Vision => &["vision"],
        Kind::Prefix => &["prefix"],
        Kind::Denoise => &["denoise"],
        Kind::Policy => &["vision", "prefix", "denoise"],
        Kind::Postprocess => &["postprocess"],
        Kind::ActionSink => &["sink"],
        Kind::ActionQueue => &["action-queue"],
        Kind::OpenpiServer => &["openpi-server"],
    }
}

/// Bytes per frame of a message kind (the largest frame: every camera real, the longest
/// prefix), and of its device form when it travels by handle.
fn msg_bytes(msg: Msg, cfg: &Config, bf16: bool) -> (usize, usize) {
    let t = cfg.tokens_per_image();
    let kvw = cfg.num_kv_heads * cfg.head_dim;
    let act = if bf16 { 2 } else { 4 };
    let cap = cfg.max_prefix_len() + cfg.suffix_len();
    let host = match msg {
        Msg::Frames | Msg::Images => cfg.num_images * cfg.image_size * cfg.image_size * 3,
        Msg::State => cfg.action_dim * 4,
        Msg::ImageEmbeddings => cfg.num_images * t * cfg.vlm_width * 4,
        Msg::KvCache => cfg.vlm_depth * 2 * cfg.max_prefix_len() * kvw * 4,
        Msg::ModelActions | Msg::RobotActions => cfg.action_horizon * cfg.action_dim * 4,
        Msg::Release | Msg::Rejections | Msg::Request => 0,
        Msg::Guide => cfg.action_horizon * cfg.action_dim * 4,
        Msg::Tokens => cfg.max_token_len * 4,
    };
    let device = match msg {
        Msg::KvCache => cfg.vlm_depth * 2 * cap * kvw * act,
        _ => host,
    };
    (host, device)
}

/// Plans the dataflow in `file`.
pub fn plan(file: &Path) -> Result<Plan> {
    let text = read_graph(file)?;
    let desc: Descriptor = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not a valid dora dataflow", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    Ok(plan_descriptor(&desc, base))
}

fn machine_of(node: &Node) -> String {
    match &node.deploy {
        Some(d) if d.machine.is_some() => d.machine.clone().unwrap_or_default(),
        Some(d) if !d.labels.is_empty() => format!(
            "labels{{{}}}",
            d.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        _ => "local".into(),
    }
}

fn env_usize(node: &Node, key: &str, default: usize) -> usize {
    env_of(node, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Cameras of a synthetic camera node (None when it replays a recording: unknown).
fn synthetic_cameras(node: &Node) -> Option<usize> {
    env_of(node, "FRAMES")
        .is_none_or(|f| f.is_empty())
        .then(|| env_usize(node, "SYNTHETIC_CAMERAS", 2))
}

/// Bytes of one `frames` message when the sender's env tells them: the synthetic camera's
/// (`SYNTHETIC_CAMERAS` x `SYNTHETIC_SIZE`^2 x 3), or a robot-side decode's resized cameras
/// (`IMAGE_SIZE`^2 x 3 for each camera of its synthetic source, else for at most
/// `NUM_IMAGES`; raw: JPEG sends less).
fn frames_bytes(node: &Node, kind: Kind, by_id: &BTreeMap<String, &Node>) -> Option<usize> {
    match kind {
        Kind::Camera => {
            let size = env_usize(node, "SYNTHETIC_SIZE", 224);
            synthetic_cameras(node).map(|n| n * size * size * 3)
        }
        Kind::Decode => {
            let size = env_usize(node, "IMAGE_SIZE", 224);
            let source = node
                .inputs
                .iter()
                .find_map(|(id, input)| match &input.mapping {
                    InputMapping::User(m) if id.to_string() == "frames" => {
                        by_id.get(&m.source.to_string()).copied()
                    }
                    _ => None,
                });
            let cameras = source
                .filter(|n| n.path.as_deref().and_then(Kind::from_path) == Some(Kind::Camera))
                .and_then(synthetic_cameras)
                .unwrap_or_else(|| env_usize(node, "NUM_IMAGES", 3));
            Some(cameras * size * size * 3)
        }
        _ => None,
    }
}

fn plan_descriptor(desc: &Descriptor, base: &Path) -> Plan {
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    let kind_of = |n: &Node| n.path.as_deref().and_then(Kind::from_path);
    let cfg: Option<Config> = desc
        .nodes
        .iter()
        .filter(|n| {
            kind_of(n).is_some_and(|k| {
                matches!(
                    k,
                    Kind::Vision | Kind::Prefix | Kind::Denoise | Kind::Policy
                )
            })
        })
        .filter_map(|n| env_of(n, "CHECKPOINT"))
        .find_map(|c| Checkpoint::open(&base.join(c)).ok().map(|c| c.config));
    if cfg.is_none() {
        notes.push("no readable checkpoint: message sizes unknown".into());
    }
    let by_id: BTreeMap<String, &Node> = desc.nodes.iter().map(|n| (n.id.to_string(), n)).collect();
    let backend = |n: &Node| env_of(n, "BACKEND").unwrap_or_else(|| "cpu".into());
    let bf16 = |n: &Node| backend(n) == "cuda" && env_of(n, "DTYPE").is_none_or(|d| d == "bf16");

    // Stage graph: one vertex per stage, fused nodes chain their stages in-process.
    let mut g: DiGraph<(String, &'static str), ()> = DiGraph::new();
    let mut first: BTreeMap<String, NodeIndex> = BTreeMap::new();
    let mut last: BTreeMap<String, NodeIndex> = BTreeMap::new();
    let mut stages = Vec::new();
    let mut edges = Vec::new();
    for node in &desc.nodes {
        let id = node.id.to_string();
        let Some(kind) = kind_of(node) else { continue };
        let mut prev: Option<NodeIndex> = None;
        for &s in stages_of(kind) {
            let v = g.add_node((id.clone(), s));
            if let Some(p) = prev {
                g.add_edge(p, v, ());
                let (bytes, host_bytes) = match &cfg {
                    Some(c) => {
                        let msg = if s == "prefix" {
                            Msg::ImageEmbeddings
                        } else {
                            Msg::KvCache
                        };
                        let (_, dev) = msg_bytes(msg, c, bf16(node));
                        (
                            Some(dev),
                            Some(if backend(node) == "cuda" { 0 } else { dev }),
                        )
                    }
                    None => (None, None),
                };
                edges.push(EdgePlan {
                    from: format!("{id}:{}", g[p].1),
                    to: format!("{id}:{s}"),
                    msg: Some(if s == "prefix" {
                        Msg::ImageEmbeddings
                    } else {
                        Msg::KvCache
                    }),
                    transport: if backend(node) == "cuda" {
                        "in-process (device pointer + CUDA event)"
                    } else {
                        "in-process (host memory)"
                    },
                    bytes,
                    host_bytes,
                    ring_slots: None,
                    queue_size: 0,
                    cross_machine: None,
                    jpeg: false,
                });
            }
            first.entry(id.clone()).or_insert(v);
            last.insert(id.clone(), v);
            prev = Some(v);
            stages.push(StagePlan {
                node: id.clone(),
                stage: s,
                machine: machine_of(node),
                backend: backend(node),
                priority: None,
            });
        }
    }
    for node in &desc.nodes {
        let id = node.id.to_string();
        for (input_id, input) in &node.inputs {
            let input_id = input_id.to_string();
            let InputMapping::User(m) = &input.mapping else {
                continue;
            };
            let (src, out) = (m.source.to_string(), m.output.to_string());
            let Some(src_node) = by_id.get(&src) else {
                continue;
            };
            let msg = kind_of(src_node).and_then(|k| k.output(&out));
            let queue_size = input.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
            if input_id == "release" {
                continue;
            }
            // The actions answering the openpi server are listed but do not feed a stage.
            if !is_feedback(kind_of(node), &input_id) {
                if let (Some(&a), Some(&b)) = (last.get(&src), first.get(&id)) {
                    g.add_edge(a, b, ());
                }
            }
            let ipc = env_of(src_node, "TRANSPORT").as_deref() == Some("cuda-ipc");
            let same_machine = machine_of(src_node) == machine_of(node);
            let transport = if ipc && same_machine {
                "cuda-ipc (handle + event; consumer copies device to device)"
            } else {
                "host (Arrow buffer)"
            };
            if ipc && !same_machine {
                errors.push(format!(
                    "edge `{src}/{out}` -> `{id}/{input_id}`: TRANSPORT: cuda-ipc between machines `{}` and `{}`; CUDA IPC works on one machine only (use TRANSPORT: host)",
                    machine_of(src_node),
                    machine_of(node)
                ));
            }
            let ring_slots = ipc.then(|| {
                env_of(src_node, "RING_SLOTS")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(4)
            });
            if let Some(slots) = ring_slots {
                // One slot being written, `queue_size` waiting, one being copied.
                if slots < queue_size + 2 {
                    notes.push(format!(
                        "edge `{src}/{out}` -> `{id}/{input_id}`: {slots} ring slots for a queue of {queue_size}: the producer drops a frame when the consumer holds {slots} (RING_SLOTS >= {} never drops at the producer)",
                        queue_size + 2
                    ));
                }
            }
            let src_kind = kind_of(src_node);
            let jpeg = src_kind == Some(Kind::Decode)
                && out == "frames"
                && env_of(src_node, "ENCODE").as_deref() == Some("jpeg");
            let sized = match (src_kind, msg) {
                (Some(k), Some(Msg::Frames)) => frames_bytes(src_node, k, &by_id),
                _ => None,
            };
            let (bytes, host_bytes) = match (&cfg, msg) {
                _ if sized.is_some() => (sized, sized),
                (Some(c), Some(m)) => {
                    let (host, dev) = msg_bytes(m, c, bf16(src_node));
                    if ipc && same_machine {
                        (Some(dev), Some(0))
                    } else {
                        (Some(host), Some(host))
                    }
                }
                _ => (None, None),
            };
            edges.push(EdgePlan {
                from: format!("{src}/{out}"),
                to: format!("{id}/{input_id}"),
                msg,
                transport,
                bytes,
                host_bytes,
                ring_slots,
                queue_size,
                cross_machine: (!same_machine).then(|| (machine_of(src_node), machine_of(node))),
                jpeg,
            });
        }
    }
    // Critical path: GPU stages ranked by how many stages separate them from the actions.
    let sinks: Vec<NodeIndex> = g.node_indices().filter(|&v| g[v].1 == "denoise").collect();
    let mut dist: BTreeMap<NodeIndex, usize> = BTreeMap::new();
    let mut frontier = sinks.clone();
    for &s in &sinks {
        dist.insert(s, 0);
    }
    while let Some(v) = frontier.pop() {
        let d = dist[&v];
        for e in g.edges_directed(v, petgraph::Direction::Incoming) {
            let u = e.source();
            if dist.get(&u).is_none_or(|&old| old > d + 1) {
                dist.insert(u, d + 1);
                frontier.push(u);
            }
        }
    }
    for (v, s) in g.node_indices().zip(stages.iter_mut()) {
        if s.backend == "cuda" && matches!(s.stage, "vision" | "prefix" | "denoise") {
            s.priority = dist.get(&v).copied();
        }
    }
    let gpu_procs: BTreeMap<String, Vec<String>> = stages
        .iter()
        .filter(|s| s.priority.is_some())
        .fold(BTreeMap::new(), |mut m, s| {
            let procs: &mut Vec<String> = m.entry(s.machine.clone()).or_default();
            if !procs.contains(&s.node) {
                procs.push(s.node.clone());
            }
            m
        });
    for (machine, procs) in &gpu_procs {
        if procs.len() > 1 {
            notes.push(format!(
                "machine `{machine}`: {} GPU processes ({}) share the GPU; without MPS their kernels time-slice rather than overlap, so throughput is bounded by the sum of their stage times",
                procs.len(),
                procs.join(", ")
            ));
        }
    }
    let mut machines: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in &desc.nodes {
        machines
            .entry(machine_of(node))
            .or_default()
            .push(node.id.to_string());
    }
    let rate_hz = desc
        .nodes
        .iter()
        .find(|n| kind_of(n) == Some(Kind::Camera))
        .map(|n| {
            env_of(n, "RATE_HZ")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|r| r.is_finite() && *r > 0.0)
                .unwrap_or(10.0)
        });
    Plan {
        stages,
        edges,
        machines,
        rate_hz,
        notes,
        errors,
    }
}

/// Bytes in the unit that suits them (B, kB, MB).
fn size(b: Option<usize>) -> String {
    match b {
        None => "?".into(),
        Some(b) if b < 1000 => format!("{b} B"),
        Some(b) if b < 1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        Some(b) => format!("{:.2} MB", b as f64 / 1e6),
    }
}

fn mb(b: Option<usize>) -> String {
    b.map_or("?".into(), |b| {
        if b == 0 {
            "0".into()
        } else {
            format!("{:.2} MB", b as f64 / 1e6)
        }
    })
}

impl Plan {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<14} {:<12} {:<10} {:<8} GPU stream priority (0 = highest, critical path)",
            "node", "stage", "machine", "backend"
        );
        for st in &self.stages {
            let _ = writeln!(
                s,
                "{:<14} {:<12} {:<10} {:<8} {}",
                st.node,
                st.stage,
                st.machine,
                st.backend,
                st.priority.map_or("-".into(), |p| p.to_string())
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<32} {:<30} {:<12} {:>6} {:>5} {:>10} {:>10}  transport",
            "from", "to", "message", "queue", "ring", "bytes", "via host"
        );
        for e in &self.edges {
            let _ = writeln!(
                s,
                "{:<32} {:<30} {:<12} {:>6} {:>5} {:>10} {:>10}  {}",
                e.from,
                e.to,
                e.msg.map_or("?", msg_name),
                if e.queue_size == 0 {
                    "-".into()
                } else {
                    e.queue_size.to_string()
                },
                e.ring_slots.map_or("-".into(), |r| r.to_string()),
                mb(e.bytes),
                mb(e.host_bytes),
                e.transport
            );
        }
        if self.machines.len() > 1 {
            let _ = writeln!(s);
            let _ = writeln!(s, "{:<14} nodes", "machine");
            for (machine, nodes) in &self.machines {
                let _ = writeln!(s, "{:<14} {}", machine, nodes.join(", "));
            }
            let _ = writeln!(s);
            let rate = self.rate_hz.unwrap_or(10.0);
            let _ = writeln!(
                s,
                "{:<32} {:<30} {:<20} {:>10} {:>12}  across the network (at {rate} frames/s)",
                "from", "to", "machines", "bytes", "per second"
            );
            for e in self.edges.iter() {
                let Some((a, b)) = &e.cross_machine else {
                    continue;
                };
                let per_s = e.bytes.map(|b| (b as f64 * rate) as usize);
                let _ = writeln!(
                    s,
                    "{:<32} {:<30} {:<20} {:>10} {:>10}/s  {}{}",
                    e.from,
                    e.to,
                    format!("{a} -> {b}"),
                    size(e.bytes),
                    size(per_s),
                    e.msg.map_or("?", msg_name),
                    if e.jpeg {
                        " (JPEG: at most this, less on the wire)"
                    } else {
                        ""
                    }
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }

    pub fn dot(&self) -> String {
        let mut s = String::from("digraph plan {\n  rankdir=LR;\n  node [shape=box];\n");
        let mut by_machine: BTreeMap<&str, Vec<&StagePlan>> = BTreeMap::new();
        for st in &self.stages {
            by_machine.entry(st.machine.as_str()).or_default().push(st);
        }
        for (i, (machine, sts)) in by_machine.iter().enumerate() {
            let _ = writeln!(s, "  subgraph cluster_{i} {{\n    label=\"{machine}\";");
            for st in sts {
                let color = if st.backend == "cuda" {
                    "palegreen"
                } else {
                    "lightgrey"
                };
                let pri = st
                    .priority
                    .map_or(String::new(), |p| format!("\\npriority {p}"));
                let _ = writeln!(
                    s,
                    "    \"{}:{}\" [label=\"{}\\n{} ({}){pri}\", style=filled, fillcolor={color}];",
                    st.node, st.stage, st.node, st.stage, st.backend
                );
            }
            let _ = writeln!(s, "  }}");
        }
        let vertex = |end: &str, first: bool| -> String {
            // node/output or node:stage: map a node to its first or last stage.
            if end.contains(':') {
                return end.to_string();
            }
            let node = end.split('/').next().unwrap_or(end);
            let mut sts = self.stages.iter().filter(|s| s.node == node);
            let st = if first { sts.next() } else { sts.next_back() };
            st.map_or(node.to_string(), |s| format!("{}:{}", s.node, s.stage))
        };
        for e in &self.edges {
            let style = if e.transport.starts_with("cuda-ipc") || e.transport.contains("device") {
                "bold"
            } else {
                "solid"
            };
            let _ = writeln!(
                s,
                "  \"{}\" -> \"{}\" [label=\"{} {}\", style={style}];",
                vertex(&e.from, false),
                vertex(&e.to, true),
                e.transport.split(' ').next().unwrap_or(""),
                mb(e.bytes)
            );
        }
        s.push_str("}\n");
        s
    }
}

fn msg_name(m: Msg) -> &'static str {
    match m {
        Msg::Frames => "frames",
        Msg::State => "state",
        Msg::Images => "images",
        Msg::ImageEmbeddings => "embeddings",
        Msg::KvCache => "kv_cache",
        Msg::ModelActions => "actions",
        Msg::RobotActions => "actions",
        Msg::Release => "release",
        Msg::Tokens => "tokens",
        Msg::Rejections => "rejected",
        Msg::Request => "request",
        Msg::Guide => "guide",
    }
}
