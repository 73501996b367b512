// Few-row GEMMs on the tensor cores (bf16, sm_80+: mma.sync): the action expert's products at
// pi0.5's 10-token horizon against weights of 0.5-17 MB, which cuBLASLt runs with tiles made
// for many rows. Each weight byte is read exactly once, in 16-byte loads, by enough warps to keep the
// memory busy: a block owns 8 output columns and its warps split K; the warps'
// partial sums are added in a fixed order (replays and split stages agree bit for bit).
// Compiled only into the bf16 program. Launcher: skinny.rs; CPU twin: cpu::Linear::forward
// followed by cpu::add_residual (with the gate). Two more entry points put the next operation
// of the denoise loop in the epilogue (one launch instead of two, and no round trip through
// memory): GeGLU after the gate|up product, RoPE and the K/V cache write after q|k|v. Their
// blocks take pairs of weight rows (gate and up, the two halves of a rotated pair), so that
// each output's operands are in the block that writes it. A fourth, `skinny_gemm_fp8`, takes
// the weights as FP8 E4M3 codes with a scale per output channel (W8A16: half the bytes per
// weight, the activations stay bf16); it is described at its own code, below.
//
// The dot product is the same whatever order its terms come in, so the K index is permuted
// within each 32-wide chunk: lane (g, t) loads the 8 contiguous values 8t..8t+7 of a weight row
// and of an input row (one 16-byte load each), and feeds them to two m16n8k16 instructions as
// the k pairs (2t, 2t+1) and (2t+8, 2t+9) of each. A and B use the same permutation, so the
// products pair up exactly as in x·wᵀ.

