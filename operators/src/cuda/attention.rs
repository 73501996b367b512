//! Attention as two batched cuBLASLt GEMMs around a masked f32 softmax:
//! S = scale * Q Kᵀ (f32), P = softmax(S) under the mask (act), O = P V. Heads that share a
//! KV head are stacked as rows of one GEMM (the grouped query layout written by
//! [`super::rope::rope_qkv`]), so GQA costs nothing extra. The mask is data: the number of
//! valid prefix keys is read from device memory, so a captured graph serves any prefix
//! length. CPU twins: [`crate::cpu::attention`] and [`crate::cpu::softmax_masked`].

use super::compile::Kernels;
use super::device::{blocks_for, int, launch, launch_grid, Args, DType, Lane, View};
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

/// Flash-decoding attention on the tensor cores (bf16, sm_80+): one block per (64 query
/// rows, 64 keys, batch), so even the few query rows of the denoise loop fill the GPU; each
/// block writes its chunk's normalised output and the chunk's (max, sum) of the scores, and a
/// second kernel combines the chunks. Two launches instead of the GEMM path's three, and no
/// score matrix in memory. Compiled only into the bf16 program.
pub(crate) const FUSED_SOURCE: &str = r#"
#if TP_BF16 && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define TP_FA_KEYS 64
#define TP_FA_ROWS 64
#define TP_FA_MAX_SPLITS 64

