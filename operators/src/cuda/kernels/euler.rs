//! The Euler step of the flow-matching sampler, fused with the velocity head's bias and the
//! cast of x_t for the next step's action projection. CPU twins: the update `x += dt * v` of
//! [`crate::policy::Denoiser::run`], and for the step guided by real-time chunking (Jacobian
//! dropped) [`crate::rtc::guided_euler_update`].

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

/// What the guided step reads besides the unguided one's: the mask and the target
/// `[rows, width]` (f32) and the guidance weight per step `coef` (f32 `[steps]`).
#[derive(Debug, Clone, Copy)]
pub struct Guidance {
    pub weight: View,
    pub target: View,
    pub coef: View,
}

/// [`euler_step`] guided toward `g.target` at step `step` (time `t`) with the Jacobian
/// dropped: v = v_raw + bias; x += dt * (v - coef[step] * w * (y - (x - t * v))); x_act = x.
pub fn euler_step_guided(
    k: &Kernels,
    lane: &Lane,
    (x, x_act, v_raw, bias): (View, View, View, View),
    g: Guidance,
    (step, t, dt): (usize, f32, f32),
    rows: usize,
    width: usize,
) -> Result<()> {
    let n = rows * width;
    x.need(DType::F32, n, "guided euler x")?;
    x_act.need(k.act, n, "guided euler x (act)")?;
    v_raw.need(DType::F32, n, "guided euler velocity")?;
    bias.need(DType::F32, width, "guided euler bias")?;
    g.weight.need(DType::F32, n, "guided euler weight")?;
    g.target.need(DType::F32, n, "guided euler target")?;
    g.coef
        .need(DType::F32, step + 1, "guided euler coefficients")?;
    let args = Args::new()
        .ptr(x)
        .ptr(x_act)
        .ptr(v_raw)
        .ptr(bias)
        .ptr(g.weight)
        .ptr(g.target)
        .ptr(g.coef)
        .i32(int(step, "step")?)
        .f32(t)
        .f32(dt)
        .i32(int(width, "width")?)
        .i32(int(n, "elements")?);
    launch(
        &k.euler_step_guided,
        lane,
        "euler_step_guided",
        blocks_for(n, 256),
        256,
        args,
    )
}
