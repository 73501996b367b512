// Flash-decoding attention on the tensor cores (bf16, sm_80+: mma.sync, cp.async, ldmatrix):
// one block per (64 query rows, 64 keys, batch), so even the few query rows of the denoise
// loop fill the GPU; each block writes its chunk's normalised output and the chunk's (max,
// sum) of the scores, and a second kernel combines the chunks. Two launches instead of the
// GEMM path's three, and no score matrix in memory. attention_flash takes several chunks per
// block with an online softmax, for many query rows (the prefix, the vision tower): fewer
// blocks and a smaller workspace, none when one block takes every key. Compiled only into
// the bf16 program. Launcher: attention.rs (`fused_attention`; TP_FA_* are its FUSED_*
// constants).

#if TP_BF16 && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
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

// S = Q K^T for one warp's 16 query rows x 64 keys: 8 accumulator tiles of 16x8. `qaddr` and
// `kaddr` are this lane's ldmatrix addresses of the Q tile and the K chunk in shared memory.
__device__ __forceinline__ void tp_fa_scores(float (&s)[8][4], unsigned qaddr, unsigned kaddr,
                                             int ld, int hdp) {
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
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
}

// Scales a chunk's scores and masks them (softmax_masked's mask): entry (j, e) of this lane
// is key `key0 + 8 j + e` (key0 = the chunk's first key + 2 t) for row a (s[j][e]) and row b
// (s[j][2 + e]), `late_*` saying whether the row's query comes at or after n_state.
__device__ __forceinline__ void tp_fa_mask(float (&s)[8][4], int key0, int keys, int plen,
                                           int prefix_cap, int n_state, bool late_a,
                                           bool late_b, float scale) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key0 + j * 8 + e;
      const bool pre = key < prefix_cap;
      const bool any = key < keys && (!pre || key < plen);
      const bool suffix_all = !pre && (key - prefix_cap) < n_state;
      const bool va = any && (pre || suffix_all || late_a);
      const bool vb = any && (pre || suffix_all || late_b);
      s[j][e] = va ? s[j][e] * scale : tp_neg_inf();
      s[j][2 + e] = vb ? s[j][2 + e] * scale : tp_neg_inf();
    }
  }
}

// The largest score of rows a and b over the chunk (a row lives in the 4 lanes of a quad).
__device__ __forceinline__ void tp_fa_row_max(const float (&s)[8][4], float& ma, float& mb) {
  ma = tp_neg_inf();
  mb = tp_neg_inf();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    ma = fmaxf(ma, fmaxf(s[j][0], s[j][1]));
    mb = fmaxf(mb, fmaxf(s[j][2], s[j][3]));
  }
  ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, 1));
  ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, 2));
  mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, 1));
  mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, 2));
}

// Where a warp's results go: with one block along the keys, O (rows a and b where they are
// real rows); else the block's normalised partial output and its rows' (max, sum).
struct TpFaOut {
  float* part;                 // this block's [rows_pad][hd] partials
  float* stats;                // this block's [rows_pad][2] (max, sum)
  unsigned short* o;           // this problem's O
  long long o_ld;
  int hd, ra, rb;
  bool in_a, in_b, split;
};

// Columns col, col + 1 of rows a (va0, va1) and b (vb0, vb1).
__device__ __forceinline__ void tp_fa_put(const TpFaOut& w, int col, float va0, float va1,
                                          float vb0, float vb1) {
  if (col >= w.hd) return;
  if (w.split) {
    *reinterpret_cast<float2*>(w.part + (long long)w.ra * w.hd + col) = make_float2(va0, va1);
    *reinterpret_cast<float2*>(w.part + (long long)w.rb * w.hd + col) = make_float2(vb0, vb1);
    return;
  }
  if (w.in_a) {
    tp_store(w.o, (long long)w.ra * w.o_ld + col, va0);
    tp_store(w.o, (long long)w.ra * w.o_ld + col + 1, va1);
  }
  if (w.in_b) {
    tp_store(w.o, (long long)w.rb * w.o_ld + col, vb0);
    tp_store(w.o, (long long)w.rb * w.o_ld + col + 1, vb1);
  }
}

// The rows' (max, sum) for attention_combine (one lane of the quad writes them).
__device__ __forceinline__ void tp_fa_put_stats(const TpFaOut& w, int t, float ma, float la,
                                                float mb, float lb) {
  if (!w.split || t != 0) return;
  w.stats[2 * w.ra] = ma;
  w.stats[2 * w.ra + 1] = la;
  w.stats[2 * w.rb] = mb;
  w.stats[2 * w.rb + 1] = lb;
}

