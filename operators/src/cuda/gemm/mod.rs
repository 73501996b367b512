//! GEMM glue over cuBLASLt for row-major operands, by the transposed-problem trick: a
//! row-major y[M, N] is the column-major yᵀ[N, M], so y = x·op(b) is computed as
//! yᵀ = op(b)ᵀ·xᵀ with cuBLASLt's m = N, n = M. CPU twin: [`crate::cpu::matmul_into`].
//!
//! Strict mode (f32 operands) uses CUBLAS_COMPUTE_32F, which never rounds to TF32; bf16
//! operands accumulate in f32 and may write f32 or bf16. Descriptors and the algorithm are
//! planned once per shape (cached), so steady-state frames and graph replays only call
//! cublasLtMatmul.
//!
//! Autotuning: a plan asks the heuristic for up to [`CANDIDATES`] algorithms and, when the
//! stream is not capturing, times each on the real operands (CUDA events on the lane's
//! stream, results written to a scratch buffer so that y is untouched) and keeps the
//! fastest. Plans are made by eager runs (the first frame, the warm-up before a graph
//! capture); a plan first needed while the stream captures takes the heuristic's first
//! algorithm without timing. `TURBOPI_GEMM_AUTOTUNE=0` always takes the first algorithm.
//! The timing ([`tune`]) flushes the L2 cache before each run (`TURBOPI_GEMM_TUNE_COLD`), as
//! a frame finds it: the expert's weights come from memory, not from the cache a back-to-back
//! rerun of the same product leaves them in.
//! Timed picks are shared by every handle of the process and kept in the kernel cache for
//! later processes ([`super::runtime::plans`]): a shape runs the same way everywhere.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{sys as drv_sys, CudaContext};

use super::device::{CudaResult, DType, Device, Lane, View};
use super::runtime::plans;

mod tune;
use crate::{settings, Error, Result};
use tune::autotune_enabled;

/// A row-major matrix operand: `rows` x `cols` elements with row stride `ld`; in a batched
/// product, matrix i starts `stride * i` elements after the first. A Linear's weight in FP8
/// (`--dtype fp8`) holds E4M3 codes (u8) and carries its scales in `fp8`.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    pub view: View,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub stride: usize,
    pub fp8: Option<Fp8>,
}

/// What an FP8 weight operand carries besides its codes.
#[derive(Debug, Clone, Copy)]
pub struct Fp8 {
    /// f32 [rows]: row n of the weight is `scales[n]` times its E4M3 codes.
    pub scales: View,
    /// Whether the inputs it meets are quantised too (W8A8 on FP8 tensor cores: the vision
    /// tower and Gemma 2B) or stay bf16 (W8A16: the action expert). See docs/fp8.md.
    pub acts: bool,
}

impl Mat {
    /// A dense [rows, cols] matrix at the start of `view`.
    pub fn new(view: View, rows: usize, cols: usize) -> Mat {
        Mat {
            view,
            rows,
            cols,
            ld: cols,
            stride: rows * cols,
            fp8: None,
        }
    }

    pub fn ld(self, ld: usize) -> Mat {
        Mat { ld, ..self }
    }

    pub fn stride(self, stride: usize) -> Mat {
        Mat { stride, ..self }
    }

    /// Elements spanned by `batch` matrices.
    fn span(&self, batch: usize) -> usize {
        if self.rows == 0 || self.cols == 0 || batch == 0 {
            return 0;
        }
        (batch - 1) * self.stride + (self.rows - 1) * self.ld + self.cols
    }

    /// That the row stride covers the columns and `batch` matrices lie inside the view.
    pub(crate) fn check(&self, batch: usize, what: &str) -> Result<()> {
        if self.ld < self.cols {
            return Err(Error::Cuda(format!(
                "internal: {what}: row stride {} < {} columns",
                self.ld, self.cols
            )));
        }
        let span = self.span(batch);
        if span > self.view.len {
            return Err(Error::Cuda(format!(
                "internal: {what}: [{}, {}] (ld {}, {batch} x stride {}) spans {span} elements, the buffer holds {}",
                self.rows, self.cols, self.ld, self.stride, self.view.len
            )));
        }
        Ok(())
    }
}

