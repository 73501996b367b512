//! Few-row GEMMs: y = x·wᵀ (stored, added, or added with a per-column gate) for at most
//! [`MAX_ROWS`] rows of x: the action expert's products at pi0.5's 10-token horizon.
//! cuBLASLt's tiles are made for many rows and read the expert's weights at a fraction of the
//! memory's speed; `skinny_gemm` streams each weight byte once with 16-byte loads over up to
//! [`WARPS`] warps per 8 output columns and adds their partial sums in a fixed order
//! (deterministic: graph replays and split stages agree bit for bit). bf16 on sm_80 or newer;
//! elsewhere, or for a shape it does not take, [`linear`] answers `Ok(false)` having queued
//! nothing and the caller runs cuBLASLt. CPU twin: [`crate::cpu::Linear::forward`], then
//! [`crate::cpu::add_residual`] (with the gate) when adding.
//!
//! [`geglu`] and [`rope`] put the operation after the product in its epilogue (GeGLU after
//! gate|up; RoPE with the scatter to q and the K/V cache after q|k|v): the same bits as the
//! product and [`super::mlp::gelu_gate`] or [`super::rope::rope_qkv`] one after the other,
//! in one launch. They answer `Ok(false)` the same way.

use super::rope::Heads;
use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::cuda::gemm::Mat;
use crate::Result;
use cudarc::driver::CudaFunction;

/// The most rows of x the kernel takes (one m16 tile of the tensor cores; pi0's 51 rows
/// would re-read x from L2 for every 8 columns and run slower than cuBLASLt).
pub const MAX_ROWS: usize = 16;
/// The most warps per block (`TP_SK_WARPS`), each summing one slice of K.
pub const WARPS: usize = 16;
/// 16-byte weight loads each lane keeps in flight per tile (`TP_SK_UNROLL`): a warp's slice
/// of K is 32 · UNROLL long where K allows. (Measured on an H200, libero denoise: 2, 4 and 8
/// give 8.35, 8.02 and 8.56 ms.)
pub const UNROLL: usize = 4;
/// Tiles of 8 output columns per block of the plain product (`TP_SK_TILES`): each x
/// fragment a warp loads serves all of them, so x is read from L2 once per 8 · TILES
/// columns. (Measured on an H200, libero denoise: 1 tile 8.02 ms; 2 tiles 8.70 ms, 8.50 ms
/// with UNROLL 2; 4 tiles with UNROLL 2 9.29 ms: x's reads from L2 are not what limits it.)
pub const TILES: usize = 1;
/// Values of K a warp covers per 16-byte load of each of its rows (8 per lane, four lanes
/// per row).
const CHUNK_BF16: usize = 32;

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
    k.skinny_gemm.is_some()
        && operands_fit(x, w)
        && w.rows % 8 == 0
        && matches!(y.view.dtype, DType::F32 | DType::Bf16)
        && y.rows == x.rows
        && y.cols == w.rows
}

/// What every entry point needs of x and w: bf16 with 16-byte aligned rows, K a multiple of
/// 32, 1..=[`MAX_ROWS`] rows of x, at least one weight row.
fn operands_fit(x: &Mat, w: &Mat) -> bool {
    let aligned = |m: &Mat| m.view.ptr % 16 == 0 && m.ld % 8 == 0;
    x.view.dtype == DType::Bf16
        && w.view.dtype == DType::Bf16
        && (1..=MAX_ROWS).contains(&x.rows)
        && x.cols == w.cols
        && x.cols % 32 == 0
        && w.rows > 0
        && aligned(x)
        && aligned(w)
}

/// Checks the row strides and spans of the operands `mats` before a launch.
fn need_all(mats: &[(&Mat, &str)]) -> Result<()> {
    mats.iter().try_for_each(|(m, what)| m.check(1, what))
}

