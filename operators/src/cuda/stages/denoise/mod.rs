//! Stage 3 on the GPU: the flow-matching sampler over the action expert, attending to a K/V
//! cache slot. The whole loop (every step) is one CUDA graph per step count and cache slot;
//! it does not depend on the prefix length, which it reads from the slot's info on the
//! device (attention runs over the padded cache and masks the unused rows). Everything that
//! depends only on the step grid (pi0's time half of the action-time MLP, pi0.5's adaptive
//! norm modulations) is computed once per step count. A loop guided by real-time chunking
//! (Jacobian dropped, docs/rtc.md) is a graph of its own whose Euler steps are
//! `euler_step_guided`, reading the guide's mask and target from this stage's buffers and the
//! guidance weight per step from a table of its graph, uploaded before each launch. CPU twin:
//! [`crate::policy::Denoiser`] (`run`, and `run_guided_with` with the Jacobian dropped).

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::config::Config;
use crate::cuda::activation::{add_bias, bias_act, cast, Act, Out};
use crate::cuda::attention::{score_stride, Mask, Problem, Scratch, Workspace};
use crate::cuda::device::{DType, DeviceBuffer, Lane, PinnedBuffer, View};
use crate::cuda::euler::{euler_step, euler_step_guided, Guidance};
use crate::cuda::gemm::Mat;
use crate::cuda::kernels::skinny::RopeOut;
use crate::cuda::mlp::gelu_gate;
use crate::cuda::residual::add_residual;
use crate::cuda::rms_norm::{rms_norm, NormParam};
use crate::cuda::rope::rope_qkv_batch;
use crate::cuda::runtime::graph::NodeCensus;
use crate::cuda::runtime::graph::{capture, Graph};
use crate::cuda::weights::{Arena, DenoiseW, DeviceWeights, GemmaW, HeadsW, Lin, NormW, Planner};
use crate::{rtc, settings, Error, Result};

mod time;

use time::TimeTable;

use super::prefix::heads;
use super::{
    allocate, gemma_attention, lin, profile_stage, upload_inv_freq, CacheBatch, CacheSlot, Engine,
    Marks,
};
use crate::MAX_BATCH;

/// The sizes of the sampler, named as the config names them.
#[derive(Debug, Clone, Copy)]
struct Shape {
    horizon: usize,
    action_dim: usize,
    width: usize,
    mlp: usize,
    /// Suffix tokens: pi0's state token, then the action tokens.
    suffix: usize,
    /// The first action token of the suffix (1 for pi0, 0 for pi0.5).
    first_action: usize,
    max_prefix: usize,
    /// Rows of each layer's cache: the longest prefix, then the suffix.
    cache_rows: usize,
    layers: usize,
}

impl Shape {
    fn of(c: &Config) -> Shape {
        let suffix = c.suffix_len();
        Shape {
            horizon: c.action_horizon,
            action_dim: c.action_dim,
            width: c.expert_width,
            mlp: c.expert_mlp_dim,
            suffix,
            first_action: suffix - c.action_horizon,
            max_prefix: c.max_prefix_len(),
            cache_rows: c.max_prefix_len() + suffix,
            layers: c.vlm_depth,
        }
    }
}

/// The expert's queries of `batch` sequences over their whole caches, for the tensor-core
/// attention.
fn problem(cfg: &Config, s: &Shape, batch: usize) -> Problem {
    let hs = heads(cfg);
    Problem {
        rows: s.suffix * hs.group(),
        keys: s.cache_rows,
        hd: hs.hd,
        n1: hs.kv,
        n2: batch,
        // Few query rows: one block per key chunk fills the GPU.
        per_block: 1,
    }
}

struct Buffers {
    noise: View,
    state: View,
    xt: View,
    xt_act: View,
    state_act: View,
    state_tok: View,
    a: View,
    a_act: View,
    xe: View,
    he: View,
    qkv: View,
    q: View,
    scores: View,
    probs: View,
    att_g: View,
    att: View,
    tmp: View,
    gu: View,
    m: View,
    vraw: View,
    inv_freq: View,
    fa: Workspace,
    /// Real-time chunking's guide of the frame (guided loops only): the mask per value and
    /// the target, f32 [horizon, action_dim].
    guide_weight: View,
    guide_target: View,
}

