//! The three model stages on the GPU — vision, prefix, denoise — each in its own file with
//! its weights (only its own: a split stage process loads nothing else), its buffers, its
//! forward pass and its graph cache, on its own stream. [`crate::cuda::pipeline`] runs the
//! three as one policy; [`crate::cuda::split`] runs one alone in a stage node.
//!
//! A stage reads and writes the tensors it shares with its neighbours through views the
//! caller hands it (the vision stage writes the prefix stage's input rows; the K/V cache
//! lives in [`KvSlots`], written by the prefix and read by the denoise stage), so the fused
//! policy copies nothing between stages.

pub mod denoise;
pub mod prefix;
pub mod vision;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::Duration;

use cudarc::driver::CudaEvent;

use crate::backend::Precision;
use crate::config::Config;
use crate::cuda::attention::{self, Mask, Problem, Scratch, Strided, Workspace};
use crate::cuda::device::{
    timing_event, CudaResult, DType, Device, DeviceBuffer, Fp8Scratch, Lane, View,
};
use crate::cuda::gemm::{Fp8, Gemm, LtEpilogue, Mat};
use crate::cuda::kernels::activation::Act;
use crate::cuda::kernels::rope::RowBatch;
use crate::cuda::kernels::skinny::{self, Epilogue};
use crate::cuda::kernels::{fp8, mlp};
use crate::cuda::runtime::graph::Graph;
use crate::cuda::weights::{Arena, Lin};
use crate::cuda::Kernels;
use crate::{cpu, settings, Error, Result};

/// What every stage of one process uses: the device, its kernels and cuBLASLt. Declared
/// last in its owner so that it drops after every buffer and graph.
pub struct Engine {
    pub kernels: Kernels,
    pub gemm: Gemm,
    /// Few-row products on [`skinny`] where it takes them (`TURBOPI_SKINNY_GEMM`, default on).
    pub skinny: bool,
    /// With `skinny`: GeGLU in its epilogue (`TURBOPI_SKINNY_GEGLU`, default on).
    pub skinny_geglu: bool,
    /// With `skinny`: RoPE and the K/V cache write in its epilogue where kernels do not
    /// start early (`TURBOPI_SKINNY_ROPE`, default on; see [`Engine::linear_rope`]).
    pub skinny_rope: bool,
    /// The stages whose large linear layers' weights are FP8 (`--dtype fp8` and
    /// `TURBOPI_FP8_STAGES`, docs/fp8.md); none in f32 and bf16.
    pub fp8: crate::fp8::Stages,
    /// bf16: the vision tower's biases (and fc1's GELU) in cuBLASLt's epilogue where it
    /// offers one (`TURBOPI_LT_EPILOGUES`, default on; see [`Engine::linear_bias`]).
    pub lt_epilogues: bool,
    /// bf16: the vision tower's tensor-core attention (`TURBOPI_VISION_ATTENTION`).
    pub vision_attention: settings::VisionAttention,
    /// bf16: the prefix's attention (`TURBOPI_PREFIX_ATTENTION`).
    pub prefix_attention: settings::PrefixAttention,
    /// Why `--dtype fp8` runs fewer stages in FP8 than asked for, if it does.
    pub fp8_note: Option<String>,
    /// How the W8A8 stages' products run on this card, where any stage is W8A8.
    pub w8a8: Option<fp8::W8a8>,
    /// Where those products' scales come after cuBLASLt: the scales applied by the kernel
    /// that reads the product next where one does (`TURBOPI_FP8_FOLD`, default on; see
    /// [`Engine::geglu_w8a8`] and [`Engine::linear_bias`]).
    pub fp8_fold: bool,
    /// FP8 expert products of 17 to 64 rows in one launch of the few-row FP8 kernel's wide
    /// form (`TURBOPI_SKINNY_FP8_WIDE`, default on).
    pub fp8_wide: bool,
    pub dev: Device,
}

impl Engine {
    /// Opens device `TURBOPI_CUDA_DEVICE` (default 0) with the kernels of `precision`; with
    /// fp8, the stages `TURBOPI_FP8_STAGES` asks for, or where it is unset those this card
    /// runs faster in FP8 ([`Engine::open_with`]).
    pub fn open(precision: Precision) -> Result<Engine> {
        Engine::open_with(precision, None)
    }

