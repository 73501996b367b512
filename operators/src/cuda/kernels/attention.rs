//! Attention as two batched cuBLASLt GEMMs around a masked f32 softmax:
//! S = scale * Q Kᵀ (f32), P = softmax(S) under the mask (act), O = P V. Heads that share a
//! KV head are stacked as rows of one GEMM (the grouped query layout written by
//! [`super::rope::rope_qkv`]), so GQA costs nothing extra. The mask is data: the number of
//! valid prefix keys is read from device memory, so a captured graph serves any prefix
//! length. [`fused_attention`] computes the same in one pass on the tensor cores (bf16,
//! sm_80+). CPU twins: [`crate::cpu::attention`] and [`crate::cpu::softmax_masked`].

use cudarc::driver::sys;

use super::Kernels;
use crate::cuda::device::{
    blocks_for, int, launch, launch_with, Args, CudaResult, DType, Lane, View,
};
use crate::cuda::gemm::{Gemm, Mat, Op};
use crate::{Error, Result};

/// Which keys a query row sees (see the kernel's comment).
#[derive(Debug, Clone, Copy)]
pub struct Mask {
    /// Device i32: how many of the first `prefix_cap` keys are valid; None: all of them.
    pub prefix_len: Option<View>,
    /// i32 between the prefix lengths of consecutive problems of the fused attention's inner
    /// batch (the sequences of a batch, each over its own cache); 0: one length for all.
    pub prefix_stride: usize,
    pub prefix_cap: usize,
    /// Suffix keys every query sees (pi0's state token); later suffix keys are seen only by
    /// queries at or after `n_state` (block-causal).
    pub n_state: usize,
    /// Consecutive rows that belong to one query (the query heads of a KV group).
    pub group: usize,
}

impl Mask {
    /// Every key visible (SigLIP, and the prefix over its real tokens).
    pub fn full(keys: usize) -> Mask {
        Mask {
            prefix_len: None,
            prefix_stride: 0,
            prefix_cap: keys,
            n_state: 0,
            group: 1,
        }
    }
}

/// P = softmax(S) row by row under `mask`; S f32, P act, both [batch * rows_per_batch, n_keys]
/// with row stride `ld` (>= n_keys).
#[allow(clippy::too_many_arguments)]
pub fn softmax_masked(
    k: &Kernels,
    lane: &Lane,
    s: View,
    p: View,
    rows: usize,
    rows_per_batch: usize,
    n_keys: usize,
    ld: usize,
    mask: &Mask,
) -> Result<()> {
    if ld < n_keys {
        return Err(Error::Cuda("internal: softmax row stride < keys".into()));
    }
    let span = if rows == 0 {
        0
    } else {
        (rows - 1) * ld + n_keys
    };
    s.need(DType::F32, span, "softmax scores")?;
    p.need(k.act, span, "softmax probabilities")?;
    if let Some(pl) = mask.prefix_len {
        pl.need(DType::I32, 1, "softmax prefix length")?;
    }
    if rows_per_batch == 0 || mask.group == 0 {
        return Err(Error::Cuda("internal: softmax grouping".into()));
    }
    if mask.prefix_stride != 0 {
        return Err(Error::Cuda(
            "internal: softmax with a prefix length per sequence (one sequence at a time)".into(),
        ));
    }
    let args = Args::new()
        .ptr(s)
        .ptr(p)
        .i32(int(rows, "rows")?)
        .i32(int(n_keys, "keys")?)
        .i32(int(ld, "score row stride")?)
        .opt(mask.prefix_len)
        .i32(int(mask.prefix_cap, "prefix cap")?)
        .i32(int(mask.n_state, "state tokens")?)
        .i32(int(rows_per_batch, "rows per batch")?)
        .i32(int(mask.group, "group")?);
    // 4 warps (rows) per block.
    launch(
        &k.softmax_masked,
        lane,
        "softmax_masked",
        rows.div_ceil(4),
        128,
        args,
    )
}

/// out [rows, kv * group * hd] from the grouped layout [kv][rows][group][hd].
#[allow(clippy::too_many_arguments)]
pub fn unpermute_heads(
    k: &Kernels,
    lane: &Lane,
    input: View,
    out: View,
    rows: usize,
    kv: usize,
    group: usize,
    hd: usize,
) -> Result<()> {
    let n = rows * kv * group * hd;
    input.need(k.act, n, "unpermute input")?;
    out.need(k.act, n, "unpermute output")?;
    let args = Args::new()
        .ptr(input)
        .ptr(out)
        .i32(int(rows, "rows")?)
        .i32(int(kv, "kv heads")?)
        .i32(int(group, "group")?)
        .i32(int(hd, "head_dim")?);
    launch(
        &k.unpermute_heads,
        lane,
        "unpermute_heads",
        blocks_for(n, 256),
        256,
        args,
    )
}