/// The buffers of a loop over up to [`MAX_BATCH`] sequences (the attention's GEMM scratch,
/// used a sequence at a time, holds one).
fn layout(cfg: &Config, s: &Shape, act: DType, ar: &mut Arena) -> Buffers {
    let f = DType::F32;
    let hs = heads(cfg);
    let qw = hs.nh * hs.hd;
    let mb = MAX_BATCH;
    let (h, ad, ew, n) = (mb * s.horizon, s.action_dim, s.width, mb * s.suffix);
    // Only the bf16 kernels have the fused attention.
    let (part, stats) = if act == DType::Bf16 {
        problem(cfg, s, mb).workspace()
    } else {
        (0, 0)
    };
    let fa = Workspace {
        part: ar.take(f, part),
        stats: ar.take(f, stats),
    };
    Buffers {
        noise: ar.take(f, h * ad),
        state: ar.take(f, mb * ad),
        xt: ar.take(f, h * ad),
        xt_act: ar.take(act, h * ad),
        state_act: ar.take(act, mb * ad),
        state_tok: ar.take(f, mb * ew),
        a: ar.take(f, h * ew),
        a_act: ar.take(act, h * ew),
        xe: ar.take(f, n * ew),
        he: ar.take(act, n * ew),
        qkv: ar.take(act, n * hs.qkv_width()),
        q: ar.take(act, n * qw),
        scores: ar.take(f, hs.nh * s.suffix * score_stride(s.cache_rows)),
        probs: ar.take(act, hs.nh * s.suffix * score_stride(s.cache_rows)),
        att_g: ar.take(act, n * qw),
        att: ar.take(act, n * qw),
        tmp: ar.take(f, n * ew),
        gu: ar.take(act, n * 2 * s.mlp),
        m: ar.take(act, n * s.mlp),
        vraw: ar.take(f, h * ad),
        inv_freq: ar.take(f, cfg.head_dim / 2),
        fa,
        guide_weight: ar.take(f, s.horizon * ad),
        guide_target: ar.take(f, s.horizon * ad),
    }
}

/// What a loop's graph is captured for: its step count, first cache slot (the K/V pointer),
/// batch size and whether its Euler steps are guided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GraphKey {
    steps: usize,
    cache: u64,
    batch: usize,
    guided: bool,
}

/// The guidance weight per step of a guided loop: on the device (f32 [steps], what the graph
/// reads) and its pinned staging.
struct CoefTable {
    device: DeviceBuffer,
    host: PinnedBuffer,
}

/// The captured loop of one [`GraphKey`], with the tables it reads.
struct StepGraph {
    graph: Graph,
    table: TimeTable,
    /// Guided loops only.
    coef: Option<CoefTable>,
}

/// The host side of a guided frame's guide: the mask and the target, f32 [horizon,
/// action_dim] in pinned memory (untouched until the stream has passed the upload), and the
/// guidance weight per step (any host memory; staged by the stage).
pub struct GuideHost<'a> {
    pub weight: &'a [f32],
    pub target: &'a [f32],
    pub coef: &'a [f32],
}

/// The denoise stage: its weights (the expert and the action and time heads), buffers,
/// stream and graphs.
pub struct Denoise {
    graphs: HashMap<GraphKey, StepGraph>,
    /// The key of the last loop run.
    last: Option<GraphKey>,
    buf: Buffers,
    _buf: DeviceBuffer,
    pub(crate) weights: DeviceWeights<DenoiseW>,
    pub lane: Lane,
    /// While profiling: an event after each operation of an eager run.
    marks: Marks,
    cfg: Config,
    shape: Shape,
}

impl Denoise {
    pub fn new(e: &Engine, cfg: &Config) -> Result<Denoise> {
        let shape = Shape::of(cfg);
        let lane = e.lane(0)?;
        let weights =
            DeviceWeights::allocate(&e.dev, e.weight_types(), |p: &mut Planner| p.denoise(cfg))?;
        let act = e.act();
        let (buf, alloc) = allocate(&e.dev, &lane, |ar| layout(cfg, &shape, act, ar))?;
        upload_inv_freq(cfg, &lane, buf.inv_freq)?;
        Ok(Denoise {
            graphs: HashMap::new(),
            last: None,
            buf,
            _buf: alloc,
            weights,
            lane,
            marks: Marks::default(),
            cfg: cfg.clone(),
            shape,
        })
    }