__device__ __forceinline__ unsigned tp_bf16_bits(float v) {
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
// Two values as a bf16x2 register, the lower column in the low half (mma operand order).
__device__ __forceinline__ unsigned tp_pack_bf16(float lo, float hi) {
  return tp_bf16_bits(lo) | (tp_bf16_bits(hi) << 16);
}
// D = A B + D for one 16x8x16 tile (A row-major 16x16, B column-major 16x8, f32 accumulate).
__device__ __forceinline__ void tp_mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2,
                                            unsigned a3, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned tp_smem_addr(const void* p) {
  unsigned long long a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (unsigned)a;
}
// 16 bytes global -> shared without a register round trip; `bytes` 0 writes zeros.
__device__ __forceinline__ void tp_cp_async16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void tp_ldmatrix_x4(unsigned addr, unsigned& r0, unsigned& r1,
                                               unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void tp_ldmatrix_x4_trans(unsigned addr, unsigned& r0, unsigned& r1,
                                                     unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
// `n` rows of `hd` elements (row stride `src_ld`) into shared rows of `ld`, zero past `valid`
// rows and past hd (up to hdp); 16-byte pieces spread over the block.
__device__ __forceinline__ void tp_fa_stage(unsigned short* dst, int ld,
                                            const unsigned short* src, long long src_ld,
                                            int n, int valid, int hd, int hdp) {
  const int vecs = hdp >> 3;
  const unsigned base = tp_smem_addr(dst);
  for (int i = threadIdx.x; i < n * vecs; i += blockDim.x) {
    const int r = i / vecs, c = (i - r * vecs) << 3;
    const bool in = r < valid && c < hd;
    tp_cp_async16(base + (unsigned)(r * ld + c) * 2u, in ? src + r * src_ld + c : src,
                  in ? 16 : 0);
  }
}

// Problem b of gridDim.z = n1 * nb2 sits at offset (b / nb2) * s1 + (b % nb2) * s2 of each
// operand; rows are `ld` apart. Q, O: [rows, hd] per problem; K, V: [keys, hd] (same layout).
// Block (x, y, z): query rows 64x .. 64x + 63 (16 per warp) against keys 64y .. 64y + 63,
// staged in shared memory by cp.async (V arrives while S is computed), fragments read with
// ldmatrix. The mask is softmax_masked's. With one chunk (gridDim.y == 1) the block writes O;
// else it writes its normalised partial output to part [b][y][rows_pad][hd] and (max, sum)
// to stats [b][y][rows_pad][2] for attention_combine.
extern "C" __global__ void __launch_bounds__(128) attention_chunk(
    const unsigned short* __restrict__ Q, const unsigned short* __restrict__ K,
    const unsigned short* __restrict__ V, unsigned short* __restrict__ O,
    float* __restrict__ part, float* __restrict__ stats, const int* __restrict__ prefix_len,
    int rows, int keys, int hd, int hdp, int nb2,
    long long q_ld, long long q_s1, long long q_s2,
    long long kv_ld, long long kv_s1, long long kv_s2,
    long long o_ld, long long o_s1, long long o_s2,
    float scale, int prefix_cap, int n_state, int group) {
  extern __shared__ __align__(16) unsigned short tp_fa_smem[];
  const int ld = hdp + 8;  // padded rows: conflict-free ldmatrix
  unsigned short* sq = tp_fa_smem;
  unsigned short* sk = sq + TP_FA_ROWS * ld;
  unsigned short* sv = sk + TP_FA_KEYS * ld;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, b1 = b / nb2, b2 = b - b1 * nb2;
  const int split = blockIdx.y, splits = gridDim.y, j0 = split * TP_FA_KEYS;
  const int row0 = blockIdx.x * TP_FA_ROWS;
  const unsigned short* q = Q + b1 * q_s1 + b2 * q_s2;
  const unsigned short* kp = K + b1 * kv_s1 + b2 * kv_s2 + (long long)j0 * kv_ld;
  const unsigned short* vp = V + b1 * kv_s1 + b2 * kv_s2 + (long long)j0 * kv_ld;

  tp_fa_stage(sq, ld, q + (long long)row0 * q_ld, q_ld, TP_FA_ROWS, rows - row0, hd, hdp);
  tp_fa_stage(sk, ld, kp, kv_ld, TP_FA_KEYS, keys - j0, hd, hdp);
  asm volatile("cp.async.commit_group;\n" ::);
  tp_fa_stage(sv, ld, vp, kv_ld, TP_FA_KEYS, keys - j0, hd, hdp);
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 1;\n" ::);
  __syncthreads();

  const int r0 = row0 + warp * 16;
  const int ra = r0 + g, rb = ra + 8;
  const bool in_a = ra < rows, in_b = rb < rows;
  // ldmatrix: lane l addresses row (l & 7) of 8x8 matrix (l >> 3).
  const int mi = lane & 7, mm = lane >> 3;

  // S = Q K^T for 16 rows x 64 keys: 8 accumulator tiles of 16x8.
  float s[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  const unsigned qaddr = tp_smem_addr(sq + (warp * 16 + (mm & 1) * 8 + mi) * ld + (mm >> 1) * 8);
  const unsigned kaddr = tp_smem_addr(sk + ((mm >> 1) * 8 + mi) * ld + (mm & 1) * 8);
  for (int kt = 0; kt < hdp; kt += 16) {
    unsigned a0, a1, a2, a3;
    tp_ldmatrix_x4(qaddr + kt * 2, a0, a1, a2, a3);
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      unsigned k0, k1, k2, k3;
      tp_ldmatrix_x4(kaddr + (jp * 16 * ld + kt) * 2, k0, k1, k2, k3);
      tp_mma_bf16(s[2 * jp], a0, a1, a2, a3, k0, k1);
      tp_mma_bf16(s[2 * jp + 1], a0, a1, a2, a3, k2, k3);
    }
  }

  // Masked softmax over the chunk; each row lives in the 4 lanes of a quad.
  const int plen = prefix_len != 0 ? prefix_len[0] : prefix_cap;
  const bool late_a = ra / group >= n_state, late_b = rb / group >= n_state;
  float ma = tp_neg_inf(), mb = tp_neg_inf();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = j0 + j * 8 + 2 * t + e;
      const bool pre = key < prefix_cap;
      const bool any = key < keys && (!pre || key < plen);
      const bool suffix_all = !pre && (key - prefix_cap) < n_state;
      const bool va = any && (pre || suffix_all || late_a);
      const bool vb = any && (pre || suffix_all || late_b);
      s[j][e] = va ? s[j][e] * scale : tp_neg_inf();
      s[j][2 + e] = vb ? s[j][2 + e] * scale : tp_neg_inf();
      ma = fmaxf(ma, s[j][e]);
      mb = fmaxf(mb, s[j][2 + e]);
    }
  }
  ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, 1));
  ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, 2));
  mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, 1));
  mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, 2));
  float la = 0.0f, lb = 0.0f;
  const bool seen_a = ma != tp_neg_inf(), seen_b = mb != tp_neg_inf();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[j][e] = seen_a ? expf(s[j][e] - ma) : 0.0f;
      s[j][2 + e] = seen_b ? expf(s[j][2 + e] - mb) : 0.0f;
      la += s[j][e];
      lb += s[j][2 + e];
    }
  }
  la += __shfl_xor_sync(0xffffffffu, la, 1);
  la += __shfl_xor_sync(0xffffffffu, la, 2);
  lb += __shfl_xor_sync(0xffffffffu, lb, 1);
  lb += __shfl_xor_sync(0xffffffffu, lb, 2);
  const float ia = la > 0.0f ? 1.0f / la : 0.0f, ib = lb > 0.0f ? 1.0f / lb : 0.0f;
  // The probabilities as A fragments of P V: two adjacent 16x8 score tiles are one 16x16 tile.
  unsigned p[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    p[kk][0] = tp_pack_bf16(s[2 * kk][0] * ia, s[2 * kk][1] * ia);
    p[kk][1] = tp_pack_bf16(s[2 * kk][2] * ib, s[2 * kk][3] * ib);
    p[kk][2] = tp_pack_bf16(s[2 * kk + 1][0] * ia, s[2 * kk + 1][1] * ia);
    p[kk][3] = tp_pack_bf16(s[2 * kk + 1][2] * ib, s[2 * kk + 1][3] * ib);
  }

  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  if (r0 >= rows) return;
  // O = P V, 16 output columns (two 16x8 tiles) at a time.
  const long long rows_pad = (long long)gridDim.x * TP_FA_ROWS;
  float* pb = part + ((long long)b * splits + split) * rows_pad * hd;
  unsigned short* o = O + b1 * o_s1 + b2 * o_s2;
  const unsigned vaddr = tp_smem_addr(sv + ((mm & 1) * 8 + mi) * ld + (mm >> 1) * 8);
  for (int np = 0; np < (hdp >> 4); ++np) {
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      unsigned v0, v1, v2, v3;
      tp_ldmatrix_x4_trans(vaddr + (kk * 16 * ld + np * 16) * 2, v0, v1, v2, v3);
      tp_mma_bf16(acc[0], p[kk][0], p[kk][1], p[kk][2], p[kk][3], v0, v1);
      tp_mma_bf16(acc[1], p[kk][0], p[kk][1], p[kk][2], p[kk][3], v2, v3);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = np * 16 + h * 8 + 2 * t;
      if (c >= hd) continue;
      if (splits > 1) {
        *reinterpret_cast<float2*>(pb + (long long)ra * hd + c) = make_float2(acc[h][0], acc[h][1]);
        *reinterpret_cast<float2*>(pb + (long long)rb * hd + c) = make_float2(acc[h][2], acc[h][3]);
      } else {
        if (in_a) {
          tp_store(o, (long long)ra * o_ld + c, acc[h][0]);
          tp_store(o, (long long)ra * o_ld + c + 1, acc[h][1]);
        }
        if (in_b) {
          tp_store(o, (long long)rb * o_ld + c, acc[h][2]);
          tp_store(o, (long long)rb * o_ld + c + 1, acc[h][3]);
        }
      }
    }
  }
  if (splits > 1 && t == 0) {
    float* st = stats + ((long long)b * splits + split) * rows_pad * 2;
    st[2 * ra] = ma;
    st[2 * ra + 1] = la;
    st[2 * rb] = mb;
    st[2 * rb + 1] = lb;
  }
}

