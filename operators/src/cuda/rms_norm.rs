//! Gemma's RMSNorm, x * rsqrt(mean(x^2) + eps) * (1 + w), and pi0.5's adaptive variant,
//! x * rsqrt(..) * (1 + scale) + shift, whose (scale, shift, gate) come from dense(cond): the
//! gate is the third chunk of the same vector, applied by [`super::residual::add_residual`].
//! CPU twins: [`crate::cpu::rms_normalize`] and [`crate::gemma::Norm::forward`].

use super::compile::Kernels;
use super::device::{int, launch, Args, DType, Lane, View};
use crate::{Error, Result};

pub(crate) const SOURCE: &str = r#"
// One block per row. x: f32 [rows, width]. Exactly one of w1p (1 + weight, precomputed in
// f32 as the CPU computes it) and mod ([scale | shift | gate], f32 [3 * width]) is not null.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w1p,
                                    const float* __restrict__ mod, act_t* __restrict__ y,
                                    int width, double eps) {
  __shared__ double red[32];
  const float* xr = x + (long long)blockIdx.x * width;
  act_t* yr = y + (long long)blockIdx.x * width;
  double s = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    double v = (double)xr[i];
    s += v * v;
  }
  double ms = tp_block_sum_d(s, red) / (double)width;
  float inv = (float)(1.0 / sqrt(ms + eps));
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = xr[i] * inv;
    if (w1p != 0) {
      v = v * w1p[i];
    } else {
      v = v * (1.0f + mod[i]) + mod[width + i];
    }
    tp_store(yr, i, v);
  }
}
"#;

/// The weight of a norm: `OnePlus` holds 1 + w (f32 [width]); `Modulation` holds
/// [scale | shift | gate] (f32 [3 * width]).
#[derive(Debug, Clone, Copy)]
pub enum NormParam {
    OnePlus(View),
    Modulation(View),
}

/// y[rows, width] (act) = RMSNorm(x) under `param`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    k: &Kernels,
    lane: &Lane,
    x: View,
    param: NormParam,
    y: View,
    rows: usize,
    width: usize,
    eps: f64,
) -> Result<()> {
    x.need(DType::F32, rows * width, "rms_norm x")?;
    y.need(k.act, rows * width, "rms_norm y")?;
    let (w1p, modulation) = match param {
        NormParam::OnePlus(w) => {
            w.need(DType::F32, width, "rms_norm weight")?;
            (Some(w), None)
        }
        NormParam::Modulation(m) => {
            m.need(DType::F32, 3 * width, "rms_norm modulation")?;
            (None, Some(m))
        }
    };
    if width == 0 {
        return Err(Error::Cuda("internal: rms_norm of width 0".into()));
    }
    let args = Args::new()
        .ptr(x)
        .opt(w1p)
        .opt(modulation)
        .ptr(y)
        .i32(int(width, "width")?)
        .f64(eps);
    launch(&k.rms_norm, lane, "rms_norm", rows, 256, args)
}
