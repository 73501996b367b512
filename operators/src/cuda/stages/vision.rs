//! Stage 1 on the GPU: SigLIP and the projector over the real cameras of a frame, writing the
//! image rows of the prefix's input (f32 [cameras * tokens_per_image, vlm_width]). CPU twin:
//! [`crate::policy::VisionEncoder`] ([`crate::siglip`]).

use crate::config::Config;
use crate::cuda::activation::{add_bias, bias_act, Act, Out};
use crate::cuda::attention::{
    self, attention, fused_attention, fused_fits, score_stride, Mask, Problem, Scratch, Strided,
    Workspace,
};
use crate::cuda::device::{DType, DeviceBuffer, Fp8Scratch, Lane, View};
use crate::cuda::gemm::Mat;
use crate::cuda::layer_norm::layer_norm;
use crate::cuda::patch::{im2col, patch_embed_finish, unit_pixels};
use crate::cuda::runtime::graph::GraphCache;
use crate::cuda::weights::{Arena, DeviceWeights, Planner, VisionW};
use crate::settings::VisionAttention;
use crate::Result;

use super::{allocate, lin, profile_stage, stage_graphs, Engine, Marks};

/// A frame's real cameras in pinned memory, ready to upload: in [-1, 1], or as bytes that
/// the GPU maps (a quarter of the upload).
#[derive(Clone, Copy)]
pub enum Staged<'a> {
    Unit(&'a [f32]),
    Bytes(&'a [u8]),
}

/// The sizes of the vision tower, named as the config names them.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// The most cameras one run takes (a frame's, or every frame's of a batch).
    cameras: usize,
    image_size: usize,
    patch_size: usize,
    tokens_per_image: usize,
    /// Columns of an im2col row: 3 * patch_size^2.
    patch_values: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
    mlp: usize,
    /// Width of the projected tokens (the prefix's width).
    out_width: usize,
}

impl Shape {
    fn of(c: &Config) -> Shape {
        Shape {
            cameras: c.num_images,
            image_size: c.image_size,
            patch_size: c.patch_size,
            tokens_per_image: c.tokens_per_image(),
            patch_values: 3 * c.patch_size * c.patch_size,
            width: c.vision_width,
            heads: c.vision_heads,
            head_dim: c.vision_head_dim(),
            mlp: c.vision_mlp_dim,
            out_width: c.vlm_width,
        }
    }

    /// Every camera and head at once, for the tensor-core attention: one block per key
    /// chunk (`chunks`, whose workspace is the larger), or every key in one block.
    fn problem(&self, cameras: usize, chunks: bool) -> Problem {
        Problem {
            rows: self.tokens_per_image,
            keys: self.tokens_per_image,
            hd: self.head_dim,
            n1: cameras,
            n2: self.heads,
            per_block: if chunks { 1 } else { Problem::ALL_KEYS },
        }
    }
}

struct Buffers {
    /// f32 [cameras, size, size, 3] in [-1, 1]: the real cameras, first to last.
    pixels: View,
    /// u8 [cameras, size, size, 3]: the real cameras as bytes, when they come so
    /// ([`crate::Pixels::Bytes`]), mapped into `pixels` on the GPU.
    bytes: View,
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
    /// `--dtype fp8`: where each product's input is quantised.
    fp8: Option<Fp8Scratch>,
}