    /// [`Engine::open`] with the FP8 stages given (as `TURBOPI_FP8_STAGES` would give them;
    /// None: that setting). Where no stages are asked for, all three are FP8, except on a
    /// card where cuBLASLt applies no per-row scales to an FP8 product (Hopper): there the
    /// W8A8 products, with their scales applied after cuBLASLt, ran slower than bf16 (H100,
    /// docs/benchmarks.md), so only the expert is FP8 and the description says why.
    pub fn open_with(precision: Precision, stages: Option<crate::fp8::Stages>) -> Result<Engine> {
        let dev = Device::open(settings::cuda_device()?)?;
        let asked = match stages {
            Some(s) => Some(s),
            None => settings::fp8_stages_asked()?,
        };
        let mut fp8 = if precision == Precision::Fp8 {
            asked.unwrap_or(crate::fp8::Stages::ALL)
        } else {
            crate::fp8::Stages::NONE
        };
        if fp8.any() && dev.cc < (8, 9) {
            return Err(fp8_refusal(&dev));
        }
        let kernels = Kernels::load(&dev, act_type(precision))?;
        let gemm = Gemm::new(&dev)?;
        let w8a8 = if fp8.vision || fp8.prefix {
            w8a8_offered(&dev, &kernels, &gemm)?
        } else {
            None
        };
        // Why the vision tower and the prefix keep bf16, if they do.
        let fp8_note = match w8a8 {
            // Their W8A8 products need cuBLASLt's FP8 GEMM.
            None if fp8.vision || fp8.prefix => {
                let why = format!("cuBLASLt has no FP8 GEMM on sm_{}{}", dev.cc.0, dev.cc.1);
                if asked.is_some() {
                    return Err(Error::Input(format!(
                        "TURBOPI_FP8_STAGES asks for {} in FP8, but {why} ({}): the vision \
                         tower's and the prefix's W8A8 products need it; use \
                         TURBOPI_FP8_STAGES=expert, or leave it unset",
                        fp8.names(),
                        dev.name
                    )));
                }
                Some(why)
            }
            Some(fp8::W8a8::Rescaled(_)) if asked.is_none() => Some(format!(
                "cuBLASLt applies no per-row scales to FP8 products on sm_{}{}, and W8A8 with \
                 them applied after it runs slower than bf16; TURBOPI_FP8_STAGES=all runs it",
                dev.cc.0, dev.cc.1
            )),
            _ => None,
        };
        if fp8_note.is_some() {
            fp8.vision = false;
            fp8.prefix = false;
        }
        let skinny = settings::flag("TURBOPI_SKINNY_GEMM", true)?;
        let skinny_geglu = skinny && settings::flag("TURBOPI_SKINNY_GEGLU", true)?;
        let skinny_rope = skinny && settings::flag("TURBOPI_SKINNY_ROPE", true)?;
        let lt_epilogues = settings::flag("TURBOPI_LT_EPILOGUES", true)?;
        let fp8_fold = settings::flag("TURBOPI_FP8_FOLD", true)?;
        let fp8_wide = settings::flag("TURBOPI_SKINNY_FP8_WIDE", true)?;
        let vision_attention = settings::vision_attention()?;
        let prefix_attention = settings::prefix_attention()?;
        Ok(Engine {
            kernels,
            gemm,
            skinny,
            skinny_geglu,
            skinny_rope,
            fp8,
            lt_epilogues,
            vision_attention,
            prefix_attention,
            fp8_note,
            w8a8,
            fp8_fold,
            fp8_wide,
            dev,
        })
    }

    /// What the stages' weights are laid out in: the activation type, and the stages whose
    /// large linear layers are FP8.
    pub fn weight_types(&self) -> (DType, crate::fp8::Stages) {
        (self.act(), self.fp8)
    }

    /// y = x·wᵀ + beta·y for a Linear weight `w` [n_out, n_in]: on the few-row kernel
    /// ([`skinny`]) where it takes the shape and beta is 0 or 1, else on cuBLASLt; FP8
    /// weights as [`Engine::linear_fp8`] runs them.
    pub fn linear(&self, lane: &Lane, x: Mat, w: Mat, y: Mat, beta: f32) -> Result<()> {
        let epi = if beta == 0.0 {
            Some(Epilogue::Store)
        } else if beta == 1.0 {
            Some(Epilogue::Add)
        } else {
            None
        };
        if let Some(f) = w.fp8 {
            let epi =
                epi.ok_or_else(|| Error::Cuda(format!("internal: FP8 product with beta {beta}")))?;
            return self.linear_fp8(lane, x, (w, f), y, epi);
        }
        if let Some(epi) = epi.filter(|_| self.skinny) {
            if skinny::linear(&self.kernels, lane, x, w, y, epi)? {
                return Ok(());
            }
        }
        self.gemm.linear(lane, x, w, y, beta)
    }

    /// y[r, c] += gate[c] · (x·wᵀ)[r, c] in one launch: the few-row kernel where it takes the
    /// shape, else cuBLASLt's per-row alpha ([`Gemm::linear_gated`]); Ok(false), nothing
    /// queued, when neither can.
    pub fn linear_gated(&self, lane: &Lane, x: Mat, w: Mat, y: Mat, gate: View) -> Result<bool> {
        if let Some(f) = w.fp8 {
            self.linear_fp8(lane, x, (w, f), y, Epilogue::Gated(gate))?;
            return Ok(true);
        }
        if self.skinny && skinny::linear(&self.kernels, lane, x, w, y, Epilogue::Gated(gate))? {
            return Ok(true);
        }
        self.gemm.linear_gated(lane, x, w, y, gate)
    }