/// How the warps of a block split K, read in chunks of `chunk` values (a warp's 16-byte load
/// per row: 32 for bf16): (warps, K slice of each). As many warps as K has runs of UNROLL
/// chunks (1 to [`WARPS`]), the chunks split evenly among them, each slice a whole number of
/// chunks: each lane then has its whole slice in flight at once where K allows. (Measured on an H200 for bf16, against one warp per chunk, up to
/// 16, and against two slices per warp: the expert's step 0.96 ms against 1.04 and 0.98.)
/// A slice past K (more warps than slices need) reads nothing and adds zeros.
pub fn split_k(kdim: usize, chunk: usize) -> (usize, usize) {
    let chunks = kdim.div_ceil(chunk);
    let warps = chunks.div_ceil(UNROLL).clamp(1, WARPS);
    (warps, chunks.div_ceil(warps) * chunk)
}

/// Launches `f` over `blocks` blocks with the arguments x, w, those `own` adds (the entry
/// point's own, rows included), K and the warps' K slice ([`split_k`] in chunks of `chunk`).
fn launch_chunked(
    f: &CudaFunction,
    lane: &Lane,
    name: &str,
    (x, w): (&Mat, &Mat),
    blocks: usize,
    chunk: usize,
    own: impl FnOnce(Args) -> Result<Args>,
) -> Result<()> {
    let kdim = x.cols;
    let (warps, kslice) = split_k(kdim, chunk);
    let args = Args::new()
        .ptr(x.view)
        .i64(x.ld as i64)
        .ptr(w.view)
        .i64(w.ld as i64);
    let args = own(args)?
        .i32(int(kdim, "inner dimension")?)
        .i32(int(kslice, "K slice")?);
    launch(f, lane, name, blocks, (warps * 32) as u32, args)
}

/// [`launch_chunked`] for bf16 weights.
fn launch_product(
    f: &CudaFunction,
    lane: &Lane,
    name: &str,
    xw: (&Mat, &Mat),
    blocks: usize,
    own: impl FnOnce(Args) -> Result<Args>,
) -> Result<()> {
    launch_chunked(f, lane, name, xw, blocks, CHUNK_BF16, own)
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
    need_all(&[
        (&x, "skinny gemm x"),
        (&w, "skinny gemm w"),
        (&y, "skinny gemm y"),
    ])?;
    let (add, gate) = match epi {
        Epilogue::Store => (0, None),
        Epilogue::Add => (1, None),
        Epilogue::Gated(g) => {
            g.need(DType::F32, w.rows, "skinny gemm gate")?;
            (0, Some(g))
        }
    };
    let blocks = (w.rows / 8).div_ceil(TILES);
    launch_product(f, lane, "skinny_gemm", (&x, &w), blocks, |a| {
        Ok(a.ptr(y.view)
            .i64(y.ld as i64)
            .i32(i32::from(y.view.dtype == DType::F32))
            .opt(gate)
            .i32(add)
            .i32(int(x.rows, "rows")?)
            .i32(int(w.rows, "columns")?))
    })?;
    Ok(true)
}

/// out [rows, mlp] = gelu_tanh(gate) · up of the gate|up product x·wᵀ (w [2·mlp, K]: the gate
/// rows, then the up rows; out bf16, mlp = out.cols a multiple of 4), in one launch.
/// Ok(false), nothing queued, where the kernel does not take the operands.
pub fn geglu(k: &Kernels, lane: &Lane, x: Mat, w: Mat, out: Mat) -> Result<bool> {
    let Some(f) = k.skinny_gemm_geglu.as_ref() else {
        return Ok(false);
    };
    let mlp = out.cols;
    let takes = operands_fit(&x, &w)
        && out.view.dtype == DType::Bf16
        && mlp % 4 == 0
        && w.rows == 2 * mlp
        && out.rows == x.rows;
    if !takes {
        return Ok(false);
    }
    need_all(&[
        (&x, "skinny geglu x"),
        (&w, "skinny geglu w"),
        (&out, "skinny geglu output"),
    ])?;
    launch_product(f, lane, "skinny_gemm_geglu", (&x, &w), mlp / 4, |a| {
        Ok(a.ptr(out.view)
            .i64(out.ld as i64)
            .i32(int(x.rows, "rows")?)
            .i32(int(mlp, "mlp")?))
    })?;
    Ok(true)
}