    /// Values of a chunk of actions: action_horizon * action_dim.
    pub fn action_values(&self) -> usize {
        self.shape.horizon * self.shape.action_dim
    }

    /// Builds (once per step count and cache slot) the loop's graph, so that the first timed
    /// frame does not pay for it: the time table, an eager run (which makes every GEMM plan
    /// and loads every kernel), then the capture.
    pub fn prepare(&mut self, e: &Engine, steps: usize, cache: CacheSlot) -> Result<()> {
        self.prepare_batch(e, steps, CacheBatch::one(cache))
    }

    /// [`Denoise::prepare`] of the loop over a batch's caches.
    pub fn prepare_batch(&mut self, e: &Engine, steps: usize, caches: CacheBatch) -> Result<()> {
        self.prepare_graph(e, Self::key(steps, caches, false), caches)
    }

    /// [`Denoise::prepare`] of the guided loop (real-time chunking, Jacobian dropped).
    pub fn prepare_guided(&mut self, e: &Engine, steps: usize, cache: CacheSlot) -> Result<()> {
        let cache = CacheBatch::one(cache);
        self.prepare_graph(e, Self::key(steps, cache, true), cache)
    }

    fn key(steps: usize, caches: CacheBatch, guided: bool) -> GraphKey {
        GraphKey {
            steps,
            cache: caches.first.kv.ptr,
            batch: caches.n,
            guided,
        }
    }

    fn prepare_graph(&mut self, e: &Engine, key: GraphKey, caches: CacheBatch) -> Result<()> {
        if caches.n == 0 || caches.n > MAX_BATCH || (key.guided && caches.n != 1) {
            return Err(Error::Cuda(format!(
                "internal: a denoise loop over {} sequences{}",
                caches.n,
                if key.guided { ", guided" } else { "" }
            )));
        }
        if self.graphs.contains_key(&key) {
            return Ok(());
        }
        let steps = key.steps;
        let table = TimeTable::build(e, &self.lane, &self.weights.w, self.shape.width, steps)?;
        let coef = if key.guided {
            let device = DeviceBuffer::alloc(&e.dev, DType::F32, steps)?;
            // The eager run below reads it before any frame's values are uploaded.
            self.lane.zero(device.view())?;
            let host = PinnedBuffer::alloc(&e.dev, steps * std::mem::size_of::<f32>())?;
            Some(CoefTable { device, host })
        } else {
            None
        };
        let guide = coef.as_ref().map(|c| Guidance {
            weight: self.buf.guide_weight,
            target: self.buf.guide_target,
            coef: c.device.view(),
        });
        self.forward(e, steps, &table, caches, guide)?;
        let graph = capture(
            &self.lane,
            || self.forward(e, steps, &table, caches, guide),
            if key.guided {
                "guided denoise loop"
            } else {
                "denoise loop"
            },
        )?;
        self.graphs.insert(key, StepGraph { graph, table, coef });
        Ok(())
    }

    /// On this stage's stream: uploads `noise` and (pi0) `state` (pinned, untouched until the
    /// stream has passed this point), replays the loop over `cache` and downloads the actions
    /// into `actions` (pinned; read it after the stream has passed this point).
    pub fn enqueue(
        &mut self,
        e: &Engine,
        sampler: (&[f32], Option<&[f32]>),
        steps: usize,
        cache: CacheSlot,
        actions: &mut [f32],
    ) -> Result<()> {
        self.enqueue_with(e, sampler, None, steps, CacheBatch::one(cache), actions)
    }

    /// [`Denoise::enqueue`] of a batch: one loop over the sequences of `caches`, whose
    /// noise (and pi0 states) are `sampler`'s, one sequence after another, as are the
    /// actions it downloads.
    pub fn enqueue_batch(
        &mut self,
        e: &Engine,
        sampler: (&[f32], Option<&[f32]>),
        steps: usize,
        caches: CacheBatch,
        actions: &mut [f32],
    ) -> Result<()> {
        self.enqueue_with(e, sampler, None, steps, caches, actions)
    }

    /// [`Denoise::enqueue`] of the guided loop: also uploads the guide's mask and target
    /// (pinned) and its guidance weight per step (staged here; `coef` holds `steps` values)
    /// before the launch.
    pub fn enqueue_guided(
        &mut self,
        e: &Engine,
        sampler: (&[f32], Option<&[f32]>),
        guide: GuideHost<'_>,
        steps: usize,
        cache: CacheSlot,
        actions: &mut [f32],
    ) -> Result<()> {
        let cache = CacheBatch::one(cache);
        self.enqueue_with(e, sampler, Some(guide), steps, cache, actions)
    }