    /// out = gelu_tanh(gate) · up of the gate|up product x·wᵀ in one launch on the few-row
    /// kernel ([`skinny::geglu`]); Ok(false), nothing queued, where it does not take the
    /// shape or the epilogue is off (the caller then runs the product and `gelu_gate`).
    /// W8A16 weights (the expert in FP8) take the FP8 kernel's form ([`skinny::geglu_fp8`]).
    pub fn linear_geglu(&self, lane: &Lane, x: Mat, w: Mat, out: Mat) -> Result<bool> {
        if !self.skinny_geglu {
            return Ok(false);
        }
        match w.fp8 {
            None => skinny::geglu(&self.kernels, lane, x, w, out),
            Some(f) if !f.acts => skinny::geglu_fp8(&self.kernels, lane, x, (w, f.scales), out),
            Some(_) => Ok(false),
        }
    }

    /// For W8A8 weights whose scales come after cuBLASLt ([`fp8::W8a8::Rescaled`]) with
    /// `TURBOPI_FP8_FOLD` on and bf16 activations: x quantised into the lane's FP8 scratch and
    /// cuBLASLt's product of the codes with unit scales into the scratch in the activation
    /// type, for the caller's next kernel to scale as it reads it. Returns that product
    /// [x.rows, w.rows] and the input's row scales, or None, nothing queued that matters,
    /// elsewhere (the caller then takes the unfolded path).
    fn codes_product(&self, lane: &Lane, x: Mat, w: Mat) -> Result<Option<(Mat, View)>> {
        let rescaled = matches!(self.w8a8, Some(fp8::W8a8::Rescaled(_)));
        let acts = w.fp8.is_some_and(|f| f.acts);
        if !acts || !rescaled || !self.fp8_fold || self.act() != DType::Bf16 {
            return Ok(None);
        }
        let (scratch, xq, scales) = self.quantise_input(lane, x)?;
        let (rows, n) = (x.rows, w.rows);
        let p = Mat::new(scratch.out.as_type(self.act()).at(0, rows * n)?, rows, n);
        let offered = self.gemm.product_e4m3(lane, xq, w, p)?;
        Ok(offered.then_some((p, scales)))
    }

    /// x quantised per row (`quantise_e4m3`) into the lane's FP8 scratch: the scratch, the
    /// codes [x.rows, x.cols] and their row scales, for a W8A8 product.
    fn quantise_input(&self, lane: &Lane, x: Mat) -> Result<(Fp8Scratch, Mat, View)> {
        let scratch = lane.fp8_scratch().ok_or_else(|| {
            Error::Cuda("internal: an FP8 product on a lane without FP8 scratch".into())
        })?;
        let (rows, k) = (x.rows, x.cols);
        let codes = scratch.codes.at(0, rows * k)?;
        let scales = scratch.scales.at(0, rows)?;
        fp8::quantise_e4m3(&self.kernels, lane, x.view, x.ld, codes, k, scales, rows, k)?;
        Ok((scratch, Mat::new(codes, rows, k), scales))
    }

    /// out = gelu_tanh(gate)·up of the gate|up product x·wᵀ for W8A8 weights where their
    /// scales come after cuBLASLt: [`Engine::codes_product`], then
    /// [`mlp::gelu_gate`] applies the scales as it reads it, one pass over the product
    /// fewer than [`Engine::linear_fp8`] then `gelu_gate`. Ok(false), nothing queued that
    /// matters, elsewhere: the caller then runs the product and `gelu_gate`.
    pub fn geglu_w8a8(&self, lane: &Lane, x: Mat, w: Mat, out: Mat) -> Result<bool> {
        let fits = out.ld == out.cols && 2 * out.cols == w.rows && out.rows == x.rows;
        let (Some(f), true) = (w.fp8, fits) else {
            return Ok(false);
        };
        let Some((p, xs)) = self.codes_product(lane, x, w)? else {
            return Ok(false);
        };
        let (rows, mlp) = (out.rows, out.cols);
        mlp::gelu_gate(
            &self.kernels,
            lane,
            (p.view, out.view),
            rows,
            mlp,
            Some((xs, f.scales)),
        )?;
        Ok(true)
    }

    /// The q|k|v product x·wᵀ with RoPE and the scatter to q and the K/V cache in one launch
    /// on the few-row kernel ([`skinny::rope`]), on lanes whose kernels do not start early
    /// (PDL off, or before sm_90). Measured on an H200 (docs/benchmarks.md): without PDL the
    /// one launch is faster than the product and `rope_qkv`; with PDL it is slower (likely
    /// because `rope_qkv` then overlaps its neighbours, while the rotation in the epilogue
    /// runs after the product).
    /// Ok(false), nothing queued, where it does not apply or does not take the shape (the
    /// caller then runs the product and `rope_qkv`).
    pub fn linear_rope(&self, lane: &Lane, x: Mat, w: Mat, out: skinny::RopeOut) -> Result<bool> {
        if !self.skinny_rope || lane.pdl() || w.fp8.is_some() {
            return Ok(false);
        }
        skinny::rope(&self.kernels, lane, x, w, out)
    }

    /// y = x·wᵀ + beta·y for the large products of the vision tower and the prefix (hundreds
    /// of rows): on cuBLASLt, or as [`Engine::linear_fp8`] runs FP8 weights. (The few-row
    /// kernel is not tried: a prefix of a few prompt tokens keeps cuBLASLt's numerics.)
    pub fn product(&self, lane: &Lane, x: Mat, w: Mat, y: Mat, beta: f32) -> Result<()> {
        match w.fp8 {
            Some(_) => self.linear(lane, x, w, y, beta),
            None => self.gemm.linear(lane, x, w, y, beta),
        }
    }

