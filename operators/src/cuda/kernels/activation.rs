//! Bias add fused with an optional activation (silu or tanh-GELU) and the cast to the
//! activation type: the epilogue of every Linear with a bias, and the f32 -> act cast.
//! CPU twins: the bias add of [`crate::cpu::Linear::forward`], [`crate::cpu::silu`],
//! [`crate::cpu::gelu_tanh`].

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::{Error, Result};

/// The activation applied after the bias; its codes are TP_ACT_* in activation.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None = 0,
    Silu = 1,
    GeluTanh = 2,
}

/// Where [`bias_act`] writes: an f32 and/or an act-typed matrix, both with row stride `ld`.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub f32: Option<View>,
    pub act: Option<View>,
    pub ld: usize,
}

/// out = act(x + bias) over [rows, width]; x has row stride `ldx`.
#[allow(clippy::too_many_arguments)]
pub fn bias_act(
    k: &Kernels,
    lane: &Lane,
    x: View,
    ldx: usize,
    bias: Option<View>,
    act: Act,
    out: Out,
    rows: usize,
    width: usize,
) -> Result<()> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    if ldx < width || out.ld < width || (out.f32.is_none() && out.act.is_none()) {
        return Err(Error::Cuda("internal: bias_act strides or outputs".into()));
    }
    x.need(DType::F32, (rows - 1) * ldx + width, "bias_act input")?;
    if let Some(b) = bias {
        b.need(DType::F32, width, "bias_act bias")?;
    }
    let span = (rows - 1) * out.ld + width;
    if let Some(o) = out.f32 {
        o.need(DType::F32, span, "bias_act f32 output")?;
    }
    if let Some(o) = out.act {
        o.need(k.act, span, "bias_act output")?;
    }
    // Four values per thread in vector loads and stores where every row of every operand,
    // and the bias, start 16-byte aligned (an act output row: at least 8-byte aligned).
    let views = [Some(x), bias, out.f32, out.act];
    let aligned = views.iter().flatten().all(|v| v.ptr % 16 == 0);
    let vec = if aligned
        && width.is_multiple_of(4)
        && ldx.is_multiple_of(4)
        && out.ld.is_multiple_of(4)
    {
        4
    } else {
        1
    };
    let args = Args::new()
        .ptr(x)
        .i32(int(ldx, "ldx")?)
        .opt(bias)
        .i32(act as i32)
        .opt(out.f32)
        .opt(out.act)
        .i32(int(out.ld, "ldo")?)
        .i32(int(rows, "rows")?)
        .i32(int(width, "width")?)
        .i32(vec as i32);
    launch(
        &k.bias_act,
        lane,
        "bias_act",
        blocks_for(rows * width / vec, 256),
        256,
        args,
    )
}

/// Casts f32 `x` [n] to the activation type.
pub fn cast(k: &Kernels, lane: &Lane, x: View, out: View, n: usize) -> Result<()> {
    bias_act(
        k,
        lane,
        x,
        n,
        None,
        Act::None,
        Out {
            f32: None,
            act: Some(out),
            ld: n,
        },
        1,
        n,
    )
}

/// x[rows, width] (f32, row stride ld) += bias, in place.
pub fn add_bias(
    k: &Kernels,
    lane: &Lane,
    x: View,
    ld: usize,
    bias: View,
    rows: usize,
    width: usize,
) -> Result<()> {
    bias_act(
        k,
        lane,
        x,
        ld,
        Some(bias),
        Act::None,
        Out {
            f32: Some(x),
            act: None,
            ld,
        },
        rows,
        width,
    )
}
