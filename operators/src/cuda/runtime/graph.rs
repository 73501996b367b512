//! CUDA graphs: a stage's launches recorded once per shape and replayed after, which saves the
//! host's per-launch cost. One capture routine and one cache serve every stage.

use std::collections::HashMap;
use std::hash::Hash;

use cudarc::driver::{sys, CudaGraph};

use crate::cuda::device::{CudaResult, Lane};
use crate::{Error, Result};

/// A captured graph. Graphs hold raw driver handles, so they are not `Send` by themselves.
pub struct Graph(CudaGraph);

// SAFETY: a graph is only launched by the thread that currently owns the stage holding it
// (every launch takes &mut or & of the owner, which is !Sync); the driver allows graph execs
// to be launched from any thread.
unsafe impl Send for Graph {}

impl Graph {
    pub fn launch(&self, what: &str) -> Result<()> {
        self.0.launch().cuda(&format!("launching the {what} graph"))
    }

    /// The graph's nodes: kernels, memory copies and sets, others. A replay launches exactly
    /// these; cuBLASLt's GEMMs count with the kernels they run.
    pub fn census(&self) -> Result<NodeCensus> {
        let g = self.0.cu_graph();
        let mut n: usize = 0;
        // SAFETY: `g` is the live graph of this exec; a null node array asks for the count.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }
            .result()
            .cuda("counting a graph's nodes")?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` holds `n` entries, the count just read; the driver writes at most
        // `n` and sets `n` to what it wrote.
        unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }
            .result()
            .cuda("listing a graph's nodes")?;
        let mut c = NodeCensus::default();
        for node in &nodes[..n.min(nodes.len())] {
            let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` belongs to the live graph; `t` is an out-parameter.
            unsafe { sys::cuGraphNodeGetType(*node, &mut t) }
                .result()
                .cuda("reading a graph node's type")?;
            match t {
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => c.kernels += 1,
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY
                | sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => c.copies += 1,
                _ => c.other += 1,
            }
        }
        let mut edges: usize = 0;
        // SAFETY: null arrays ask for the edge count only.
        unsafe {
            sys::cuGraphGetEdges_v2(
                g,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut edges,
            )
        }
        .result()
        .cuda("counting a graph's edges")?;
        let mut from: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); edges];
        let mut to: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); edges];
        // SAFETY: an all-zero edge is a valid value of this plain C struct of bytes.
        let mut data: Vec<sys::CUgraphEdgeData> = vec![unsafe { std::mem::zeroed() }; edges];
        // SAFETY: the three arrays hold `edges` entries, the count just read; the driver
        // writes at most that many and sets `edges` to what it wrote.
        unsafe {
            sys::cuGraphGetEdges_v2(
                g,
                from.as_mut_ptr(),
                to.as_mut_ptr(),
                data.as_mut_ptr(),
                &mut edges,
            )
        }
        .result()
        .cuda("listing a graph's edges")?;
        let programmatic = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
        c.programmatic = data[..edges.min(data.len())]
            .iter()
            .filter(|d| d.type_ == programmatic)
            .count();
        Ok(c)
    }
}

/// What a graph launches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCensus {
    pub kernels: usize,
    /// Memory copies and sets.
    pub copies: usize,
    /// Event records and waits, empty nodes.
    pub other: usize,
    /// Programmatic edges: kernels that may start while their predecessor drains
    /// (`TURBOPI_PDL`).
    pub programmatic: usize,
}

/// Records what `body` launches on `lane` into a graph (after the lane's work so far has
/// finished), without running it.
pub fn capture(lane: &Lane, body: impl FnOnce() -> Result<()>, what: &str) -> Result<Graph> {
    lane.synchronize()?;
    lane.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .cuda(&format!("starting the capture of {what}"))?;
    lane.recording(true);
    let recorded = body();
    lane.recording(false);
    // The capture must end even when recording failed, or the stream stays unusable.
    let graph = lane.stream.end_capture(sys::CUgraphInstantiate_flags(0));
    recorded?;
    let graph = graph
        .cuda(&format!("capturing {what}"))?
        .ok_or_else(|| Error::Cuda(format!("capturing {what} produced no graph")))?;
    graph
        .upload()
        .cuda(&format!("uploading the {what} graph"))?;
    Ok(Graph(graph))
}

/// A stage's graphs by shape key.
pub struct GraphCache<K> {
    graphs: HashMap<K, Graph>,
    /// The key of the last run.
    last: Option<K>,
    what: &'static str,
}

impl<K: Hash + Eq + Clone> GraphCache<K> {
    pub fn new(what: &'static str) -> Self {
        GraphCache {
            graphs: HashMap::new(),
            last: None,
            what,
        }
    }

    /// Runs `body` for `key` on `lane`: the captured graph when there is one; otherwise
    /// eagerly (its first run makes the GEMM plans and loads the kernels), then, with
    /// `capture_after`, records it for the next time (capturing does not run it again).
    pub fn run(
        &mut self,
        key: K,
        lane: &Lane,
        capture_after: bool,
        body: impl Fn() -> Result<()>,
    ) -> Result<()> {
        self.last = Some(key.clone());
        if let Some(g) = self.graphs.get(&key) {
            return g.launch(self.what);
        }
        body()?;
        if capture_after {
            let g = capture(lane, &body, self.what)?;
            self.graphs.insert(key, g);
        }
        Ok(())
    }

    /// The graph of the last run (None when it ran eagerly).
    pub fn last(&self) -> Option<&Graph> {
        self.graphs.get(self.last.as_ref()?)
    }

    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}
