//! The gated MLP product of Gemma's GeGLU: gelu_tanh(gate) * up, reading the fused
//! [gate | up] output of one GEMM. CPU twin: [`crate::cpu::gelu_tanh`] as used by
//! `Gemma::mlp` in [`crate::gemma`].

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, Lane, View};
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
    let n = rows * mlp;
    let args = Args::new()
        .ptr(gu)
        .ptr(out)
        .i32(int(mlp, "mlp")?)
        .i64(n as i64);
    launch(
        &k.gelu_gate,
        lane,
        "gelu_gate",
        blocks_for(n, 256),
        256,
        args,
    )
}
