//! FP8 E4M3 quantisation per row: codes and scales, as an FP8 GEMM's operand holds them (CPU
//! twin: [`crate::fp8::quantise_rows`], bit for bit); and the W8A8 product on those codes,
//! with the scales applied by cuBLASLt or after it ([`w8a8`]).

use super::activation::Act;
use super::{residual, Kernels};
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::cuda::gemm::{Gemm, Mat};
use crate::{Error, Result};

/// Threads per row: enough warps to read a row of a few thousand values in a few passes.
const THREADS: u32 = 256;

/// q[r, c] = E4M3(x[r, c] / scale[r]), scale[r] = max |x[r, :]| / 448, for `rows` rows of
/// `width` values of the activation type (row stride `ldx`); q is u8 with row stride `ldq`,
/// scale f32 [rows].
#[allow(clippy::too_many_arguments)]
pub fn quantise_e4m3(
    k: &Kernels,
    lane: &Lane,
    x: View,
    ldx: usize,
    q: View,
    ldq: usize,
    scale: View,
    rows: usize,
    width: usize,
) -> Result<()> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let span = |ld: usize| (rows - 1) * ld + width;
    x.need(k.act, span(ldx), "quantise_e4m3 x")?;
    q.need(DType::U8, span(ldq), "quantise_e4m3 q")?;
    scale.need(DType::F32, rows, "quantise_e4m3 scale")?;
    let args = Args::new()
        .ptr(x)
        .i64(ldx as i64)
        .i32(int(width, "width")?)
        .ptr(q)
        .i64(ldq as i64)
        .ptr(scale)
        .i32(int(rows, "rows")?);
    launch(&k.quantise_e4m3, lane, "quantise_e4m3", rows, THREADS, args)
}

/// y = act(diag(xs)·p·diag(ws) + bias) (add false) or y + that (add true): `p` [y.rows,
/// y.cols] (dense, f32 or the activation type) holds an E4M3 product of codes taken with unit
/// scales, xs f32 [y.rows] and ws f32 [y.cols] the scales of its input rows and weight rows,
/// `bias` (f32 [y.cols]) and `act` the layer's own where it has them (folded in here, as
/// [`super::activation::bias_act`] would apply them after); y is f32 or the activation type,
/// row stride `y.ld`. CPU twin: [`crate::fp8::rescale_product`] (then the bias and
/// [`crate::cpu::gelu_tanh`] or [`crate::cpu::silu`]).
pub fn rescale_e4m3(
    k: &Kernels,
    lane: &Lane,
    p: View,
    (xs, ws): (View, View),
    y: Mat,
    add: bool,
    (bias, act): (Option<View>, Act),
) -> Result<()> {
    let (rows, n) = (y.rows, y.cols);
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let is_f32 = |v: View, what: &str| -> Result<bool> {
        if v.dtype == DType::F32 || v.dtype == k.act {
            Ok(v.dtype == DType::F32)
        } else {
            Err(Error::Cuda(format!(
                "internal: rescale_e4m3 {what} is {:?}, expected f32 or {:?}",
                v.dtype, k.act
            )))
        }
    };
    let (y_f32, p_f32) = (is_f32(y.view, "y")?, is_f32(p, "p")?);
    p.need(p.dtype, rows * n, "rescale_e4m3 p")?;
    xs.need(DType::F32, rows, "rescale_e4m3 input scales")?;
    ws.need(DType::F32, n, "rescale_e4m3 weight scales")?;
    if let Some(b) = bias {
        b.need(DType::F32, n, "rescale_e4m3 bias")?;
    }
    y.check(1, "rescale_e4m3 y")?;
    let total = rows * n;
    let args = Args::new()
        .ptr(y.view)
        .i64(y.ld as i64)
        .i32(i32::from(y_f32))
        .ptr(p)
        .i32(i32::from(p_f32))
        .ptr(xs)
        .ptr(ws)
        .opt(bias)
        .i32(act as i32)
        .i32(int(rows, "rows")?)
        .i32(int(n, "columns")?)
        .i32(i32::from(add));
    launch(
        &k.rescale_e4m3,
        lane,
        "rescale_e4m3",
        blocks_for(total, 256),
        256,
        args,
    )
}

