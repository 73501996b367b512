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
    let args = Args::new()
        .ptr(x)
        .opt(pre_bias)
        .ptr(w)
        .ptr(b)
        .ptr(y)
        .i32(int(width, "width")?)
        .f64(eps);
    launch(&k.layer_norm, lane, "layer_norm", rows, 256, args)
}
