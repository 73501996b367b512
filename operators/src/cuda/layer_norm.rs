//! LayerNorm over the last dimension (SigLIP's pre-norms and post-norm).
//! CPU twin: [`crate::cpu::layer_norm`] (statistics in f64 there and here).

use super::compile::Kernels;
use super::device::{int, launch, Args, DType, Lane, View};
use crate::Result;

pub(crate) const SOURCE: &str = r#"
// One block per row. x: f32 [rows, width], the residual stream. When pre_bias is not null,
// x += pre_bias first and is written back: the bias of the Linear that last added into x.
extern "C" __global__ void layer_norm(float* __restrict__ x, const float* __restrict__ pre_bias,
                                      const float* __restrict__ w, const float* __restrict__ b,
                                      act_t* __restrict__ y, int width, double eps) {
  __shared__ double red[32];
  float* xr = x + (long long)blockIdx.x * width;
  act_t* yr = y + (long long)blockIdx.x * width;
  double s = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = xr[i];
    if (pre_bias != 0) { v += pre_bias[i]; xr[i] = v; }
    s += (double)v;
  }
  double mean = tp_block_sum_d(s, red) / (double)width;
  double q = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    double d = (double)xr[i] - mean;
    q += d * d;
  }
  double var = tp_block_sum_d(q, red) / (double)width;
  float inv = (float)(1.0 / sqrt(var + eps));
  float m = (float)mean;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    tp_store(yr, i, (xr[i] - m) * inv * w[i] + b[i]);
  }
}
"#;

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
