//! The Euler step of the flow-matching sampler, fused with the velocity head's bias and the
//! cast of x_t for the next step's action projection. CPU twin: the update
//! `x += dt * v` of [`crate::policy::Denoiser::run`].

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

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
