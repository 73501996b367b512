//! The pi0 / pi0.5 policy on the GPU: the CPU's three stages (vision, prefix K/V, denoise),
//! each on its own stream, ordered by events whose timestamps are the stage times.
//!
//! Memory is laid out once from the config: the weights in one allocation, every activation
//! (sized for the longest prefix) and the K/V cache in another. A frame allocates nothing and
//! synchronises once: the observation is uploaded from pinned buffers, the kernels run, the
//! actions come back. The denoise loop (all steps) is a CUDA graph, captured the first time a
//! step count is used and replayed after; it does not depend on the prefix length, which it
//! reads from device memory (attention runs over the padded cache and masks the unused rows).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use cudarc::driver::{sys, CudaEvent, CudaGraph};

use super::activation::{add_bias, bias_act, cast, Act, Out};
use super::attention::{
    self, attention, fused_attention, fused_fits, score_stride, unpermute_heads, Mask, Problem,
    Scratch, Strided, Workspace,
};
use super::compile::Kernels;
use super::device::{
    guard, timing_event, CudaResult, DType, Device, DeviceBuffer, Lane, PinnedBuffer, Pod, View,
};
use super::embed::embed_tokens;
use super::euler::euler_step;
use super::gemm::{Gemm, Mat, Op};
use super::layer_norm::layer_norm;
use super::mlp::gelu_gate;
use super::patch::{im2col, patch_embed_finish};
use super::residual::add_residual;
use super::rms_norm::{rms_norm, NormParam};
use super::rope::{rope_qkv, Heads};
use super::weights::{Arena, DeviceWeights, GemmaW, HeadsW, Lin, NormW};
use crate::backend::{Precision, Runner};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::gemma::KvCache;
use crate::observation::Observation;
use crate::policy::{time_embedding, StageTimes};
use crate::{cpu, Error, Result};

/// The dimensions the buffers and launches are sized from.
#[derive(Debug, Clone)]
struct Dims {
    n_img: usize,
    size: usize,
    patch: usize,
    /// Tokens per image.
    t: usize,
    vw: usize,
    vnh: usize,
    vhd: usize,
    vmlp: usize,
    /// Columns of an im2col row (3 p p).
    pk: usize,
    vdepth: usize,
    w: usize,
    heads: Heads,
    mlp: usize,
    ew: usize,
    emlp: usize,
    ad: usize,
    /// Action horizon.
    h: usize,
    /// Suffix tokens (state + actions for pi0).
    s: usize,
    first_action: usize,
    max_tok: usize,
    /// Longest prefix.
    pmax: usize,
    /// Rows of each layer's K/V cache: the longest prefix, then the suffix.
    cap: usize,
    depth: usize,
    vocab: usize,
    /// Adaptive norms of the expert (pi0.5): two per layer and the final one.
    n_norms: usize,
}

impl Dims {
    fn new(c: &Config) -> Dims {
        let heads = Heads {
            nh: c.num_heads,
            kv: c.num_kv_heads,
            hd: c.head_dim,
        };
        let s = c.suffix_len();
        let pmax = c.max_prefix_len();
        Dims {
            n_img: c.num_images,
            size: c.image_size,
            patch: c.patch_size,
            t: c.tokens_per_image(),
            vw: c.vision_width,
            vnh: c.vision_heads,
            vhd: c.vision_head_dim(),
            vmlp: c.vision_mlp_dim,
            pk: 3 * c.patch_size * c.patch_size,
            vdepth: c.vision_depth,
            w: c.vlm_width,
            heads,
            mlp: c.vlm_mlp_dim,
            ew: c.expert_width,
            emlp: c.expert_mlp_dim,
            ad: c.action_dim,
            h: c.action_horizon,
            s,
            first_action: s - c.action_horizon,
            max_tok: c.max_token_len,
            pmax,
            cap: pmax + s,
            depth: c.vlm_depth,
            vocab: c.vocab_size,
            n_norms: if c.pi05 { 2 * c.vlm_depth + 1 } else { 0 },
        }
    }
}

struct VisionBuf {
    pixels: View,
    patches: View,
    x: View,
    h: View,
    /// f32 GEMM outputs awaiting their bias (q|k|v and fc1).
    pre: View,
    qkv: View,
    scores: View,
    probs: View,
    att: View,
    m: View,
    fa: Workspace,
}

struct PrefixBuf {
    ids: View,
    /// Per cache slot, i32 [P, 0]: the real prefix length and a zero (the prefix's first
    /// position).
    info: [View; 2],
    x: View,
    h: View,
    qkv: View,
    q: View,
    scores: View,
    probs: View,
    att_g: View,
    att: View,
    gu: View,
    m: View,
    /// Two cache slots (frame t's denoise reads one while frame t+1's prefix fills the
    /// other), each [depth][K, V][cap][kv * hd].
    kv: [View; 2],
    inv_freq: View,
}

struct DenoiseBuf {
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
    fa: Workspace,
}

struct Buffers {
    vision: VisionBuf,
    prefix: PrefixBuf,
    denoise: DenoiseBuf,
}

/// The problems the fused attention serves: the vision tower (every camera and head) and
/// the expert's queries over the whole cache.
fn vision_problem(d: &Dims, n_img: usize) -> Problem {
    Problem {
        rows: d.t,
        keys: d.t,
        hd: d.vhd,
        n1: n_img,
        n2: d.vnh,
    }
}

fn expert_problem(d: &Dims) -> Problem {
    Problem {
        rows: d.s * d.heads.group(),
        keys: d.cap,
        hd: d.heads.hd,
        n1: d.heads.kv,
        n2: 1,
    }
}

fn layout(d: &Dims, act: DType, ar: &mut Arena) -> Buffers {
    let f = DType::F32;
    let vr = d.n_img * d.t;
    let hs = d.heads;
    let qw = hs.nh * hs.hd;
    // Only the bf16 kernels have the fused attention.
    let mut workspace = |p: Problem| {
        let (part, stats) = if act == DType::Bf16 {
            p.workspace()
        } else {
            (0, 0)
        };
        Workspace {
            part: ar.take(f, part),
            stats: ar.take(f, stats),
        }
    };
    let vision_fa = workspace(vision_problem(d, d.n_img));
    let denoise_fa = workspace(expert_problem(d));
    let vision = VisionBuf {
        pixels: ar.take(f, d.n_img * d.size * d.size * 3),
        patches: ar.take(act, vr * d.pk),
        x: ar.take(f, vr * d.vw),
        h: ar.take(act, vr * d.vw),
        pre: ar.take(f, vr * (3 * d.vw).max(d.vmlp)),
        qkv: ar.take(act, vr * 3 * d.vw),
        scores: ar.take(f, d.vnh * d.t * score_stride(d.t)),
        probs: ar.take(act, d.vnh * d.t * score_stride(d.t)),
        att: ar.take(act, vr * d.vw),
        m: ar.take(act, vr * d.vmlp),
        fa: vision_fa,
    };
    let prefix = PrefixBuf {
        ids: ar.take(DType::I32, d.max_tok.max(1)),
        info: [ar.take(DType::I32, 4), ar.take(DType::I32, 4)],
        x: ar.take(f, d.pmax * d.w),
        h: ar.take(act, d.pmax * d.w),
        qkv: ar.take(act, d.pmax * hs.qkv_width()),
        q: ar.take(act, d.pmax * qw),
        scores: ar.take(f, hs.nh * d.pmax * score_stride(d.pmax)),
        probs: ar.take(act, hs.nh * d.pmax * score_stride(d.pmax)),
        att_g: ar.take(act, d.pmax * qw),
        att: ar.take(act, d.pmax * qw),
        gu: ar.take(act, d.pmax * 2 * d.mlp),
        m: ar.take(act, d.pmax * d.mlp),
        kv: [
            ar.take(act, d.depth * 2 * d.cap * hs.kv_width()),
            ar.take(act, d.depth * 2 * d.cap * hs.kv_width()),
        ],
        inv_freq: ar.take(f, hs.hd / 2),
    };
    let denoise = DenoiseBuf {
        noise: ar.take(f, d.h * d.ad),
        state: ar.take(f, d.ad),
        xt: ar.take(f, d.h * d.ad),
        xt_act: ar.take(act, d.h * d.ad),
        state_act: ar.take(act, d.ad),
        state_tok: ar.take(f, d.ew),
        a: ar.take(f, d.h * d.ew),
        a_act: ar.take(act, d.h * d.ew),
        xe: ar.take(f, d.s * d.ew),
        he: ar.take(act, d.s * d.ew),
        qkv: ar.take(act, d.s * hs.qkv_width()),
        q: ar.take(act, d.s * qw),
        scores: ar.take(f, hs.nh * d.s * score_stride(d.cap)),
        probs: ar.take(act, hs.nh * d.s * score_stride(d.cap)),
        att_g: ar.take(act, d.s * qw),
        att: ar.take(act, d.s * qw),
        tmp: ar.take(f, d.s * d.ew),
        gu: ar.take(act, d.s * 2 * d.emlp),
        m: ar.take(act, d.s * d.emlp),
        vraw: ar.take(f, d.h * d.ad),
        fa: denoise_fa,
    };
    Buffers {
        vision,
        prefix,
        denoise,
    }
}

/// Per step count: what depends only on the time (pi0: W_t · temb + b of the action-time
/// MLP; pi0.5: the (scale, shift, gate) of every adaptive norm), precomputed once with the
/// same kernels the loop would use.
struct TimeTable {
    steps: usize,
    /// pi0: f32 [steps, ew].
    tb: Option<View>,
    /// pi0.5: f32 [n_norms][steps][3 ew].
    mods: Option<View>,
    _bufs: Vec<DeviceBuffer>,
}