#if TP_BF16 && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
__device__ __forceinline__ void tp_sk_mma(float* c, unsigned a0, unsigned a1, unsigned a2,
                                          unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A weight load that bypasses L1 (each byte is used once). Not volatile: the compiler may
// issue it ahead of earlier products.
__device__ __forceinline__ uint4 tp_sk_stream(const unsigned short* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 tp_sk_row(const unsigned short* p, bool in) {
  return in ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
}

// Weight row of fragment column n (0..7) of block b. pair_half 0: rows 8b..8b+7. Else the
// block takes four pairs of rows (c, pair_half + c) of one span of 2 · pair_half rows, so that
// an epilogue sees both halves of each pair: span b / (pair_half / 4), rows 4 (b mod
// (pair_half / 4)) + c for n = c < 4 and pair_half more for n = c + 4.
__device__ __forceinline__ long long tp_sk_wrow(int b, int n, int pair_half) {
  if (pair_half == 0) return 8LL * b + n;
  const int per = pair_half >> 2, span = b / per, j = b - span * per;
  return 2LL * pair_half * span + 4 * j + (n < 4 ? n : pair_half + n - 4);
}

// The block's partial products into red ([warp · T + tile][fragment value][lane]) for x [M, K]
// (M <= 16, row stride ldx) against T tiles of 8 weight rows each (W [_, K], row stride ldw;
// both with 16-byte aligned rows, K a multiple of 32): tile i of block b is tile T·b + i of
// tp_sk_wrow; tiles at or past n_tiles are skipped. Each x fragment loaded serves all T tiles
// (x is read from L2 once per 8·T columns). Warp w of blockDim.x / 32 (at most TP_SK_WARPS)
// sums K range [w·kslice, (w+1)·kslice); each lane keeps TP_SK_UNROLL · T 16-byte weight loads
// in flight. `after_wait()` runs right after the wait for the previous kernel, before the
// products: an epilogue's own loads issued there are in flight while the products run. Ends
// with __syncthreads.
template <int T, class AfterWait>
__device__ __forceinline__ void tp_sk_accumulate(const unsigned short* __restrict__ X,
                                                 long long ldx,
                                                 const unsigned short* __restrict__ W,
                                                 long long ldw, int pair_half, int n_tiles,
                                                 int M, int K, int kslice,
                                                 float (*red)[4][32], AfterWait after_wait) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kb = warp * kslice, ke = min(K, kb + kslice);
  const unsigned short* wrow[T];
  bool live[T];
#pragma unroll
  for (int i = 0; i < T; ++i) {
    const int tile = blockIdx.x * T + i;
    live[i] = tile < n_tiles;
    wrow[i] = W + (live[i] ? tp_sk_wrow(tile, g, pair_half) * ldw + 8 * t : 0);
  }
  const bool in_a = g < M, in_b = g + 8 < M;
  const unsigned short* xa = X + (long long)g * ldx + 8 * t;
  const unsigned short* xb = X + (long long)(g + 8) * ldx + 8 * t;
  float c[T][4];
#pragma unroll
  for (int i = 0; i < T; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;

  // TP_SK_UNROLL chunks of weights per tile in flight per lane (fewer at the end of the
  // slice), then their products. The weights are constant: the first chunks are requested
  // before waiting for the previous kernel (programmatic dependent launch), whose output x
  // may be.
  uint4 w[TP_SK_UNROLL][T];
#pragma unroll
  for (int u = 0; u < TP_SK_UNROLL; ++u)
#pragma unroll
    for (int i = 0; i < T; ++i)
      w[u][i] = live[i] && kb + 32 * u < ke ? tp_sk_stream(wrow[i] + kb + 32 * u)
                                            : make_uint4(0u, 0u, 0u, 0u);
  tp_pdl_enter();
  after_wait();
  for (int k = kb; k < ke; k += 32 * TP_SK_UNROLL) {
    if (k != kb) {
#pragma unroll
      for (int u = 0; u < TP_SK_UNROLL; ++u)
#pragma unroll
        for (int i = 0; i < T; ++i)
          w[u][i] = live[i] && k + 32 * u < ke ? tp_sk_stream(wrow[i] + k + 32 * u)
                                               : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < TP_SK_UNROLL; ++u) {
      if (k + 32 * u < ke) {
        const uint4 a = tp_sk_row(xa + k + 32 * u, in_a), b = tp_sk_row(xb + k + 32 * u, in_b);
#pragma unroll
        for (int i = 0; i < T; ++i) {
          tp_sk_mma(c[i], a.x, b.x, a.y, b.y, w[u][i].x, w[u][i].y);
          tp_sk_mma(c[i], a.z, b.z, a.w, b.w, w[u][i].z, w[u][i].w);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < T; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[warp * T + i][j][lane] = c[i][j];
  __syncthreads();
}

// Output (row, fragment column n) of tile i of the block's T: the warps' partial sums added in
// warp order. The m16n8 fragment holds (row g, columns 2t, 2t+1) in values 0, 1 and row g + 8
// in 2, 3 of lane (g, t).
__device__ __forceinline__ float tp_sk_sum(float (*red)[4][32], int T, int i, int row, int n) {
  const int lane = (row & 7) * 4 + (n >> 1), j = ((row >> 3) << 1) + (n & 1);
  float s = 0.0f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w * T + i][j][lane];
  return s;
}

// v as a bf16 output holds it.
__device__ __forceinline__ float tp_sk_bf16(float v) {
  return __uint_as_float(tp_bf16_bits(v) << 16);
}

// y[at] = s, or y[at] += s with `accumulate`; y f32 (y_f32) or bf16.
__device__ __forceinline__ void tp_sk_write(void* __restrict__ Y, long long at, int y_f32, float s,
                                            bool accumulate) {
  if (y_f32) {
    float* y = reinterpret_cast<float*>(Y);
    y[at] = accumulate ? y[at] + s : s;
  } else {
    unsigned short* y = reinterpret_cast<unsigned short*>(Y);
    tp_store(y, at, accumulate ? tp_load(y, at) + s : s);
  }
}

// Y[m, n] for m < M, n < N (N a multiple of 8), columns 8·TP_SK_TILES·b .. in block b (8 per
// tile): Y = x·Wᵀ; with `add`, Y += x·Wᵀ; with `gate` (f32 [N]), Y += gate[n] · (x·Wᵀ). Y f32
// (y_f32) or bf16, row stride ldy.
extern "C" __global__ void __launch_bounds__(TP_SK_WARPS * 32) skinny_gemm(
    const unsigned short* __restrict__ X, long long ldx, const unsigned short* __restrict__ W,
    long long ldw, void* __restrict__ Y, long long ldy, int y_f32,
    const float* __restrict__ gate, int add, int M, int N, int K, int kslice) {
  __shared__ float red[TP_SK_WARPS * TP_SK_TILES][4][32];
  tp_sk_accumulate<TP_SK_TILES>(X, ldx, W, ldw, 0, N >> 3, M, K, kslice, red, [] {});
  for (int e = threadIdx.x; e < 128 * TP_SK_TILES; e += blockDim.x) {
    const int i = e >> 7, row = (e & 127) >> 3, n = e & 7;
    const int col = (blockIdx.x * TP_SK_TILES + i) * 8 + n;
    if (row >= M || col >= N) continue;
    float s = tp_sk_sum(red, TP_SK_TILES, i, row, n);
    const long long at = (long long)row * ldy + col;
    tp_sk_write(Y, at, y_f32, gate != 0 ? s * gate[col] : s, add || gate != 0);
  }
}

// GeGLU in the epilogue of the gate|up product: out[m, c] = gelu_tanh(gate) · up with gate =
// (x·Wᵀ)[m, c] and up = (x·Wᵀ)[m, mlp + c], each rounded to bf16 first, as the product's bf16
// output and gelu_gate would see them (the same bits as those two launches). W [2 mlp, K]
// (gate rows, then up rows; mlp a multiple of 4); block b: c = 4b..4b+3. out bf16, row stride
// ldo. CPU twin: cpu::Linear::forward, then cpu::gelu_tanh(gate) · up.
// The epilogues are calls, not inlined: inlined, the compiler hoists their address
// arithmetic above the product loop, and the registers it keeps live there cost occupancy.
// With `scale` (FP8 codes: f32 [2 mlp], gate rows then up rows), each sum is scaled before
// its bf16 rounding, as skinny_gemm_fp8's bf16 output rounds it.
__device__ __noinline__ void tp_sk_geglu_out(float (*red)[4][32], unsigned short* out,
                                             long long ldo, int M, const float* scale,
                                             int mlp) {
  for (int e = threadIdx.x; e < 64; e += blockDim.x) {
    const int row = e >> 2, c = e & 3, col = 4 * blockIdx.x + c;
    if (row >= M) continue;
    float gt = tp_sk_sum(red, 1, 0, row, c), up = tp_sk_sum(red, 1, 0, row, c + 4);
    if (scale != 0) {
      gt *= scale[col];
      up *= scale[mlp + col];
    }
    tp_store(out, (long long)row * ldo + col, tp_gelu_tanh(tp_sk_bf16(gt)) * tp_sk_bf16(up));
  }
}

extern "C" __global__ void __launch_bounds__(TP_SK_WARPS * 32) skinny_gemm_geglu(
    const unsigned short* __restrict__ X, long long ldx, const unsigned short* __restrict__ W,
    long long ldw, unsigned short* __restrict__ out, long long ldo, int M, int mlp, int K,
    int kslice) {
  __shared__ float red[TP_SK_WARPS][4][32];
  tp_sk_accumulate<1>(X, ldx, W, ldw, mlp, mlp >> 2, M, K, kslice, red, [] {});
  tp_sk_geglu_out(red, out, ldo, M, nullptr, mlp);
}

// RoPE in the epilogue of the fused q|k|v product (W [(nh + 2 kv) hd, K], hd a multiple of 8):
// rope_qkv's rotation and scatter of the product's bf16-rounded values (the same bits as the
// product and rope_qkv launched one after the other). Block b: head b / (hd / 8), pairs
// (j, j + hd/2) for j = 4 (b mod (hd / 8)) + 0..3. Row m's position is pos0[0] + m; q goes to
// q_out [kv][M][nh / kv][hd], k and v to row out_row0 + m of k_out, v_out ([_, kv hd]).
// CPU twin: cpu::Linear::forward, then cpu::rope on q and k.
struct TpSkRope {
  unsigned short* q_out;
  unsigned short* k_out;
  unsigned short* v_out;
  int M, nh, kv, hd, out_row0;
};

// freq: inv_freq of this thread's pair (the same for each of its outputs: they are 32 apart);
// pos0: the first row's position.
__device__ __noinline__ void tp_sk_rope_out(float (*red)[4][32], TpSkRope p, float freq,
                                            int pos0) {
  const int half = p.hd >> 1;
  const int per = half >> 2, h = blockIdx.x / per, j0 = 4 * (blockIdx.x - h * per);
  const int group = p.nh / p.kv, kvw = p.kv * p.hd;
  for (int e = threadIdx.x; e < 64; e += blockDim.x) {
    const int row = e >> 2, j = j0 + (e & 3);
    if (row >= p.M) continue;
    const float a = tp_sk_bf16(tp_sk_sum(red, 1, 0, row, e & 3));
    const float b = tp_sk_bf16(tp_sk_sum(red, 1, 0, row, (e & 3) + 4));
    if (h < p.nh + p.kv) {
      const float pos = (float)(pos0 + row);
      const float angle = freq * pos;
      const float c = cosf(angle);
      const float s = sinf(angle);
      const float o1 = a * c - b * s;
      const float o2 = b * c + a * s;
      if (h < p.nh) {
        const int gq = h / group, jj = h - gq * group;
        const long long base = (((long long)gq * p.M + row) * group + jj) * p.hd;
        tp_store(p.q_out, base + j, o1);
        tp_store(p.q_out, base + j + half, o2);
      } else {
        const long long base =
            (long long)(p.out_row0 + row) * kvw + (long long)(h - p.nh) * p.hd;
        tp_store(p.k_out, base + j, o1);
        tp_store(p.k_out, base + j + half, o2);
      }
    } else {
      const long long base =
          (long long)(p.out_row0 + row) * kvw + (long long)(h - p.nh - p.kv) * p.hd;
      tp_store(p.v_out, base + j, a);
      tp_store(p.v_out, base + j + half, b);
    }
  }
}

extern "C" __global__ void __launch_bounds__(TP_SK_WARPS * 32) skinny_gemm_rope(
    const unsigned short* __restrict__ X, long long ldx, const unsigned short* __restrict__ W,
    long long ldw, unsigned short* __restrict__ q_out, unsigned short* __restrict__ k_out,
    unsigned short* __restrict__ v_out, const float* __restrict__ inv_freq,
    const int* __restrict__ pos0, int M, int nh, int kv, int hd, int out_row0, int K,
    int kslice) {
  __shared__ float red[TP_SK_WARPS][4][32];
  const int half = hd >> 1, per = half >> 2, h = blockIdx.x / per;
  // inv_freq is constant (uploaded once, like the weights): read before the wait. The
  // position comes from the prefix stage: read right after it, in flight during the products.
  const bool rotates = threadIdx.x < 64 && h < nh + kv;
  const float freq = rotates ? inv_freq[4 * (blockIdx.x - h * per) + (threadIdx.x & 3)] : 0.0f;
  int p0 = 0;
  tp_sk_accumulate<1>(X, ldx, W, ldw, half, (nh + 2 * kv) * hd >> 3, M, K, kslice, red,
                      [&] {
                        if (rotates) p0 = pos0[0];
                      });
  tp_sk_rope_out(red, TpSkRope{q_out, k_out, v_out, M, nh, kv, hd, out_row0}, freq, p0);
}

// ---- W8A16: FP8 E4M3 weights (the batch-1 denoise loop reads half the bytes) ----
// skinny_gemm_fp8 is skinny_gemm with the weights as E4M3 codes (u8 [N, K], one row per
// output channel) and an f32 scale per row, as fp8::quantise_rows and the quantise_e4m3
// kernel store them: y[m, n] = scale[n] · Σ_k x[m, k] · E4M3(code[n, k]). Each code is
// converted to bf16 in registers, exactly, and the products run on the same bf16 tensor
// cores with f32 sums; the scale is applied once per output, in the epilogue. CPU twin:
// cpu::Linear::quantise_fp8(false) (weights rounded to scale · E4M3 per channel, what
// `--dtype fp8` runs on the CPU) then cpu::Linear::forward and cpu::add_residual.
//
// The K permutation, in chunks of 64 (a 16-byte load holds 16 codes, four lanes one row):
// lane (g, t) loads codes 16t..16t+15 of the chunk of weight row g (one 16-byte load) and
// the same 16 values of rows g and g + 8 of x (two 16-byte loads each). Word q (0..3) of the
// weight load holds codes 4q..4q+3; instruction q of the chunk's four m16n8k16 takes the
// lane's k pairs (2t, 2t+1) and (2t+8, 2t+9) from values 16t+4q+{0,1} and 16t+4q+{2,3},
// for x (x registers 2q and 2q+1 of the lane's eight bf16x2) and for the converted weights
// alike.
// Each value k of the chunk is thus paired with its own weight: the product is x·Wᵀ's.

// The weight load of skinny_gemm for codes: past L1, not volatile.
__device__ __forceinline__ uint4 tp_sk8_stream(const unsigned char* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// bf16x2 v times 2^120 (and -0.0, which keeps the sign of a zero product), one rounding.
__device__ __forceinline__ unsigned tp_sk8_times_2p120(unsigned v) {
  unsigned d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(v), "r"(0x7B807B80u), "r"(0x80008000u));
  return d;
}

// Four E4M3 codes (byte j of w is code j) as two bf16x2 of their exact values: codes 0, 1
// in .x and 2, 3 in .y, the lower index in the low half (mma operand order).
//
// Exact, subnormals included: a code's 7 magnitude bits written at bits 4..10 of a bf16,
// its sign at bit 15, put E4M3's 4-bit exponent field in the low four bits of bf16's 8-bit
// one and its 3 mantissa bits at the top of bf16's 7. That bf16 is the code's value times
// 2^(7 - 127) = 2^-120 for every code: for normals (exponent field e > 0) 2^(e-127) (1 + m/8)
// against E4M3's 2^(e-7) (1 + m/8), and for subnormals (e = 0) bf16's 2^-126 (m/8) against
// E4M3's 2^-6 (m/8), the same ratio, because both formats' subnormals continue their
// smallest binade the same way. One bf16x2 multiply-add by 2^120 then gives the value: the
// product is exact (at most 4 significant bits, magnitude 2^-9..448, inside bf16's normal
// range), and bf16 arithmetic takes subnormal inputs as they are (PTX has no flush-to-zero
// form of fma.bf16x2). The 2^120 goes here, not into the per-channel scale: with it left in,
// the products would be ~2^-120 and the f32 sums would lose them as subnormals.
// No sm_89 conversion instruction is used, so sm_80..sm_87 compile it too.
//
// The bits reach their place with whole-word operations: mag = the codes without their
// signs; sgn = each code's sign moved to bit 3 of its byte; one byte permute per pair puts
// code j's mag in the low byte and its sgn in the high byte of a half (sign at bit 11,
// magnitude at bits 0..6), and a shift by 4 moves both home (bits 15 and 4..10) without
// crossing into the other half. 9 instructions per 4 codes, the two fma included.
//
// NaN codes (0x7F, 0xFF; the quantisers never write them: they saturate at ±448) come out
// as ±480, the value of that bit pattern read as a finite number, not NaN.
__device__ __forceinline__ uint2 tp_sk8_bf16x4(unsigned w) {
  const unsigned mag = w & 0x7F7F7F7Fu;
  const unsigned sgn = (w >> 4) & 0x08080808u;
  // Bytes (low to high): mag 0, sgn 0, mag 1, sgn 1; then the same for codes 2 and 3.
  const unsigned lo = __byte_perm(mag, sgn, 0x5140) << 4;
  const unsigned hi = __byte_perm(mag, sgn, 0x7362) << 4;
  return make_uint2(tp_sk8_times_2p120(lo), tp_sk8_times_2p120(hi));
}

// tp_sk_accumulate for E4M3 weights (W [_, K] codes, row stride ldw bytes, 16-byte aligned
// rows; x as there; K a multiple of 16): the block's partial products, unscaled, into red,
// for tiles T·b .. T·b + T - 1 of 8 weight rows (tp_sk_wrow with pair_half; those at or
// past n_tiles skipped), and MT m16 tiles of x's rows (rows 16 mt .. 16 mt + 15; a tile
// past M is skipped, the whole warp alike): each converted weight fragment feeds all MT.
// red[(warp · MT + mt) · T + i] holds row tile mt, column tile i. Warp w sums K range
// [w·kslice, (w+1)·kslice), kslice a multiple of 64, in chunks of 64 (see the permutation
// above); in a chunk that K ends inside (K mod 64 = 16, 32 or 48) only the lanes t whose
// 16 values all lie below K load, the others feed zeros. Each lane keeps TP_SK_UNROLL · T
// 16-byte weight loads in flight; the first are requested before the wait for the previous
// kernel. Ends with __syncthreads.
template <int T, int MT>
__device__ __forceinline__ void tp_sk8_accumulate(const unsigned short* __restrict__ X,
                                                  long long ldx,
                                                  const unsigned char* __restrict__ W,
                                                  long long ldw, int pair_half, int n_tiles,
                                                  int M, int K, int kslice,
                                                  float (*red)[4][32]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kb = warp * kslice, ke = min(K, kb + kslice);
  const unsigned char* wrow[T];
  bool live[T];
#pragma unroll
  for (int i = 0; i < T; ++i) {
    const int tile = blockIdx.x * T + i;
    live[i] = tile < n_tiles;
    wrow[i] = W + (live[i] ? tp_sk_wrow(tile, g, pair_half) * ldw + 16 * t : 0);
  }
  float c[MT][T][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < T; ++i) c[mt][i][0] = c[mt][i][1] = c[mt][i][2] = c[mt][i][3] = 0.0f;

  // This lane's 16 values of the chunk at k exist where k + 16t < ke (k a multiple of 64,
  // ke of 16).
  uint4 w[TP_SK_UNROLL][T];
#pragma unroll
  for (int u = 0; u < TP_SK_UNROLL; ++u)
#pragma unroll
    for (int i = 0; i < T; ++i)
      w[u][i] = live[i] && kb + 64 * u + 16 * t < ke ? tp_sk8_stream(wrow[i] + kb + 64 * u)
                                                     : make_uint4(0u, 0u, 0u, 0u);
  tp_pdl_enter();
  for (int k = kb; k < ke; k += 64 * TP_SK_UNROLL) {
    if (k != kb) {
#pragma unroll
      for (int u = 0; u < TP_SK_UNROLL; ++u)
#pragma unroll
        for (int i = 0; i < T; ++i)
          w[u][i] = live[i] && k + 64 * u + 16 * t < ke ? tp_sk8_stream(wrow[i] + k + 64 * u)
                                                        : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < TP_SK_UNROLL; ++u) {
      const int kc = k + 64 * u;
      if (kc < ke) {
        const bool mine = kc + 16 * t < ke;
        uint2 q[T][4];
#pragma unroll
        for (int i = 0; i < T; ++i) {
          q[i][0] = tp_sk8_bf16x4(w[u][i].x);
          q[i][1] = tp_sk8_bf16x4(w[u][i].y);
          q[i][2] = tp_sk8_bf16x4(w[u][i].z);
          q[i][3] = tp_sk8_bf16x4(w[u][i].w);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (16 * mt >= M) continue;
          const int ra = 16 * mt + g;
          const bool in_a = ra < M && mine, in_b = ra + 8 < M && mine;
          const unsigned short* xa = X + (long long)ra * ldx + 16 * t + kc;
          const unsigned short* xb = xa + 8 * ldx;
          const uint4 a0 = tp_sk_row(xa, in_a), a1 = tp_sk_row(xa + 8, in_a);
          const uint4 b0 = tp_sk_row(xb, in_b), b1 = tp_sk_row(xb + 8, in_b);
#pragma unroll
          for (int i = 0; i < T; ++i) {
            tp_sk_mma(c[mt][i], a0.x, b0.x, a0.y, b0.y, q[i][0].x, q[i][0].y);
            tp_sk_mma(c[mt][i], a0.z, b0.z, a0.w, b0.w, q[i][1].x, q[i][1].y);
            tp_sk_mma(c[mt][i], a1.x, b1.x, a1.y, b1.y, q[i][2].x, q[i][2].y);
            tp_sk_mma(c[mt][i], a1.z, b1.z, a1.w, b1.w, q[i][3].x, q[i][3].y);
          }
        }
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) red[(warp * MT + mt) * T + i][j][lane] = c[mt][i][j];
  __syncthreads();
}

// The epilogue of the FP8 products: Y[m, n] for m < M, n < N over the block's MT row tiles
// and T column tiles of red, each sum scaled by scale[n]; then as skinny_gemm's (`add`,
// `gate`). The warps' sums are added in warp order, then scaled: replays give the same bits.
template <int T, int MT>
__device__ __forceinline__ void tp_sk8_out(float (*red)[4][32], const float* __restrict__ scale,
                                           void* __restrict__ Y, long long ldy, int y_f32,
                                           const float* __restrict__ gate, int add, int M,
                                           int N) {
  for (int e = threadIdx.x; e < 128 * T * MT; e += blockDim.x) {
    const int row = e / (8 * T), i = (e >> 3) % T, n = e & 7;
    const int col = (blockIdx.x * T + i) * 8 + n;
    if (row >= M || col >= N) continue;
    const float s = tp_sk_sum(red, T * MT, (row >> 4) * T + i, row & 15, n) * scale[col];
    const long long at = (long long)row * ldy + col;
    tp_sk_write(Y, at, y_f32, gate != 0 ? s * gate[col] : s, add || gate != 0);
  }
}

// Y[m, n] for m < M (at most 16), n < N (N a multiple of 8), as skinny_gemm, of x and the
// E4M3 weights (codes W, f32 scale [N]): Y = scale ⊙ (x·Wᵀ); with `add`, Y += that; with
// `gate` (f32 [N]), Y += gate[n] · scale[n] · (x·Wᵀ)[m, n].
extern "C" __global__ void __launch_bounds__(TP_SK_WARPS * 32) skinny_gemm_fp8(
    const unsigned short* __restrict__ X, long long ldx, const unsigned char* __restrict__ W,
    long long ldw, const float* __restrict__ scale, void* __restrict__ Y, long long ldy,
    int y_f32, const float* __restrict__ gate, int add, int M, int N, int K, int kslice) {
  __shared__ float red[TP_SK_WARPS * TP_SK_TILES][4][32];
  tp_sk8_accumulate<TP_SK_TILES, 1>(X, ldx, W, ldw, 0, N >> 3, M, K, kslice, red);
  tp_sk8_out<TP_SK_TILES, 1>(red, scale, Y, ldy, y_f32, gate, add, M, N);
}

// skinny_gemm_fp8 for 17..64 rows of x (pi0's 51 suffix tokens): the weights are read once,
// each converted fragment feeding four m16 tiles, and each block takes TP_SK8W_TILES tiles
// of 8 columns, so that x, which every block reads whole, is read from L2 once per
// 8 · TP_SK8W_TILES columns. At most TP_SK8W_WARPS warps (their partial sums share the
// block's 48 KB of static shared memory).
extern "C" __global__ void __launch_bounds__(TP_SK8W_WARPS * 32) skinny_gemm_fp8_wide(
    const unsigned short* __restrict__ X, long long ldx, const unsigned char* __restrict__ W,
    long long ldw, const float* __restrict__ scale, void* __restrict__ Y, long long ldy,
    int y_f32, const float* __restrict__ gate, int add, int M, int N, int K, int kslice) {
  __shared__ float red[TP_SK8W_WARPS * TP_SK8W_TILES * 4][4][32];
  tp_sk8_accumulate<TP_SK8W_TILES, 4>(X, ldx, W, ldw, 0, N >> 3, M, K, kslice, red);
  tp_sk8_out<TP_SK8W_TILES, 4>(red, scale, Y, ldy, y_f32, gate, add, M, N);
}

// GeGLU in the epilogue of the FP8 gate|up product (W [2 mlp, K] codes, scale f32 [2 mlp]),
// as skinny_gemm_geglu is for bf16 weights: out[m, c] = gelu_tanh(gate) · up, gate and up
// each scaled and rounded to bf16 as skinny_gemm_fp8's bf16 output holds them (the same
// bits as that product and gelu_gate). At most 16 rows.
extern "C" __global__ void __launch_bounds__(TP_SK_WARPS * 32) skinny_gemm_fp8_geglu(
    const unsigned short* __restrict__ X, long long ldx, const unsigned char* __restrict__ W,
    long long ldw, const float* __restrict__ scale, unsigned short* __restrict__ out,
    long long ldo, int M, int mlp, int K, int kslice) {
  __shared__ float red[TP_SK_WARPS][4][32];
  tp_sk8_accumulate<1, 1>(X, ldx, W, ldw, mlp, mlp >> 2, M, K, kslice, red);
  tp_sk_geglu_out(red, out, ldo, M, scale, mlp);
}
#endif