/// Row stride of the score and probability matrices: keys rounded up to 8 elements, so that
/// every row starts 16-byte aligned (cuBLASLt's tensor-core kernels need it).
pub fn score_stride(keys: usize) -> usize {
    keys.div_ceil(8) * 8
}

/// Scratch of one attention call: scores (f32) and probabilities (act), each holding at
/// least batch * q.rows * score_stride(keys) elements.
#[derive(Debug, Clone, Copy)]
pub struct Scratch {
    pub scores: View,
    pub probs: View,
}

/// out = softmax(scale * q kᵀ under `mask`) v, for `batch` strided problems. q, out:
/// [rows, hd] per batch; k, v: [keys, hd] per batch.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    kern: &Kernels,
    gemm: &Gemm,
    lane: &Lane,
    q: Mat,
    k: Mat,
    v: Mat,
    out: Mat,
    batch: usize,
    scale: f32,
    mask: &Mask,
    scratch: Scratch,
) -> Result<()> {
    let (rows, keys) = (q.rows, k.rows);
    if rows == 0 || batch == 0 {
        return Ok(());
    }
    let ld = score_stride(keys);
    let n = batch * rows * ld;
    let s = Mat::new(scratch.scores.at(0, n)?, rows, keys)
        .ld(ld)
        .stride(rows * ld);
    let p = Mat::new(scratch.probs.at(0, n)?, rows, keys)
        .ld(ld)
        .stride(rows * ld);
    gemm.matmul(lane, q, k, Op::Wt, s, scale, 0.0, batch)?;
    softmax_masked(
        kern,
        lane,
        s.view,
        p.view,
        batch * rows,
        rows,
        keys,
        ld,
        mask,
    )?;
    gemm.matmul(lane, p, v, Op::N, out, 1.0, 0.0, batch)
}

/// The scale of attention scores, hd^-0.5 computed in f64 as the CPU does.
pub fn scale(head_dim: usize) -> f32 {
    (head_dim as f64).powf(-0.5) as f32
}

// The fused attention's shape, given to attention_fused.cu as the TP_FA_* defines (see
// `super::defines`). Its fragment code fixes the tile: 8 score tiles of 8 keys, 16 query rows
// per warp.
/// Keys per block of the fused attention (TP_FA_KEYS).
pub const FUSED_KEYS: usize = 64;
/// Query rows per block of the fused attention (TP_FA_ROWS).
pub const FUSED_ROWS: usize = 64;
/// Threads per block of the fused attention's chunk kernel (TP_FA_THREADS).
pub const FUSED_THREADS: usize = 128;
/// Padding of each shared-memory row, in elements, for conflict-free ldmatrix (TP_FA_PAD).
pub const FUSED_PAD: usize = 8;
/// The most blocks of a chunk grid that may start early (programmatic dependent launch):
/// pi0.5's denoise attention has 24, pi0's 112 and the vision tower's 512 (measured on an
/// H200: early blocks cost pi0 0.3 ms a frame).
const EARLY_BLOCKS: usize = 32;

/// Most key chunks the combine kernel takes (4096 keys; TP_FA_MAX_SPLITS).
pub const FUSED_MAX_SPLITS: usize = 64;
/// Largest head dimension of the fused attention.
pub const FUSED_MAX_HD: usize = 256;
const _: () = assert!(FUSED_KEYS == 8 * 8 && FUSED_ROWS == 16 * (FUSED_THREADS / 32));
/// Dynamic shared memory of a fused block: the Q tile and the K and V chunks, rows padded
/// by [`FUSED_PAD`] elements, bf16.
const fn fused_smem(hdp: usize) -> usize {
    (FUSED_ROWS + 2 * FUSED_KEYS) * (hdp + FUSED_PAD) * 2
}
pub(crate) const FUSED_MAX_SMEM: usize = fused_smem(FUSED_MAX_HD);

/// Lets the chunk and flash kernels (when loaded) take the shared memory of the largest head
/// dimension.
pub(crate) fn allow_shared_memory(k: &Kernels) -> Result<()> {
    for f in [&k.attention_chunk, &k.attention_flash]
        .into_iter()
        .flatten()
    {
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            FUSED_MAX_SMEM as i32,
        )
        .cuda("allowing the attention kernel its shared memory")?;
    }
    Ok(())
}

/// One operand of the fused attention: element (b1, b2, row, col) of a batch of n1 x n2
/// problems sits at `view + b1 * s1 + b2 * s2 + row * ld + col` (elements).
#[derive(Debug, Clone, Copy)]
pub struct Strided {
    pub view: View,
    pub ld: usize,
    pub s1: usize,
    pub s2: usize,
}

