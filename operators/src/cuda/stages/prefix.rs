//! Stage 2 on the GPU: the prompt's token embedding and the Gemma 2B prefix over the real
//! tokens (image rows first, written by the vision stage or copied in), filling every layer's
//! K (after RoPE) and V of a K/V cache slot. CPU twin: [`crate::policy::PrefixEncoder`]
//! ([`crate::gemma::Gemma::prefix_kv`]).

use crate::config::Config;
use crate::cuda::attention::{score_stride, Mask, Problem, Scratch, Workspace, FUSED_ROWS};
use crate::cuda::device::{DType, DeviceBuffer, Fp8Scratch, Lane, View};
use crate::cuda::embed::embed_tokens;
use crate::cuda::gemm::Mat;
use crate::cuda::mlp::gelu_gate;
use crate::cuda::rms_norm::{rms_norm, NormParam};
use crate::cuda::rope::{rope_qkv, Heads, RowBatch};
use crate::cuda::runtime::graph::GraphCache;
use crate::cuda::weights::{Arena, DeviceWeights, NormW, Planner, PrefixW};
use crate::{Error, Result};

use super::{
    allocate, gemma_attention, lin, profile_stage, stage_graphs, upload_inv_freq, CacheSlot,
    Engine, Marks,
};
use crate::cuda::runtime::graph::NodeCensus;

struct Buffers {
    /// i32 [max_token_len]: the real prompt ids.
    ids: View,
    /// f32 [max_prefix, width]: the prefix's input, image rows first, then the prompt's.
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
    inv_freq: View,
    /// The tensor-core attention's partial outputs and statistics, when its keys are split.
    fa: Workspace,
    /// `--dtype fp8`: where each product's input is quantised.
    fp8: Option<Fp8Scratch>,
}

/// The prefix attention's tensor-core problem over `p` tokens (the caller still asks
/// [`crate::cuda::attention::fused_fits`]), or None for the GEMM path
/// (`TURBOPI_PREFIX_ATTENTION`). Automatic splits: the fewest ways of splitting the keys
/// whose blocks cover every SM once (the prefix has few blocks of 64 query rows and many
/// keys; each split beyond one costs its partial outputs' round trip through memory).
fn attention_problem(e: &Engine, cfg: &Config, p: usize) -> Option<Problem> {
    let crate::settings::PrefixAttention::Flash { splits } = e.prefix_attention else {
        return None;
    };
    let hs = heads(cfg);
    let rows = p * hs.group();
    let blocks = rows.div_ceil(FUSED_ROWS) * hs.kv;
    let splits = splits.unwrap_or_else(|| e.dev.sm_count().div_ceil(blocks.max(1)));
    Some(Problem {
        rows,
        keys: p,
        hd: hs.hd,
        n1: hs.kv,
        n2: 1,
        per_block: Problem::chunks_for_splits(p, splits),
    })
}

/// f32 elements of the attention workspace that serves every prefix length up to the
/// config's: (partial outputs, statistics).
fn attention_workspace(e: &Engine, cfg: &Config) -> (usize, usize) {
    (1..=cfg.max_prefix_len())
        .filter_map(|p| attention_problem(e, cfg, p))
        .map(|prob| prob.workspace())
        .fold((0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1)))
}

fn layout(
    cfg: &Config,
    (act, fp8): (DType, crate::fp8::Stages),
    (part, stats): (usize, usize),
    ar: &mut Arena,
) -> Buffers {
    let f = DType::F32;
    let heads = heads(cfg);
    let (p, w, mlp) = (cfg.max_prefix_len(), cfg.vlm_width, cfg.vlm_mlp_dim);
    let qw = heads.nh * heads.hd;
    Buffers {
        ids: ar.take(DType::I32, cfg.max_token_len.max(1)),
        x: ar.take(f, p * w),
        h: ar.take(act, p * w),
        qkv: ar.take(act, p * heads.qkv_width()),
        q: ar.take(act, p * qw),
        scores: ar.take(f, heads.nh * p * score_stride(p)),
        probs: ar.take(act, heads.nh * p * score_stride(p)),
        att_g: ar.take(act, p * qw),
        att: ar.take(act, p * qw),
        gu: ar.take(act, p * 2 * mlp),
        m: ar.take(act, p * mlp),
        inv_freq: ar.take(f, cfg.head_dim / 2),
        fa: Workspace {
            part: ar.take(f, part),
            stats: ar.take(f, stats),
        },
        fp8: fp8.prefix.then(|| Fp8Scratch {
            codes: ar.take(DType::U8, p * w.max(qw).max(mlp)),
            scales: ar.take(f, p),
            // Every product's output before its scales (f32 at most): q|k|v, o,
            // gate|up, down.
            out: ar.take(f, p * w.max(heads.qkv_width()).max(2 * mlp)),
        }),
    }
}