impl TimeTable {
    fn modulation(&self, norm: usize, step: usize, ew: usize) -> Result<View> {
        self.mods
            .ok_or_else(|| Error::Cuda("internal: adaptive norm without modulations".into()))?
            .at((norm * self.steps + step) * 3 * ew, 3 * ew)
    }
}

/// CUDA graphs hold raw driver handles, so they are not `Send` by themselves.
struct SendGraph(CudaGraph);

// SAFETY: a graph is only launched by the thread that currently owns the policy (`infer`
// takes &mut self); the driver allows graph execs to be launched from any thread.
unsafe impl Send for SendGraph {}

struct StepGraph {
    graph: SendGraph,
    _table: TimeTable,
}

struct Lanes {
    vision: Lane,
    prefix: Lane,
    denoise: Lane,
}

struct Pinned {
    pixels: PinnedBuffer,
    ids: PinnedBuffer,
    info: PinnedBuffer,
    noise: PinnedBuffer,
    state: PinnedBuffer,
    actions: PinnedBuffer,
}

/// The policy on one GPU. Fields drop in order: graphs before the buffers they use, buffers
/// before the library handles, everything before the context.
pub struct CudaPolicy {
    /// The denoise loop by (steps, cache slot).
    graphs: HashMap<(usize, usize), StepGraph>,
    /// Vision by number of real cameras and prefix by (image rows, prompt tokens), captured
    /// after their first eager run: replaying saves the host's per-launch cost.
    vision_graphs: HashMap<usize, SendGraph>,
    prefix_graphs: HashMap<(usize, usize, usize), SendGraph>,
    buf: Buffers,
    _act_buf: DeviceBuffer,
    weights: DeviceWeights,
    /// Per cache slot.
    pinned: [Pinned; 2],
    gemm: Gemm,
    kernels: Kernels,
    /// Per cache slot: vision, prefix and denoise start / end.
    events: [[CudaEvent; 6]; 2],
    /// The cache slot the stages being recorded or launched use.
    slot: usize,
    /// Pipelined frames submitted and not yet collected (their slots, oldest first).
    in_flight: std::collections::VecDeque<usize>,
    /// The device time of the last split stage run through the stage traits.
    last_stage_gpu: Option<Duration>,
    lanes: Lanes,
    cfg: Config,
    dims: Dims,
    precision: Precision,
    /// While profiling: an event recorded on the denoise stream after each operation of an
    /// eager denoise run, named by the operation's kind.
    prof: RefCell<Option<Vec<(&'static str, CudaEvent)>>>,
    dev: Device,
}

/// Whether gated residuals use the fused GEMM (`TURBOPI_FUSED_GATE=0` forces the two-launch
/// path, for comparison).
fn fused_gate_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TURBOPI_FUSED_GATE").map_or(true, |v| v.trim() != "0"))
}

/// Stream priorities by the critical path (on unless `TURBOPI_STREAM_PRIORITIES=0`).
fn stream_priorities_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("TURBOPI_STREAM_PRIORITIES").as_deref(),
            Ok("0" | "off" | "false")
        )
    })
}

/// `TURBOPI_STAGE_GRAPHS=0` runs vision and prefix eagerly every frame (for A/B runs).
fn stage_graphs_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("TURBOPI_STAGE_GRAPHS").as_deref(),
            Ok("0" | "off" | "false")
        )
    })
}

/// The time between two recorded timing events.
fn elapsed(a: &CudaEvent, b: &CudaEvent) -> Result<Duration> {
    let t = a.elapsed_ms(b).cuda("reading stage times")?;
    Ok(Duration::from_secs_f64(f64::from(t.max(0.0)) / 1e3))
}

/// Synchronous upload of pageable host memory (used by the split stages between frames).
fn upload_now<T: Pod>(src: &[T], dst: View) -> Result<()> {
    if std::mem::size_of_val(src) > dst.bytes() {
        return Err(Error::Cuda("internal: upload larger than its view".into()));
    }
    // SAFETY: `dst` holds the bytes (checked); the copy is synchronous, so `src` outlives it.
    unsafe { cudarc::driver::result::memcpy_htod_sync(dst.ptr, src) }
        .cuda("uploading to the device")
}

/// Synchronous download into pageable host memory.
fn download_now<T: Pod>(src: View, dst: &mut [T]) -> Result<()> {
    if std::mem::size_of_val(dst) > src.bytes() {
        return Err(Error::Cuda(
            "internal: download larger than its view".into(),
        ));
    }
    // SAFETY: `src` holds the bytes (checked); the copy is synchronous and every stream that
    // wrote `src` was synchronised by the caller.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(dst, src.ptr) }
        .cuda("downloading from the device")
}

/// A device view of the activation type (f32 or bf16) as f32.
fn read_act(v: View) -> Result<Vec<f32>> {
    match v.dtype {
        DType::F32 => {
            let mut out = vec![0.0f32; v.len];
            download_now(v, &mut out)?;
            Ok(out)
        }
        DType::Bf16 => {
            let mut bits = vec![0u16; v.len];
            download_now(v, &mut bits)?;
            Ok(bits
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect())
        }
        other => Err(Error::Cuda(format!(
            "internal: reading {other:?} as activations"
        ))),
    }
}

/// f32 values into a device view of the activation type.
fn write_act(src: &[f32], dst: View) -> Result<()> {
    match dst.dtype {
        DType::F32 => upload_now(src, dst),
        DType::Bf16 => {
            let bits: Vec<u16> = src
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            upload_now(&bits, dst)
        }
        other => Err(Error::Cuda(format!(
            "internal: writing {other:?} as activations"
        ))),
    }
}

/// Records what `body` launches on `lane` into a graph (after its work so far has finished),
/// without running it.
fn capture(lane: &Lane, body: impl FnOnce() -> Result<()>, what: &str) -> Result<SendGraph> {
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
    Ok(SendGraph(graph))
}

fn lin(l: &Lin) -> Mat {
    Mat::new(l.w, l.n_out, l.n_in)
}

fn device_ordinal() -> Result<usize> {
    match std::env::var("TURBOPI_CUDA_DEVICE") {
        Ok(v) => v.trim().parse().map_err(|_| {
            Error::Input(format!(
                "TURBOPI_CUDA_DEVICE must be a device index (0, 1, ...), found `{v}`"
            ))
        }),
        Err(_) => Ok(0),
    }
}

impl CudaPolicy {
    /// Loads `ckpt` onto the GPU (device `TURBOPI_CUDA_DEVICE`, default 0): compiles the
    /// kernels, lays out and uploads the weights, allocates every buffer a frame needs.
    /// `progress(bytes_read, bytes_total)` is called as tensors are read.
    pub fn load(
        ckpt: &Checkpoint,
        precision: Precision,
        progress: impl FnMut(u64, u64),
    ) -> Result<CudaPolicy> {
        guard("loading the policy on the GPU", move || {
            let p = Self::build(&ckpt.config, precision)?;
            p.weights.fill_from(ckpt, &p.lanes.prefix, progress)?;
            Ok(p)
        })
    }

    /// A policy of `cfg` with random weights generated on the device (for benchmarks: no
    /// checkpoint to write or read). The values differ from `random::write_random_checkpoint`'s
    /// (another generator) but have the same scales.
    pub fn random(cfg: &Config, precision: Precision, seed: u64) -> Result<CudaPolicy> {
        guard("building a random-weight policy on the GPU", || {
            cfg.validate()?;
            let p = Self::build(cfg, precision)?;
            p.weights.fill_random(&p.kernels, &p.lanes.prefix, seed)?;
            Ok(p)
        })
    }

    fn build(cfg: &Config, precision: Precision) -> Result<CudaPolicy> {
        let act = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::Bf16,
        };
        let dev = Device::open(device_ordinal()?)?;
        let kernels = Kernels::load(&dev, act)?;
        let gemm = Gemm::new(&dev)?;
        // Stream priorities by the critical path to the actions (what `turbopi graph plan`
        // prints): the denoise first, then the prefix, then vision, so that with frames
        // overlapped the next frame's stages fill the gaps of this frame's denoise.
        // `TURBOPI_STREAM_PRIORITIES=0` leaves every stream at the default (for A/B runs).
        let rank = |r: usize| stream_priorities_enabled().then_some(r);
        let lanes = Lanes {
            vision: Lane::with_rank(&dev, rank(2))?,
            prefix: Lane::with_rank(&dev, rank(1))?,
            denoise: Lane::with_rank(&dev, rank(0))?,
        };
        let dims = Dims::new(cfg);
        let weights = DeviceWeights::allocate(&dev, cfg, act)?;
        let mut sizing = Arena::sizing();
        layout(&dims, act, &mut sizing);
        let act_buf = DeviceBuffer::alloc(&dev, DType::U8, sizing.used())?;
        let buf = layout(&dims, act, &mut Arena::at(act_buf.view().ptr));
        // Cache rows past the prefix are read (with probability 0) by the padded attention:
        // they must hold finite values, so everything starts at zero.
        lanes.prefix.zero(act_buf.view())?;
        let inv_freq = cpu::rope_inv_freq(dims.heads.hd, cfg.rope_theta);
        lanes.prefix.upload(&inv_freq, buf.prefix.inv_freq)?;
        lanes.prefix.synchronize()?;
        let f = std::mem::size_of::<f32>();
        let pinned = || -> Result<Pinned> {
            Ok(Pinned {
                pixels: PinnedBuffer::alloc(&dev, dims.n_img * dims.size * dims.size * 3 * f)?,
                ids: PinnedBuffer::alloc(&dev, dims.max_tok.max(1) * f)?,
                info: PinnedBuffer::alloc(&dev, 4 * f)?,
                noise: PinnedBuffer::alloc(&dev, dims.h * dims.ad * f)?,
                state: PinnedBuffer::alloc(&dev, dims.ad * f)?,
                actions: PinnedBuffer::alloc(&dev, dims.h * dims.ad * f)?,
            })
        };
        let pinned = [pinned()?, pinned()?];
        let events = || -> Result<[CudaEvent; 6]> {
            Ok([
                timing_event(&dev)?,
                timing_event(&dev)?,
                timing_event(&dev)?,
                timing_event(&dev)?,
                timing_event(&dev)?,
                timing_event(&dev)?,
            ])
        };
        let events = [events()?, events()?];
        Ok(CudaPolicy {
            graphs: HashMap::new(),
            vision_graphs: HashMap::new(),
            prefix_graphs: HashMap::new(),
            buf,
            _act_buf: act_buf,
            weights,
            pinned,
            gemm,
            kernels,
            events,
            slot: 0,
            in_flight: std::collections::VecDeque::new(),
            last_stage_gpu: None,
            lanes,
            cfg: cfg.clone(),
            dims,
            precision,
            prof: RefCell::new(None),
            dev,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Device memory held by the weights, in bytes.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Builds (once per step count) the denoise graph, so that the first timed frame does not
    /// pay for the capture.
    pub fn warm_up(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::Input("denoise: steps must be at least 1".into()));
        }
        guard("warming up the denoise graph", || {
            self.dev.bind()?;
            let keep = self.slot;
            for slot in [0, 1] {
                self.slot = slot;
                let built = self.ensure_graph(steps);
                self.slot = keep;
                built?;
            }
            self.lanes.denoise.synchronize()
        })
    }