// O row (blockIdx.x) of problem blockIdx.y from the chunks' partial outputs, each weighted by
// its share exp(m_c - M) l_c of the softmax denominator (a fixed order: replays agree).
extern "C" __global__ void attention_combine(const float* __restrict__ part,
                                             const float* __restrict__ stats,
                                             unsigned short* __restrict__ O, int rows_pad, int hd,
                                             int splits, int nb2, long long o_ld, long long o_s1,
                                             long long o_s2) {
  __shared__ float w[TP_FA_MAX_SPLITS];
  __shared__ float inv_den;
  const int r = blockIdx.x, b = blockIdx.y;
  const long long plane = (long long)rows_pad;
  const float* st = stats + ((long long)b * splits * plane + r) * 2;
  if (threadIdx.x < 32) {
    float m = tp_neg_inf();
    for (int c = threadIdx.x; c < splits; c += 32) m = fmaxf(m, st[c * plane * 2]);
    m = tp_warp_max(m);
    float den = 0.0f;
    for (int c = threadIdx.x; c < splits; c += 32) {
      const float l = st[c * plane * 2 + 1];
      const float wc = l > 0.0f ? l * expf(st[c * plane * 2] - m) : 0.0f;
      w[c] = wc;
      den += wc;
    }
    den = tp_warp_sum(den);
    if (threadIdx.x == 0) inv_den = den > 0.0f ? 1.0f / den : 0.0f;
  }
  __syncthreads();
  const int b1 = b / nb2, b2 = b - b1 * nb2;
  unsigned short* o = O + b1 * o_s1 + b2 * o_s2 + (long long)r * o_ld;
  const float* pp = part + ((long long)b * splits * plane + r) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (int c = 0; c < splits; ++c) acc += w[c] * pp[(long long)c * plane * hd + d];
    tp_store(o, d, acc * inv_den);
  }
}
#endif
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