    /// y (act) = x·wᵀ + bias, then tanh-GELU with `gelu`: in one cuBLASLt call where the
    /// epilogues are on, the activations bf16, the weights not FP8 and cuBLASLt offers an
    /// algorithm ([`Gemm::linear_bias`]); for W8A8 weights whose scales come after cuBLASLt,
    /// its product of the codes then one `rescale_e4m3` with the bias and GELU folded in
    /// ([`Engine::codes_product`]); Ok(false), nothing queued that matters, otherwise (the
    /// caller then stores the product in f32 and runs `bias_act`).
    pub fn linear_bias(
        &self,
        lane: &Lane,
        x: Mat,
        w: Mat,
        y: Mat,
        (bias, gelu): (View, bool),
    ) -> Result<bool> {
        if let Some(f) = w.fp8 {
            // W8A8 whose scales come after cuBLASLt: the scales, the bias and the GELU in
            // the one pass that follows the product of the codes.
            let Some((p, xs)) = self.codes_product(lane, x, w)? else {
                return Ok(false);
            };
            let act = if gelu { Act::GeluTanh } else { Act::None };
            fp8::rescale_e4m3(
                &self.kernels,
                lane,
                p.view,
                (xs, f.scales),
                y,
                false,
                (Some(bias), act),
            )?;
            return Ok(true);
        }
        if !self.lt_epilogues || self.act() != DType::Bf16 {
            return Ok(false);
        }
        let epi = if gelu {
            LtEpilogue::GeluBias
        } else {
            LtEpilogue::Bias
        };
        self.gemm.linear_bias(lane, x, w, y, bias, epi)
    }

    /// A product with FP8 weights `w` (codes, and the scales and kind in `f`):
    /// - W8A16 (the expert, `f.acts` false): the few-row FP8 kernel on x in bf16, up to 64
    ///   rows per launch (16 with `TURBOPI_SKINNY_FP8_WIDE` off; each row's result is the
    ///   same whatever the batch), with `epi`;
    /// - W8A8 (`f.acts`): x quantised per row into the lane's FP8 scratch, then cuBLASLt's
    ///   FP8 GEMM with both scale vectors, or of the codes alone and the scales after it
    ///   ([`fp8::w8a8`]); `epi` Store or Add.
    ///
    /// CPU twin: [`crate::cpu::Linear::forward`] on the layer quantised by
    /// [`crate::cpu::Linear::quantise_fp8`].
    pub fn linear_fp8(
        &self,
        lane: &Lane,
        x: Mat,
        (w, f): (Mat, Fp8),
        y: Mat,
        epi: Epilogue,
    ) -> Result<()> {
        if !f.acts {
            let per = if self.fp8_wide {
                skinny::MAX_ROWS_FP8
            } else {
                skinny::MAX_ROWS
            };
            let mut r0 = 0;
            while r0 < x.rows {
                let n = (x.rows - r0).min(per);
                let xs = Mat {
                    view: x.view.tail(r0 * x.ld)?,
                    rows: n,
                    ..x
                };
                let ys = Mat {
                    view: y.view.tail(r0 * y.ld)?,
                    rows: n,
                    ..y
                };
                if !skinny::linear_fp8(&self.kernels, lane, xs, w, f.scales, ys, epi)? {
                    return Err(Error::Cuda(format!(
                        "fp8: the few-row FP8 kernel does not take x [{}, {}] ({:?}, ld {}) times \
                         weights [{}, {}] (ld {}) into {:?}: it needs bf16 inputs, K a multiple \
                         of 16, N a multiple of 8 and 16-byte aligned rows",
                        x.rows, x.cols, x.view.dtype, x.ld, w.rows, w.cols, w.ld, y.view.dtype
                    )));
                }
                r0 += n;
            }
            return Ok(());
        }
        let add = match epi {
            Epilogue::Store => false,
            Epilogue::Add => true,
            Epilogue::Gated(_) => {
                return Err(Error::Cuda(
                    "internal: a gated product with FP8 inputs".into(),
                ))
            }
        };
        let (scratch, xq, scales) = self.quantise_input(lane, x)?;
        let (rows, k) = (x.rows, x.cols);
        let ran = fp8::w8a8(
            &self.kernels,
            &self.gemm,
            lane,
            (xq, scales),
            (w, f.scales),
            y,
            add,
            scratch.out,
        )?;
        if ran.is_none() {
            return Err(Error::Cuda(format!(
                "fp8: cuBLASLt offers no E4M3 product for x [{rows}, {k}] times weights [{}, \
                 {k}] into {:?} on {}, with scales or without",
                w.rows, y.view.dtype, self.dev.name
            )));
        }
        Ok(())
    }

    /// The activation type (f32 or bf16).
    pub fn act(&self) -> DType {
        self.kernels.act
    }