pub(crate) fn heads(cfg: &Config) -> Heads {
    Heads {
        nh: cfg.num_heads,
        kv: cfg.num_kv_heads,
        hd: cfg.head_dim,
    }
}

/// The prefix stage: its weights (embedding table and Gemma 2B), buffers, stream and graphs
/// (by image rows, prompt tokens and cache slot).
pub struct Prefix {
    graphs: GraphCache<(usize, usize, u64)>,
    /// The shape and cache of the last run (for the profile).
    last: Option<(usize, usize, CacheSlot)>,
    /// While profiling: an event after each operation of an eager run.
    marks: Marks,
    buf: Buffers,
    _buf: DeviceBuffer,
    pub(crate) weights: DeviceWeights<PrefixW>,
    pub lane: Lane,
    cfg: Config,
}

impl Prefix {
    pub fn new(e: &Engine, cfg: &Config) -> Result<Prefix> {
        let lane = e.lane(1)?;
        if let Some(sms) = crate::settings::overlap_sms()? {
            lane.limit_sms(sms);
        }
        let weights =
            DeviceWeights::allocate(&e.dev, e.weight_types(), |p: &mut Planner| p.prefix(cfg))?;
        let types = e.weight_types();
        let fa = attention_workspace(e, cfg);
        let (buf, alloc) = allocate(&e.dev, &lane, |ar| layout(cfg, types, fa, ar))?;
        if let Some(s) = buf.fp8 {
            lane.attach_fp8_scratch(s)?;
        }
        upload_inv_freq(cfg, &lane, buf.inv_freq)?;
        Ok(Prefix {
            graphs: GraphCache::new("prefix"),
            last: None,
            marks: Marks::default(),
            buf,
            _buf: alloc,
            weights,
            lane,
            cfg: cfg.clone(),
        })
    }

    /// Rows 0..`rows` of the prefix's input (f32 [rows, vlm_width]): where the image
    /// embeddings go.
    pub fn input_rows(&self, rows: usize) -> Result<View> {
        self.buf.x.at(0, rows * self.cfg.vlm_width)
    }

    /// Checks a frame's prefix: at most `num_images` cameras, `max_token_len` prompt ids,
    /// each in the vocabulary, and something to see.
    pub fn check(&self, cameras: usize, ids: &[i32]) -> Result<()> {
        let c = &self.cfg;
        crate::observation::check_visible(cameras, ids.len())?;
        if cameras > c.num_images {
            return Err(Error::Input(format!(
                "prefix: {cameras} cameras, the checkpoint has {}",
                c.num_images
            )));
        }
        if ids.len() > c.max_token_len {
            return Err(Error::Input(format!(
                "prefix: {} prompt tokens, at most max_token_len {}",
                ids.len(),
                c.max_token_len
            )));
        }
        if let Some(t) = ids
            .iter()
            .find(|&&t| usize::try_from(t).map_or(true, |id| id >= c.vocab_size))
        {
            return Err(Error::Input(format!(
                "token id {t} is outside the vocabulary [0, {})",
                c.vocab_size
            )));
        }
        Ok(())
    }

    /// On this stage's stream: uploads the prompt `ids` and the cache `info` ([P, 0, 0, 0];
    /// both pinned, untouched until the stream has passed this point) and runs the prefix
    /// over `img_rows` image rows (already in [`Prefix::input_rows`]) and the prompt into
    /// `cache`, from its graph after the first run for this shape.
    pub fn enqueue(
        &mut self,
        e: &Engine,
        ids: &[i32],
        info: &[i32],
        img_rows: usize,
        cache: CacheSlot,
    ) -> Result<()> {
        self.lane.upload(ids, self.buf.ids)?;
        self.lane.upload(info, cache.info)?;
        let capture = stage_graphs()?;
        let n_ids = ids.len();
        self.last = Some((img_rows, n_ids, cache));
        let (graphs, lane) = (&mut self.graphs, &self.lane);
        let (buf, w, cfg, marks) = (&self.buf, &self.weights.w, &self.cfg, &self.marks);
        graphs.run((img_rows, n_ids, cache.kv.ptr), lane, capture, || {
            forward(e, lane, (buf, marks), w, cfg, img_rows, n_ids, cache)
        })
    }

    /// What the last run's graph launches.
    pub fn census(&self) -> Result<Option<NodeCensus>> {
        self.graphs.last().map(|g| g.census()).transpose()
    }