/// Where [`rope`] writes: as [`super::rope::rope_qkv`] does, q grouped to `q`
/// ([kv][rows][group][hd]), k (rotated) and v to rows `out_row0..` of the caches `k`, `v`
/// ([cap, kv·hd]), at positions `pos0[0] + r` (`pos0`: device i32) with `inv_freq` (f32
/// [hd/2]). The kernel reads `inv_freq` before it waits for the launch before it (like the
/// weights): it must not be written by that launch.
#[derive(Debug, Clone, Copy)]
pub struct RopeOut {
    pub q: View,
    pub k: View,
    pub v: View,
    pub inv_freq: View,
    pub pos0: View,
    pub heads: Heads,
    pub out_row0: usize,
}

/// The q|k|v product x·wᵀ (w [qkv_width, K]) with RoPE and the scatter of
/// [`super::rope::rope_qkv`] in its epilogue: one launch, nothing in between in memory.
/// Ok(false), nothing queued, where the kernel does not take the operands (head_dim a
/// multiple of 8 here).
pub fn rope(k: &Kernels, lane: &Lane, x: Mat, w: Mat, out: RopeOut) -> Result<bool> {
    let Some(f) = k.skinny_gemm_rope.as_ref() else {
        return Ok(false);
    };
    let Heads { nh, kv, hd } = out.heads;
    let takes = operands_fit(&x, &w)
        && kv > 0
        && nh % kv == 0
        && hd % 8 == 0
        && w.rows == out.heads.qkv_width();
    if !takes {
        return Ok(false);
    }
    need_all(&[(&x, "skinny rope x"), (&w, "skinny rope w")])?;
    let (rows, kvw) = (x.rows, out.heads.kv_width());
    out.q
        .need(DType::Bf16, rows * nh * hd, "skinny rope q output")?;
    out.k.need(
        DType::Bf16,
        (out.out_row0 + rows) * kvw,
        "skinny rope k cache",
    )?;
    out.v.need(
        DType::Bf16,
        (out.out_row0 + rows) * kvw,
        "skinny rope v cache",
    )?;
    out.inv_freq
        .need(DType::F32, hd / 2, "skinny rope inv_freq")?;
    out.pos0.need(DType::I32, 1, "skinny rope position")?;
    launch_product(f, lane, "skinny_gemm_rope", (&x, &w), w.rows / 8, |a| {
        Ok(a.ptr(out.q)
            .ptr(out.k)
            .ptr(out.v)
            .ptr(out.inv_freq)
            .ptr(out.pos0)
            .i32(int(rows, "rows")?)
            .i32(int(nh, "heads")?)
            .i32(int(kv, "kv heads")?)
            .i32(int(hd, "head_dim")?)
            .i32(int(out.out_row0, "cache row")?))
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warps' slices cover K exactly once, in whole chunks, in order: every value of K
    /// is summed by one warp (the kernels read a chunk only where it starts before K).
    #[test]
    fn warps_split_k_into_whole_chunks() {
        for chunk in [CHUNK_BF16] {
            for kdim in (32..=20_000).step_by(32) {
                let (warps, kslice) = split_k(kdim, chunk);
                let what = format!("K {kdim} in chunks of {chunk}");
                assert!((1..=WARPS).contains(&warps), "{what}: {warps} warps");
                assert_eq!(kslice % chunk, 0, "{what}: slice {kslice}");
                assert!(warps * kslice >= kdim, "{what}: K not covered");
                // At most UNROLL chunks per warp while WARPS warps are enough.
                if kdim.div_ceil(chunk) <= UNROLL * WARPS {
                    assert!(kslice <= UNROLL * chunk, "{what}: slice {kslice}");
                }
            }
        }
        // The expert's shapes: K 1024 (q|k|v, gate|up), 4096 (down).
        assert_eq!(split_k(1024, CHUNK_BF16), (8, 128));
        assert_eq!(split_k(4096, CHUNK_BF16), (16, 256));
    }
}
