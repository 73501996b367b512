//! LayerNorm over the last dimension (SigLIP's pre-norms and post-norm).
//! CPU twin: [`crate::cpu::layer_norm`] (statistics in f64 there and here).

use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::Result;

/// y[rows, width] (act) = LayerNorm(x) with f32 `w`, `b`. With `pre_bias`, x += pre_bias
/// first, in place (fusing the bias of the Linear that wrote x).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    k: &Kernels,
    lane: &Lane,
    x: View,
    pre_bias: Option<View>,
    w: View,
    b: View,
    y: View,
    rows: usize,
    width: usize,
    eps: f64,
) -> Result<()> {
    x.need(DType::F32, rows * width, "layer_norm x")?;
    y.need(k.act, rows * width, "layer_norm y")?;
    w.need(DType::F32, width, "layer_norm weight")?;
    b.need(DType::F32, width, "layer_norm bias")?;
    if let Some(pb) = pre_bias {
        pb.need(DType::F32, width, "layer_norm pre-bias")?;
    }
    let params = [Some(x), pre_bias, Some(w), Some(b), Some(y)];
    let threads = one_float4_per_thread(width, &params);
    let args = Args::new()
        .ptr(x)
        .opt(pre_bias)
        .ptr(w)
        .ptr(b)
        .ptr(y)
        .i32(int(width, "width")?)
        .f64(eps)
        .i32(i32::from(threads.is_some()));
    launch(
        &k.layer_norm,
        lane,
        "layer_norm",
        rows,
        threads.unwrap_or(256),
        args,
    )
}

/// The block size at which a norm kernel's threads each hold one float4 of the row
/// (SigLIP's 1152: 288 threads; Gemma's 2048 and the expert's 1024: 512 and 256), or None
/// when width or an operand's alignment does not allow it (the kernel then strides 256
/// threads over the row). Every row of an f32 operand is then 16-byte aligned, and of a bf16
/// output 8-byte aligned.
pub(crate) fn one_float4_per_thread(width: usize, operands: &[Option<View>]) -> Option<u32> {
    let threads = width / 4;
    let fits =
        width.is_multiple_of(4) && threads.is_multiple_of(32) && (32..=1024).contains(&threads);
    let aligned = operands.iter().flatten().all(|v| v.ptr % 16 == 0);
    (fits && aligned).then_some(threads as u32)
}