/// How the second operand enters the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `b` is stored [N, K] (a PyTorch Linear weight): y = x·bᵀ.
    Wt,
    /// `b` is stored [K, N]: y = x·b.
    N,
}

/// cuBLASLt's type of an operand; u8 operands are FP8 E4M3 codes ([`Gemm::linear_fp8`]).
fn lt_type(d: DType) -> Result<lt_sys::cudaDataType> {
    match d {
        DType::F32 => Ok(lt_sys::cudaDataType::CUDA_R_32F),
        DType::Bf16 => Ok(lt_sys::cudaDataType::CUDA_R_16BF),
        DType::U8 => Ok(lt_sys::cudaDataType::CUDA_R_8F_E4M3),
        other => Err(Error::Cuda(format!(
            "internal: GEMM operand of type {other:?}"
        ))),
    }
}

/// That both operands of an FP8 product hold E4M3 codes (u8).
fn e4m3_operands(x: Mat, w: Mat) -> Result<()> {
    if x.view.dtype != DType::U8 || w.view.dtype != DType::U8 {
        return Err(Error::Cuda(format!(
            "internal: FP8 GEMM operands of types {:?} and {:?}, expected u8 codes",
            x.view.dtype, w.view.dtype
        )));
    }
    Ok(())
}

/// Largest power of two (up to 256) dividing the address of every matrix of the batch.
fn alignment(ptr: u64, stride_bytes: u64, batch: usize) -> u32 {
    let mut a = ptr | 256;
    if batch > 1 {
        a |= stride_bytes.max(1);
    }
    (a & a.wrapping_neg()).min(256) as u32
}

/// How alpha reaches cuBLASLt: a host scalar, or a device f32 vector with one value per row
/// of D (per column of the row-major y), beta a host scalar; or, for FP8 operands, alpha a
/// host scalar and each operand scaled by a device f32 vector over its outer dimension
/// (cuBLASLt's outer-vector scaling: one scale per weight row and one per input row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scale {
    Host,
    RowVector,
    OuterVectors,
}

/// alpha as passed to one call.
#[derive(Debug, Clone, Copy)]
enum Alpha {
    Host(f32),
    /// Device address of f32 [N].
    Rows(u64),
}

impl Alpha {
    fn scale(self) -> Scale {
        match self {
            Alpha::Host(_) => Scale::Host,
            Alpha::Rows(_) => Scale::RowVector,
        }
    }
}

/// Heuristic results requested per plan (the candidates the autotuner times).
pub const CANDIDATES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    op: Op,
    lda: usize,
    ldb: usize,
    ldd: usize,
    types: (DType, DType, DType),
    batch: usize,
    strides: (usize, usize, usize),
    align: (u32, u32, u32),
    scale: Scale,
    epilogue: LtEpilogue,
    /// The SMs cuBLASLt may target (`CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET`); 0: all. The
    /// lane's ([`Lane::sm_target`]).
    sms: u32,
}

/// What cuBLASLt applies to each output before it is stored: nothing, the bias of its
/// output channel (an f32 vector, one value per row of D: per column of the row-major y),
/// or that bias then tanh-GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LtEpilogue {
    None,
    Bias,
    GeluBias,
}

/// The device addresses of one call: A = b, B = x, C = the y read (beta), D = the y written.
#[derive(Debug, Clone, Copy)]
struct Operands {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
    alpha: Alpha,
    beta: f32,
    /// FP8 products: the device addresses of A's scales (one per weight row) and B's (one
    /// per input row), bound to the descriptor before each call.
    scales: Option<(u64, u64)>,
    /// With a bias epilogue: the device address of the f32 bias, bound before each call.
    bias: Option<u64>,
    /// Bytes D spans (the scratch a timing run writes instead of D).
    d_bytes: usize,
}