    /// Runs and captures the vision graph for every camera count and, given the number of
    /// real prompt tokens, the prefix graph for every camera count, on placeholder inputs:
    /// a split stage node's first frames then cost what later ones do (the first eager run
    /// plans and autotunes every GEMM).
    pub fn warm_up_stages(&mut self, prompt_tokens: Option<usize>) -> Result<()> {
        guard("warming up the stage graphs", || {
            self.dev.bind()?;
            let d = self.dims.clone();
            let per_image = d.size * d.size * 3;
            if let Some(n_ids) = prompt_tokens {
                if n_ids > d.max_tok {
                    return Err(Error::Input(format!(
                        "prefix: {n_ids} prompt tokens, at most max_token_len {}",
                        d.max_tok
                    )));
                }
                let ids = vec![0i32; n_ids];
                for n in 0..=d.n_img {
                    self.stage_prompt(&ids, n * d.t + n_ids)?;
                    self.enqueue_prefix(n * d.t, n_ids)?;
                    // The pinned prompt is rewritten next round.
                    self.lanes.prefix.synchronize()?;
                }
            } else {
                for n in 1..=d.n_img {
                    let px = vec![0.0f32; n * per_image];
                    let real: Vec<usize> = (0..n).collect();
                    self.stage_images(&px, &real)?;
                    self.enqueue_vision(n)?;
                    self.lanes.vision.synchronize()?;
                }
            }
            Ok(())
        })
    }