// The output of block (x, y, z) for the warp whose lane holds rows ra and rb.
__device__ __forceinline__ TpFaOut tp_fa_out(float* part, float* stats, unsigned short* O,
                                             long long o_off, long long o_ld, int rows, int hd,
                                             int ra, int rb) {
  const long long rows_pad = (long long)gridDim.x * TP_FA_ROWS;
  const long long blk = (long long)blockIdx.z * gridDim.y + blockIdx.y;
  TpFaOut w;
  w.part = part + blk * rows_pad * hd;
  w.stats = stats + blk * rows_pad * 2;
  w.o = O + o_off;
  w.o_ld = o_ld;
  w.hd = hd;
  w.ra = ra;
  w.rb = rb;
  w.in_a = ra < rows;
  w.in_b = rb < rows;
  w.split = gridDim.y > 1;
  return w;
}

// Problem b of gridDim.z = n1 * nb2 sits at offset (b / nb2) * s1 + (b % nb2) * s2 of each
// operand, and reads its prefix length at prefix_len[(b % nb2) * plen_stride] (the rows of a
// batch over their own caches); rows are `ld` apart. Q, O: [rows, hd] per problem; K, V:
// [keys, hd] (same layout).
// Block (x, y, z): query rows 64x .. 64x + 63 (16 per warp) against keys 64y .. 64y + 63,
// staged in shared memory by cp.async (V arrives while S is computed), fragments read with
// ldmatrix. The mask is softmax_masked's. With one chunk (gridDim.y == 1) the block writes O;
// else it writes its normalised partial output to part [b][y][rows_pad][hd] and (max, sum)
// to stats [b][y][rows_pad][2] for attention_combine.
extern "C" __global__ void __launch_bounds__(TP_FA_THREADS) attention_chunk(
    const unsigned short* __restrict__ Q, const unsigned short* __restrict__ K,
    const unsigned short* __restrict__ V, unsigned short* __restrict__ O,
    float* __restrict__ part, float* __restrict__ stats, const int* __restrict__ prefix_len,
    int rows, int keys, int hd, int hdp, int nb2,
    long long q_ld, long long q_s1, long long q_s2,
    long long kv_ld, long long kv_s1, long long kv_s2,
    long long o_ld, long long o_s1, long long o_s2,
    float scale, int prefix_cap, int n_state, int group, int plen_stride) {
  tp_pdl_enter();
  extern __shared__ __align__(16) unsigned short tp_fa_smem[];
  const int ld = hdp + TP_FA_PAD;  // padded rows: conflict-free ldmatrix
  unsigned short* sq = tp_fa_smem;
  unsigned short* sk = sq + TP_FA_ROWS * ld;
  unsigned short* sv = sk + TP_FA_KEYS * ld;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, b1 = b / nb2, b2 = b - b1 * nb2;
  const int j0 = blockIdx.y * TP_FA_KEYS;
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
  // ldmatrix: lane l addresses row (l & 7) of 8x8 matrix (l >> 3).
  const int mi = lane & 7, mm = lane >> 3;

  const unsigned qaddr = tp_smem_addr(sq + (warp * 16 + (mm & 1) * 8 + mi) * ld + (mm >> 1) * 8);
  const unsigned kaddr = tp_smem_addr(sk + ((mm >> 1) * 8 + mi) * ld + (mm & 1) * 8);
  float s[8][4];
  tp_fa_scores(s, qaddr, kaddr, ld, hdp);

  // Masked softmax over the chunk; each row lives in the 4 lanes of a quad.
  const int plen = prefix_len != 0 ? prefix_len[(long long)b2 * plen_stride] : prefix_cap;
  const bool late_a = ra / group >= n_state, late_b = rb / group >= n_state;
  tp_fa_mask(s, j0 + 2 * t, keys, plen, prefix_cap, n_state, late_a, late_b, scale);
  float ma, mb;
  tp_fa_row_max(s, ma, mb);
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
  const TpFaOut out = tp_fa_out(part, stats, O, b1 * o_s1 + b2 * o_s2, o_ld, rows, hd, ra, rb);
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
      tp_fa_put(out, np * 16 + h * 8 + 2 * t, acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    }
  }
  tp_fa_put_stats(out, t, ma, la, mb, lb);
}

