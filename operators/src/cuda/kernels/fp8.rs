//! FP8 E4M3 quantisation per row: codes and scales, as an FP8 GEMM's operand holds them. CPU
//! twin: [`crate::fp8::quantise_rows`] (bit for bit).

use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::Result;

/// Threads per row: enough warps to read a row of a few thousand values in a few passes.
const THREADS: u32 = 256;

/// q[r, c] = E4M3(x[r, c] / scale[r]), scale[r] = max |x[r, :]| / 448, for `rows` rows of
/// `width` values of the activation type (row stride `ldx`); q is u8 with row stride `ldq`,
/// scale f32 [rows].
#[allow(clippy::too_many_arguments)]
pub fn quantise_e4m3(
    k: &Kernels,
    lane: &Lane,
    x: View,
    ldx: usize,
    q: View,
    ldq: usize,
    scale: View,
    rows: usize,
    width: usize,
) -> Result<()> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let span = |ld: usize| (rows - 1) * ld + width;
    x.need(k.act, span(ldx), "quantise_e4m3 x")?;
    q.need(DType::U8, span(ldq), "quantise_e4m3 q")?;
    scale.need(DType::F32, rows, "quantise_e4m3 scale")?;
    let args = Args::new()
        .ptr(x)
        .i64(ldx as i64)
        .i32(int(width, "width")?)
        .ptr(q)
        .i64(ldq as i64)
        .ptr(scale)
        .i32(int(rows, "rows")?);
    launch(&k.quantise_e4m3, lane, "quantise_e4m3", rows, THREADS, args)
}