    fn enqueue_with(
        &mut self,
        e: &Engine,
        (noise, state): (&[f32], Option<&[f32]>),
        guide: Option<GuideHost<'_>>,
        steps: usize,
        caches: CacheBatch,
        actions: &mut [f32],
    ) -> Result<()> {
        let n = caches.n * self.action_values();
        let ad = self.shape.action_dim;
        let states = state.filter(|_| !self.cfg.pi05);
        if caches.n > MAX_BATCH
            || noise.len() != n
            || actions.len() < n
            || states.is_some_and(|s| s.len() != caches.n * ad)
        {
            return Err(Error::Cuda(format!(
                "internal: a denoise loop over {} sequences with {} noise values, {} state \
                 values and room for {} actions",
                caches.n,
                noise.len(),
                states.map_or(0, <[f32]>::len),
                actions.len()
            )));
        }
        self.lane.upload(noise, self.buf.noise.at(0, n)?)?;
        if let Some(s) = states {
            self.lane.upload(s, self.buf.state.at(0, s.len())?)?;
        }
        if let Some(g) = &guide {
            if g.weight.len() != n || g.target.len() != n || g.coef.len() != steps {
                return Err(Error::Cuda(format!(
                    "internal: guide of {} weights, {} targets and {} coefficients; expected {n}, {n} and {steps}",
                    g.weight.len(),
                    g.target.len(),
                    g.coef.len()
                )));
            }
            self.lane.upload(g.weight, self.buf.guide_weight)?;
            self.lane.upload(g.target, self.buf.guide_target)?;
        }
        let key = Self::key(steps, caches, guide.is_some());
        self.prepare_graph(e, key, caches)?;
        let g = self
            .graphs
            .get_mut(&key)
            .ok_or_else(|| Error::Cuda("internal: denoise graph missing".into()))?;
        if let Some(guide) = &guide {
            let table = g
                .coef
                .as_mut()
                .ok_or_else(|| Error::Cuda("internal: guided graph without its table".into()))?;
            // The previous guided frame's upload from this staging has completed: frames
            // are collected (synchronised) before the next is enqueued.
            table
                .host
                .slice_mut::<f32>(steps)?
                .copy_from_slice(guide.coef);
            self.lane
                .upload(table.host.slice::<f32>(steps)?, table.device.view())?;
        }
        g.graph.launch("denoise")?;
        self.last = Some(key);
        self.lane.download(self.buf.xt.at(0, n)?, &mut actions[..n])
    }

    /// Norm `idx` of the expert at step `step` into `he`; returns the gate of the residual it
    /// feeds (pi0.5) or None.
    fn expert_norm(
        &self,
        e: &Engine,
        norm: &NormW,
        (idx, step, rows): (usize, usize, usize),
        table: &TimeTable,
    ) -> Result<Option<View>> {
        let (s, b, l) = (&self.shape, &self.buf, &self.lane);
        let eps = self.cfg.rms_norm_eps;
        match norm {
            NormW::Plain(w) => {
                let param = NormParam::OnePlus(*w);
                rms_norm(&e.kernels, l, b.xe, param, b.he, rows, s.width, eps)?;
                Ok(None)
            }
            NormW::Adaptive(_) => {
                let m = table.modulation(idx, step, s.width)?;
                let param = NormParam::Modulation(m);
                rms_norm(&e.kernels, l, b.xe, param, b.he, rows, s.width, eps)?;
                Ok(Some(m.at(2 * s.width, s.width)?))
            }
        }
    }

    /// xe += x·Wᵀ, gated per column when `gate` is given: one cuBLASLt call with the gate as
    /// a per-row alpha vector where cuBLASLt supports it (and `TURBOPI_FUSED_GATE` is not
    /// off), else the product into `tmp` and a gated add.
    fn expert_residual(&self, e: &Engine, x: Mat, w: &Lin, gate: Option<View>) -> Result<()> {
        let (s, b, l) = (&self.shape, &self.buf, &self.lane);
        let xe = Mat::new(b.xe, x.rows, s.width);
        match gate {
            None => e.linear(l, x, lin(w), xe, 1.0),
            Some(gate) => {
                if settings::flag("TURBOPI_FUSED_GATE", true)?
                    && e.linear_gated(l, x, lin(w), xe, gate)?
                {
                    return Ok(());
                }
                e.linear(l, x, lin(w), Mat::new(b.tmp, x.rows, s.width), 0.0)?;
                add_residual(&e.kernels, l, b.xe, b.tmp, Some(gate), x.rows, s.width)
            }
        }
    }