// attention_chunk's problem with an online softmax over `per_block` consecutive key chunks per
// block (FlashAttention-2's loop): block (x, y, z) takes chunks per_block * y .. on; each
// warp keeps its rows' running max and sum and their output accumulators in registers,
// rescaled as each chunk raises the max, and the probabilities are rounded to bf16 before
// they are normalised. K and V are single-buffered: the next chunk's K is staged while this
// one's softmax and P V run, its V while the next scores run. Fewer blocks, no workspace when
// one block takes every chunk (gridDim.y == 1: it writes O); else the same normalised
// partials and (max, sum) as attention_chunk, for attention_combine.
// Parameters: attention_chunk's, then per_block.
extern "C" __global__ void __launch_bounds__(TP_FA_THREADS) attention_flash(
    const unsigned short* __restrict__ Q, const unsigned short* __restrict__ K,
    const unsigned short* __restrict__ V, unsigned short* __restrict__ O,
    float* __restrict__ part, float* __restrict__ stats, const int* __restrict__ prefix_len,
    int rows, int keys, int hd, int hdp, int nb2,
    long long q_ld, long long q_s1, long long q_s2,
    long long kv_ld, long long kv_s1, long long kv_s2,
    long long o_ld, long long o_s1, long long o_s2,
    float scale, int prefix_cap, int n_state, int group, int plen_stride, int per_block) {
  tp_pdl_enter();
  extern __shared__ __align__(16) unsigned short tp_fa_smem[];
  const int ld = hdp + TP_FA_PAD;
  unsigned short* sq = tp_fa_smem;
  unsigned short* sk = sq + TP_FA_ROWS * ld;
  unsigned short* sv = sk + TP_FA_KEYS * ld;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, b1 = b / nb2, b2 = b - b1 * nb2;
  const int chunks = (keys + TP_FA_KEYS - 1) / TP_FA_KEYS;
  const int c0 = blockIdx.y * per_block, c1 = min(c0 + per_block, chunks);
  const int row0 = blockIdx.x * TP_FA_ROWS;
  const long long step = (long long)TP_FA_KEYS * kv_ld;
  const unsigned short* q = Q + b1 * q_s1 + b2 * q_s2;
  const unsigned short* kp = K + b1 * kv_s1 + b2 * kv_s2;
  const unsigned short* vp = V + b1 * kv_s1 + b2 * kv_s2;

  // Groups in flight: {Q, K(c0)}, {V(c0)}; each chunk then adds {K(c + 1)} and {V(c + 1)}
  // (empty past the last chunk), so "all but the newest group" is always the one needed.
  tp_fa_stage(sq, ld, q + (long long)row0 * q_ld, q_ld, TP_FA_ROWS, rows - row0, hd, hdp);
  tp_fa_stage(sk, ld, kp + c0 * step, kv_ld, TP_FA_KEYS, keys - c0 * TP_FA_KEYS, hd, hdp);
  asm volatile("cp.async.commit_group;\n" ::);
  tp_fa_stage(sv, ld, vp + c0 * step, kv_ld, TP_FA_KEYS, keys - c0 * TP_FA_KEYS, hd, hdp);
  asm volatile("cp.async.commit_group;\n" ::);

  const int r0 = row0 + warp * 16;
  const int ra = r0 + g, rb = ra + 8;
  const int mi = lane & 7, mm = lane >> 3;
  const unsigned qaddr = tp_smem_addr(sq + (warp * 16 + (mm & 1) * 8 + mi) * ld + (mm >> 1) * 8);
  const unsigned kaddr = tp_smem_addr(sk + ((mm >> 1) * 8 + mi) * ld + (mm & 1) * 8);
  const unsigned vaddr = tp_smem_addr(sv + ((mm & 1) * 8 + mi) * ld + (mm >> 1) * 8);
  const int plen = prefix_len != 0 ? prefix_len[(long long)b2 * plen_stride] : prefix_cap;
  const bool late_a = ra / group >= n_state, late_b = rb / group >= n_state;
  const int nps = hdp >> 4;

  // Rows a and b: running max, this lane's share of the running sum, and O's 16x8 tiles
  // (two per 16 output columns).
  float ma = tp_neg_inf(), mb = tp_neg_inf(), la = 0.0f, lb = 0.0f;
  float acc[TP_FA_MAX_HD / 16][2][4];
#pragma unroll
  for (int np = 0; np < TP_FA_MAX_HD / 16; ++np) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      acc[np][h][0] = acc[np][h][1] = acc[np][h][2] = acc[np][h][3] = 0.0f;
    }
  }

  for (int c = c0; c < c1; ++c) {
    const int j0 = c * TP_FA_KEYS;
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
    float s[8][4];
    tp_fa_scores(s, qaddr, kaddr, ld, hdp);
    __syncthreads();
    if (c + 1 < c1)
      tp_fa_stage(sk, ld, kp + (c + 1) * step, kv_ld, TP_FA_KEYS, keys - j0 - TP_FA_KEYS, hd, hdp);
    asm volatile("cp.async.commit_group;\n" ::);

    tp_fa_mask(s, j0 + 2 * t, keys, plen, prefix_cap, n_state, late_a, late_b, scale);
    float ca, cb;
    tp_fa_row_max(s, ca, cb);
    const float na = fmaxf(ma, ca), nb = fmaxf(mb, cb);
    // Rows that have seen no key keep max -inf, sum 0 and O 0.
    const float xa = ma == tp_neg_inf() ? 0.0f : expf(ma - na);
    const float xb = mb == tp_neg_inf() ? 0.0f : expf(mb - nb);
    ma = na;
    mb = nb;
    la *= xa;
    lb *= xb;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[j][e] = na == tp_neg_inf() ? 0.0f : expf(s[j][e] - na);
        s[j][2 + e] = nb == tp_neg_inf() ? 0.0f : expf(s[j][2 + e] - nb);
        la += s[j][e];
        lb += s[j][2 + e];
      }
    }
    unsigned p[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      p[kk][0] = tp_pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      p[kk][1] = tp_pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      p[kk][2] = tp_pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p[kk][3] = tp_pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#pragma unroll
    for (int np = 0; np < TP_FA_MAX_HD / 16; ++np) {
      if (np < nps) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc[np][h][0] *= xa;
          acc[np][h][1] *= xa;
          acc[np][h][2] *= xb;
          acc[np][h][3] *= xb;
        }
      }
    }

    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