/// The shape of a batched attention: `n1 * n2` problems of `rows` queries over `keys` keys
/// with head dimension `hd`, and how the keys are spread over blocks.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    pub rows: usize,
    pub keys: usize,
    pub hd: usize,
    pub n1: usize,
    pub n2: usize,
    /// Key chunks of [`FUSED_KEYS`] per block. 1: one chunk per block (flash-decoding:
    /// `attention_chunk`, the most blocks, for few query rows); more: `attention_flash`, an
    /// online softmax over that many chunks per block ([`Problem::ALL_KEYS`]: every key in
    /// one block, no workspace). A function of the problem's shape only, never of the batch,
    /// so that a row's result does not depend on its neighbours.
    pub per_block: usize,
}

impl Problem {
    /// [`Problem::per_block`] for every key chunk in one block.
    pub const ALL_KEYS: usize = usize::MAX;

    /// Chunks per block that split the keys `splits` ways (at least one chunk per block).
    pub fn chunks_for_splits(keys: usize, splits: usize) -> usize {
        keys.div_ceil(FUSED_KEYS).div_ceil(splits.max(1)).max(1)
    }

    /// Blocks along the keys (`gridDim.y`).
    fn splits(&self) -> usize {
        self.keys
            .div_ceil(FUSED_KEYS)
            .div_ceil(self.per_block.max(1))
    }

    fn flash(&self) -> bool {
        self.per_block > 1
    }

    fn rows_pad(&self) -> usize {
        self.rows.div_ceil(FUSED_ROWS) * FUSED_ROWS
    }

    /// f32 elements of the fused attention's workspace: partial outputs and (max, sum) pairs.
    pub fn workspace(&self) -> (usize, usize) {
        let n = self.n1 * self.n2 * self.splits() * self.rows_pad();
        (n * self.hd, n * 2)
    }

    fn span(&self, op: &Strided, cols: usize, rows: usize) -> usize {
        if rows == 0 || self.n1 == 0 || self.n2 == 0 {
            return 0;
        }
        (self.n1 - 1) * op.s1 + (self.n2 - 1) * op.s2 + (rows - 1) * op.ld + cols
    }
}

/// The fused attention's workspace (f32), sized by [`Problem::workspace`].
#[derive(Debug, Clone, Copy)]
pub struct Workspace {
    pub part: View,
    pub stats: View,
}

/// `TURBOPI_FUSED_ATTENTION=0` keeps attention on the GEMM path (for A/B runs).
fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("TURBOPI_FUSED_ATTENTION").as_deref(),
            Ok("0" | "off" | "false")
        )
    })
}

/// Whether [`fused_attention`] can run this problem on these operands: bf16 kernels on an
/// sm_80+ device, hd a multiple of 8 up to 256, at most [`FUSED_MAX_SPLITS`] blocks along
/// the keys, 16-byte aligned K and V rows and 4-byte aligned Q and O rows (else the GEMM path
/// serves it).
pub fn fused_fits(
    k: &Kernels,
    p: &Problem,
    q: &Strided,
    kv: (&Strided, &Strided),
    out: &Strided,
) -> bool {
    let aligned = |op: &Strided, elems: usize| {
        op.view.ptr.is_multiple_of(2 * elems as u64)
            && [op.ld, op.s1, op.s2].iter().all(|s| s % elems == 0)
    };
    fused_enabled()
        && k.attention_chunk.is_some()
        && k.attention_combine.is_some()
        && (!p.flash() || k.attention_flash.is_some())
        && k.act == DType::Bf16
        && p.hd.is_multiple_of(8)
        && p.hd > 0
        && p.hd <= FUSED_MAX_HD
        && p.splits() <= FUSED_MAX_SPLITS
        && aligned(kv.0, 8)
        && aligned(kv.1, 8)
        && (kv.0.ld, kv.0.s1, kv.0.s2) == (kv.1.ld, kv.1.s1, kv.1.s2)
        && aligned(q, 2)
        && aligned(out, 2)
}