    /// A lane whose stream ranks `rank` on the critical path to the actions (0: denoise, 1:
    /// prefix, 2: vision; what `turbopi graph plan` prints), so that with frames overlapped
    /// the next frame's stages fill the gaps of this frame's denoise. `TURBOPI_STREAM_PRIORITIES=0`
    /// leaves every stream at the default priority (for A/B runs).
    pub fn lane(&self, rank: usize) -> Result<Lane> {
        let ranked = settings::flag("TURBOPI_STREAM_PRIORITIES", true)?;
        Lane::with_rank(&self.dev, ranked.then_some(rank))
    }

    /// A timing event.
    pub fn event(&self) -> Result<CudaEvent> {
        timing_event(&self.dev)
    }

    pub fn describe(&self, precision: Precision) -> String {
        let mut notes = Vec::new();
        if let Some(why) = self.fp8_note.as_ref().filter(|_| self.fp8.any()) {
            notes.push(format!("{} only: {why}", self.fp8.names()));
        } else if self.fp8.any() && !self.fp8.is_all() {
            notes.push(format!("{} only", self.fp8.names()));
        }
        if let Some(how) = self.w8a8.filter(|_| self.fp8.vision || self.fp8.prefix) {
            if how != fp8::W8a8::Scaled {
                notes.push(format!("W8A8 {}", how.describe()));
            }
        }
        let p = if notes.is_empty() {
            precision.name().to_string()
        } else {
            format!("{} ({})", precision.name(), notes.join("; "))
        };
        format!(
            "cuda {p} on {} (sm_{}{})",
            self.dev.name, self.dev.cc.0, self.dev.cc.1
        )
    }
}

/// The type of the activations outside FP8 GEMMs.
pub fn act_type(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 | Precision::Fp8 => DType::Bf16,
    }
}

/// How cuBLASLt runs the W8A8 stages' products on `dev` ([`fp8::w8a8`]), or None where it
/// has no E4M3 product at all: one small product of their kind, bf16 out. Its operands are
/// never read back, so they are left uninitialised.
fn w8a8_offered(dev: &Device, kernels: &Kernels, gemm: &Gemm) -> Result<Option<fp8::W8a8>> {
    let lane = Lane::new(dev)?;
    let (m, n, k) = (64, 256, 256);
    let x = dev.alloc(DType::U8, m * k)?;
    let w = dev.alloc(DType::U8, n * k)?;
    let xs = dev.alloc(DType::F32, m)?;
    let ws = dev.alloc(DType::F32, n)?;
    let y = dev.alloc(DType::Bf16, m * n)?;
    let tmp = dev.alloc(DType::F32, m * n)?;
    let ran = fp8::w8a8(
        kernels,
        gemm,
        &lane,
        (Mat::new(x.view(), m, k), xs.view()),
        (Mat::new(w.view(), n, k), ws.view()),
        Mat::new(y.view(), m, n),
        false,
        tmp.view(),
    )?;
    lane.synchronize()?;
    Ok(ran)
}

/// Why `--dtype fp8` does not run on `dev`, a card without FP8 tensor cores (before
/// sm_89), named with its compute capability.
fn fp8_refusal(dev: &Device) -> crate::Error {
    let (major, minor) = dev.cc;
    crate::Error::Input(format!(
        "dtype fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, \
         Blackwell); {} is sm_{major}{minor}: use dtype bf16",
        dev.name
    ))
}

/// Whether vision and prefix are captured as graphs after their first run
/// (`TURBOPI_STAGE_GRAPHS=0` runs them eagerly every frame, for A/B runs).
pub fn stage_graphs() -> Result<bool> {
    settings::flag("TURBOPI_STAGE_GRAPHS", true)
}

/// A timed span of a stage's work on its stream.
pub struct Span {
    pub start: CudaEvent,
    pub end: CudaEvent,
}

impl Span {
    pub fn new(engine: &Engine) -> Result<Span> {
        Ok(Span {
            start: engine.event()?,
            end: engine.event()?,
        })
    }

    /// The device time between the two events (both recorded and passed).
    pub fn elapsed(&self) -> Result<Duration> {
        let t = self
            .start
            .elapsed_ms(&self.end)
            .cuda("reading stage times")?;
        Ok(Duration::from_secs_f64(f64::from(t.max(0.0)) / 1e3))
    }

    pub fn record_start(&self, lane: &Lane) -> Result<()> {
        self.start
            .record(&lane.stream)
            .cuda("recording a stage's start")
    }

    pub fn record_end(&self, lane: &Lane) -> Result<()> {
        self.end
            .record(&lane.stream)
            .cuda("recording a stage's end")
    }
}