/// Keys per block of the fused attention.
pub const FUSED_KEYS: usize = 64;
/// Query rows per block of the fused attention.
pub const FUSED_ROWS: usize = 64;
/// Most key chunks the combine kernel takes (4096 keys).
pub const FUSED_MAX_SPLITS: usize = 64;
/// Largest head dimension of the fused attention.
pub const FUSED_MAX_HD: usize = 256;
/// Dynamic shared memory of a fused block: the Q tile and the K and V chunks, rows padded
/// by 8 elements, bf16.
const fn fused_smem(hdp: usize) -> usize {
    (FUSED_ROWS + 2 * FUSED_KEYS) * (hdp + 8) * 2
}
pub(crate) const FUSED_MAX_SMEM: usize = fused_smem(FUSED_MAX_HD);

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
/// with head dimension `hd`.
#[derive(Debug, Clone, Copy)]
pub struct Problem {
    pub rows: usize,
    pub keys: usize,
    pub hd: usize,
    pub n1: usize,
    pub n2: usize,
}

impl Problem {
    fn splits(&self) -> usize {
        self.keys.div_ceil(FUSED_KEYS)
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
/// sm_80+ device, hd a multiple of 8 up to 256, at most 4096 keys, 16-byte aligned K and V
/// rows and 4-byte aligned Q and O rows (else the GEMM path serves it).
pub fn fused_fits(
    k: &Kernels,
    p: &Problem,
    q: &Strided,
    kv: (&Strided, &Strided),
    out: &Strided,
) -> bool {
    let aligned = |op: &Strided, elems: usize| {
        op.view.ptr % (2 * elems as u64) == 0
            && [op.ld, op.s1, op.s2].iter().all(|s| s % elems == 0)
    };
    fused_enabled()
        && k.fused_attention.is_some()
        && k.act == DType::Bf16
        && p.hd % 8 == 0
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
    let f = kern
        .fused_attention
        .as_ref()
        .ok_or_else(|| Error::Cuda("internal: no fused attention kernels".into()))?;
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
        pl.need(DType::I32, 1, "attention prefix length")?;
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
    let args = Args::new()
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
        .i32(int(mask.group, "group")?);
    launch_grid(
        &f.chunk,
        lane,
        "attention_chunk",
        (p.rows.div_ceil(FUSED_ROWS), splits, batch),
        128,
        smem as u32,
        args,
    )?;
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
    launch_grid(
        &f.combine,
        lane,
        "attention_combine",
        (p.rows, batch, 1),
        128,
        0,
        args,
    )
}
