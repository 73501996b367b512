//! Attention as two batched cuBLASLt GEMMs around a masked f32 softmax:
//! S = scale * Q Kᵀ (f32), P = softmax(S) under the mask (act), O = P V. Heads that share a
//! KV head are stacked as rows of one GEMM (the grouped query layout written by
//! [`super::rope::rope_qkv`]), so GQA costs nothing extra. The mask is data: the number of
//! valid prefix keys is read from device memory, so a captured graph serves any prefix
//! length. CPU twins: [`crate::cpu::attention`] and [`crate::cpu::softmax_masked`].

use super::compile::Kernels;
use super::device::{blocks_for, int, launch, Args, DType, Lane, View};
use super::gemm::{Gemm, Mat, Op};
use crate::{Error, Result};

pub(crate) const SOURCE: &str = r#"
// One warp per row of S [rows, n_keys] (f32, already scaled, row stride ld); writes P (same
// layout; the padding columns n_keys..ld are left alone).
// Key j is visible to row r when
//   j <  prefix_cap: j < plen (plen = *prefix_len, or prefix_cap when prefix_len is null);
//   j >= prefix_cap: s = j - prefix_cap is a suffix key, visible when s < n_state or
//                    q >= n_state, with q = (r % rows_per_batch) / group the query index.
// Rows that see nothing get all-zero probabilities, as cpu::softmax_masked.
extern "C" __global__ void softmax_masked(const float* __restrict__ S, act_t* __restrict__ P,
                                          int rows, int n_keys, int ld, const int* __restrict__ prefix_len,
                                          int prefix_cap, int n_state, int rows_per_batch, int group) {
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  long long r = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
  if (r >= rows) return;
  int plen = prefix_len != 0 ? prefix_len[0] : prefix_cap;
  int q = (int)((r % rows_per_batch) / group);
  bool late = q >= n_state;
  const float* s = S + r * ld;
  act_t* p = P + r * ld;
  float m = tp_neg_inf();
  for (int j = lane; j < n_keys; j += 32) {
    bool vis = j < prefix_cap ? j < plen : ((j - prefix_cap) < n_state || late);
    if (vis) m = fmaxf(m, s[j]);
  }
  m = tp_warp_max(m);
  if (m == tp_neg_inf()) {
    for (int j = lane; j < n_keys; j += 32) tp_store(p, j, 0.0f);
    return;
  }
  float sum = 0.0f;
  for (int j = lane; j < n_keys; j += 32) {
    bool vis = j < prefix_cap ? j < plen : ((j - prefix_cap) < n_state || late);
    if (vis) sum += expf(s[j] - m);
  }
  sum = tp_warp_sum(sum);
  float inv = 1.0f / sum;
  for (int j = lane; j < n_keys; j += 32) {
    bool vis = j < prefix_cap ? j < plen : ((j - prefix_cap) < n_state || late);
    tp_store(p, j, vis ? expf(s[j] - m) * inv : 0.0f);
  }
}

// in: grouped [kv][rows][group][hd] -> out: [rows][kv * group * hd] (heads in order).
extern "C" __global__ void unpermute_heads(const act_t* __restrict__ in, act_t* __restrict__ out,
                                           int rows, int kv, int group, int hd) {
  long long width = (long long)kv * group * hd;
  long long n = (long long)rows * width;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    long long r = i / width;
    long long rem = i - r * width;
    long long h = rem / hd;
    long long d = rem - h * hd;
    long long g = h / group;
    long long jj = h - g * group;
    out[i] = in[((g * rows + r) * group + jj) * hd + d];
  }
}
"#;

/// Which keys a query row sees (see the kernel's comment).
#[derive(Debug, Clone, Copy)]
pub struct Mask {
    /// Device i32: how many of the first `prefix_cap` keys are valid; None: all of them.
    pub prefix_len: Option<View>,
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