fn layout(s: &Shape, (act, fp8): (DType, crate::fp8::Stages), ar: &mut Arena) -> Buffers {
    let f = DType::F32;
    let rows = s.cameras * s.tokens_per_image;
    // Only the bf16 kernels have the fused attention.
    let (part, stats) = if act == DType::Bf16 {
        s.problem(s.cameras, true).workspace()
    } else {
        (0, 0)
    };
    let fa = Workspace {
        part: ar.take(f, part),
        stats: ar.take(f, stats),
    };
    let t = s.tokens_per_image;
    Buffers {
        pixels: ar.take(f, s.cameras * s.image_size * s.image_size * 3),
        bytes: ar.take(DType::U8, s.cameras * s.image_size * s.image_size * 3),
        patches: ar.take(act, rows * s.patch_values),
        x: ar.take(f, rows * s.width),
        h: ar.take(act, rows * s.width),
        pre: ar.take(f, rows * (3 * s.width).max(s.mlp)),
        qkv: ar.take(act, rows * 3 * s.width),
        scores: ar.take(f, s.heads * t * score_stride(t)),
        probs: ar.take(act, s.heads * t * score_stride(t)),
        att: ar.take(act, rows * s.width),
        m: ar.take(act, rows * s.mlp),
        fa,
        fp8: fp8.vision.then(|| Fp8Scratch {
            codes: ar.take(DType::U8, rows * s.width.max(s.mlp)),
            scales: ar.take(f, rows),
            // Every product's output before its scales (f32 at most): q|k|v, out, fc1,
            // fc2, the projector.
            out: ar.take(f, rows * (3 * s.width).max(s.mlp).max(s.out_width)),
        }),
    }
}

/// The vision stage: its weights, buffers, stream and graphs (by camera count and output).
pub struct Vision {
    graphs: GraphCache<(usize, u64)>,
    buf: Buffers,
    _buf: DeviceBuffer,
    pub(crate) weights: DeviceWeights<VisionW>,
    pub lane: Lane,
    /// While profiling: an event after each operation of an eager run.
    marks: Marks,
    /// The camera count and output of the last run (what a profile re-runs).
    last: Option<(usize, View)>,
    cfg: Config,
    shape: Shape,
}

impl Vision {
    /// The stage of `cfg` with its weights laid out (not yet filled) and its buffers.
    pub fn new(e: &Engine, cfg: &Config) -> Result<Vision> {
        Self::with_capacity(e, cfg, cfg.num_images)
    }

    /// The stage with buffers for runs of up to `cameras` cameras (every camera of a batch's
    /// frames in one run).
    pub fn with_capacity(e: &Engine, cfg: &Config, cameras: usize) -> Result<Vision> {
        let shape = Shape {
            cameras: cameras.max(cfg.num_images),
            ..Shape::of(cfg)
        };
        let lane = e.lane(2)?;
        if let Some(sms) = crate::settings::overlap_sms()? {
            lane.limit_sms(sms);
        }
        let weights =
            DeviceWeights::allocate(&e.dev, e.weight_types(), |p: &mut Planner| p.vision(cfg))?;
        let types = e.weight_types();
        let (buf, alloc) = allocate(&e.dev, &lane, |ar| layout(&shape, types, ar))?;
        if let Some(s) = buf.fp8 {
            lane.attach_fp8_scratch(s)?;
        }
        Ok(Vision {
            graphs: GraphCache::new("vision"),
            buf,
            _buf: alloc,
            weights,
            lane,
            marks: Marks::default(),
            last: None,
            cfg: cfg.clone(),
            shape,
        })
    }

    /// Values of `n` cameras' pixels.
    pub fn pixel_values(&self, n: usize) -> usize {
        n * self.shape.image_size * self.shape.image_size * 3
    }

    /// Rows of image tokens for `n` cameras.
    pub fn rows(&self, n: usize) -> usize {
        n * self.shape.tokens_per_image
    }