    /// Device time per kind of operation of one layer, from one eager run of the last
    /// frame's shape (its inputs still in place) queued behind two replays of its graph.
    pub fn profile(&mut self, e: &Engine) -> Result<Option<String>> {
        let Some((img_rows, n_ids, cache)) = self.last else {
            return Ok(None);
        };
        let (buf, w, cfg, marks) = (&self.buf, &self.weights.w, &self.cfg, &self.marks);
        let l = &self.lane;
        let layers = cfg.vlm_depth as f64;
        let title = format!(
            "prefix profile ({} real tokens, {} layers, eager, events after each op; per layer):",
            img_rows + n_ids,
            cfg.vlm_depth
        );
        let p = profile_stage(
            e,
            l,
            (self.graphs.last(), "prefix"),
            marks,
            || forward(e, l, (buf, marks), w, cfg, img_rows, n_ids, cache),
            (&title, layers, "layer"),
        )?;
        let (mut out, total) = (p.table, p.total_ms);
        let graph_ms = p.graph_ms.unwrap_or(f32::NAN);
        out.push_str(&format!(
            "  {:<40} {:>8.1} us  (eager, incl. event overhead; whole prefix {total:.2} ms; graph replay {graph_ms:.2} ms)\n",
            "total",
            total * 1e3 / layers
        ));
        Ok(Some(out))
    }
}

/// Token embedding and the Gemma 2B prefix over the `p` real tokens (images first): fills
/// every layer's K (after RoPE) and V, rows 0..p. Launches only (what the graph captures).
#[allow(clippy::too_many_arguments)]
fn forward(
    e: &Engine,
    l: &Lane,
    (b, marks): (&Buffers, &Marks),
    wt: &PrefixW,
    cfg: &Config,
    img_rows: usize,
    n_tok: usize,
    cache: CacheSlot,
) -> Result<()> {
    let k = &e.kernels;
    let eps = cfg.rms_norm_eps;
    let (w, mlp) = (cfg.vlm_width, cfg.vlm_mlp_dim);
    let p = img_rows + n_tok;
    let hs = heads(cfg);
    let scale = (w as f64).sqrt() as f32;
    embed_tokens(
        k,
        l,
        b.ids,
        wt.embed,
        b.x.rows(img_rows, n_tok, w)?,
        n_tok,
        cfg.vocab_size,
        w,
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
    // The tensor-core attention's workspace and key chunks per block, the same every layer.
    let fused = attention_problem(e, cfg, p).map(|prob| (b.fa, prob.per_block));
    let mask = Mask {
        prefix_len: None,
        prefix_stride: 0,
        prefix_cap: p,
        n_state: 0,
        group: hs.group(),
    };
    let plain = |n: &NormW| match n {
        NormW::Plain(v) => Ok(NormParam::OnePlus(*v)),
        NormW::Adaptive(_) => Err(Error::Cuda("internal: adaptive norm in the prefix".into())),
    };
    let mark = |what| marks.mark(e, l, what);
    mark("embed tokens")?;
    let layers = &wt.gemma.layers;
    for (li, lw) in layers.iter().enumerate() {
        rms_norm(k, l, b.x, plain(&lw.norm1)?, b.h, p, w, eps)?;
        mark("rms_norm")?;
        e.product(
            l,
            Mat::new(b.h, p, w),
            lin(&lw.qkv),
            Mat::new(b.qkv, p, hs.qkv_width()),
            0.0,
        )?;
        mark("gemm qkv")?;
        let (kc, vc) = cache.layer(li)?;
        rope_qkv(
            k,
            l,
            b.qkv,
            b.q,
            kc,
            vc,
            b.inv_freq,
            cache.first_position()?,
            p,
            hs,
            0,
        )?;
        mark("rope_qkv")?;
        // The last layer's attention output and MLP feed nothing the policy reads.
        if li + 1 < layers.len() {
            gemma_attention(
                e,
                cfg,
                l,
                (RowBatch::one(p), p),
                b.q,
                (kc, vc),
                mask,
                scratch,
                fused,
                (b.att_g, b.att),
            )?;
            mark("attention")?;
            e.product(
                l,
                Mat::new(b.att, p, qw),
                lin(&lw.o),
                Mat::new(b.x, p, w),
                1.0,
            )?;
            mark("gemm o + residual")?;
            rms_norm(k, l, b.x, plain(&lw.norm2)?, b.h, p, w, eps)?;
            mark("rms_norm")?;
            let (h, m) = (Mat::new(b.h, p, w), Mat::new(b.m, p, mlp));
            if e.geglu_w8a8(l, h, lin(&lw.gu), m)? {
                mark("gemm gate|up (fp8 codes) + gelu_gate")?;
            } else {
                e.product(l, h, lin(&lw.gu), Mat::new(b.gu, p, 2 * mlp), 0.0)?;
                mark("gemm gate|up")?;
                gelu_gate(k, l, (b.gu, b.m), p, mlp, None)?;
                mark("gelu_gate")?;
            }
            e.product(
                l,
                Mat::new(b.m, p, mlp),
                lin(&lw.down),
                Mat::new(b.x, p, w),
                1.0,
            )?;
            mark("gemm down + residual")?;
        }
    }
    Ok(())
}
