//! The gated MLP product of Gemma's GeGLU: gelu_tanh(gate) * up, reading the fused
//! [gate | up] output of one GEMM. CPU twin: [`crate::cpu::gelu_tanh`] as used by
//! `Gemma::mlp` in [`crate::gemma`].

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

/// out[rows, mlp] = gelu_tanh(gu[:, :mlp]) * gu[:, mlp:].
pub fn gelu_gate(
    k: &Kernels,
    lane: &Lane,
    gu: View,
    out: View,
    rows: usize,
    mlp: usize,
) -> Result<()> {
    run(k, lane, (gu, out), rows, mlp, None)
}

/// [`gelu_gate`] of an FP8 gate|up product of codes taken with unit scales: each value of
/// `gu` (the activation type) is first multiplied by its row's input scale `xs` [rows] and
/// its column's weight scale `ws` [2 * mlp], as [`super::fp8::rescale_e4m3`] would store it,
/// but without storing it. CPU twin: [`crate::fp8::rescale_product`], then
/// [`crate::cpu::gelu_tanh`] of the gate times the up (the scaled values kept in f32).
#[allow(clippy::too_many_arguments)]
pub fn gelu_gate_e4m3(
    k: &Kernels,
    lane: &Lane,
    gu: View,
    out: View,
    rows: usize,
    mlp: usize,
    xs: View,
    ws: View,
) -> Result<()> {
    xs.need(DType::F32, rows, "gelu_gate input scales")?;
    ws.need(DType::F32, 2 * mlp, "gelu_gate weight scales")?;
    run(k, lane, (gu, out), rows, mlp, Some((xs, ws)))
}

fn run(
    k: &Kernels,
    lane: &Lane,
    (gu, out): (View, View),
    rows: usize,
    mlp: usize,
    scales: Option<(View, View)>,
) -> Result<()> {
    gu.need(k.act, rows * 2 * mlp, "gelu_gate input")?;
    out.need(k.act, rows * mlp, "gelu_gate output")?;
    // 8 outputs per thread (16-byte loads of bf16) where every row starts 16-byte aligned.
    let aligned = gu.ptr % 16 == 0 && out.ptr % 16 == 0;
    let vec = if k.act == DType::Bf16 && mlp.is_multiple_of(8) && aligned {
        8
    } else {
        1
    };
    let groups = rows * mlp / vec;
    let args = Args::new()
        .ptr(gu)
        .ptr(out)
        .i32(int(mlp, "mlp")?)
        .i32(vec as i32)
        .i64(groups as i64)
        .opt(scales.map(|s| s.0))
        .opt(scales.map(|s| s.1));
    launch(
        &k.gelu_gate,
        lane,
        "gelu_gate",
        blocks_for(groups, 256),
        256,
        args,
    )
}
