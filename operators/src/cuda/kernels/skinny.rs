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
//!
//! [`linear_fp8`] is [`linear`] with FP8 E4M3 weights (W8A16: codes and a scale per output
//! channel, as [`crate::fp8::quantise_rows`] and [`super::fp8::quantise_e4m3`] store them;
//! the activations stay bf16): half the weight bytes of the batch-1 denoise loop. CPU twin:
//! [`crate::cpu::Linear::quantise_fp8`] (without activations), then
//! [`crate::cpu::Linear::forward`] and [`crate::cpu::add_residual`].

use super::rope::Heads;
use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::cuda::gemm::Mat;
use crate::{Error, Result};
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
/// The most rows of x [`linear_fp8`] takes: up to [`MAX_ROWS`] on `skinny_gemm_fp8`, up to
/// 64 (four m16 tiles) on `skinny_gemm_fp8_wide`, which reads the codes once for all of
/// them (pi0's 51 suffix tokens).
pub const MAX_ROWS_FP8: usize = 64;
/// The most warps per block of `skinny_gemm_fp8_wide` (`TP_SK8W_WARPS`): its partial sums,
/// 4 row tiles × [`WIDE_TILES`] column tiles per warp, fill 32 KB of shared memory at 8.
pub const WIDE_WARPS: usize = 8;
/// Tiles of 8 output columns per block of `skinny_gemm_fp8_wide` (`TP_SK8W_TILES`): every
/// block reads all of x's rows (up to 64), so x is read from L2 once per 8 · WIDE_TILES
/// columns.
pub const WIDE_TILES: usize = 2;
// The wide form's partial sums fit the 48 KB of shared memory a block may hold statically
// (4 bytes × 4 × 32 per row tile and column tile of each warp).
const _: () = assert!(WIDE_WARPS * WIDE_TILES * (MAX_ROWS_FP8 / 16) * 4 * 4 * 32 <= 48 * 1024);
/// Values of K a warp covers per 16-byte load of each of its rows: 32 for bf16 weights
/// (8 per lane, four lanes per row), 64 for FP8 codes (16 per lane, four lanes per row).
const CHUNK_BF16: usize = 32;
pub const CHUNK_FP8: usize = 64;

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

impl Epilogue {
    /// The kernels' `add` flag and gate pointer, the gate checked to hold `n_out` f32
    /// (`what` names it in the error).
    fn args(self, n_out: usize, what: &str) -> Result<(i32, Option<View>)> {
        Ok(match self {
            Epilogue::Store => (0, None),
            Epilogue::Add => (1, None),
            Epilogue::Gated(g) => {
                g.need(DType::F32, n_out, what)?;
                (0, Some(g))
            }
        })
    }
}

/// Whether the kernel takes y = x·wᵀ with these operands: x and w bf16 with 16-byte aligned
/// rows, K a multiple of 32, N a multiple of 8, 1..=[`MAX_ROWS`] rows, y f32 or bf16.
pub fn fits(k: &Kernels, x: &Mat, w: &Mat, y: &Mat) -> bool {
    k.skinny_gemm.is_some()
        && operands_fit(x, w)
        && w.rows.is_multiple_of(8)
        && matches!(y.view.dtype, DType::F32 | DType::Bf16)
        && y.rows == x.rows
        && y.cols == w.rows
}

/// What every entry point needs of x and w: bf16 with 16-byte aligned rows, K a multiple of
/// 32, 1..=[`MAX_ROWS`] rows of x, at least one weight row.
fn operands_fit(x: &Mat, w: &Mat) -> bool {
    let aligned = |m: &Mat| m.view.ptr.is_multiple_of(16) && m.ld.is_multiple_of(8);
    x.view.dtype == DType::Bf16
        && w.view.dtype == DType::Bf16
        && (1..=MAX_ROWS).contains(&x.rows)
        && x.cols == w.cols
        && x.cols.is_multiple_of(32)
        && w.rows > 0
        && aligned(x)
        && aligned(w)
}