    /// On this stage's stream: uploads `pixels` (pinned, [n, size, size, 3]; untouched until
    /// the stream has passed this point; bytes are mapped to [-1, 1] on the GPU) and runs the
    /// tower for `n` cameras into `out` (f32, rows(n) x vlm_width), from its graph after the
    /// first run for this shape.
    pub fn enqueue(&mut self, e: &Engine, pixels: Staged, n: usize, out: View) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > self.shape.cameras {
            return Err(crate::Error::Cuda(format!(
                "internal: {n} cameras in one vision run, at most {}",
                self.shape.cameras
            )));
        }
        match pixels {
            Staged::Unit(v) => self.lane.upload(v, self.buf.pixels)?,
            Staged::Bytes(b) => {
                self.lane.upload(b, self.buf.bytes)?;
                unit_pixels(
                    &e.kernels,
                    &self.lane,
                    self.buf.bytes,
                    self.buf.pixels,
                    b.len(),
                )?;
            }
        }
        let capture = stage_graphs()?;
        let out = out.at(0, self.rows(n) * self.shape.out_width)?;
        self.last = Some((n, out));
        let (graphs, lane) = (&mut self.graphs, &self.lane);
        let (buf, w, cfg, s) = (&self.buf, &self.weights.w, &self.cfg, self.shape);
        let marks = &self.marks;
        graphs.run((n, out.ptr), lane, capture, || {
            forward(e, lane, (buf, marks), w, cfg, &s, n, out)
        })
    }

    /// The device time per kind of operation of one layer of the tower, from an eager run of
    /// the last frame's cameras with an event after each operation, and the graph's replay
    /// time (None before a first run).
    pub fn profile(&mut self, e: &Engine) -> Result<Option<String>> {
        let Some((n, out)) = self.last else {
            return Ok(None);
        };
        let (buf, w, cfg, s, marks) = (
            &self.buf,
            &self.weights.w,
            &self.cfg,
            self.shape,
            &self.marks,
        );
        let l = &self.lane;
        let layers = cfg.vision_depth as f64;
        let title = format!(
            "vision profile ({n} cameras, {} tokens, {} layers, eager, events after each op; per layer):",
            n * s.tokens_per_image,
            cfg.vision_depth
        );
        let p = profile_stage(
            e,
            l,
            (self.graphs.last(), "vision"),
            marks,
            || forward(e, l, (buf, marks), w, cfg, &s, n, out),
            (&title, layers, "layer"),
        )?;
        let (mut out, total) = (p.table, p.total_ms);
        let graph_ms = p.graph_ms.unwrap_or(f32::NAN);
        out.push_str(&format!(
            "  {:<40} {:>8.1} us  (eager, incl. event overhead; whole tower {total:.2} ms; graph replay {graph_ms:.2} ms)\n",
            "total",
            total * 1e3 / layers
        ));
        Ok(Some(out))
    }
}

impl Vision {
    /// What the last run's graph launches.
    pub fn census(&self) -> Result<Option<crate::cuda::runtime::graph::NodeCensus>> {
        self.graphs.last().map(|g| g.census()).transpose()
    }
}

