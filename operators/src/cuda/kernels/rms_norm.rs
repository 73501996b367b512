//! Gemma's RMSNorm, x * rsqrt(mean(x^2) + eps) * (1 + w), and pi0.5's adaptive variant,
//! x * rsqrt(..) * (1 + scale) + shift, whose (scale, shift, gate) come from dense(cond): the
//! gate is the third chunk of the same vector, applied by [`super::residual::add_residual`].
//! CPU twins: [`crate::cpu::rms_normalize`] and [`crate::gemma::Norm::forward`].

use super::layer_norm::one_float4_per_thread;
use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::{Error, Result};

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
    let threads = one_float4_per_thread(width, &[Some(x), w1p, modulation, Some(y)]);
    let args = Args::new()
        .ptr(x)
        .opt(w1p)
        .opt(modulation)
        .ptr(y)
        .i32(int(width, "width")?)
        .f64(eps)
        .i32(i32::from(threads.is_some()));
    launch(
        &k.rms_norm,
        lane,
        "rms_norm",
        rows,
        threads.unwrap_or(256),
        args,
    )
}
