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
}

/// Records what `body` launches on `lane` into a graph (after the lane's work so far has
/// finished), without running it.
pub fn capture(lane: &Lane, body: impl FnOnce() -> Result<()>, what: &str) -> Result<Graph> {
    lane.synchronize()?;
    lane.stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .cuda(&format!("starting the capture of {what}"))?;
    let recorded = body();
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
    what: &'static str,
}

impl<K: Hash + Eq> GraphCache<K> {
    pub fn new(what: &'static str) -> Self {
        GraphCache {
            graphs: HashMap::new(),
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

    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}