#pragma unroll
    for (int np = 0; np < TP_FA_MAX_HD / 16; ++np) {
      if (np < nps) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          unsigned v0, v1, v2, v3;
          tp_ldmatrix_x4_trans(vaddr + (kk * 16 * ld + np * 16) * 2, v0, v1, v2, v3);
          tp_mma_bf16(acc[np][0], p[kk][0], p[kk][1], p[kk][2], p[kk][3], v0, v1);
          tp_mma_bf16(acc[np][1], p[kk][0], p[kk][1], p[kk][2], p[kk][3], v2, v3);
        }
      }
    }
    __syncthreads();
    if (c + 1 < c1)
      tp_fa_stage(sv, ld, vp + (c + 1) * step, kv_ld, TP_FA_KEYS, keys - j0 - TP_FA_KEYS, hd, hdp);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  asm volatile("cp.async.wait_group 0;\n" ::);

  la += __shfl_xor_sync(0xffffffffu, la, 1);
  la += __shfl_xor_sync(0xffffffffu, la, 2);
  lb += __shfl_xor_sync(0xffffffffu, lb, 1);
  lb += __shfl_xor_sync(0xffffffffu, lb, 2);
  if (r0 >= rows) return;
  const float ia = la > 0.0f ? 1.0f / la : 0.0f, ib = lb > 0.0f ? 1.0f / lb : 0.0f;
  const TpFaOut out = tp_fa_out(part, stats, O, b1 * o_s1 + b2 * o_s2, o_ld, rows, hd, ra, rb);
#pragma unroll
  for (int np = 0; np < TP_FA_MAX_HD / 16; ++np) {
    if (np >= nps) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tp_fa_put(out, np * 16 + h * 8 + 2 * t, acc[np][h][0] * ia, acc[np][h][1] * ia,
                acc[np][h][2] * ib, acc[np][h][3] * ib);
    }
  }
  tp_fa_put_stats(out, t, ma, la, mb, lb);
}

// O row (blockIdx.x) of problem blockIdx.y from the chunks' partial outputs, each weighted by
// its share exp(m_c - M) l_c of the softmax denominator (a fixed order: replays agree).
extern "C" __global__ void attention_combine(const float* __restrict__ part,
                                             const float* __restrict__ stats,
                                             unsigned short* __restrict__ O, int rows_pad, int hd,
                                             int splits, int nb2, long long o_ld, long long o_s1,
                                             long long o_s2) {
  tp_pdl_enter();
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