/// Checks the row strides and spans of the operands `mats` before a launch.
fn need_all(mats: &[(&Mat, &str)]) -> Result<()> {
    mats.iter().try_for_each(|(m, what)| m.check(1, what))
}

/// How the warps of a block split K, read in chunks of `chunk` values (a warp's 16-byte load
/// per row: 32 for bf16, [`CHUNK_FP8`] for FP8 codes): (warps, K slice of each). As many
/// warps as K has runs of UNROLL chunks (1 to [`WARPS`]), the chunks split evenly among
/// them, each slice a whole number of chunks: each lane then has its whole slice in flight
/// at once where K allows. (Measured on an H200 for bf16, against one warp per chunk, up to
/// 16, and against two slices per warp: the expert's step 0.96 ms against 1.04 and 0.98.)
/// A slice past K (more warps than slices need) reads nothing and adds zeros.
pub fn split_k(kdim: usize, chunk: usize) -> (usize, usize) {
    split_k_among(kdim, chunk, WARPS)
}

/// [`split_k`] over at most `max_warps` warps.
fn split_k_among(kdim: usize, chunk: usize, max_warps: usize) -> (usize, usize) {
    let chunks = kdim.div_ceil(chunk);
    let warps = chunks.div_ceil(UNROLL).clamp(1, max_warps);
    (warps, chunks.div_ceil(warps) * chunk)
}

/// How [`linear_fp8`] splits K among the warps for x of `rows` rows: (warps, K slice).
pub fn split_k_fp8(kdim: usize, rows: usize) -> (usize, usize) {
    let most = if rows > MAX_ROWS { WIDE_WARPS } else { WARPS };
    split_k_among(kdim, CHUNK_FP8, most)
}

/// Launches `f` over `blocks` blocks of `warps` warps with the arguments x, w, those `own`
/// adds (the entry point's own, rows included), K and the warps' K slice `kslice`.
fn launch_chunked(
    f: &CudaFunction,
    lane: &Lane,
    name: &str,
    (x, w): (&Mat, &Mat),
    blocks: usize,
    (warps, kslice): (usize, usize),
    own: impl FnOnce(Args) -> Result<Args>,
) -> Result<()> {
    let kdim = x.cols;
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
    let split = split_k(xw.0.cols, CHUNK_BF16);
    launch_chunked(f, lane, name, xw, blocks, split, own)
}

/// The plain products' arguments after the weights (and scales): y, its row stride and type,
/// the gate and add flag of [`Epilogue::args`], the rows and columns.
fn output_args(
    a: Args,
    y: &Mat,
    (add, gate): (i32, Option<View>),
    (rows, cols): (usize, usize),
) -> Result<Args> {
    Ok(a.ptr(y.view)
        .i64(y.ld as i64)
        .i32(i32::from(y.view.dtype == DType::F32))
        .opt(gate)
        .i32(add)
        .i32(int(rows, "rows")?)
        .i32(int(cols, "columns")?))
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
    let (add, gate) = epi.args(w.rows, "skinny gemm gate")?;
    let blocks = (w.rows / 8).div_ceil(TILES);
    launch_product(f, lane, "skinny_gemm", (&x, &w), blocks, |a| {
        output_args(a, &y, (add, gate), (x.rows, w.rows))
    })?;
    Ok(true)
}

/// What the GeGLU epilogues need of their output: bf16 [x.rows, mlp], mlp a multiple of 4,
/// and w's rows the gate's and the up's (2·mlp).
fn geglu_out_fits(x: &Mat, w: &Mat, out: &Mat) -> bool {
    out.view.dtype == DType::Bf16
        && out.cols.is_multiple_of(4)
        && w.rows == 2 * out.cols
        && out.rows == x.rows
}

