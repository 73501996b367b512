//! The residual add, plain or gated per column (pi0.5's adaptive norms gate the block output
//! before adding it). CPU twin: [`crate::cpu::add_residual`].

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

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

/// x = y (`add` false) or x += y (`add` true), x f32 and y of the activation type, `n`
/// elements each. CPU twin: [`crate::cpu::add_residual`] (y as the activation type holds it).
pub fn add_act(k: &Kernels, lane: &Lane, x: View, y: View, add: bool, n: usize) -> Result<()> {
    x.need(DType::F32, n, "add_act x")?;
    y.need(k.act, n, "add_act y")?;
    let args = Args::new().ptr(x).ptr(y).i32(i32::from(add)).i64(n as i64);
    launch(&k.add_act, lane, "add_act", blocks_for(n, 256), 256, args)
}
