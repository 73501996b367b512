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
    gu.need(k.act, rows * 2 * mlp, "gelu_gate input")?;
    out.need(k.act, rows * mlp, "gelu_gate output")?;
    // 8 outputs per thread (16-byte loads of bf16) where every row starts 16-byte aligned.
    let aligned = gu.ptr % 16 == 0 && out.ptr % 16 == 0;
    let vec = if k.act == DType::Bf16 && mlp % 8 == 0 && aligned {
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
        .i64(groups as i64);
    launch(
        &k.gelu_gate,
        lane,
        "gelu_gate",
        blocks_for(groups, 256),
        256,
        args,
    )
}