/// out = softmax(scale * q kᵀ under `mask`) v on the tensor cores, for `p.n1 * p.n2`
/// problems. The caller checks [`fused_fits`] first; the workspace is used when the keys
/// span more than one chunk of [`FUSED_KEYS`].
#[allow(clippy::too_many_arguments)]
pub fn fused_attention(
    kern: &Kernels,
    lane: &Lane,
    p: &Problem,
    q: Strided,
    (k, v): (Strided, Strided),
    out: Strided,
    scale: f32,
    mask: &Mask,
    work: Workspace,
) -> Result<()> {
    if !fused_fits(kern, p, &q, (&k, &v), &out) {
        return Err(Error::Cuda(
            "internal: fused attention on an unsupported problem".into(),
        ));
    }
    let chunk_kernel = if p.flash() {
        (&kern.attention_flash, "attention_flash")
    } else {
        (&kern.attention_chunk, "attention_chunk")
    };
    let (Some(chunk), Some(combine)) = (chunk_kernel.0, &kern.attention_combine) else {
        return Err(Error::Cuda("internal: no fused attention kernels".into()));
    };
    if p.rows == 0 || p.n1 == 0 || p.n2 == 0 {
        return Ok(());
    }
    let act = kern.act;
    q.view
        .need(act, p.span(&q, p.hd, p.rows), "attention queries")?;
    k.view
        .need(act, p.span(&k, p.hd, p.keys), "attention keys")?;
    v.view
        .need(act, p.span(&v, p.hd, p.keys), "attention values")?;
    out.view
        .need(act, p.span(&out, p.hd, p.rows), "attention output")?;
    if let Some(pl) = mask.prefix_len {
        let n = (p.n2 - 1) * mask.prefix_stride + 1;
        pl.need(DType::I32, n, "attention prefix length")?;
    }
    if mask.group == 0 {
        return Err(Error::Cuda("internal: attention grouping".into()));
    }
    let splits = p.splits().max(1);
    let (np, ns) = p.workspace();
    if splits > 1 {
        work.part
            .need(DType::F32, np, "attention partial outputs")?;
        work.stats.need(DType::F32, ns, "attention statistics")?;
    }
    let hdp = p.hd.div_ceil(16) * 16;
    let smem = fused_smem(hdp);
    let i64_of = |v: usize, what: &str| {
        i64::try_from(v).map_err(|_| Error::Cuda(format!("internal: {what} {v} too large")))
    };
    let batch = p.n1 * p.n2;
    let mut args = Args::new()
        .ptr(q.view)
        .ptr(k.view)
        .ptr(v.view)
        .ptr(out.view)
        .ptr(work.part)
        .ptr(work.stats)
        .opt(mask.prefix_len)
        .i32(int(p.rows, "rows")?)
        .i32(int(p.keys, "keys")?)
        .i32(int(p.hd, "head_dim")?)
        .i32(int(hdp, "padded head_dim")?)
        .i32(int(p.n2, "inner batch")?)
        .i64(i64_of(q.ld, "query row stride")?)
        .i64(i64_of(q.s1, "query stride")?)
        .i64(i64_of(q.s2, "query stride")?)
        .i64(i64_of(k.ld, "key row stride")?)
        .i64(i64_of(k.s1, "key stride")?)
        .i64(i64_of(k.s2, "key stride")?)
        .i64(i64_of(out.ld, "output row stride")?)
        .i64(i64_of(out.s1, "output stride")?)
        .i64(i64_of(out.s2, "output stride")?)
        .f32(scale)
        .i32(int(mask.prefix_cap, "prefix cap")?)
        .i32(int(mask.n_state, "state tokens")?)
        .i32(int(mask.group, "group")?)
        .i32(int(mask.prefix_stride, "prefix length stride")?);
    if p.flash() {
        let per_block = p.per_block.min(p.keys.div_ceil(FUSED_KEYS)).max(1);
        args = args.i32(int(per_block, "key chunks per block")?);
    }
    let grid = (p.rows.div_ceil(FUSED_ROWS), splits, batch);
    // A small grid (pi0.5's expert at a 10-token horizon: 2 row tiles x 12 key chunks) may
    // start while its predecessor drains; larger ones launch in order, since their blocks,
    // resident early with their shared memory, hold SMs the predecessor still needs.
    let early = grid.0 * grid.1 * grid.2 <= EARLY_BLOCKS;
    let shape = (grid, FUSED_THREADS as u32, smem as u32);
    launch_with(chunk, lane, chunk_kernel.1, shape, args, early)?;
    if splits == 1 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(work.part)
        .ptr(work.stats)
        .ptr(out.view)
        .i32(int(p.rows_pad(), "padded rows")?)
        .i32(int(p.hd, "head_dim")?)
        .i32(int(splits, "key chunks")?)
        .i32(int(p.n2, "inner batch")?)
        .i64(i64_of(out.ld, "output row stride")?)
        .i64(i64_of(out.s1, "output stride")?)
        .i64(i64_of(out.s2, "output stride")?);
    let shape = ((p.rows, batch, 1), 128, 0);
    launch_with(combine, lane, "attention_combine", shape, args, early)
}
