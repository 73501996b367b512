//! Half-split rotary embedding of the fused q|k|v projection, with HF's f32 inv_freq. It also
//! scatters: q goes to the grouped layout that attention's GEMMs read ([kv][rows][group][hd]:
//! the query heads sharing a KV head are consecutive rows), k (rotated) and v go to rows
//! `out_row0..` of the per-layer K/V cache. CPU twin: [`crate::cpu::rope`].

use super::Kernels;
use crate::cuda::device::{int, launch_grid, Args, DType, Lane, View};
use crate::{Error, Result};

/// Head geometry of a Gemma attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub nh: usize,
    pub kv: usize,
    pub hd: usize,
}

impl Heads {
    pub fn group(&self) -> usize {
        self.nh / self.kv
    }
    pub fn kv_width(&self) -> usize {
        self.kv * self.hd
    }
    /// Width of the fused q|k|v projection.
    pub fn qkv_width(&self) -> usize {
        (self.nh + 2 * self.kv) * self.hd
    }
}

/// How the rows of an attention layer split into the sequences of a batch: `n` sequences of
/// `per` rows, sequence b reading its first position (and prefix length) `prefix_stride` i32
/// after sequence b-1's and writing (and reading) its own K/V cache `kv_stride` elements
/// after sequence b-1's. One sequence: [`RowBatch::one`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowBatch {
    pub n: usize,
    pub per: usize,
    pub kv_stride: usize,
    pub prefix_stride: usize,
}

impl RowBatch {
    /// `rows` rows of one sequence.
    pub fn one(rows: usize) -> RowBatch {
        RowBatch {
            n: 1,
            per: rows,
            kv_stride: 0,
            prefix_stride: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.n * self.per
    }

    /// Elements a view of `len` elements per sequence spans over all sequences at `stride`.
    pub fn span(&self, stride: usize, len: usize) -> usize {
        self.n.saturating_sub(1) * stride + len
    }
}

/// RoPE on q and k of `qkv` [rows, qkv_width] at positions `pos0[0] + r` (`pos0`: device
/// i32); writes q grouped to `q_out` and k, v to rows `out_row0..out_row0 + rows` of the
/// caches `k_out`, `v_out` ([cap, kv * hd]).
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    k: &Kernels,
    lane: &Lane,
    qkv: View,
    q_out: View,
    k_out: View,
    v_out: View,
    inv_freq: View,
    pos0: View,
    rows: usize,
    heads: Heads,
    out_row0: usize,
) -> Result<()> {
    let io = (qkv, q_out, k_out, v_out);
    rope_qkv_batch(
        k,
        lane,
        io,
        inv_freq,
        pos0,
        RowBatch::one(rows),
        heads,
        out_row0,
    )
}

/// [`rope_qkv`] of the sequences of `batch` in one launch: sequence b's rows at positions
/// `pos0[b · prefix_stride] + i`, its q at `b · rows_per · nh · hd` of `q_out` (grouped per
/// sequence), its k and v into its own cache, `b · kv_stride` elements into `k_out` and
/// `v_out`.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_batch(
    k: &Kernels,
    lane: &Lane,
    (qkv, q_out, k_out, v_out): (View, View, View, View),
    inv_freq: View,
    pos0: View,
    batch: RowBatch,
    heads: Heads,
    out_row0: usize,
) -> Result<()> {
    let rows = batch.rows();
    if rows == 0 {
        return Ok(());
    }
    let Heads { nh, kv, hd } = heads;
    if kv == 0 || nh % kv != 0 || hd % 2 != 0 {
        return Err(Error::Cuda(format!(
            "internal: rope heads {nh}/{kv}, head_dim {hd}"
        )));
    }
    qkv.need(k.act, rows * heads.qkv_width(), "rope qkv")?;
    q_out.need(k.act, rows * nh * hd, "rope q output")?;
    let cache = batch.span(batch.kv_stride, (out_row0 + batch.per) * heads.kv_width());
    k_out.need(k.act, cache, "rope k cache")?;
    v_out.need(k.act, cache, "rope v cache")?;
    inv_freq.need(DType::F32, hd / 2, "rope inv_freq")?;
    pos0.need(
        DType::I32,
        batch.span(batch.prefix_stride, 1),
        "rope position",
    )?;
    let cache_stride = i64::try_from(batch.kv_stride)
        .map_err(|_| Error::Cuda("internal: rope cache stride too large".into()))?;
    let args = Args::new()
        .ptr(qkv)
        .ptr(q_out)
        .ptr(k_out)
        .ptr(v_out)
        .ptr(inv_freq)
        .ptr(pos0)
        .i32(int(rows, "rows")?)
        .i32(int(nh, "heads")?)
        .i32(int(kv, "kv heads")?)
        .i32(int(hd, "head_dim")?)
        .i32(int(out_row0, "cache row")?)
        .i32(int(batch.per, "rows per sequence")?)
        .i32(int(batch.prefix_stride, "position stride")?)
        .i64(cache_stride);
    // Every rotated pair and copied v value of a row, one per thread.
    let items = (nh + kv) * (hd / 2) + kv * hd;
    let grid = (rows, items.div_ceil(256), 1);
    launch_grid(&k.rope_qkv, lane, "rope_qkv", grid, 256, 0, args)
}