/// How [`w8a8`] ran a product, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W8a8 {
    /// One cuBLASLt call with both scale vectors (outer-vector scaling) into y.
    Scaled,
    /// The same into the activation type in the scratch, then [`residual::add_act`] into an
    /// f32 y (no f32 output offered with those scales).
    ScaledThenAdded,
    /// cuBLASLt's product of the codes with unit scales into the scratch (its type named),
    /// then [`rescale_e4m3`] into y: where cuBLASLt has no per-row scales (Hopper).
    Rescaled(DType),
}

impl W8a8 {
    pub fn describe(self) -> &'static str {
        match self {
            W8a8::Scaled => "scales in cuBLASLt",
            W8a8::ScaledThenAdded => "scales in cuBLASLt, bf16 out",
            W8a8::Rescaled(DType::F32) => "scales applied after cuBLASLt, f32 between",
            W8a8::Rescaled(_) => "scales applied after cuBLASLt, bf16 between",
        }
    }
}

/// y = diag(xs)·(xq·wᵀ)·diag(ws) (add false) or y + that (add true) for E4M3 codes `xq`
/// [M, K] and `w` [N, K] with their row scales `xs` and `ws`, y [M, N] f32 or the activation
/// type: on cuBLASLt with its outer-vector scales where it offers them, else cuBLASLt's
/// product of the codes with unit scales into `tmp` (at least M x N f32 values) and
/// [`rescale_e4m3`]. Either way the scales multiply the same sums of exact code products, so
/// the two agree up to f32 rounding (and one bf16 rounding where the product passes through
/// the activation type). Returns the way it ran, or None, having queued nothing, where
/// cuBLASLt offers no FP8 product for it at all.
/// CPU twin: [`crate::cpu::Linear::forward`] on a layer quantised with its activations.
#[allow(clippy::too_many_arguments)]
pub fn w8a8(
    k: &Kernels,
    gemm: &Gemm,
    lane: &Lane,
    (xq, xs): (Mat, View),
    (w, ws): (Mat, View),
    y: Mat,
    add: bool,
    tmp: View,
) -> Result<Option<W8a8>> {
    let beta = if add { 1.0 } else { 0.0 };
    if gemm.linear_fp8(lane, xq, xs, w, ws, y, beta)? {
        return Ok(Some(W8a8::Scaled));
    }
    let (m, n) = (y.rows, y.cols);
    let dense = |dt: DType| -> Result<Mat> {
        let v = tmp.as_type(dt);
        v.need(dt, m * n, "the FP8 product's scratch")?;
        Ok(Mat::new(v.at(0, m * n)?, m, n))
    };
    // add_act walks y as one dense run of m x n values.
    if y.view.dtype == DType::F32 && k.act != DType::F32 && y.ld == n {
        let t = dense(k.act)?;
        if gemm.linear_fp8(lane, xq, xs, w, ws, t, 0.0)? {
            residual::add_act(k, lane, y.view, t.view, add, m * n)?;
            return Ok(Some(W8a8::ScaledThenAdded));
        }
    }
    // The activation type between first: half the bytes of f32 through memory, and its
    // rounding is 2^-9 against the 2^-4 of E4M3's own.
    let between: &[DType] = if k.act == DType::F32 {
        &[DType::F32]
    } else {
        &[k.act, DType::F32]
    };
    for &dt in between {
        let t = dense(dt)?;
        if gemm.product_e4m3(lane, xq, w, t)? {
            rescale_e4m3(k, lane, t.view, (xs, ws), y, add, (None, Act::None))?;
            return Ok(Some(W8a8::Rescaled(dt)));
        }
    }
    Ok(None)
}