    /// The suffix tokens of step `step` of `seqs` sequences into `xe`, one sequence's after
    /// another's.
    fn suffix_tokens(&self, e: &Engine, step: usize, seqs: usize, table: &TimeTable) -> Result<()> {
        let (k, l) = (&e.kernels, &self.lane);
        let (s, b, wt) = (&self.shape, &self.buf, &self.weights.w);
        let (h, ew) = (seqs * s.horizon, s.width);
        let x_act = Mat::new(b.xt_act, h, s.action_dim);
        match &wt.heads {
            HeadsW::Pi0 {
                time_in, time_out, ..
            } => {
                e.linear(l, x_act, lin(&wt.action_in), Mat::new(b.a, h, ew), 0.0)?;
                let to_act = Out {
                    f32: None,
                    act: Some(b.a_act),
                    ld: ew,
                };
                bias_act(k, l, b.a, ew, wt.action_in.b, Act::None, to_act, h, ew)?;
                // The action half of action_time_mlp_in; the time half is in the table.
                let w_a = Mat::new(time_in.w, ew, ew).ld(2 * ew);
                e.linear(l, Mat::new(b.a_act, h, ew), w_a, Mat::new(b.a, h, ew), 0.0)?;
                let tb = table
                    .tb
                    .ok_or_else(|| Error::Cuda("internal: pi0 time table missing".into()))?
                    .at(step * ew, ew)?;
                bias_act(k, l, b.a, ew, Some(tb), Act::Silu, to_act, h, ew)?;
                // Each sequence's tokens: its state token, then its action tokens.
                let (ho, n) = (s.horizon, s.suffix);
                for q in 0..seqs {
                    let rows = b.xe.rows(q * n + 1, ho, ew)?;
                    e.linear(
                        l,
                        Mat::new(b.a_act.rows(q * ho, ho, ew)?, ho, ew),
                        lin(time_out),
                        Mat::new(rows, ho, ew),
                        0.0,
                    )?;
                    add_bias(k, l, rows, ew, time_out.bias()?, ho, ew)?;
                    l.copy(b.state_tok.rows(q, 1, ew)?, b.xe.rows(q * n, 1, ew)?)?;
                }
                Ok(())
            }
            HeadsW::Pi05 { .. } => {
                e.linear(l, x_act, lin(&wt.action_in), Mat::new(b.xe, h, ew), 0.0)?;
                add_bias(k, l, b.xe, ew, wt.action_in.bias()?, h, ew)
            }
        }
    }