    /// The real cameras and the real prompt token ids of `obs`, checked as the CPU checks them.
    fn check_inputs(
        &self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<usize>, Vec<i32>)> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        if obs.image_masks.len() != c.num_images || obs.images.len() != c.num_images * per_image {
            return Err(Error::Input(format!(
                "vision: expected {} images of {}x{}x3 and {} masks, got {} values and {} masks",
                c.num_images,
                c.image_size,
                c.image_size,
                c.num_images,
                obs.images.len(),
                obs.image_masks.len()
            )));
        }
        if obs.tokens.len() != obs.token_mask.len() || obs.tokens.len() > c.max_token_len {
            return Err(Error::Input(format!(
                "prefix: {} tokens with {} mask entries; expected equal lengths of at most max_token_len {}",
                obs.tokens.len(),
                obs.token_mask.len(),
                c.max_token_len
            )));
        }
        let mut ids = Vec::with_capacity(obs.tokens.len());
        for (&t, _) in obs.tokens.iter().zip(&obs.token_mask).filter(|(_, &m)| m) {
            if usize::try_from(t)
                .ok()
                .filter(|&id| id < c.vocab_size)
                .is_none()
            {
                return Err(Error::Input(format!(
                    "token id {t} is outside the vocabulary [0, {})",
                    c.vocab_size
                )));
            }
            ids.push(t);
        }
        crate::policy::check_sampler_inputs(c, obs.state.as_deref(), noise, steps)?;
        let real: Vec<usize> = (0..c.num_images).filter(|&i| obs.image_masks[i]).collect();
        crate::observation::check_visible(real.len(), ids.len())?;
        Ok((real, ids))
    }

    /// Copies the real cameras of `images` into the pinned pixel buffer.
    fn stage_images(&mut self, images: &[f32], real: &[usize]) -> Result<()> {
        let per_image = self.dims.size * self.dims.size * 3;
        let px = self.pinned[self.slot]
            .pixels
            .slice_mut::<f32>(real.len() * per_image)?;
        for (dst, &i) in px.chunks_exact_mut(per_image).zip(real) {
            dst.copy_from_slice(&images[i * per_image..(i + 1) * per_image]);
        }
        Ok(())
    }

    /// Copies the prompt ids and the prefix length `p` into pinned memory.
    fn stage_prompt(&mut self, ids: &[i32], p: usize) -> Result<()> {
        self.pinned[self.slot]
            .ids
            .slice_mut::<i32>(ids.len())?
            .copy_from_slice(ids);
        let info = [
            i32::try_from(p).map_err(|_| Error::Input("prefix too long".into()))?,
            0,
            0,
            0,
        ];
        self.pinned[self.slot]
            .info
            .slice_mut::<i32>(4)?
            .copy_from_slice(&info);
        Ok(())
    }

    /// Copies the noise and (pi0) the state into pinned memory.
    fn stage_sampler(&mut self, noise: &[f32], state: Option<&[f32]>) -> Result<()> {
        self.pinned[self.slot]
            .noise
            .slice_mut::<f32>(noise.len())?
            .copy_from_slice(noise);
        if let Some(s) = state.filter(|_| !self.cfg.pi05) {
            let ad = self.dims.ad;
            self.pinned[self.slot]
                .state
                .slice_mut::<f32>(ad)?
                .copy_from_slice(s);
        }
        Ok(())
    }

    /// Vision stream: upload of `n` staged cameras, then the vision graph (captured after
    /// the first eager run of this camera count).
    fn enqueue_vision(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let per_image = self.dims.size * self.dims.size * 3;
        let lv = &self.lanes.vision;
        lv.upload(
            self.pinned[self.slot].pixels.slice::<f32>(n * per_image)?,
            self.buf.vision.pixels,
        )?;
        if let Some(g) = self.vision_graphs.get(&n) {
            g.0.launch().cuda("launching the vision graph")?;
        } else {
            self.vision(n)?;
            if stage_graphs_enabled() {
                let g = capture(&self.lanes.vision, || self.vision(n), "vision")?;
                self.vision_graphs.insert(n, g);
            }
        }
        Ok(())
    }

    /// Prefix stream: upload of the staged prompt, then the prefix graph for this shape.
    fn enqueue_prefix(&mut self, img_rows: usize, n_ids: usize) -> Result<()> {
        let lp = &self.lanes.prefix;
        lp.upload(
            self.pinned[self.slot].ids.slice::<i32>(n_ids)?,
            self.buf.prefix.ids,
        )?;
        lp.upload(
            self.pinned[self.slot].info.slice::<i32>(4)?,
            self.buf.prefix.info[self.slot],
        )?;
        let key = (img_rows, n_ids, self.slot);
        if let Some(g) = self.prefix_graphs.get(&key) {
            g.0.launch().cuda("launching the prefix graph")?;
        } else {
            self.prefix(img_rows, n_ids)?;
            if stage_graphs_enabled() {
                let g = capture(&self.lanes.prefix, || self.prefix(key.0, key.1), "prefix")?;
                self.prefix_graphs.insert(key, g);
            }
        }
        Ok(())
    }

    /// Denoise stream: upload of the staged noise (and state), the denoise graph, and the
    /// download of the actions into pinned memory.
    fn enqueue_denoise(&mut self, steps: usize) -> Result<()> {
        let d = &self.dims;
        let n = d.h * d.ad;
        let ld = &self.lanes.denoise;
        ld.upload(
            self.pinned[self.slot].noise.slice::<f32>(n)?,
            self.buf.denoise.noise,
        )?;
        if !self.cfg.pi05 {
            ld.upload(
                self.pinned[self.slot].state.slice::<f32>(d.ad)?,
                self.buf.denoise.state,
            )?;
        }
        self.ensure_graph(steps)?;
        let graph = self
            .graphs
            .get(&(steps, self.slot))
            .ok_or_else(|| Error::Cuda("internal: denoise graph missing".into()))?;
        graph.graph.0.launch().cuda("launching the denoise graph")?;
        self.lanes.denoise.download(
            self.buf.denoise.xt.at(0, n)?,
            self.pinned[self.slot].actions.slice_mut::<f32>(n)?,
        )
    }

    fn frame(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, StageTimes)> {
        if !self.in_flight.is_empty() {
            return Err(Error::Input(
                "frames submitted with `submit` are in flight: collect them first".into(),
            ));
        }
        self.submit_inner(obs, noise, steps)?;
        self.collect_inner()?
            .ok_or_else(|| Error::Cuda("internal: the frame was not in flight".into()))
    }

    /// Starts a frame without waiting for it (pipelined use): its vision and prefix run on
    /// their streams while the previous frame's denoise still runs, which reads its K/V cache
    /// from the other of two cache slots. At most two frames are in flight; `collect` returns
    /// them oldest first.
    pub fn submit(&mut self, obs: &Observation, noise: &[f32], steps: usize) -> Result<()> {
        guard("submitting a frame", || {
            self.submit_inner(obs, noise, steps)
        })
    }

    /// Frames submitted and not collected yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the oldest frame in flight has finished (does not wait).
    pub fn ready(&self) -> bool {
        self.in_flight
            .front()
            .is_some_and(|&s| self.events[s][5].is_complete())
    }

    /// Waits for the oldest frame in flight: its actions and stage times (None when nothing
    /// is in flight).
    pub fn collect(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        guard("collecting a frame", || self.collect_inner())
    }

    fn submit_inner(&mut self, obs: &Observation, noise: &[f32], steps: usize) -> Result<()> {
        if self.in_flight.len() >= 2 {
            return Err(Error::Input(
                "two frames are in flight: collect one before submitting another".into(),
            ));
        }
        let (real, ids) = self.check_inputs(obs, noise, steps)?;
        self.dev.bind()?;
        let slot = match self.in_flight.back() {
            Some(&busy) => busy ^ 1,
            None => self.slot,
        };
        self.slot = slot;
        let img_rows = real.len() * self.dims.t;
        self.stage_images(&obs.images, &real)?;
        self.stage_prompt(&ids, img_rows + ids.len())?;
        self.stage_sampler(noise, obs.state.as_deref())?;

        // Vision rewrites the prefix's input rows: only after the other slot's prefix (the
        // previous frame) has read them.
        let lv = &self.lanes.vision;
        lv.stream
            .wait(&self.events[slot ^ 1][3])
            .cuda("ordering vision after the previous prefix")?;
        self.events[slot][0]
            .record(&lv.stream)
            .cuda("recording an event")?;
        self.enqueue_vision(real.len())?;
        let (ev, lv, lp) = (&self.events[slot], &self.lanes.vision, &self.lanes.prefix);
        ev[1].record(&lv.stream).cuda("recording an event")?;
        lp.stream
            .wait(&ev[1])
            .cuda("ordering prefix after vision")?;
        ev[2].record(&lp.stream).cuda("recording an event")?;
        self.enqueue_prefix(img_rows, ids.len())?;
        let (ev, lp, ld) = (&self.events[slot], &self.lanes.prefix, &self.lanes.denoise);
        ev[3].record(&lp.stream).cuda("recording an event")?;
        ld.stream
            .wait(&ev[3])
            .cuda("ordering denoise after prefix")?;
        ev[4].record(&ld.stream).cuda("recording an event")?;
        self.enqueue_denoise(steps)?;
        let (ev, ld) = (&self.events[slot], &self.lanes.denoise);
        ev[5].record(&ld.stream).cuda("recording an event")?;
        self.in_flight.push_back(slot);
        Ok(())
    }

    fn collect_inner(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        let Some(slot) = self.in_flight.pop_front() else {
            return Ok(None);
        };
        let ev = &self.events[slot];
        ev[5].synchronize().cuda("running the frame")?;
        let times = StageTimes {
            vision: elapsed(&ev[0], &ev[1])?,
            prefix: elapsed(&ev[2], &ev[3])?,
            denoise: elapsed(&ev[4], &ev[5])?,
        };
        let n = self.dims.h * self.dims.ad;
        let actions = self.pinned[slot].actions.slice::<f32>(n)?.to_vec();
        Ok(Some((actions, times)))
    }

    /// The vision stage of `n` cameras alone (a split vision node), enqueued between the
    /// slot's events 0 and 1 and not waited for: the device rows of its image embeddings.
    fn vision_alone(&mut self, images: &[f32], n: usize) -> Result<View> {
        let d = self.dims.clone();
        let per_image = d.size * d.size * 3;
        if n > d.n_img || images.len() != n * per_image {
            return Err(Error::Input(format!(
                "vision: expected at most {} images of {}x{}x3, got {} values for {n}",
                d.n_img,
                d.size,
                d.size,
                images.len()
            )));
        }
        self.dev.bind()?;
        let real: Vec<usize> = (0..n).collect();
        self.stage_images(images, &real)?;
        self.events[self.slot][0]
            .record(&self.lanes.vision.stream)
            .cuda("recording an event")?;
        self.enqueue_vision(n)?;
        self.events[self.slot][1]
            .record(&self.lanes.vision.stream)
            .cuda("recording an event")?;
        self.buf.prefix.x.at(0, n * d.t * d.w)
    }

    /// The vision stage alone (a split vision node): the image embeddings [n * t, vlm_width]
    /// (f32) of the `n` cameras in `images` ([n, size, size, 3] in [-1, 1]), and the stage's
    /// GPU time.
    pub fn run_vision(&mut self, images: &[f32], n: usize) -> Result<(Vec<f32>, Duration)> {
        guard("the CUDA vision stage", || {
            let rows = self.vision_alone(images, n)?;
            let ev = &self.events[self.slot];
            ev[1].synchronize().cuda("running the vision stage")?;
            let mut out = vec![0.0f32; rows.len];
            download_now(rows, &mut out)?;
            Ok((out, elapsed(&ev[0], &ev[1])?))
        })
    }

    /// The prefix stage alone (a split prefix node): the K/V cache of the real prefix from the
    /// image embeddings of `real_images` cameras and the real prompt ids, and the stage's GPU
    /// time. The cache comes back in f32 (exactly the values the device holds).
    pub fn run_prefix(
        &mut self,
        embeddings: &[f32],
        real_images: usize,
        ids: &[i32],
    ) -> Result<(KvCache, Duration)> {
        guard("the CUDA prefix stage", || {
            let (p, time) = self.prefix_from_host_inner(embeddings, real_images, ids)?;
            Ok((self.download_cache(p)?, time))
        })
    }

    /// The prefix stage from host image embeddings, leaving the K/V cache on the device
    /// (export it with [`CudaPolicy::cache_to_ring`] or [`CudaPolicy::download_cache`]).
    /// Returns the prefix length and the GPU time.
    pub fn prefix_from_host(
        &mut self,
        embeddings: &[f32],
        real_images: usize,
        ids: &[i32],
    ) -> Result<(usize, Duration)> {
        guard("the CUDA prefix stage", || {
            self.prefix_from_host_inner(embeddings, real_images, ids)
        })
    }

    fn prefix_from_host_inner(
        &mut self,
        embeddings: &[f32],
        real_images: usize,
        ids: &[i32],
    ) -> Result<(usize, Duration)> {
        let img_rows = real_images * self.dims.t;
        let w = self.dims.w;
        if embeddings.len() != img_rows * w {
            return Err(Error::Input(format!(
                "prefix: expected [{img_rows}, {w}] image embeddings for {real_images} cameras, got {} values",
                embeddings.len()
            )));
        }
        // Pageable upload: synchronous with respect to `embeddings`.
        self.prefix_alone(real_images, ids, |_, rows| upload_now(embeddings, rows))
    }

    /// The prefix stage alone (a split prefix node): `fill` writes the image embeddings into
    /// their rows of the prefix's input (ordered on the prefix lane), then the prefix runs and
    /// is waited for; the K/V cache stays on the device. The prefix length and the GPU time.
    fn prefix_alone(
        &mut self,
        real_images: usize,
        ids: &[i32],
        fill: impl FnOnce(&Self, View) -> Result<()>,
    ) -> Result<(usize, Duration)> {
        self.check_prompt(real_images, ids)?;
        self.dev.bind()?;
        let img_rows = real_images * self.dims.t;
        let p = img_rows + ids.len();
        self.stage_prompt(ids, p)?;
        self.events[self.slot][2]
            .record(&self.lanes.prefix.stream)
            .cuda("recording an event")?;
        fill(self, self.buf.prefix.x.at(0, img_rows * self.dims.w)?)?;
        self.enqueue_prefix(img_rows, ids.len())?;
        let (ev, lp) = (&self.events[self.slot], &self.lanes.prefix);
        ev[3].record(&lp.stream).cuda("recording an event")?;
        ev[3].synchronize().cuda("running the prefix stage")?;
        Ok((p, elapsed(&ev[2], &ev[3])?))
    }

    /// The denoise stage alone (a split denoise node) over a K/V cache of `p` prefix rows
    /// that `fill` writes (ordered on the denoise lane): the actions and the GPU time.
    fn denoise_alone(
        &mut self,
        p: usize,
        (state, noise, steps): (Option<&[f32]>, &[f32], usize),
        fill: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<(Vec<f32>, Duration)> {
        let d = self.dims.clone();
        if p > d.pmax {
            return Err(Error::Input(format!(
                "denoise: a prefix of {p} rows, at most {} fit the cache",
                d.pmax
            )));
        }
        crate::policy::check_sampler_inputs(&self.cfg, state, noise, steps)?;
        self.dev.bind()?;
        self.stage_sampler(noise, state)?;
        let info = [
            i32::try_from(p).map_err(|_| Error::Input("prefix too long".into()))?,
            0,
            0,
            0,
        ];
        upload_now(&info, self.buf.prefix.info[self.slot].at(0, 4)?)?;
        self.events[self.slot][4]
            .record(&self.lanes.denoise.stream)
            .cuda("recording an event")?;
        fill(self)?;
        self.enqueue_denoise(steps)?;
        let (ev, ld) = (&self.events[self.slot], &self.lanes.denoise);
        ev[5].record(&ld.stream).cuda("recording an event")?;
        ev[5].synchronize().cuda("running the denoise stage")?;
        let n = d.h * d.ad;
        let actions = self.pinned[self.slot].actions.slice::<f32>(n)?.to_vec();
        Ok((actions, elapsed(&ev[4], &ev[5])?))
    }

    /// The denoise stage alone (a split denoise node): actions [horizon, action_dim] from a
    /// K/V cache, the state (pi0) and the noise, and the stage's GPU time.
    pub fn run_denoise(
        &mut self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, Duration)> {
        guard("the CUDA denoise stage", || {
            let d = self.dims.clone();
            let kvw = d.heads.kv_width();
            if cache.kv_width != kvw
                || cache.k.len() != d.depth
                || cache.v.len() != d.depth
                || cache.len > d.pmax
                || cache
                    .k
                    .iter()
                    .chain(&cache.v)
                    .any(|l| l.len() != cache.len * kvw)
            {
                return Err(Error::Input(format!(
                    "denoise: expected a K/V cache of {} layers, width {kvw}, at most {} rows; got {} / {} layers, width {}, {} rows",
                    d.depth,
                    d.pmax,
                    cache.k.len(),
                    cache.v.len(),
                    cache.kv_width,
                    cache.len
                )));
            }
            self.denoise_alone(cache.len, (state, noise, steps), |me| {
                me.upload_cache(cache)
            })
        })
    }

    /// The vision stage into slot `slot` of `ring` (a split vision node with CUDA IPC): the
    /// image embeddings [n * t, vlm_width] f32 of the `n` cameras in `images` are copied into
    /// the slot and its event recorded, nothing crosses the host. Returns the GPU time and
    /// the bytes written.
    pub fn vision_to_ring(
        &mut self,
        images: &[f32],
        n: usize,
        ring: &super::ipc::Ring,
        slot: usize,
    ) -> Result<(Duration, usize)> {
        guard("the CUDA vision stage (IPC)", || {
            let rows = self.vision_alone(images, n)?;
            ring.write(slot, &self.lanes.vision, rows)?;
            let ev = &self.events[self.slot];
            ev[1].synchronize().cuda("running the vision stage")?;
            Ok((elapsed(&ev[0], &ev[1])?, rows.bytes()))
        })
    }

    /// The prefix stage reading its image embeddings from a producer's ring slot (stream
    /// ordered after the producer's event); the K/V cache stays on the device (see
    /// [`CudaPolicy::cache_to_ring`]). Returns the prefix length and the GPU time.
    pub fn prefix_from_ring(
        &mut self,
        importer: &mut super::ipc::Importer,
        remote: &super::ipc::Remote,
        real_images: usize,
        ids: &[i32],
    ) -> Result<(usize, Duration)> {
        guard("the CUDA prefix stage (IPC)", || {
            self.prefix_alone(real_images, ids, |me, rows| {
                importer.read(&me.dev, &me.lanes.prefix, remote, rows)
            })
        })
    }

    /// The shape [layers, 2, cache rows, kv_width] of the device K/V cache (what
    /// [`CudaPolicy::cache_to_ring`] exports), in the activation type.
    pub fn cache_shape(&self) -> [usize; 4] {
        let d = &self.dims;
        [d.depth, 2, d.cap, d.heads.kv_width()]
    }

    /// The activation type of the device tensors this policy exchanges.
    pub fn act_dtype(&self) -> DType {
        self.kernels.act
    }

    /// Copies the whole device K/V cache into slot `slot` of `ring` and records its event.
    /// Returns the bytes written.
    pub fn cache_to_ring(&mut self, ring: &super::ipc::Ring, slot: usize) -> Result<usize> {
        guard("exporting the K/V cache", || {
            self.dev.bind()?;
            let kv = self.buf.prefix.kv[self.slot];
            ring.write(slot, &self.lanes.prefix, kv)?;
            Ok(kv.bytes())
        })
    }

    /// The denoise stage reading the K/V cache (of `p` real prefix rows) from a producer's
    /// ring slot, stream-ordered after the producer's event.
    pub fn denoise_from_ring(
        &mut self,
        importer: &mut super::ipc::Importer,
        remote: &super::ipc::Remote,
        p: usize,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, Duration)> {
        guard("the CUDA denoise stage (IPC)", || {
            self.denoise_alone(p, (state, noise, steps), |me| {
                importer.read(
                    &me.dev,
                    &me.lanes.denoise,
                    remote,
                    me.buf.prefix.kv[me.slot],
                )
            })
        })
    }

    /// The device this policy runs on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn check_prompt(&self, real_images: usize, ids: &[i32]) -> Result<()> {
        let d = &self.dims;
        crate::observation::check_visible(real_images, ids.len())?;
        if real_images > d.n_img {
            return Err(Error::Input(format!(
                "prefix: {real_images} cameras, the checkpoint has {}",
                d.n_img
            )));
        }
        if ids.len() > d.max_tok {
            return Err(Error::Input(format!(
                "prefix: {} prompt tokens, at most max_token_len {}",
                ids.len(),
                d.max_tok
            )));
        }
        if let Some(t) = ids
            .iter()
            .find(|&&t| usize::try_from(t).map_or(true, |id| id >= d.vocab))
        {
            return Err(Error::Input(format!(
                "token id {t} is outside the vocabulary [0, {})",
                d.vocab
            )));
        }
        Ok(())
    }

    /// Rows 0..p of every layer's K and V cache, as f32.
    pub fn download_cache(&self, p: usize) -> Result<KvCache> {
        let d = &self.dims;
        let kvw = d.heads.kv_width();
        let (mut k, mut v) = (Vec::with_capacity(d.depth), Vec::with_capacity(d.depth));
        for layer in 0..d.depth {
            let (kc, vc) = self.cache(layer)?;
            k.push(read_act(kc.at(0, p * kvw)?)?);
            v.push(read_act(vc.at(0, p * kvw)?)?);
        }
        Ok(KvCache {
            len: p,
            kv_width: kvw,
            k,
            v,
        })
    }

    /// Writes `cache` into rows 0..len of every layer's K and V cache (rounded to the
    /// activation type: exact for a cache that came from this type).
    fn upload_cache(&self, cache: &KvCache) -> Result<()> {
        for layer in 0..self.dims.depth {
            let (kc, vc) = self.cache(layer)?;
            write_act(&cache.k[layer], kc.at(0, cache.k[layer].len())?)?;
            write_act(&cache.v[layer], vc.at(0, cache.v[layer].len())?)?;
        }
        Ok(())
    }

    /// SigLIP and the projector for `n` real images; writes prefix rows 0..n*t.
    fn vision(&self, n: usize) -> Result<()> {
        let (d, k, g, l) = (&self.dims, &self.kernels, &self.gemm, &self.lanes.vision);
        let (w, b) = (&self.weights.w.vision, &self.buf.vision);
        let eps = self.cfg.layer_norm_eps;
        let rows = n * d.t;
        let qkvw = 3 * d.vw;
        im2col(k, l, b.pixels, b.patches, n, d.size, d.patch)?;
        g.linear(
            l,
            Mat::new(b.patches, rows, d.pk),
            lin(&w.patch),
            Mat::new(b.x, rows, d.vw),
            0.0,
        )?;
        patch_embed_finish(k, l, b.x, w.patch.bias()?, w.pos, rows, d.t, d.vw)?;
        let scale = attention::scale(d.vhd);
        let scratch = Scratch {
            scores: b.scores,
            probs: b.probs,
        };
        let mut pending = None;
        for lw in &w.layers {
            layer_norm(k, l, b.x, pending, lw.ln1_w, lw.ln1_b, b.h, rows, d.vw, eps)?;
            g.linear(
                l,
                Mat::new(b.h, rows, d.vw),
                lin(&lw.qkv),
                Mat::new(b.pre, rows, qkvw),
                0.0,
            )?;
            let out = Out {
                f32: None,
                act: Some(b.qkv),
                ld: qkvw,
            };
            bias_act(k, l, b.pre, qkvw, lw.qkv.b, Act::None, out, rows, qkvw)?;
            // Every camera and head at once on the tensor cores, else per camera as GEMMs.
            let prob = vision_problem(d, n);
            let at = |view: View, ld: usize| Strided {
                view,
                ld,
                s1: d.t * ld,
                s2: d.vhd,
            };
            let (fq, fk, fv) = (
                at(b.qkv, qkvw),
                at(b.qkv.tail(d.vw)?, qkvw),
                at(b.qkv.tail(2 * d.vw)?, qkvw),
            );
            let fo = at(b.att, d.vw);
            let fused = fused_fits(k, &prob, &fq, (&fk, &fv), &fo);
            if fused {
                fused_attention(k, l, &prob, fq, (fk, fv), fo, scale, &Mask::full(d.t), b.fa)?;
            }
            for i in (0..n).filter(|_| !fused) {
                let base = b.qkv.tail(i * d.t * qkvw)?;
                let q = Mat {
                    view: base,
                    rows: d.t,
                    cols: d.vhd,
                    ld: qkvw,
                    stride: d.vhd,
                };
                let kk = Mat {
                    view: base.tail(d.vw)?,
                    ..q
                };
                let v = Mat {
                    view: base.tail(2 * d.vw)?,
                    ..q
                };
                let o = Mat {
                    view: b.att.tail(i * d.t * d.vw)?,
                    rows: d.t,
                    cols: d.vhd,
                    ld: d.vw,
                    stride: d.vhd,
                };
                attention(
                    k,
                    g,
                    l,
                    q,
                    kk,
                    v,
                    o,
                    d.vnh,
                    scale,
                    &Mask::full(d.t),
                    scratch,
                )?;
            }
            g.linear(
                l,
                Mat::new(b.att, rows, d.vw),
                lin(&lw.out),
                Mat::new(b.x, rows, d.vw),
                1.0,
            )?;
            layer_norm(
                k, l, b.x, lw.out.b, lw.ln2_w, lw.ln2_b, b.h, rows, d.vw, eps,
            )?;
            g.linear(
                l,
                Mat::new(b.h, rows, d.vw),
                lin(&lw.fc1),
                Mat::new(b.pre, rows, d.vmlp),
                0.0,
            )?;
            let out = Out {
                f32: None,
                act: Some(b.m),
                ld: d.vmlp,
            };
            bias_act(
                k,
                l,
                b.pre,
                d.vmlp,
                lw.fc1.b,
                Act::GeluTanh,
                out,
                rows,
                d.vmlp,
            )?;
            g.linear(
                l,
                Mat::new(b.m, rows, d.vmlp),
                lin(&lw.fc2),
                Mat::new(b.x, rows, d.vw),
                1.0,
            )?;
            pending = lw.fc2.b;
        }
        debug_assert_eq!(w.layers.len(), d.vdepth);
        layer_norm(k, l, b.x, pending, w.post_w, w.post_b, b.h, rows, d.vw, eps)?;
        let xp = self.buf.prefix.x;
        g.linear(
            l,
            Mat::new(b.h, rows, d.vw),
            lin(&w.proj),
            Mat::new(xp, rows, d.w),
            0.0,
        )?;
        add_bias(k, l, xp, d.w, w.proj.bias()?, rows, d.w)
    }

    /// Layer `layer`'s K and V caches, [cap, kv * hd] each.
    fn cache(&self, layer: usize) -> Result<(View, View)> {
        let d = &self.dims;
        let n = d.cap * d.heads.kv_width();
        let kv = self.buf.prefix.kv[self.slot];
        Ok((kv.at((2 * layer) * n, n)?, kv.at((2 * layer + 1) * n, n)?))
    }

    /// Attention of `rows` queries (grouped layout in `q`) over the first `keys` rows of the
    /// caches; the result lands in `att` [rows, nh * hd].
    #[allow(clippy::too_many_arguments)]
    fn gemma_attention(
        &self,
        l: &Lane,
        rows: usize,
        keys: usize,
        q: View,
        (kc, vc): (View, View),
        mask: Mask,
        scratch: Scratch,
        fa: Option<Workspace>,
        (att_g, att): (View, View),
    ) -> Result<()> {
        let hs = self.dims.heads;
        let (kv, group, hd) = (hs.kv, hs.group(), hs.hd);
        let gr = rows * group;
        // With one KV head the grouped layout is already [rows, nh * hd].
        let out = if kv == 1 { att } else { att_g };
        let fused = match fa {
            Some(work) => {
                let prob = Problem {
                    rows: gr,
                    keys,
                    hd,
                    n1: kv,
                    n2: 1,
                };
                let fq = Strided {
                    view: q,
                    ld: hd,
                    s1: gr * hd,
                    s2: 0,
                };
                let fk = Strided {
                    view: kc,
                    ld: hs.kv_width(),
                    s1: hd,
                    s2: 0,
                };
                let fv = Strided { view: vc, ..fk };
                let fo = Strided { view: out, ..fq };
                let fits = fused_fits(&self.kernels, &prob, &fq, (&fk, &fv), &fo);
                if fits {
                    fused_attention(
                        &self.kernels,
                        l,
                        &prob,
                        fq,
                        (fk, fv),
                        fo,
                        attention::scale(hd),
                        &mask,
                        work,
                    )?;
                }
                fits
            }
            None => false,
        };
        let qm = Mat::new(q, gr, hd);
        let km = Mat {
            view: kc,
            rows: keys,
            cols: hd,
            ld: hs.kv_width(),
            stride: hd,
        };
        let vm = Mat { view: vc, ..km };
        if !fused {
            let om = Mat::new(out, gr, hd);
            attention(
                &self.kernels,
                &self.gemm,
                l,
                qm,
                km,
                vm,
                om,
                kv,
                attention::scale(hd),
                &mask,
                scratch,
            )?;
        }
        if kv > 1 {
            unpermute_heads(&self.kernels, l, att_g, att, rows, kv, group, hd)?;
        }
        Ok(())
    }

    /// Token embedding and the Gemma 2B prefix over the `p` real tokens (images first):
    /// fills every layer's K (after RoPE) and V, rows 0..p.
    fn prefix(&self, img_rows: usize, n_tok: usize) -> Result<()> {
        let (d, k, g, l) = (&self.dims, &self.kernels, &self.gemm, &self.lanes.prefix);
        let b = &self.buf.prefix;
        let wt = &self.weights.w;
        let eps = self.cfg.rms_norm_eps;
        let p = img_rows + n_tok;
        let hs = d.heads;
        let scale = (d.w as f64).sqrt() as f32;
        embed_tokens(
            k,
            l,
            b.ids,
            wt.embed,
            b.x.rows(img_rows, n_tok, d.w)?,
            n_tok,
            d.vocab,
            d.w,
            scale,
        )?;
        if p == 0 {
            return Ok(());
        }
        let qw = hs.nh * hs.hd;
        let scratch = Scratch {
            scores: b.scores,
            probs: b.probs,
        };
        let mask = Mask {
            prefix_len: None,
            prefix_cap: p,
            n_state: 0,
            group: hs.group(),
        };
        let plain = |n: &NormW| match n {
            NormW::Plain(v) => Ok(NormParam::OnePlus(*v)),
            NormW::Adaptive(_) => Err(Error::Cuda("internal: adaptive norm in the prefix".into())),
        };
        let layers = &wt.prefix.layers;
        for (li, lw) in layers.iter().enumerate() {
            rms_norm(k, l, b.x, plain(&lw.norm1)?, b.h, p, d.w, eps)?;
            g.linear(
                l,
                Mat::new(b.h, p, d.w),
                lin(&lw.qkv),
                Mat::new(b.qkv, p, hs.qkv_width()),
                0.0,
            )?;
            let (kc, vc) = self.cache(li)?;
            rope_qkv(
                k,
                l,
                b.qkv,
                b.q,
                kc,
                vc,
                b.inv_freq,
                b.info[self.slot].at(1, 1)?,
                p,
                hs,
                0,
            )?;
            // The last layer's attention output and MLP feed nothing the policy reads.
            if li + 1 < layers.len() {
                self.gemma_attention(
                    l,
                    p,
                    p,
                    b.q,
                    (kc, vc),
                    mask,
                    scratch,
                    None,
                    (b.att_g, b.att),
                )?;
                g.linear(
                    l,
                    Mat::new(b.att, p, qw),
                    lin(&lw.o),
                    Mat::new(b.x, p, d.w),
                    1.0,
                )?;
                rms_norm(k, l, b.x, plain(&lw.norm2)?, b.h, p, d.w, eps)?;
                g.linear(
                    l,
                    Mat::new(b.h, p, d.w),
                    lin(&lw.gu),
                    Mat::new(b.gu, p, 2 * d.mlp),
                    0.0,
                )?;
                gelu_gate(k, l, b.gu, b.m, p, d.mlp)?;
                g.linear(
                    l,
                    Mat::new(b.m, p, d.mlp),
                    lin(&lw.down),
                    Mat::new(b.x, p, d.w),
                    1.0,
                )?;
            }
        }
        Ok(())
    }

    fn ensure_graph(&mut self, steps: usize) -> Result<()> {
        if !self.graphs.contains_key(&(steps, self.slot)) {
            let g = self.build_graph(steps)?;
            self.graphs.insert((steps, self.slot), g);
        }
        Ok(())
    }

    /// Time table, an eager warm-up run (creates every GEMM plan, loads every kernel), then
    /// the capture of the whole loop on the denoise stream.
    fn build_graph(&self, steps: usize) -> Result<StepGraph> {
        let table = self.time_table(steps)?;
        let l = &self.lanes.denoise;
        self.denoise(steps, &table)?;
        l.synchronize()?;
        l.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .cuda("starting the capture of the denoise loop")?;
        let body = self.denoise(steps, &table);
        // The capture must end even when recording failed, or the stream stays unusable.
        let graph = l.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        body?;
        let graph = graph
            .cuda("capturing the denoise loop")?
            .ok_or_else(|| Error::Cuda("capturing the denoise loop produced no graph".into()))?;
        graph.upload().cuda("uploading the denoise graph")?;
        Ok(StepGraph {
            graph: SendGraph(graph),
            _table: table,
        })
    }

    fn time_table(&self, steps: usize) -> Result<TimeTable> {
        let (d, k, g, l) = (&self.dims, &self.kernels, &self.gemm, &self.lanes.denoise);
        let ew = d.ew;
        let act = k.act;
        // The same t sequence as the sampler: t = 1, t += dt in f32.
        let dt = (-1.0f64 / steps as f64) as f32;
        let mut temb = Vec::with_capacity(steps * ew);
        let mut t = 1.0f32;
        for _ in 0..steps {
            temb.extend(time_embedding(t, ew));
            t += dt;
        }
        let n = steps * ew;
        let temb_f = DeviceBuffer::alloc(&self.dev, DType::F32, n)?;
        let temb_a = DeviceBuffer::alloc(&self.dev, act, n)?;
        l.upload(&temb, temb_f.view())?;
        cast(k, l, temb_f.view(), temb_a.view(), n)?;
        let mut bufs = Vec::new();
        let (mut tb, mut mods) = (None, None);
        match &self.weights.w.heads {
            HeadsW::Pi0 { time_in, .. } => {
                let out = DeviceBuffer::alloc(&self.dev, DType::F32, n)?;
                let w_t = Mat {
                    view: time_in.w.tail(ew)?,
                    rows: ew,
                    cols: ew,
                    ld: 2 * ew,
                    stride: 0,
                };
                g.matmul(
                    l,
                    Mat::new(temb_a.view(), steps, ew),
                    w_t,
                    Op::Wt,
                    Mat::new(out.view(), steps, ew),
                    1.0,
                    0.0,
                    1,
                )?;
                add_bias(k, l, out.view(), ew, time_in.bias()?, steps, ew)?;
                tb = Some(out.view());
                bufs.push(out);
            }
            HeadsW::Pi05 { time_in, time_out } => {
                let c_f = DeviceBuffer::alloc(&self.dev, DType::F32, n)?;
                let c_a = DeviceBuffer::alloc(&self.dev, act, n)?;
                let (cf, ca) = (c_f.view(), c_a.view());
                let silu_to_act = Out {
                    f32: None,
                    act: Some(ca),
                    ld: ew,
                };
                g.linear(
                    l,
                    Mat::new(temb_a.view(), steps, ew),
                    lin(time_in),
                    Mat::new(cf, steps, ew),
                    0.0,
                )?;
                bias_act(k, l, cf, ew, time_in.b, Act::Silu, silu_to_act, steps, ew)?;
                g.linear(
                    l,
                    Mat::new(ca, steps, ew),
                    lin(time_out),
                    Mat::new(cf, steps, ew),
                    0.0,
                )?;
                bias_act(k, l, cf, ew, time_out.b, Act::Silu, silu_to_act, steps, ew)?;
                let norms = adaptive_norms(&self.weights.w.expert)?;
                if norms.len() != d.n_norms {
                    return Err(Error::Cuda("internal: adaptive norm count".into()));
                }
                let m = DeviceBuffer::alloc(&self.dev, DType::F32, d.n_norms * n * 3)?;
                for (i, dense) in norms.iter().enumerate() {
                    let dst = m.view().at(i * n * 3, n * 3)?;
                    g.linear(
                        l,
                        Mat::new(ca, steps, ew),
                        lin(dense),
                        Mat::new(dst, steps, 3 * ew),
                        0.0,
                    )?;
                    add_bias(k, l, dst, 3 * ew, dense.bias()?, steps, 3 * ew)?;
                }
                mods = Some(m.view());
                bufs.extend([c_f, c_a, m]);
            }
        }
        // `temb` (pageable host memory) must outlive its upload.
        l.synchronize()?;
        bufs.extend([temb_f, temb_a]);
        Ok(TimeTable {
            steps,
            tb,
            mods,
            _bufs: bufs,
        })
    }

    /// Norm `idx` of the expert at step `step` into `he`; returns the gate of the residual it
    /// feeds (pi0.5) or None.
    fn expert_norm(
        &self,
        norm: &NormW,
        idx: usize,
        step: usize,
        table: &TimeTable,
    ) -> Result<Option<View>> {
        let d = &self.dims;
        let b = &self.buf.denoise;
        let l = &self.lanes.denoise;
        let eps = self.cfg.rms_norm_eps;
        match norm {
            NormW::Plain(w) => {
                rms_norm(
                    &self.kernels,
                    l,
                    b.xe,
                    NormParam::OnePlus(*w),
                    b.he,
                    d.s,
                    d.ew,
                    eps,
                )?;
                Ok(None)
            }
            NormW::Adaptive(_) => {
                let m = table.modulation(idx, step, d.ew)?;
                rms_norm(
                    &self.kernels,
                    l,
                    b.xe,
                    NormParam::Modulation(m),
                    b.he,
                    d.s,
                    d.ew,
                    eps,
                )?;
                Ok(Some(m.at(2 * d.ew, d.ew)?))
            }
        }
    }

    /// xe += x·Wᵀ, gated per column when `gate` is given: one cuBLASLt call with the gate as
    /// a per-row alpha vector where cuBLASLt supports it (and `TURBOPI_FUSED_GATE` is not 0),
    /// else the product into `tmp` and a gated add.
    fn expert_residual(&self, x: Mat, w: &Lin, gate: Option<View>) -> Result<()> {
        let (d, g, l) = (&self.dims, &self.gemm, &self.lanes.denoise);
        let b = &self.buf.denoise;
        let xe = Mat::new(b.xe, d.s, d.ew);
        match gate {
            None => g.linear(l, x, lin(w), xe, 1.0),
            Some(gate) => {
                if fused_gate_enabled() && g.linear_gated(l, x, lin(w), xe, gate)? {
                    return Ok(());
                }
                g.linear(l, x, lin(w), Mat::new(b.tmp, d.s, d.ew), 0.0)?;
                add_residual(&self.kernels, l, b.xe, b.tmp, Some(gate), d.s, d.ew)
            }
        }
    }

    /// The suffix tokens of step `step` into `xe`.
    fn suffix_tokens(&self, step: usize, table: &TimeTable) -> Result<()> {
        let (d, k, g, l) = (&self.dims, &self.kernels, &self.gemm, &self.lanes.denoise);
        let b = &self.buf.denoise;
        let wt = &self.weights.w;
        let (h, ew) = (d.h, d.ew);
        let x_act = Mat::new(b.xt_act, h, d.ad);
        match &wt.heads {
            HeadsW::Pi0 {
                time_in, time_out, ..
            } => {
                g.linear(l, x_act, lin(&wt.action_in), Mat::new(b.a, h, ew), 0.0)?;
                let to_act = Out {
                    f32: None,
                    act: Some(b.a_act),
                    ld: ew,
                };
                bias_act(k, l, b.a, ew, wt.action_in.b, Act::None, to_act, h, ew)?;
                // The action half of action_time_mlp_in; the time half is in the table.
                let w_a = Mat::new(time_in.w, ew, ew).ld(2 * ew);
                g.matmul(
                    l,
                    Mat::new(b.a_act, h, ew),
                    w_a,
                    Op::Wt,
                    Mat::new(b.a, h, ew),
                    1.0,
                    0.0,
                    1,
                )?;
                let tb = table
                    .tb
                    .ok_or_else(|| Error::Cuda("internal: pi0 time table missing".into()))?
                    .at(step * ew, ew)?;
                bias_act(k, l, b.a, ew, Some(tb), Act::Silu, to_act, h, ew)?;
                let rows = b.xe.rows(1, h, ew)?;
                g.linear(
                    l,
                    Mat::new(b.a_act, h, ew),
                    lin(time_out),
                    Mat::new(rows, h, ew),
                    0.0,
                )?;
                add_bias(k, l, rows, ew, time_out.bias()?, h, ew)?;
                l.copy(b.state_tok, b.xe.at(0, ew)?)
            }
            HeadsW::Pi05 { .. } => {
                g.linear(l, x_act, lin(&wt.action_in), Mat::new(b.xe, h, ew), 0.0)?;
                add_bias(k, l, b.xe, ew, wt.action_in.bias()?, h, ew)
            }
        }
    }

    /// The whole sampler on the denoise stream: x = noise; `steps` times x += dt·v(x, t).
    /// Launches only (no host sync, no allocation): this is what the graph captures.
    fn denoise(&self, steps: usize, table: &TimeTable) -> Result<()> {
        let (d, k, g, l) = (&self.dims, &self.kernels, &self.gemm, &self.lanes.denoise);
        let b = &self.buf.denoise;
        let wt = &self.weights.w;
        let hs = d.heads;
        let (h, ad, ew, s) = (d.h, d.ad, d.ew, d.s);
        let qw = hs.nh * hs.hd;
        l.copy(b.noise, b.xt)?;
        cast(k, l, b.xt, b.xt_act, h * ad)?;
        self.mark("setup (noise, state token)")?;
        if let HeadsW::Pi0 { state, .. } = &wt.heads {
            cast(k, l, b.state, b.state_act, ad)?;
            g.linear(
                l,
                Mat::new(b.state_act, 1, ad),
                lin(state),
                Mat::new(b.state_tok, 1, ew),
                0.0,
            )?;
            add_bias(k, l, b.state_tok, ew, state.bias()?, 1, ew)?;
        }
        let dt = (-1.0f64 / steps as f64) as f32;
        let mask = Mask {
            prefix_len: Some(self.buf.prefix.info[self.slot].at(0, 1)?),
            prefix_cap: d.pmax,
            n_state: d.first_action,
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
            self.suffix_tokens(step, table)?;
            self.mark("suffix tokens (action_in / time MLP)")?;
            for (li, lw) in expert.layers.iter().enumerate() {
                let gate = self.expert_norm(&lw.norm1, 2 * li, step, table)?;
                self.mark("rms_norm")?;
                g.linear(
                    l,
                    Mat::new(b.he, s, ew),
                    lin(&lw.qkv),
                    Mat::new(b.qkv, s, hs.qkv_width()),
                    0.0,
                )?;
                self.mark("gemm qkv")?;
                let cache = self.cache(li)?;
                let pos0 = self.buf.prefix.info[self.slot].at(0, 1)?;
                rope_qkv(
                    k,
                    l,
                    b.qkv,
                    b.q,
                    cache.0,
                    cache.1,
                    self.buf.prefix.inv_freq,
                    pos0,
                    s,
                    hs,
                    d.pmax,
                )?;
                self.mark("rope_qkv")?;
                self.gemma_attention(
                    l,
                    s,
                    d.cap,
                    b.q,
                    cache,
                    mask,
                    scratch,
                    Some(b.fa),
                    (b.att_g, b.att),
                )?;
                self.mark("attention")?;
                self.expert_residual(Mat::new(b.att, s, qw), &lw.o, gate)?;
                self.mark("gemm o + residual")?;
                let gate = self.expert_norm(&lw.norm2, 2 * li + 1, step, table)?;
                self.mark("rms_norm")?;
                g.linear(
                    l,
                    Mat::new(b.he, s, ew),
                    lin(&lw.gu),
                    Mat::new(b.gu, s, 2 * d.emlp),
                    0.0,
                )?;
                self.mark("gemm gate|up")?;
                gelu_gate(k, l, b.gu, b.m, s, d.emlp)?;
                self.mark("gelu_gate")?;
                self.expert_residual(Mat::new(b.m, s, d.emlp), &lw.down, gate)?;
                self.mark("gemm down + residual")?;
            }
            self.expert_norm(final_norm, 2 * d.depth, step, table)?;
            self.mark("rms_norm")?;
            let actions = b.he.rows(d.first_action, h, ew)?;
            g.linear(
                l,
                Mat::new(actions, h, ew),
                lin(&wt.action_out),
                Mat::new(b.vraw, h, ad),
                0.0,
            )?;
            self.mark("gemm action_out")?;
            euler_step(
                k,
                l,
                b.xt,
                b.xt_act,
                b.vraw,
                wt.action_out.bias()?,
                dt,
                h,
                ad,
            )?;
            self.mark("euler_step")?;
        }
        Ok(())
    }

    /// While profiling, records an event on the denoise stream closing an operation of kind
    /// `what` (nothing otherwise, in particular never while the graph is captured).
    fn mark(&self, what: &'static str) -> Result<()> {
        let mut prof = self.prof.borrow_mut();
        if let Some(marks) = prof.as_mut() {
            let ev = timing_event(&self.dev)?;
            ev.record(&self.lanes.denoise.stream)
                .cuda("recording a profiling event")?;
            marks.push((what, ev));
        }
        Ok(())
    }

    /// Device time per kind of operation of one denoise step, from one eager run of the
    /// whole loop with an event after each operation. The run is queued behind a replay of
    /// the graph, so that the host is ahead of the device and the intervals are device time
    /// (not launch gaps); the graph replay's own time is reported for comparison.
    fn profile(&mut self, steps: usize) -> Result<String> {
        self.dev.bind()?;
        self.ensure_graph(steps)?;
        let l = &self.lanes.denoise;
        l.synchronize()?;
        let graph = self
            .graphs
            .get(&(steps, self.slot))
            .ok_or_else(|| Error::Cuda("internal: denoise graph missing".into()))?;
        let (g0, g1) = (timing_event(&self.dev)?, timing_event(&self.dev)?);
        // One replay to warm up, one timed; the eager run queues behind the second.
        graph.graph.0.launch().cuda("launching the denoise graph")?;
        g0.record(&l.stream).cuda("recording a profiling event")?;
        graph.graph.0.launch().cuda("launching the denoise graph")?;
        g1.record(&l.stream).cuda("recording a profiling event")?;
        let start = timing_event(&self.dev)?;
        start
            .record(&l.stream)
            .cuda("recording a profiling event")?;
        *self.prof.borrow_mut() = Some(vec![("start", start)]);
        let run = self.denoise(steps, &graph._table);
        let marks = self.prof.borrow_mut().take().unwrap_or_default();
        let synced = l.synchronize();
        run?;
        synced?;
        let graph_ms = g0.elapsed_ms(&g1).cuda("reading profiling events")?;
        // kind -> (ms, launches), in first-seen order.
        let mut kinds: Vec<(&'static str, f64, usize)> = Vec::new();
        for pair in marks.windows(2) {
            let ms = f64::from(
                pair[0]
                    .1
                    .elapsed_ms(&pair[1].1)
                    .cuda("reading profiling events")?,
            );
            let what = pair[1].0;
            match kinds.iter_mut().find(|k| k.0 == what) {
                Some(k) => {
                    k.1 += ms;
                    k.2 += 1;
                }
                None => kinds.push((what, ms, 1)),
            }
        }
        let total: f64 = kinds.iter().map(|k| k.1).sum();
        let per = steps as f64;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "denoise profile ({steps} steps, eager, events after each op; per step):"
        );
        kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (what, ms, n) in &kinds {
            let _ = writeln!(
                out,
                "  {:<40} {:>8.1} us  {:>5.1}%  ({:.0} per step)",
                what,
                ms * 1e3 / per,
                100.0 * ms / total.max(1e-12),
                *n as f64 / per
            );
        }
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
            "  gemm plans {}, of which autotuned {}; gated residual shapes on the two-launch fallback: {}",
            self.gemm.plan_count(),
            self.gemm.tuned_count(),
            self.gemm.gated_fallbacks()
        );
        Ok(out)
    }
}

