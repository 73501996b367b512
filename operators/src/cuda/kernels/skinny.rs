//! Few-row GEMMs: y = x·wᵀ (stored, added, or added with a per-column gate) for at most
//! [`MAX_ROWS`] rows of x: the action expert's products at pi0.5's 10-token horizon.
//! cuBLASLt's tiles are made for many rows and read the expert's weights at a fraction of the
//! memory's speed; `skinny_gemm` streams each weight byte once with 16-byte loads over up to
//! [`WARPS`] warps per 8 output columns and adds their partial sums in a fixed order
//! (deterministic: graph replays and split stages agree bit for bit). bf16 on sm_80 or newer;
//! elsewhere, or for a shape it does not take, [`linear`] answers `Ok(false)` having queued
//! nothing and the caller runs cuBLASLt. CPU twin: [`crate::cpu::Linear::forward`], then
//! [`crate::cpu::add_residual`] (with the gate) when adding.

use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::cuda::gemm::Mat;
use crate::{Error, Result};

/// The most rows of x the kernel takes (one m16 tile of the tensor cores; pi0's 51 rows
/// would re-read x from L2 for every 8 columns and run slower than cuBLASLt).
pub const MAX_ROWS: usize = 16;
/// The most warps per block (`TP_SK_WARPS`), each summing one slice of K.
pub const WARPS: usize = 16;
/// 16-byte weight loads each lane keeps in flight (`TP_SK_UNROLL`): a warp's slice of K is
/// 32 · UNROLL long where K allows.
pub const UNROLL: usize = 4;

/// What becomes of y.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue {
    /// y = x·wᵀ.
    Store,
    /// y += x·wᵀ.
    Add,
    /// y[r, c] += gate[c] · (x·wᵀ)[r, c], gate f32 [n_out].
    Gated(View),
}

/// Whether the kernel takes y = x·wᵀ with these operands: x and w bf16 with 16-byte aligned
/// rows, K a multiple of 32, N a multiple of 8, 1..=[`MAX_ROWS`] rows, y f32 or bf16.
pub fn fits(k: &Kernels, x: &Mat, w: &Mat, y: &Mat) -> bool {
    let aligned = |m: &Mat| m.view.ptr % 16 == 0 && m.ld % 8 == 0;
    k.skinny_gemm.is_some()
        && x.view.dtype == DType::Bf16
        && w.view.dtype == DType::Bf16
        && matches!(y.view.dtype, DType::F32 | DType::Bf16)
        && (1..=MAX_ROWS).contains(&x.rows)
        && x.cols == w.cols
        && x.cols % 32 == 0
        && w.rows % 8 == 0
        && w.rows > 0
        && y.rows == x.rows
        && y.cols == w.rows
        && aligned(x)
        && aligned(w)
}

/// Elements a [rows, cols] operand with row stride ld spans.
fn span(m: &Mat) -> usize {
    if m.rows == 0 || m.cols == 0 {
        0
    } else {
        (m.rows - 1) * m.ld + m.cols
    }
}

/// y (x.rows × w.rows) from x [rows, K] and the Linear weight w [N, K] (see [`Epilogue`]), on
/// `lane`. Ok(false), with nothing queued, when [`fits`] says no.
pub fn linear(k: &Kernels, lane: &Lane, x: Mat, w: Mat, y: Mat, epi: Epilogue) -> Result<bool> {
    let Some(f) = k.skinny_gemm.as_ref() else {
        return Ok(false);
    };
    if !fits(k, &x, &w, &y) {
        return Ok(false);
    }
    for (m, what) in [
        (&x, "skinny gemm x"),
        (&w, "skinny gemm w"),
        (&y, "skinny gemm y"),
    ] {
        if m.ld < m.cols {
            return Err(Error::Cuda(format!(
                "internal: {what}: row stride {} < {} columns",
                m.ld, m.cols
            )));
        }
        m.view.need(m.view.dtype, span(m), what)?;
    }
    let (add, gate) = match epi {
        Epilogue::Store => (0, None),
        Epilogue::Add => (1, None),
        Epilogue::Gated(g) => {
            g.need(DType::F32, w.rows, "skinny gemm gate")?;
            (0, Some(g))
        }
    };
    let kdim = x.cols;
    // As many warps as K has slices of 32 · UNROLL (1 to WARPS), K split evenly among them:
    // each lane then has its whole slice in flight at once where K allows. (Measured on an
    // H200 against one warp per chunk, up to 16, and against two slices per warp: the
    // expert's step 0.96 ms against 1.04 and 0.98.)
    let chunks = kdim / 32;
    let warps = chunks.div_ceil(UNROLL).clamp(1, WARPS);
    let kslice = chunks.div_ceil(warps) * 32;
    let args = Args::new()
        .ptr(x.view)
        .i64(x.ld as i64)
        .ptr(w.view)
        .i64(w.ld as i64)
        .ptr(y.view)
        .i64(y.ld as i64)
        .i32(i32::from(y.view.dtype == DType::F32))
        .opt(gate)
        .i32(add)
        .i32(int(x.rows, "rows")?)
        .i32(int(w.rows, "columns")?)
        .i32(int(kdim, "inner dimension")?)
        .i32(int(kslice, "K slice")?);
    launch(
        f,
        lane,
        "skinny_gemm",
        w.rows / 8,
        (warps * 32) as u32,
        args,
    )?;
    Ok(true)
}