    /// The whole sampler on this stage's stream over `cache`: x = noise; `steps` times
    /// x += dt·v(x, t), or with `guide` the guided step (Jacobian dropped) at the times of
    /// [`rtc::step_times`]. Launches only (no host sync, no device allocation): what the
    /// graph captures.
    fn forward(
        &self,
        e: &Engine,
        steps: usize,
        table: &TimeTable,
        caches: CacheBatch,
        guide: Option<Guidance>,
    ) -> Result<()> {
        let (k, l) = (&e.kernels, &self.lane);
        let (s, b, wt, cfg) = (&self.shape, &self.buf, &self.weights.w, &self.cfg);
        let hs = heads(cfg);
        let seqs = caches.n;
        // Rows of every sequence: actions (h), suffix tokens (n).
        let (h, ad, ew, n) = (seqs * s.horizon, s.action_dim, s.width, seqs * s.suffix);
        let qw = hs.nh * hs.hd;
        l.copy(b.noise.at(0, h * ad)?, b.xt)?;
        cast(k, l, b.xt, b.xt_act, h * ad)?;
        self.mark(e, "setup (noise, state token)")?;
        if let HeadsW::Pi0 { state, .. } = &wt.heads {
            cast(k, l, b.state, b.state_act, seqs * ad)?;
            e.linear(
                l,
                Mat::new(b.state_act, seqs, ad),
                lin(state),
                Mat::new(b.state_tok, seqs, ew),
                0.0,
            )?;
            add_bias(k, l, b.state_tok, ew, state.bias()?, seqs, ew)?;
        }
        let dt = (-1.0f64 / steps as f64) as f32;
        // The guided step's times: the f64 grid of rtc::sample, as the CPU twin uses it.
        let times: Vec<f32> = match guide {
            Some(_) => rtc::step_times(steps).iter().map(|&t| t as f32).collect(),
            None => Vec::new(),
        };
        let mask = Mask {
            prefix_len: Some(caches.prefix_lens()?),
            prefix_stride: caches.info_stride,
            prefix_cap: s.max_prefix,
            n_state: s.first_action,
            group: hs.group(),
        };
        let scratch = Scratch {
            scores: b.scores,
            probs: b.probs,
        };
        let expert: &GemmaW = &wt.expert;
        let final_norm = expert
            .final_norm
            .as_ref()
            .ok_or_else(|| Error::Cuda("internal: expert without its final norm".into()))?;
        for step in 0..steps {
            self.suffix_tokens(e, step, seqs, table)?;
            self.mark(e, "suffix tokens (action_in / time MLP)")?;
            for (li, lw) in expert.layers.iter().enumerate() {
                let gate = self.expert_norm(e, &lw.norm1, (2 * li, step, n), table)?;
                self.mark(e, "rms_norm")?;
                let (kc, vc) = caches.layer(li)?;
                let pos0 = caches.prefix_lens()?;
                let he = Mat::new(b.he, n, ew);
                let rows = caches.rows(s.suffix);
                let rope_out = RopeOut {
                    q: b.q,
                    k: kc,
                    v: vc,
                    inv_freq: b.inv_freq,
                    pos0,
                    heads: hs,
                    out_row0: s.max_prefix,
                };
                // The epilogue writes one sequence's cache.
                if seqs == 1 && e.linear_rope(l, he, lin(&lw.qkv), rope_out)? {
                    self.mark(e, "gemm qkv + rope")?;
                } else {
                    let qkv = Mat::new(b.qkv, n, hs.qkv_width());
                    e.linear(l, he, lin(&lw.qkv), qkv, 0.0)?;
                    self.mark(e, "gemm qkv")?;
                    let (cap, io) = (s.max_prefix, (b.qkv, b.q, kc, vc));
                    rope_qkv_batch(k, l, io, b.inv_freq, pos0, rows, hs, cap)?;
                    self.mark(e, "rope_qkv")?;
                }
                gemma_attention(
                    e,
                    cfg,
                    l,
                    (rows, s.cache_rows),
                    b.q,
                    (kc, vc),
                    mask,
                    scratch,
                    Some((b.fa, 1)),
                    (b.att_g, b.att),
                )?;
                self.mark(e, "attention")?;
                self.expert_residual(e, Mat::new(b.att, n, qw), &lw.o, gate)?;
                self.mark(e, "gemm o + residual")?;
                let gate = self.expert_norm(e, &lw.norm2, (2 * li + 1, step, n), table)?;
                self.mark(e, "rms_norm")?;
                let he = Mat::new(b.he, n, ew);
                let m = Mat::new(b.m, n, s.mlp);
                if e.linear_geglu(l, he, lin(&lw.gu), m)? {
                    self.mark(e, "gemm gate|up + gelu_gate")?;
                } else {
                    e.linear(l, he, lin(&lw.gu), Mat::new(b.gu, n, 2 * s.mlp), 0.0)?;
                    self.mark(e, "gemm gate|up")?;
                    gelu_gate(k, l, (b.gu, b.m), n, s.mlp, None)?;
                    self.mark(e, "gelu_gate")?;
                }
                self.expert_residual(e, Mat::new(b.m, n, s.mlp), &lw.down, gate)?;
                self.mark(e, "gemm down + residual")?;
            }
            self.expert_norm(e, final_norm, (2 * s.layers, step, n), table)?;
            self.mark(e, "rms_norm")?;
            // Each sequence's action tokens follow its state token (pi0); pi0.5's are all
            // its tokens, so one product takes every sequence's.
            let (ho, per) = (s.horizon, s.suffix);
            let parts = if s.first_action == 0 {
                vec![(0, 0, h)]
            } else {
                (0..seqs)
                    .map(|q| (q * per + s.first_action, q * ho, ho))
                    .collect()
            };
            for (src, dst, rows) in parts {
                e.linear(
                    l,
                    Mat::new(b.he.rows(src, rows, ew)?, rows, ew),
                    lin(&wt.action_out),
                    Mat::new(b.vraw.rows(dst, rows, ad)?, rows, ad),
                    0.0,
                )?;
            }
            self.mark(e, "gemm action_out")?;
            let bias = wt.action_out.bias()?;
            match guide {
                None => {
                    euler_step(k, l, b.xt, b.xt_act, b.vraw, bias, dt, h, ad)?;
                    self.mark(e, "euler_step")?;
                }
                Some(g) => {
                    let t = times
                        .get(step)
                        .copied()
                        .ok_or_else(|| Error::Cuda("internal: a step past the time grid".into()))?;
                    let consts = (step, t, dt);
                    let io = (b.xt, b.xt_act, b.vraw, bias);
                    euler_step_guided(k, l, io, g, consts, h, ad)?;
                    self.mark(e, "euler_step_guided")?;
                }
            }
        }
        Ok(())
    }