impl Drop for CudaPolicy {
    /// Waits for any work still queued (a frame that failed half-way) before the fields
    /// free the memory it uses.
    fn drop(&mut self) {
        if self.dev.bind().is_ok() {
            let _ = self.dev.synchronize();
        }
    }
}

/// The expert's adaptive norms in table order: per layer input then post-attention, then
/// the final norm.
fn adaptive_norms(expert: &GemmaW) -> Result<Vec<Lin>> {
    let dense = |n: &NormW| match n {
        NormW::Adaptive(l) => Ok(*l),
        NormW::Plain(_) => Err(Error::Cuda("internal: plain norm in pi0.5's expert".into())),
    };
    let mut out = Vec::with_capacity(2 * expert.layers.len() + 1);
    for l in &expert.layers {
        out.push(dense(&l.norm1)?);
        out.push(dense(&l.norm2)?);
    }
    let f = expert
        .final_norm
        .as_ref()
        .ok_or_else(|| Error::Cuda("internal: expert without its final norm".into()))?;
    out.push(dense(f)?);
    Ok(out)
}

impl Runner for CudaPolicy {
    /// One frame: uploads the observation, runs vision, prefix and the denoise graph, and
    /// downloads the actions; no device allocation except the first time a step count is
    /// used (its time table and graph).
    fn infer(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, StageTimes)> {
        guard("CUDA inference", || self.frame(obs, noise, steps))
    }

