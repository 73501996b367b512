//! The gated MLP product of Gemma's GeGLU: gelu_tanh(gate) * up, reading the fused
//! [gate | up] output of one GEMM (or its FP8 product of codes, scaling it as it reads).
//! CPU twin: [`crate::cpu::gelu_tanh`] as used by `Gemma::mlp` in [`crate::gemma`].

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

/// out[rows, mlp] = gelu_tanh(gu[:, :mlp]) * gu[:, mlp:]. With `scales` (xs f32 [rows], ws
/// f32 [2 * mlp]), gu is an FP8 gate|up product of codes taken with unit scales, and each
/// value is first multiplied by its row's input scale and its column's weight scale, as
/// [`super::fp8::rescale_e4m3`] would store it, but without storing it (CPU twin:
/// [`crate::fp8::rescale_product`], then the above on the scaled f32 values).
pub fn gelu_gate(
    k: &Kernels,
    lane: &Lane,
    (gu, out): (View, View),
    rows: usize,
    mlp: usize,
    scales: Option<(View, View)>,
) -> Result<()> {
    if let Some((xs, ws)) = scales {
        xs.need(DType::F32, rows, "gelu_gate input scales")?;
        ws.need(DType::F32, 2 * mlp, "gelu_gate weight scales")?;
    }
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