    /// While profiling, closes an operation of kind `what`.
    fn mark(&self, e: &Engine, what: &'static str) -> Result<()> {
        self.marks.mark(e, &self.lane, what)
    }

    /// What the last loop's graph launches.
    pub fn census(&self) -> Result<Option<NodeCensus>> {
        match self.last.and_then(|k| self.graphs.get(&k)) {
            Some(g) => g.graph.census().map(Some),
            None => Ok(None),
        }
    }

    /// Bytes of weights one step reads: the expert's linears and the action heads (the time
    /// MLP and the adaptive norms' dense layers depend only on the step grid: precomputed).
    pub fn step_weight_bytes(&self) -> usize {
        let w = &self.weights.w;
        let layers: usize = w
            .expert
            .layers
            .iter()
            .map(|l| l.qkv.w.bytes() + l.o.w.bytes() + l.gu.w.bytes() + l.down.w.bytes())
            .sum();
        let heads = match &w.heads {
            // The action half of action_time_mlp_in, and action_time_mlp_out.
            HeadsW::Pi0 {
                time_in, time_out, ..
            } => time_in.w.bytes() / 2 + time_out.w.bytes(),
            HeadsW::Pi05 { .. } => 0,
        };
        layers + w.action_in.w.bytes() + w.action_out.w.bytes() + heads
    }

    /// Device time per kind of operation of one denoise step, from one eager run of the
    /// whole loop with an event after each operation. The run is queued behind a replay of
    /// the graph, so that the host is ahead of the device and the intervals are device time
    /// (not launch gaps); the graph replay's own time is reported for comparison.
    pub fn profile(&mut self, e: &Engine, steps: usize, cache: CacheSlot) -> Result<String> {
        self.prepare(e, steps, cache)?;
        let g = self
            .graphs
            .get(&Self::key(steps, CacheBatch::one(cache), false))
            .ok_or_else(|| Error::Cuda("internal: denoise graph missing".into()))?;
        let per = steps as f64;
        let title =
            format!("denoise profile ({steps} steps, eager, events after each op; per step):");
        // One replay to warm up, one timed; the eager run queues behind the second.
        let p = profile_stage(
            e,
            &self.lane,
            (Some(&g.graph), "denoise"),
            &self.marks,
            || self.forward(e, steps, &g.table, CacheBatch::one(cache), None),
            (&title, per, "step"),
        )?;
        let (mut out, total) = (p.table, p.total_ms);
        let graph_ms = p
            .graph_ms
            .ok_or_else(|| Error::Cuda("internal: denoise graph not timed".into()))?;
        let _ = writeln!(
            out,
            "  {:<40} {:>8.1} us  (eager, incl. event overhead; whole loop {:.2} ms)",
            "total",
            total * 1e3 / per,
            total
        );
        let _ = writeln!(
            out,
            "  {:<40} {:>8.1} us  (whole loop {:.2} ms)",
            "graph replay",
            f64::from(graph_ms) * 1e3 / per,
            graph_ms
        );
        let _ = writeln!(
            out,
            "  gemm plans {}, of which autotuned {}; shapes cuBLASLt refused (gated residual or bias epilogue, run as two launches): {}",
            e.gemm.plan_count(),
            e.gemm.tuned_count(),
            e.gemm.gated_fallbacks()
        );
        Ok(out)
    }
}