/// out [rows, mlp] = gelu_tanh(gate) · up of the gate|up product x·wᵀ (w [2·mlp, K]: the gate
/// rows, then the up rows; out bf16, mlp = out.cols a multiple of 4), in one launch.
/// Ok(false), nothing queued, where the kernel does not take the operands.
pub fn geglu(k: &Kernels, lane: &Lane, x: Mat, w: Mat, out: Mat) -> Result<bool> {
    let Some(f) = k.skinny_gemm_geglu.as_ref() else {
        return Ok(false);
    };
    let mlp = out.cols;
    if !(operands_fit(&x, &w) && geglu_out_fits(&x, &w, &out)) {
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

/// The FP8 entry point for x of `rows` rows: `skinny_gemm_fp8` up to [`MAX_ROWS`],
/// `skinny_gemm_fp8_wide` up to [`MAX_ROWS_FP8`] (where the program has it).
fn fp8_kernel(k: &Kernels, rows: usize) -> Option<(&CudaFunction, &'static str)> {
    match rows {
        1..=MAX_ROWS => k.skinny_gemm_fp8.as_ref().map(|f| (f, "skinny_gemm_fp8")),
        r if (MAX_ROWS + 1..=MAX_ROWS_FP8).contains(&r) => k
            .skinny_gemm_fp8_wide
            .as_ref()
            .map(|f| (f, "skinny_gemm_fp8_wide")),
        _ => None,
    }
}

/// What the FP8 entry points need of x and the codes: x bf16 with 16-byte aligned rows, w
/// u8 E4M3 codes [N, K] with 16-byte aligned rows, K a positive multiple of 16, at least one
/// weight row.
fn fp8_operands_fit(x: &Mat, w: &Mat) -> bool {
    x.view.dtype == DType::Bf16
        && w.view.dtype == DType::U8
        && x.cols == w.cols
        && x.cols > 0
        && x.cols.is_multiple_of(16)
        && w.rows > 0
        && x.view.ptr.is_multiple_of(16)
        && x.ld.is_multiple_of(8)
        && w.view.ptr.is_multiple_of(16)
        && w.ld.is_multiple_of(16)
}

/// Whether [`linear_fp8`] takes y = scale ⊙ (x·wᵀ) with these operands: the kernel for x's
/// rows is in the program (bf16, sm_80 or newer; 1..=[`MAX_ROWS`] rows, or up to
/// [`MAX_ROWS_FP8`] on the wide entry point), x bf16 with 16-byte aligned rows, w u8 E4M3
/// codes [N, K] with 16-byte aligned rows, K a positive multiple of 16, N a multiple of 8,
/// y f32 or bf16 [rows, N].
pub fn fits_fp8(k: &Kernels, x: &Mat, w: &Mat, y: &Mat) -> bool {
    fp8_kernel(k, x.rows).is_some()
        && fp8_operands_fit(x, w)
        && w.rows.is_multiple_of(8)
        && matches!(y.view.dtype, DType::F32 | DType::Bf16)
        && y.rows == x.rows
        && y.cols == w.rows
}

/// What no shape can excuse: codes that are not u8, and x, w and y that do not make one
/// product (x [rows, K], w [N, K], y [rows, N]).
fn fp8_operands_agree(x: &Mat, w: &Mat, y: &Mat) -> Result<()> {
    let bad = |what: String| Err(Error::Cuda(format!("internal: skinny fp8 gemm: {what}")));
    if w.view.dtype != DType::U8 {
        return bad(format!(
            "the weight codes are {:?}, expected U8 (E4M3 codes)",
            w.view.dtype
        ));
    }
    if x.cols != w.cols {
        return bad(format!(
            "x has {} columns but the weight codes have {} (K)",
            x.cols, w.cols
        ));
    }
    if (y.rows, y.cols) != (x.rows, w.rows) {
        return bad(format!(
            "y is [{}, {}], expected [{}, {}] (x's rows, the weight's rows)",
            y.rows, y.cols, x.rows, w.rows
        ));
    }
    Ok(())
}

/// y (x.rows × w.rows) from x [rows, K] (bf16) and FP8 E4M3 weights: `w` the codes [N, K]
/// (u8, row stride `w.ld` bytes) and `scales` f32 [N], weight (n, k) being
/// `scales[n] · E4M3(w[n, k])` as [`crate::fp8::quantise_rows`] and
/// [`super::fp8::quantise_e4m3`] write them; see [`Epilogue`] for what becomes of y. On
/// `lane`; up to [`MAX_ROWS`] rows on `skinny_gemm_fp8`, up to [`MAX_ROWS_FP8`] on
/// `skinny_gemm_fp8_wide` (the codes read once for all rows). Ok(false), with nothing
/// queued, where [`fits_fp8`] says no (the caller then takes another path); an error,
/// nothing queued, for codes that are not u8, operands that do not make one product, and
/// scales, gate or spans that are too short.
pub fn linear_fp8(
    k: &Kernels,
    lane: &Lane,
    x: Mat,
    w: Mat,
    scales: View,
    y: Mat,
    epi: Epilogue,
) -> Result<bool> {
    let Some((f, name)) = fp8_kernel(k, x.rows) else {
        return Ok(false);
    };
    fp8_operands_agree(&x, &w, &y)?;
    if !fits_fp8(k, &x, &w, &y) {
        return Ok(false);
    }
    need_all(&[
        (&x, "skinny fp8 gemm x"),
        (&w, "skinny fp8 gemm weight codes"),
        (&y, "skinny fp8 gemm y"),
    ])?;
    scales.need(DType::F32, w.rows, "skinny fp8 gemm scales")?;
    let (add, gate) = epi.args(w.rows, "skinny fp8 gemm gate")?;
    let tiles = if x.rows > MAX_ROWS { WIDE_TILES } else { TILES };
    let blocks = (w.rows / 8).div_ceil(tiles);
    let split = split_k_fp8(x.cols, x.rows);
    launch_chunked(f, lane, name, (&x, &w), blocks, split, |a| {
        output_args(a.ptr(scales), &y, (add, gate), (x.rows, w.rows))
    })?;
    Ok(true)
}

/// [`geglu`] for FP8 E4M3 weights (codes [2·mlp, K] and `scales` f32 [2·mlp], as
/// [`linear_fp8`] takes them): out [rows, mlp] = gelu_tanh(gate) · up, each of gate and up
/// scaled and rounded to bf16 as [`linear_fp8`]'s bf16 y holds it: the same bits as that
/// product then [`super::mlp::gelu_gate`], in one launch. Up to [`MAX_ROWS`] rows.
/// Ok(false), nothing queued, where the kernel does not take the operands.
pub fn geglu_fp8(
    k: &Kernels,
    lane: &Lane,
    x: Mat,
    (w, scales): (Mat, View),
    out: Mat,
) -> Result<bool> {
    let Some(f) = k.skinny_gemm_fp8_geglu.as_ref() else {
        return Ok(false);
    };
    let mlp = out.cols;
    let takes = fp8_operands_fit(&x, &w)
        && (1..=MAX_ROWS).contains(&x.rows)
        && geglu_out_fits(&x, &w, &out);
    if !takes {
        return Ok(false);
    }
    need_all(&[
        (&x, "skinny fp8 geglu x"),
        (&w, "skinny fp8 geglu weight codes"),
        (&out, "skinny fp8 geglu output"),
    ])?;
    scales.need(DType::F32, w.rows, "skinny fp8 geglu scales")?;
    let split = split_k_fp8(x.cols, x.rows);
    launch_chunked(
        f,
        lane,
        "skinny_gemm_fp8_geglu",
        (&x, &w),
        mlp / 4,
        split,
        |a| {
            Ok(a.ptr(scales)
                .ptr(out.view)
                .i64(out.ld as i64)
                .i32(int(x.rows, "rows")?)
                .i32(int(mlp, "mlp")?))
        },
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warps' slices cover K exactly once, in whole chunks, in order: every value of K
    /// is summed by one warp (the kernels read a chunk only where it starts before K).
    #[test]
    fn warps_split_k_into_whole_chunks() {
        for chunk in [CHUNK_BF16, CHUNK_FP8] {
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
        // The expert's shapes: K 1024 (q|k|v, gate|up), 4096 (down); K 16384 (the prefix's down).
        assert_eq!(split_k(1024, CHUNK_BF16), (8, 128));
        assert_eq!(split_k(4096, CHUNK_BF16), (16, 256));
        assert_eq!(split_k(1024, CHUNK_FP8), (4, 256));
        assert_eq!(split_k(4096, CHUNK_FP8), (16, 256));
        assert_eq!(split_k(16384, CHUNK_FP8), (16, 1024));
        // A chunk that K ends halfway through: one warp, two chunks.
        assert_eq!(split_k(96, CHUNK_FP8), (1, 128));
        // The FP8 kernels: up to 16 rows as split_k; the wide form's at most WIDE_WARPS warps
        // (pi0's down at 51 rows: 8 warps of 8 chunks, K covered once).
        assert_eq!(split_k_fp8(4096, 16), split_k(4096, CHUNK_FP8));
        assert_eq!(split_k_fp8(4096, 51), (WIDE_WARPS, 512));
        assert_eq!(split_k_fp8(1024, 51), (4, 256));
        assert_eq!(split_k_fp8(16, 17), (1, 64));
    }

    /// PTX's prmt.b32 in its default mode with selectors below 8 (CUDA's `__byte_perm`):
    /// byte i of the result is byte `s >> 4i & 7` of b:a (a's bytes 0..3, then b's).
    fn byte_perm(a: u32, b: u32, s: u32) -> u32 {
        let bytes = (u64::from(b) << 32 | u64::from(a)).to_le_bytes();
        (0..4).fold(0, |r, i| {
            r | u32::from(bytes[(s >> (4 * i) & 7) as usize]) << (8 * i)
        })
    }

    /// `tp_sk8_bf16x4` of skinny.cu, operation for operation: four codes as the bf16 bits
    /// of their values times 2^-120 (before the multiply by 2^120).
    fn bf16x4_before_scaling(w: u32) -> [u16; 4] {
        let mag = w & 0x7F7F_7F7F;
        let sgn = (w >> 4) & 0x0808_0808;
        let lo = byte_perm(mag, sgn, 0x5140) << 4;
        let hi = byte_perm(mag, sgn, 0x7362) << 4;
        [lo as u16, (lo >> 16) as u16, hi as u16, (hi >> 16) as u16]
    }

    /// The conversion in the FP8 kernel is exact for every code, in every byte of a word: the
    /// bits it builds, read as a bf16 (an f32 with 16 zero bits below, subnormals included)
    /// and multiplied by 2^120 (exact, and what the kernel's bf16 multiply-add by 2^120
    /// computes), are the code's E4M3 value; the NaN codes give ±480 (skinny.cu says so).
    #[test]
    fn fp8_codes_convert_to_their_exact_values() {
        let source = super::super::FILES
            .iter()
            .find(|f| f.path == "kernels/skinny.cu")
            .map(|f| f.source)
            .unwrap_or_default();
        for line in [
            "const unsigned mag = w & 0x7F7F7F7Fu;",
            "const unsigned sgn = (w >> 4) & 0x08080808u;",
            "const unsigned lo = __byte_perm(mag, sgn, 0x5140) << 4;",
            "const unsigned hi = __byte_perm(mag, sgn, 0x7362) << 4;",
            "\"r\"(0x7B807B80u), \"r\"(0x80008000u)",
        ] {
            assert!(source.contains(line), "skinny.cu no longer has `{line}`");
        }
        let two_120 = 2f32.powi(120);
        for code in 0..=255u8 {
            let want = match code {
                0x7F => 480.0,
                0xFF => -480.0,
                c => crate::fp8::decode(c),
            };
            for byte in 0..4 {
                // The code in one byte, its neighbours all ones (their bits must not leak).
                let w = !(0xFFu32 << (8 * byte)) | u32::from(code) << (8 * byte);
                let bits = bf16x4_before_scaling(w)[byte];
                let got = f32::from_bits(u32::from(bits) << 16) * two_120;
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "code {code:#04x} in byte {byte}: {got:e}, want {want:e}"
                );
            }
        }
        // 2^120 as the kernel writes it: bf16 bits 0x7B80, twice.
        assert_eq!(f32::from_bits(0x7B80 << 16), two_120);
    }
}