/// cuBLASLt descriptors and the chosen algorithm of one GEMM shape.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    d: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Gemm::plan`, destroyed once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle and its plans.
pub struct Gemm {
    handle: lt_sys::cublasLtHandle_t,
    plans: RefCell<HashMap<PlanKey, Plan>>,
    /// Row-scaled (gated) shapes that cuBLASLt cannot run: their callers take the two-launch
    /// path.
    unsupported: RefCell<std::collections::HashSet<PlanKey>>,
    /// Plans whose algorithm came from timing candidates (for tests and reports).
    tuned: std::cell::Cell<usize>,
    /// The device kind, under which algorithm picks are shared ([`super::runtime::plans`]).
    device: String,
    ctx: Arc<CudaContext>,
}

// SAFETY: the handle and descriptors are only used by the thread that owns the Gemm (the
// RefCell makes it !Sync); cuBLASLt handles may move between threads.
unsafe impl Send for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created in `new`, destroyed once.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }
}

/// Sets one attribute of a layout, matmul descriptor or preference from a plain value.
macro_rules! set_attr {
    ($f:path, $obj:expr, $attr:expr, $val:expr) => {{
        let v = $val;
        // SAFETY: `$obj` is a live descriptor and `v` is a plain value of the size and type
        // cuBLASLt documents for `$attr`.
        unsafe {
            $f(
                $obj,
                $attr,
                (&v as *const _) as *const c_void,
                std::mem::size_of_val(&v),
            )
        }
        .cuda("setting a cuBLASLt attribute")
    }};
}

impl Gemm {
    pub fn new(dev: &Device) -> Result<Gemm> {
        dev.bind()?;
        let handle = lt::create_handle().cuda("creating the cuBLASLt handle")?;
        Ok(Gemm {
            handle,
            plans: RefCell::new(HashMap::new()),
            unsupported: RefCell::new(std::collections::HashSet::new()),
            tuned: std::cell::Cell::new(0),
            device: format!("{}-sm{}{}", dev.name, dev.cc.0, dev.cc.1),
            ctx: dev.ctx.clone(),
        })
    }

    /// Plans created so far (each is a distinct shape).
    pub fn plan_count(&self) -> usize {
        self.plans.borrow().len()
    }

    /// Gated (row-scaled) or bias-epilogue shapes that cuBLASLt could not run, so their
    /// callers fell back to a GEMM and a separate kernel.
    pub fn gated_fallbacks(&self) -> usize {
        self.unsupported.borrow().len()
    }

    /// Plans whose algorithm was chosen by timing several candidates.
    pub fn tuned_count(&self) -> usize {
        self.tuned.get()
    }

