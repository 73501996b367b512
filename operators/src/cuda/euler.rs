//! The Euler step of the flow-matching sampler, fused with the velocity head's bias and the
//! cast of x_t for the next step's action projection. CPU twin: the update
//! `x += dt * v` of [`crate::policy::Denoiser::run`].

use super::compile::Kernels;
use super::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

pub(crate) const SOURCE: &str = r#"
// v = v_raw + bias[c]; x = x + dt * v (separately rounded, as the CPU); x_act = x.
extern "C" __global__ void euler_step(float* __restrict__ x, act_t* __restrict__ x_act,
                                      const float* __restrict__ v_raw, const float* __restrict__ bias,
                                      float dt, int width, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = __fadd_rn(v_raw[i], bias[i % width]);
    float nx = __fadd_rn(x[i], __fmul_rn(dt, v));
    x[i] = nx;
    tp_store(x_act, i, nx);
  }
}
"#;

/// x[rows, width] += dt * (v_raw + bias); x_act = x.
#[allow(clippy::too_many_arguments)]
pub fn euler_step(
    k: &Kernels,
    lane: &Lane,
    x: View,
    x_act: View,
    v_raw: View,
    bias: View,
    dt: f32,
    rows: usize,
    width: usize,
) -> Result<()> {
    let n = rows * width;
    x.need(DType::F32, n, "euler x")?;
    x_act.need(k.act, n, "euler x (act)")?;
    v_raw.need(DType::F32, n, "euler velocity")?;
    bias.need(DType::F32, width, "euler bias")?;
    let args = Args::new()
        .ptr(x)
        .ptr(x_act)
        .ptr(v_raw)
        .ptr(bias)
        .f32(dt)
        .i32(int(width, "width")?)
        .i32(int(n, "elements")?);
    launch(
        &k.euler_step,
        lane,
        "euler_step",
        blocks_for(n, 256),
        256,
        args,
    )
}