/// Events recorded after each operation of an eager run while profiling, named by the
/// operation's kind (nothing is recorded otherwise, in particular never while a graph is
/// captured).
#[derive(Default)]
pub(crate) struct Marks(RefCell<Option<Vec<(&'static str, CudaEvent)>>>);

impl Marks {
    /// Starts recording on `lane`.
    pub(crate) fn start(&self, e: &Engine, lane: &Lane) -> Result<()> {
        let ev = e.event()?;
        ev.record(&lane.stream)
            .cuda("recording a profiling event")?;
        *self.0.borrow_mut() = Some(vec![("start", ev)]);
        Ok(())
    }

    /// Closes an operation of kind `what` (while recording).
    pub(crate) fn mark(&self, e: &Engine, lane: &Lane, what: &'static str) -> Result<()> {
        let mut marks = self.0.borrow_mut();
        if let Some(m) = marks.as_mut() {
            let ev = e.event()?;
            ev.record(&lane.stream)
                .cuda("recording a profiling event")?;
            m.push((what, ev));
        }
        Ok(())
    }

    /// Stops recording; the marks so far.
    pub(crate) fn take(&self) -> Vec<(&'static str, CudaEvent)> {
        self.0.borrow_mut().take().unwrap_or_default()
    }
}

/// What a stage profile measured: the table of [`profile_table`], the eager run's total (ms)
/// and the graph replay's time (ms; None without a graph).
pub(crate) struct Profile {
    pub table: String,
    pub total_ms: f64,
    pub graph_ms: Option<f32>,
}

/// Profiles a stage on `lane`: `graph` (when given) replayed twice, the second replay timed;
/// then `eager` (one run of the same work, calling `marks.mark` after each operation) queued
/// behind it; the marks as a table of `per` steps or layers of `unit` titled `title`.
pub(crate) fn profile_stage(
    e: &Engine,
    lane: &Lane,
    (graph, what): (Option<&Graph>, &str),
    marks: &Marks,
    eager: impl FnOnce() -> Result<()>,
    (title, per, unit): (&str, f64, &str),
) -> Result<Profile> {
    lane.synchronize()?;
    let (g0, g1) = (timing_event(&e.dev)?, timing_event(&e.dev)?);
    if let Some(g) = graph {
        g.launch(what)?;
        g0.record(&lane.stream)
            .cuda("recording a profiling event")?;
        g.launch(what)?;
        g1.record(&lane.stream)
            .cuda("recording a profiling event")?;
    }
    marks.start(e, lane)?;
    let run = eager();
    let taken = marks.take();
    let synced = lane.synchronize();
    run?;
    synced?;
    let (table, total_ms) = profile_table(title, &taken, per, unit)?;
    let graph_ms = match graph {
        Some(_) => Some(g0.elapsed_ms(&g1).cuda("reading profiling events")?),
        None => None,
    };
    Ok(Profile {
        table,
        total_ms,
        graph_ms,
    })
}

/// The device time per kind of operation between `marks` (passed), divided by `per` (steps
/// or layers), as a table titled `title`, slowest first; and the total in ms.
pub(crate) fn profile_table(
    title: &str,
    marks: &[(&'static str, CudaEvent)],
    per: f64,
    unit: &str,
) -> Result<(String, f64)> {
    // kind -> (ms, launches), in first-seen order.
    let mut kinds: Vec<(&'static str, f64, usize)> = Vec::new();
    for pair in marks.windows(2) {
        let ms = f64::from(
            pair[0]
                .1
                .elapsed_ms(&pair[1].1)
                .cuda("reading profiling events")?,
        );
        match kinds.iter_mut().find(|k| k.0 == pair[1].0) {
            Some(k) => {
                k.1 += ms;
                k.2 += 1;
            }
            None => kinds.push((pair[1].0, ms, 1)),
        }
    }
    let total: f64 = kinds.iter().map(|k| k.1).sum();
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (what, ms, n) in &kinds {
        let _ = writeln!(
            out,
            "  {:<40} {:>8.1} us  {:>5.1}%  ({:.0} per {unit})",
            what,
            ms * 1e3 / per,
            100.0 * ms / total.max(1e-12),
            *n as f64 / per
        );
    }
    Ok((out, total))
}

/// Allocates the buffers a stage lays out with `layout` (run once to size them, then at the
/// real base) in one device allocation, zeroed on `lane`.
pub(crate) fn allocate<B>(
    dev: &Device,
    lane: &Lane,
    layout: impl Fn(&mut Arena) -> B,
) -> Result<(B, DeviceBuffer)> {
    let mut sizing = Arena::sizing();
    layout(&mut sizing);
    let buf = DeviceBuffer::alloc(dev, DType::U8, sizing.used().max(1))?;
    let views = layout(&mut Arena::at(buf.view().ptr));
    lane.zero(buf.view())?;
    lane.synchronize()?;
    Ok((views, buf))
}

/// The longest prefix (real image tokens and prompt tokens), the suffix and the cache rows
/// of each layer: the shapes the prefix and denoise stages agree on.
#[derive(Debug, Clone, Copy)]
pub struct CacheShape {
    pub layers: usize,
    /// Rows of each layer's K (and V) cache: the longest prefix, then the suffix.
    pub rows: usize,
    pub max_prefix: usize,
    /// K/V width: num_kv_heads * head_dim.
    pub kv_width: usize,
    pub act: DType,
}

impl CacheShape {
    pub fn of(cfg: &Config, act: DType) -> CacheShape {
        let max_prefix = cfg.max_prefix_len();
        CacheShape {
            layers: cfg.vlm_depth,
            rows: max_prefix + cfg.suffix_len(),
            max_prefix,
            kv_width: cfg.num_kv_heads * cfg.head_dim,
            act,
        }
    }

    /// Elements of one cache slot: [layers][K, V][rows][kv_width].
    pub fn len(&self) -> usize {
        self.layers * 2 * self.rows * self.kv_width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [layers, 2, rows, kv_width]: what a cache slot exported by IPC holds.
    pub fn dims(&self) -> [usize; 4] {
        [self.layers, 2, self.rows, self.kv_width]
    }
}

/// One K/V cache: every layer's K (after RoPE) and V, and its i32 [4] info: the real prefix
/// length P and 0 (the prefix's first position), which the graphs read from the device.
#[derive(Debug, Clone, Copy)]
pub struct CacheSlot {
    pub kv: View,
    pub info: View,
    pub shape: CacheShape,
}

impl CacheSlot {
    /// Layer `layer`'s K and V caches, [rows, kv_width] each.
    pub fn layer(&self, layer: usize) -> Result<(View, View)> {
        let n = self.shape.rows * self.shape.kv_width;
        Ok((
            self.kv.at((2 * layer) * n, n)?,
            self.kv.at((2 * layer + 1) * n, n)?,
        ))
    }

    /// The real prefix length, on the device (i32 [1]).
    pub fn prefix_len(&self) -> Result<View> {
        self.info.at(0, 1)
    }

    /// The prefix's first position, 0, on the device (i32 [1]).
    pub fn first_position(&self) -> Result<View> {
        self.info.at(1, 1)
    }
}

/// The K/V caches of a batch's sequences: slot 0's, and the next `n - 1` slots of the same
/// allocation, each `kv_stride` elements (and its info `info_stride` i32) after the one
/// before ([`KvSlots::batch`] checks that they are).
#[derive(Debug, Clone, Copy)]
pub struct CacheBatch {
    pub first: CacheSlot,
    pub n: usize,
    pub kv_stride: usize,
    pub info_stride: usize,
}

impl CacheBatch {
    /// One cache.
    pub fn one(slot: CacheSlot) -> CacheBatch {
        CacheBatch {
            first: slot,
            n: 1,
            kv_stride: 0,
            info_stride: 0,
        }
    }

    /// The sequences of `per` rows each over these caches.
    pub fn rows(&self, per: usize) -> RowBatch {
        RowBatch {
            n: self.n,
            per,
            kv_stride: self.kv_stride,
            prefix_stride: self.info_stride,
        }
    }

    /// Layer `layer`'s K and V caches of the first sequence, as views that span every
    /// sequence's (within the slots' allocation, as [`KvSlots::batch`] checked).
    pub fn layer(&self, layer: usize) -> Result<(View, View)> {
        let (k, v) = self.first.layer(layer)?;
        let more = (self.n - 1) * self.kv_stride;
        Ok((
            View {
                len: k.len + more,
                ..k
            },
            View {
                len: v.len + more,
                ..v
            },
        ))
    }

    /// The first sequence's prefix length, as a view that spans every sequence's.
    pub fn prefix_lens(&self) -> Result<View> {
        let p = self.first.prefix_len()?;
        Ok(View {
            len: p.len + (self.n - 1) * self.info_stride,
            ..p
        })
    }
}

/// `n` K/V caches in one allocation (two in the pipelined policy: frame t's denoise reads one
/// while frame t+1's prefix fills the other). Rows past a frame's prefix are read (with
/// probability 0) by the padded attention, so they start at zero and stay finite.
pub struct KvSlots {
    pub slots: Vec<CacheSlot>,
    _buf: DeviceBuffer,
}

impl KvSlots {
    pub fn new(engine: &Engine, lane: &Lane, shape: CacheShape, n: usize) -> Result<KvSlots> {
        let (slots, buf) = allocate(&engine.dev, lane, |ar| {
            (0..n)
                .map(|_| CacheSlot {
                    kv: ar.take(shape.act, shape.len()),
                    info: ar.take(DType::I32, 4),
                    shape,
                })
                .collect::<Vec<_>>()
        })?;
        Ok(KvSlots { slots, _buf: buf })
    }

    pub fn get(&self, i: usize) -> Result<CacheSlot> {
        self.slots
            .get(i)
            .copied()
            .ok_or_else(|| Error::Cuda(format!("internal: K/V cache slot {i}")))
    }

    /// Slots `0..n` as the caches of a batch's `n` sequences: an error unless they lie at one
    /// stride (they do: one layout, one allocation).
    pub fn batch(&self, n: usize) -> Result<CacheBatch> {
        let first = self.get(0)?;
        if n == 0 || n > self.slots.len() {
            return Err(Error::Cuda(format!(
                "internal: a batch of {n} over {} K/V cache slots",
                self.slots.len()
            )));
        }
        if n == 1 {
            return Ok(CacheBatch::one(first));
        }
        let second = self.get(1)?;
        let stride = |a: View, b: View| -> Option<usize> {
            let bytes = b.ptr.checked_sub(a.ptr)?;
            let size = a.dtype.size() as u64;
            (bytes % size == 0).then(|| usize::try_from(bytes / size).ok())?
        };
        let (kv_stride, info_stride) = stride(first.kv, second.kv)
            .zip(stride(first.info, second.info))
            .ok_or_else(|| Error::Cuda("internal: K/V cache slots out of order".into()))?;
        let at = |base: View, i: usize, stride: usize| {
            base.ptr + (i * stride * base.dtype.size()) as u64
        };
        let uniform = self.slots[..n].iter().enumerate().all(|(i, s)| {
            s.kv.ptr == at(first.kv, i, kv_stride) && s.info.ptr == at(first.info, i, info_stride)
        });
        if !uniform {
            return Err(Error::Cuda(
                "internal: K/V cache slots not at one stride".into(),
            ));
        }
        Ok(CacheBatch {
            first,
            n,
            kv_stride,
            info_stride,
        })
    }

    /// How many slots there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// RoPE's inverse frequencies (f32 [head_dim / 2]) uploaded into `view`.
pub fn upload_inv_freq(cfg: &Config, lane: &Lane, view: View) -> Result<()> {
    let inv_freq = cpu::rope_inv_freq(cfg.head_dim, cfg.rope_theta);
    lane.upload_now(&inv_freq, view)
}

/// A Linear as a GEMM operand (with its FP8 scales, if any).
pub(crate) fn lin(l: &Lin) -> Mat {
    l.mat()
}

/// The attention of a Gemma (prefix or expert): the queries of `rows` (one sequence, or a
/// batch's sequences each over its own cache) in the grouped layout in `q` ([sequence][kv]
/// [rows][group][hd]) over the first `keys` rows of a layer's K/V cache, on the tensor cores
/// when a workspace and the key chunks per block ([`Problem::per_block`]) are given and the
/// problem fits (one launch for every sequence), else as GEMMs (a sequence at a time); the result lands in `att` [rows, nh * hd] (through `att_g`
/// when heads must be unpermuted). `kc` and `vc` are sequence 0's caches, spanning the
/// others; `mask.prefix_len` is sequence 0's length, and the others' follow at
/// `rows.prefix_stride`.
#[allow(clippy::too_many_arguments)]
pub fn gemma_attention(
    e: &Engine,
    cfg: &Config,
    l: &Lane,
    (rows, keys): (RowBatch, usize),
    q: View,
    (kc, vc): (View, View),
    mask: Mask,
    scratch: Scratch,
    fa: Option<(Workspace, usize)>,
    (att_g, att): (View, View),
) -> Result<()> {
    let (kv, hd) = (cfg.num_kv_heads, cfg.head_dim);
    let group = cfg.num_heads / kv;
    let kv_width = kv * hd;
    let gr = rows.per * group;
    // One sequence's queries (and grouped outputs), and its output rows.
    let (q_seq, att_seq) = (kv * gr * hd, rows.per * cfg.num_heads * hd);
    // With one KV head the grouped layout is already [rows, nh * hd].
    let out = if kv == 1 { att } else { att_g };
    let mask = Mask {
        prefix_stride: rows.prefix_stride,
        ..mask
    };
    let fused = match fa {
        Some((work, per_block)) => {
            let prob = Problem {
                rows: gr,
                keys,
                hd,
                n1: kv,
                n2: rows.n,
                per_block,
            };
            let fq = Strided {
                view: q,
                ld: hd,
                s1: gr * hd,
                s2: q_seq,
            };
            let fk = Strided {
                view: kc,
                ld: kv_width,
                s1: hd,
                s2: rows.kv_stride,
            };
            let fv = Strided { view: vc, ..fk };
            let fo = Strided { view: out, ..fq };
            let fits = attention::fused_fits(&e.kernels, &prob, &fq, (&fk, &fv), &fo);
            if fits {
                attention::fused_attention(
                    &e.kernels,
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
    for b in 0..rows.n {
        let (qb, ob) = (q.at(b * q_seq, q_seq)?, out.at(b * q_seq, q_seq)?);
        if !fused {
            let cache = kc.len - (rows.n - 1) * rows.kv_stride;
            let km = Mat {
                view: kc.at(b * rows.kv_stride, cache)?,
                rows: keys,
                cols: hd,
                ld: kv_width,
                stride: hd,
                fp8: None,
            };
            let vm = Mat {
                view: vc.at(b * rows.kv_stride, cache)?,
                ..km
            };
            let prefix_len = match mask.prefix_len {
                Some(pl) => Some(pl.at(b * rows.prefix_stride, 1)?),
                None => None,
            };
            let mask = Mask {
                prefix_len,
                prefix_stride: 0,
                ..mask
            };
            attention::attention(
                &e.kernels,
                &e.gemm,
                l,
                Mat::new(qb, gr, hd),
                km,
                vm,
                Mat::new(ob, gr, hd),
                kv,
                attention::scale(hd),
                &mask,
                scratch,
            )?;
        }
        if kv > 1 {
            let ab = att.at(b * att_seq, att_seq)?;
            attention::unpermute_heads(&e.kernels, l, ob, ab, rows.per, kv, group, hd)?;
        }
    }
    Ok(())
}