    /// y = alpha·x·op(b) + beta·y for `batch` matrices (strides from the operands).
    /// beta = 1 accumulates into y in place (a residual add).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        lane: &Lane,
        x: Mat,
        b: Mat,
        op: Op,
        y: Mat,
        alpha: f32,
        beta: f32,
        batch: usize,
    ) -> Result<()> {
        let Some((key, ops)) = self.prepare(x, b, op, y, Alpha::Host(alpha), beta, batch)? else {
            return Ok(());
        };
        self.run(key, ops, lane, &|| {
            format!(
                "cublasLtMatmul y[{}, {}] = x[{}, {}] . {op:?} ({:?} -> {:?}, batch {batch})",
                key.m, key.n, key.m, key.k, x.view.dtype, y.view.dtype
            )
        })
    }

    /// Queues the plan of `key` (made now, at the shape's first call) on `ops`; a refusal by
    /// cuBLASLt is an error that names the product (`what`).
    fn run(
        &self,
        key: PlanKey,
        ops: Operands,
        lane: &Lane,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let key = PlanKey {
            sms: lane.sm_target(),
            ..key
        };
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(&key, lane, &ops)?),
        };
        // SAFETY: the plan was made for this key (shapes, strides, types, alignment, scale
        // mode, epilogue); `prepare` checked every matrix against its view, and the callers
        // checked the vectors `ops` points at (scales, gate, bias).
        unsafe { self.launch(plan, &plan.algo, &ops, lane) }
            .map_err(|e| Error::Cuda(format!("{}: {e}", what())))
    }

    /// y = x·wᵀ (+ beta·y) for a Linear weight `w` [n_out, n_in].
    pub fn linear(&self, lane: &Lane, x: Mat, w: Mat, y: Mat, beta: f32) -> Result<()> {
        self.matmul(lane, x, w, Op::Wt, y, 1.0, beta, 1)
    }

    /// y = diag(x_scales)·(x·wᵀ)·diag(w_scales) + beta·y on FP8 tensor cores: `x` [M, K] and
    /// `w` [N, K] hold E4M3 codes (u8; row r of x stands for `x_scales[r]` times its codes,
    /// row n of w for `w_scales[n]` times its codes, as [`crate::fp8::quantise_rows`] and
    /// [`crate::cuda::fp8::quantise_e4m3`] write them), products accumulate in f32 and y is
    /// f32 or bf16. Both scale vectors are applied by cuBLASLt (outer-vector scaling, CUDA
    /// 12.9 and newer, sm_90 and newer). Returns Ok(false), having queued nothing, where
    /// cuBLASLt offers no algorithm for this output (remembered, as [`Gemm::linear_bias`]).
    /// CPU twin: [`crate::cpu::Linear::forward`] on an FP8-quantised layer with its
    /// activations quantised.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_fp8(
        &self,
        lane: &Lane,
        x: Mat,
        x_scales: View,
        w: Mat,
        w_scales: View,
        y: Mat,
        beta: f32,
    ) -> Result<bool> {
        e4m3_operands(x, w)?;
        let Some((mut key, mut ops)) = self.prepare(x, w, Op::Wt, y, Alpha::Host(1.0), beta, 1)?
        else {
            return Ok(true);
        };
        x_scales.need(DType::F32, x.rows, "FP8 GEMM input scales")?;
        w_scales.need(DType::F32, w.rows, "FP8 GEMM weight scales")?;
        key.scale = Scale::OuterVectors;
        ops.scales = Some((w_scales.ptr, x_scales.ptr));
        self.run_or_refuse(key, ops, lane)
    }

    /// y = x·wᵀ for E4M3 codes `x` [M, K] and `w` [N, K] (u8) with unit scales: the sums of
    /// the codes' products, accumulated in f32, into y (f32 or bf16), for the caller to scale
    /// ([`crate::cuda::kernels::fp8::w8a8`], where cuBLASLt has no per-row scales). Returns
    /// Ok(false), having queued nothing, where cuBLASLt offers no algorithm for it.
    pub fn product_e4m3(&self, lane: &Lane, x: Mat, w: Mat, y: Mat) -> Result<bool> {
        e4m3_operands(x, w)?;
        let Some((key, ops)) = self.prepare(x, w, Op::Wt, y, Alpha::Host(1.0), 0.0, 1)? else {
            return Ok(true);
        };
        self.run_or_refuse(key, ops, lane)
    }

    /// y = x·wᵀ + bias (then tanh-GELU with `epi` GeluBias) as one cuBLASLt call, the bias
    /// (f32 [n_out]) and the activation applied to the f32 sums before y (f32 or bf16) is
    /// stored. Returns Ok(false), having queued nothing, where cuBLASLt offers no algorithm
    /// for it; the caller then stores the product and runs
    /// [`crate::cuda::activation::bias_act`]. CPU twin: [`crate::cpu::Linear::forward`]
    /// (then [`crate::cpu::gelu_tanh`]).
    pub fn linear_bias(
        &self,
        lane: &Lane,
        x: Mat,
        w: Mat,
        y: Mat,
        bias: View,
        epi: LtEpilogue,
    ) -> Result<bool> {
        bias.need(DType::F32, w.rows, "GEMM bias")?;
        let Some((mut key, mut ops)) = self.prepare(x, w, Op::Wt, y, Alpha::Host(1.0), 0.0, 1)?
        else {
            return Ok(true);
        };
        key.epilogue = epi;
        ops.bias = (epi != LtEpilogue::None).then_some(bias.ptr);
        self.run_or_refuse(key, ops, lane)
    }

    /// Runs the plan of `key` on `ops`, or Ok(false) with nothing queued where cuBLASLt
    /// has no plan for it or refuses the call (remembered: later calls fall back at once).
    fn run_or_refuse(&self, key: PlanKey, ops: Operands, lane: &Lane) -> Result<bool> {
        let key = PlanKey {
            sms: lane.sm_target(),
            ..key
        };
        if self.unsupported.borrow().contains(&key) {
            return Ok(false);
        }
        let mut plans = self.plans.borrow_mut();
        if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
            match self.plan(&key, lane, &ops) {
                Ok(p) => {
                    e.insert(p);
                }
                Err(_) => {
                    self.unsupported.borrow_mut().insert(key);
                    return Ok(false);
                }
            }
        }
        let plan = plans
            .get(&key)
            .ok_or_else(|| Error::Cuda("internal: GEMM plan missing".into()))?;
        // SAFETY: the plan was made for this key; `prepare` checked every matrix against its
        // view, and the caller checked the vectors `ops` points at (gate, bias).
        match unsafe { self.launch(plan, &plan.algo, &ops, lane) } {
            Ok(()) => Ok(true),
            // Rejected before anything was queued (cuBLASLt checks its arguments on the
            // host): remember it and let the caller take the longer path.
            Err(_) => {
                plans.remove(&key);
                self.unsupported.borrow_mut().insert(key);
                Ok(false)
            }
        }
    }

    /// y[r, c] += gate[c] · (x·wᵀ)[r, c] as one cuBLASLt call: alpha is the device vector
    /// `gate` (f32 [n_out]), one value per row of the transposed D, i.e. per column of y.
    /// Returns Ok(false), having queued nothing, when cuBLASLt offers no algorithm for this
    /// pointer mode and shape; the caller then computes the product and adds it gated
    /// itself. CPU twin: [`crate::cpu::add_residual`] with a gate after a Linear.
    pub fn linear_gated(&self, lane: &Lane, x: Mat, w: Mat, y: Mat, gate: View) -> Result<bool> {
        gate.need(DType::F32, w.rows, "gated GEMM gate")?;
        let Some((key, ops)) = self.prepare(x, w, Op::Wt, y, Alpha::Rows(gate.ptr), 1.0, 1)? else {
            return Ok(true);
        };
        self.run_or_refuse(key, ops, lane)
    }

    /// Checks the operands of y = alpha·x·op(b) + beta·y and returns the plan key and the
    /// addresses of the call, or None for an empty product.
    #[allow(clippy::too_many_arguments)]
    fn prepare(
        &self,
        x: Mat,
        b: Mat,
        op: Op,
        y: Mat,
        alpha: Alpha,
        beta: f32,
        batch: usize,
    ) -> Result<Option<(PlanKey, Operands)>> {
        let (m, k) = (x.rows, x.cols);
        let (bk, n) = match op {
            Op::Wt => (b.cols, b.rows),
            Op::N => (b.rows, b.cols),
        };
        if bk != k || y.rows != m || y.cols != n {
            return Err(Error::Cuda(format!(
                "internal: GEMM shapes x [{m}, {k}], b {op:?} [{}, {}], y [{}, {}] do not agree",
                b.rows, b.cols, y.rows, y.cols
            )));
        }
        if m == 0 || n == 0 || batch == 0 {
            return Ok(None);
        }
        if k == 0 {
            return Err(Error::Cuda(
                "internal: GEMM with an empty inner dimension".into(),
            ));
        }
        x.check(batch, "GEMM input")?;
        b.check(batch, "GEMM weight")?;
        y.check(batch, "GEMM output")?;
        if x.view.dtype != b.view.dtype {
            return Err(Error::Cuda(format!(
                "internal: GEMM operands of types {:?} and {:?}",
                x.view.dtype, b.view.dtype
            )));
        }
        let es = |v: View| v.dtype.size() as u64;
        let key = PlanKey {
            m,
            n,
            k,
            op,
            lda: b.ld,
            ldb: x.ld,
            ldd: y.ld,
            types: (b.view.dtype, x.view.dtype, y.view.dtype),
            batch,
            strides: (b.stride, x.stride, y.stride),
            align: (
                alignment(b.view.ptr, b.stride as u64 * es(b.view), batch),
                alignment(x.view.ptr, x.stride as u64 * es(x.view), batch),
                alignment(y.view.ptr, y.stride as u64 * es(y.view), batch),
            ),
            scale: alpha.scale(),
            epilogue: LtEpilogue::None,
            sms: 0,
        };
        let ops = Operands {
            a: b.view.ptr,
            b: x.view.ptr,
            c: y.view.ptr,
            d: y.view.ptr,
            alpha,
            beta,
            scales: None,
            bias: None,
            d_bytes: y.span(batch) * y.view.dtype.size(),
        };
        Ok(Some((key, ops)))
    }

    /// Queues one cublasLtMatmul of `plan` with `algo` on `ops`.
    ///
    /// # Safety
    /// `plan` must describe the operands (its key came from `prepare` of the same call) and
    /// every address in `ops` must be valid for the matrices the plan describes.
    unsafe fn launch(
        &self,
        plan: &Plan,
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        ops: &Operands,
        lane: &Lane,
    ) -> std::result::Result<(), lt::CublasError> {
        let host_alpha;
        let alpha_ptr: *const c_void = match ops.alpha {
            Alpha::Host(a) => {
                host_alpha = a;
                (&host_alpha as *const f32).cast()
            }
            Alpha::Rows(p) => p as *const c_void,
        };
        use lt_sys::cublasLtMatmulDescAttributes_t as D;
        let bias = ops.bias.map(|b| (D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, b));
        let scales = ops.scales.map(|(a, b)| {
            [
                (D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a),
                (D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b),
            ]
        });
        // The device vectors of this call, bound to the descriptor before it.
        for (attr, ptr) in bias.into_iter().chain(scales.into_iter().flatten()) {
            let p = ptr as usize as *const c_void;
            // SAFETY: the descriptor is live (owned by `plan`); the attribute is a device
            // pointer, passed by address with its size. cuBLASLt reads it at each call.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    (&p as *const *const c_void).cast(),
                    std::mem::size_of_val(&p),
                )
            }?;
        }
        lane.foreign_work();
        // SAFETY: per this function's contract; the workspace belongs to this lane and is
        // only used by work on its stream; alpha (host mode) and beta are host f32 values
        // read before the call returns; in row-vector mode alpha is a device vector of N
        // f32 values that the caller keeps alive.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                alpha_ptr,
                (&ops.beta as *const f32).cast(),
                ops.a as *const c_void,
                plan.a,
                ops.b as *const c_void,
                plan.b,
                ops.c as *const c_void,
                plan.d,
                ops.d as *mut c_void,
                plan.d,
                algo,
                lane.workspace.ptr as *mut c_void,
                lane.workspace.bytes(),
                lane.stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
    }

    fn plan(&self, key: &PlanKey, lane: &Lane, ops: &Operands) -> Result<Plan> {
        let (ta, tb, td) = key.types;
        let (at, bt, dt) = (lt_type(ta)?, lt_type(tb)?, lt_type(td)?);
        let compute = lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let desc = lt::create_matmul_desc(compute, lt_sys::cudaDataType::CUDA_R_32F)
            .cuda("creating a cuBLASLt matmul descriptor")?;
        // Built in steps so that every descriptor created so far is destroyed on an error.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let trans_a: i32 = match key.op {
            Op::Wt => 1,
            Op::N => 0,
        };
        set_attr!(
            lt::set_matmul_desc_attribute,
            plan.desc,
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            trans_a
        )?;
        set_attr!(
            lt::set_matmul_desc_attribute,
            plan.desc,
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            0i32
        )?;
        if key.sms > 0 {
            set_attr!(
                lt::set_matmul_desc_attribute,
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                i32::try_from(key.sms).unwrap_or(i32::MAX)
            )?;
        }
        if key.epilogue != LtEpilogue::None {
            use lt_sys::cublasLtEpilogue_t as E;
            let epi = match key.epilogue {
                LtEpilogue::GeluBias => E::CUBLASLT_EPILOGUE_GELU_BIAS,
                _ => E::CUBLASLT_EPILOGUE_BIAS,
            };
            set_attr!(
                lt::set_matmul_desc_attribute,
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                epi as u32
            )?;
            set_attr!(
                lt::set_matmul_desc_attribute,
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                lt_sys::cudaDataType::CUDA_R_32F as i32
            )?;
        }
        if key.scale == Scale::OuterVectors {
            let outer =
                lt_sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
                    as i32;
            for attr in [
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            ] {
                set_attr!(lt::set_matmul_desc_attribute, plan.desc, attr, outer)?;
            }
        }
        if key.scale == Scale::RowVector {
            set_attr!(
                lt::set_matmul_desc_attribute,
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_POINTER_MODE,
                lt_sys::cublasLtPointerMode_t::CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST
                    as i32
            )?;
        }
        let (m, n, k) = (key.n as u64, key.m as u64, key.k as u64);
        // A = b: op(A) is [N, K] column-major.
        let (a_rows, a_cols) = match key.op {
            Op::Wt => (k, m),
            Op::N => (m, k),
        };
        plan.a = lt::create_matrix_layout(at, a_rows, a_cols, key.lda as i64)
            .cuda("creating a cuBLASLt layout")?;
        // B = xᵀ: [K, M] column-major.
        plan.b = lt::create_matrix_layout(bt, k, n, key.ldb as i64)
            .cuda("creating a cuBLASLt layout")?;
        // D = yᵀ: [N, M] column-major.
        plan.d = lt::create_matrix_layout(dt, m, n, key.ldd as i64)
            .cuda("creating a cuBLASLt layout")?;
        if key.batch > 1 {
            let batch =
                i32::try_from(key.batch).map_err(|_| Error::Cuda("internal: GEMM batch".into()))?;
            for (layout, stride) in [
                (plan.a, key.strides.0),
                (plan.b, key.strides.1),
                (plan.d, key.strides.2),
            ] {
                set_attr!(
                    lt::set_matrix_layout_attribute,
                    layout,
                    lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    batch
                )?;
                set_attr!(
                    lt::set_matrix_layout_attribute,
                    layout,
                    lt_sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    stride as i64
                )?;
            }
        }
        let pref = lt::create_matmul_pref().cuda("creating a cuBLASLt preference")?;
        let found = self.candidates(&plan, pref, key, lane);
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        let mut found = found?;
        // Run-to-run determinism first: an in-place split-K reduction accumulates in an order
        // that varies between runs, so it is used only when nothing else is offered (or when
        // `TURBOPI_GEMM_DETERMINISTIC` is off, whose picks are kept apart in the plan cache).
        let keep_deterministic = settings::flag("TURBOPI_GEMM_DETERMINISTIC", true)?;
        if keep_deterministic && found.iter().any(|c| deterministic(&c.algo)) {
            found.retain(|c| deterministic(&c.algo));
        }
        plan.algo = found[0].algo;
        // A pick this process or an earlier one made for the shape wins (if the heuristic
        // still offers it), so that every process runs the shape the same way.
        // Picks timed with a flushed cache are kept apart from back-to-back ones.
        let timing = if tune::cold()? { " cold" } else { "" };
        let shape = if keep_deterministic {
            format!("{key:?}{timing}")
        } else {
            format!("{key:?} any reduction{timing}")
        };
        let offered = |data: &plans::Algo| found.iter().find(|c| &c.algo.data == data);
        if let Some(c) = plans::get(&self.device, &shape).and_then(|a| offered(&a)) {
            plan.algo = c.algo;
            return Ok(plan);
        }
        if found.len() > 1 && autotune_enabled()? && !capturing(lane) {
            // Any failure of the timing keeps the heuristic's first choice.
            if let Ok(Some(best)) = self.fastest(&plan, &found, ops, lane) {
                plan.algo = best;
                self.tuned.set(self.tuned.get() + 1);
            }
            let held = plans::put(&self.device, &shape, plan.algo.data);
            if let Some(c) = offered(&held) {
                plan.algo = c.algo;
            }
        }
        Ok(plan)
    }

    /// The heuristic's algorithms for `plan` under `pref` (workspace and alignments), best
    /// first: at most [`CANDIDATES`], at least one (an error otherwise).
    fn candidates(
        &self,
        plan: &Plan,
        pref: lt_sys::cublasLtMatmulPreference_t,
        key: &PlanKey,
        lane: &Lane,
    ) -> Result<Vec<lt_sys::cublasLtMatmulHeuristicResult_t>> {
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        set_attr!(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            lane.workspace.bytes() as u64
        )?;
        for (attr, align) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align.0),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align.1),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align.2),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align.2),
        ] {
            set_attr!(lt::set_matmul_pref_attribute, pref, attr, align)?;
        }
        let want = if autotune_enabled()? { CANDIDATES } else { 1 };
        // SAFETY: an all-zero heuristic result is a valid value of this plain C struct
        // (integers, floats and an opaque byte array); cuBLASLt overwrites the first
        // `count` entries.
        let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; want];
        let mut count: i32 = 0;
        // SAFETY: all descriptors are live and describe the same problem; `results` holds
        // `want` entries and `count` is a valid out-pointer.
        let status = unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.d,
                plan.d,
                pref,
                want as i32,
                results.as_mut_ptr(),
                &mut count,
            )
        };
        let count = usize::try_from(count).unwrap_or(0).min(want);
        results.truncate(count);
        results.retain(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        match status.result() {
            Ok(()) if !results.is_empty() => Ok(results),
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(()) => "no algorithm returned".into(),
                };
                Err(Error::Cuda(format!(
                    "cuBLASLt has no algorithm for y[{}, {}] = x[{}, {}] . {:?} with types {:?} (batch {}, alignment {:?}, alpha {:?}): {why}",
                    key.m, key.n, key.m, key.k, key.op, key.types, key.batch, key.align, key.scale
                )))
            }
        }
    }
}