    fn profile_denoise(&mut self, steps: usize) -> Result<Option<String>> {
        if steps == 0 {
            return Err(Error::Input("denoise: steps must be at least 1".into()));
        }
        guard("profiling the denoise loop", || self.profile(steps)).map(Some)
    }

    fn submit(&mut self, obs: &Observation, noise: &[f32], steps: usize) -> Result<bool> {
        CudaPolicy::submit(self, obs, noise, steps).map(|()| true)
    }

    fn in_flight(&self) -> usize {
        CudaPolicy::in_flight(self)
    }

    fn prepare(&mut self, steps: usize, prompt_tokens: usize) -> Result<()> {
        if !self.in_flight.is_empty() {
            return Err(Error::Input(
                "frames are in flight: collect them before preparing".into(),
            ));
        }
        self.warm_up(steps)?;
        self.warm_up_stages(None)?;
        let keep = self.slot;
        for slot in [0, 1] {
            self.slot = slot;
            let done = self.warm_up_stages(Some(prompt_tokens));
            self.slot = keep;
            done?;
        }
        Ok(())
    }

    fn ready(&self) -> bool {
        CudaPolicy::ready(self)
    }

    fn collect(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        CudaPolicy::collect(self)
    }

    fn describe(&self) -> String {
        let p = match self.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        };
        format!(
            "cuda {p} on {} (sm_{}{})",
            self.dev.name, self.dev.cc.0, self.dev.cc.1
        )
    }
}

