//! The residual add, plain or gated per column (pi0.5's adaptive norms gate the block output
//! before adding it). CPU twin: [`crate::cpu::add_residual`].

use super::compile::Kernels;
use super::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

pub(crate) const SOURCE: &str = r#"
// x[r, c] += y[r, c] * gate[c] (gate null: x += y); f32 [rows, width], n = rows * width.
extern "C" __global__ void add_residual(float* __restrict__ x, const float* __restrict__ y,
                                        const float* __restrict__ gate, int width, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    if (gate != 0) {
      x[i] += y[i] * gate[i % width];
    } else {
      x[i] += y[i];
    }
  }
}
"#;

/// x[rows, width] += y * gate (per column) or x += y.
pub fn add_residual(
    k: &Kernels,
    lane: &Lane,
    x: View,
    y: View,
    gate: Option<View>,
    rows: usize,
    width: usize,
) -> Result<()> {
    let n = rows * width;
    x.need(DType::F32, n, "add_residual x")?;
    y.need(DType::F32, n, "add_residual y")?;
    if let Some(g) = gate {
        g.need(DType::F32, width, "add_residual gate")?;
    }
    let args = Args::new()
        .ptr(x)
        .ptr(y)
        .opt(gate)
        .i32(int(width, "width")?)
        .i64(n as i64);
    launch(
        &k.add_residual,
        lane,
        "add_residual",
        blocks_for(n, 256),
        256,
        args,
    )
}