/// SigLIP and the projector for `n` real images: launches only (what the graph captures).
#[allow(clippy::too_many_arguments)]
fn forward(
    e: &Engine,
    l: &Lane,
    (b, marks): (&Buffers, &Marks),
    w: &VisionW,
    cfg: &Config,
    s: &Shape,
    n: usize,
    out: View,
) -> Result<()> {
    let (k, g) = (&e.kernels, &e.gemm);
    let mark = |what| marks.mark(e, l, what);
    let eps = cfg.layer_norm_eps;
    let (t, vw) = (s.tokens_per_image, s.width);
    let rows = n * t;
    let qkvw = 3 * vw;
    im2col(k, l, b.pixels, b.patches, n, s.image_size, s.patch_size)?;
    g.linear(
        l,
        Mat::new(b.patches, rows, s.patch_values),
        lin(&w.patch),
        Mat::new(b.x, rows, vw),
        0.0,
    )?;
    patch_embed_finish(k, l, b.x, w.patch.bias()?, w.pos, rows, t, vw)?;
    mark("patch embedding (once)")?;
    let scale = attention::scale(s.head_dim);
    let scratch = Scratch {
        scores: b.scores,
        probs: b.probs,
    };
    let mut pending = None;
    for lw in &w.layers {
        layer_norm(k, l, b.x, pending, lw.ln1_w, lw.ln1_b, b.h, rows, vw, eps)?;
        mark("layer_norm")?;
        let h = Mat::new(b.h, rows, vw);
        let qkv_out = Mat::new(b.qkv, rows, qkvw);
        if e.linear_bias(l, h, lin(&lw.qkv), qkv_out, (lw.qkv.bias()?, false))? {
            mark("gemm qkv + bias")?;
        } else {
            e.product(l, h, lin(&lw.qkv), Mat::new(b.pre, rows, qkvw), 0.0)?;
            mark("gemm qkv")?;
            let to_qkv = Out {
                f32: None,
                act: Some(b.qkv),
                ld: qkvw,
            };
            bias_act(k, l, b.pre, qkvw, lw.qkv.b, Act::None, to_qkv, rows, qkvw)?;
            mark("bias qkv")?;
        }
        // Every camera and head at once on the tensor cores, else per camera as GEMMs.
        let prob = s.problem(n, e.vision_attention == VisionAttention::Chunks);
        let at = |view: View, ld: usize| Strided {
            view,
            ld,
            s1: t * ld,
            s2: s.head_dim,
        };
        let (fq, fk, fv) = (
            at(b.qkv, qkvw),
            at(b.qkv.tail(vw)?, qkvw),
            at(b.qkv.tail(2 * vw)?, qkvw),
        );
        let fo = at(b.att, vw);
        let fused = fused_fits(k, &prob, &fq, (&fk, &fv), &fo);
        if fused {
            fused_attention(k, l, &prob, fq, (fk, fv), fo, scale, &Mask::full(t), b.fa)?;
        }
        for i in (0..n).filter(|_| !fused) {
            let base = b.qkv.tail(i * t * qkvw)?;
            let q = Mat {
                view: base,
                rows: t,
                cols: s.head_dim,
                ld: qkvw,
                stride: s.head_dim,
                fp8: None,
            };
            let kk = Mat {
                view: base.tail(vw)?,
                ..q
            };
            let v = Mat {
                view: base.tail(2 * vw)?,
                ..q
            };
            let o = Mat {
                view: b.att.tail(i * t * vw)?,
                rows: t,
                cols: s.head_dim,
                ld: vw,
                stride: s.head_dim,
                fp8: None,
            };
            attention(
                k,
                g,
                l,
                q,
                kk,
                v,
                o,
                s.heads,
                scale,
                &Mask::full(t),
                scratch,
            )?;
        }
        mark("attention")?;
        e.product(
            l,
            Mat::new(b.att, rows, vw),
            lin(&lw.out),
            Mat::new(b.x, rows, vw),
            1.0,
        )?;
        mark("gemm out + residual")?;
        layer_norm(k, l, b.x, lw.out.b, lw.ln2_w, lw.ln2_b, b.h, rows, vw, eps)?;
        mark("layer_norm")?;
        let m_out = Mat::new(b.m, rows, s.mlp);
        if e.linear_bias(l, h, lin(&lw.fc1), m_out, (lw.fc1.bias()?, true))? {
            mark("gemm fc1 + bias + gelu")?;
        } else {
            e.product(l, h, lin(&lw.fc1), Mat::new(b.pre, rows, s.mlp), 0.0)?;
            mark("gemm fc1")?;
            let to_m = Out {
                f32: None,
                act: Some(b.m),
                ld: s.mlp,
            };
            bias_act(
                k,
                l,
                b.pre,
                s.mlp,
                lw.fc1.b,
                Act::GeluTanh,
                to_m,
                rows,
                s.mlp,
            )?;
            mark("bias + gelu")?;
        }
        e.product(
            l,
            Mat::new(b.m, rows, s.mlp),
            lin(&lw.fc2),
            Mat::new(b.x, rows, vw),
            1.0,
        )?;
        mark("gemm fc2 + residual")?;
        pending = lw.fc2.b;
    }
    layer_norm(k, l, b.x, pending, w.post_w, w.post_b, b.h, rows, vw, eps)?;
    e.product(
        l,
        Mat::new(b.h, rows, vw),
        lin(&w.proj),
        Mat::new(out, rows, s.out_width),
        0.0,
    )?;
    add_bias(k, l, out, s.out_width, w.proj.bias()?, rows, s.out_width)?;
    mark("post norm + projector (once)")
}