impl crate::backend::VisionStage for CudaPolicy {
    fn encode(&mut self, pixels: &[f32], masks: &[bool]) -> Result<crate::ImageEmbeddings> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        if masks.len() != c.num_images || pixels.len() != c.num_images * per_image {
            return Err(Error::Input(format!(
                "vision: expected {} images of {}x{}x3 and {} masks, got {} values and {} masks",
                c.num_images,
                c.image_size,
                c.image_size,
                c.num_images,
                pixels.len(),
                masks.len()
            )));
        }
        let real: Vec<f32> = pixels
            .chunks_exact(per_image)
            .zip(masks)
            .filter(|(_, &m)| m)
            .flat_map(|(px, _)| px.iter().copied())
            .collect();
        let n = masks.iter().filter(|&&m| m).count();
        let (tokens, gpu) = self.run_vision(&real, n)?;
        self.last_stage_gpu = Some(gpu);
        Ok(crate::ImageEmbeddings {
            tokens,
            real_images: n,
        })
    }
    fn describe(&self) -> String {
        Runner::describe(self)
    }
    fn gpu_time(&self) -> Option<Duration> {
        self.last_stage_gpu
    }
}

impl crate::backend::PrefixStage for CudaPolicy {
    fn encode(
        &mut self,
        images: &crate::ImageEmbeddings,
        tokens: &[i32],
        token_mask: &[bool],
    ) -> Result<KvCache> {
        if tokens.len() != token_mask.len() {
            return Err(Error::Input(format!(
                "prefix: {} tokens with {} mask entries; expected equal lengths",
                tokens.len(),
                token_mask.len()
            )));
        }
        let ids: Vec<i32> = tokens
            .iter()
            .zip(token_mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        let (cache, gpu) = self.run_prefix(&images.tokens, images.real_images, &ids)?;
        self.last_stage_gpu = Some(gpu);
        Ok(cache)
    }
    fn describe(&self) -> String {
        Runner::describe(self)
    }
    fn gpu_time(&self) -> Option<Duration> {
        self.last_stage_gpu
    }
}

impl crate::backend::DenoiseStage for CudaPolicy {
    fn sample(
        &mut self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<Vec<f32>> {
        let (actions, gpu) = self.run_denoise(cache, state, noise, steps)?;
        self.last_stage_gpu = Some(gpu);
        Ok(actions)
    }
    fn describe(&self) -> String {
        Runner::describe(self)
    }
    fn gpu_time(&self) -> Option<Duration> {
        self.last_stage_gpu
    }
}