/// Whether `algo` reduces split-K partial sums without the in-place scheme (whose
/// accumulation order may vary between runs). Unknown counts as no.
fn deterministic(algo: &lt_sys::cublasLtMatmulAlgo_t) -> bool {
    let mut scheme: u32 = u32::MAX;
    let mut written: usize = 0;
    // SAFETY: `algo` is an initialised algorithm from the heuristic; `scheme` is a u32 buffer
    // of the size passed (the attribute is a uint32_t) and `written` a valid out-pointer.
    let status = unsafe {
        lt_sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            lt_sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
            (&mut scheme as *mut u32).cast(),
            std::mem::size_of::<u32>(),
            &mut written,
        )
    };
    status.result().is_ok()
        && written == std::mem::size_of::<u32>()
        && scheme != lt_sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_INPLACE as u32
}

/// Whether `lane`'s stream is capturing a graph (an unreadable status counts as capturing:
/// the caller then skips anything that would synchronise).
fn capturing(lane: &Lane) -> bool {
    !matches!(
        lane.stream.capture_status(),
        Ok(drv_sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_weakest_of_the_batch() {
        assert_eq!(alignment(0x1000, 0, 1), 256);
        assert_eq!(alignment(0x1010, 0, 1), 16);
        assert_eq!(alignment(0x1000, 144, 2), 16);
        assert_eq!(alignment(0x1000, 144, 1), 256);
        assert_eq!(alignment(0x1004, 512, 3), 4);
    }

    #[test]
    fn span_counts_strided_batches() {
        let v = View {
            ptr: 0,
            len: 100,
            dtype: DType::F32,
        };
        let m = Mat::new(v, 3, 4).ld(10).stride(4);
        assert_eq!(m.span(2), 4 + 2 * 10 + 4);
        assert!(m.check(2, "t").is_ok());
        assert!(Mat::new(v, 11, 10).check(1, "t").is_err());
    }
}
