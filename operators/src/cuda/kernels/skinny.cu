// Few-row GEMMs on the tensor cores (bf16, sm_80+: mma.sync): the action expert's products at
// pi0.5's 10-token horizon against weights of 0.5-17 MB, which cuBLASLt runs with tiles made
// for many rows. Each weight byte is read exactly once, in 16-byte loads, by enough warps to keep the
// memory busy: a block owns 8 output columns and its warps split K; the warps'
// partial sums are added in a fixed order (replays and split stages agree bit for bit).
// Compiled only into the bf16 program. Launcher: skinny.rs; CPU twin: cpu::Linear::forward
// followed by cpu::add_residual (with the gate).
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

// Y[m, n] for m < M (M <= 16), n < N (N a multiple of 8), over K (a multiple of 32): Y = acc;
// with `add`, Y += acc; with `gate` (f32 [N]), Y += gate[n] · acc. X [M, K] (row stride ldx),
// W [N, K] (row stride ldw), both with 16-byte aligned rows; Y f32 (y_f32) or bf16, row stride
// ldy. Block b: columns 8b..8b+7; warp w of the block's blockDim.x / 32 (at most TP_SK_WARPS):
// K range [w·kslice, (w+1)·kslice). Each lane keeps TP_SK_UNROLL 16-byte weight loads in flight.
extern "C" __global__ void __launch_bounds__(TP_SK_WARPS * 32) skinny_gemm(
    const unsigned short* __restrict__ X, long long ldx, const unsigned short* __restrict__ W,
    long long ldw, void* __restrict__ Y, long long ldy, int y_f32,
    const float* __restrict__ gate, int add, int M, int N, int K, int kslice) {
  __shared__ float red[TP_SK_WARPS][4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warps = blockDim.x >> 5;
  const int n0 = blockIdx.x * 8;
  const int kb = warp * kslice, ke = min(K, kb + kslice);
  const unsigned short* wrow = W + (long long)(n0 + g) * ldw + 8 * t;
  const bool in_a = g < M, in_b = g + 8 < M;
  const unsigned short* xa = X + (long long)g * ldx + 8 * t;
  const unsigned short* xb = X + (long long)(g + 8) * ldx + 8 * t;
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  // TP_SK_UNROLL chunks of weights in flight per lane (fewer at the end of the slice), then
  // their products. The weights are constant: the first chunks are requested before waiting
  // for the previous kernel (programmatic dependent launch), whose output x may be.
  uint4 w[TP_SK_UNROLL];
#pragma unroll
  for (int u = 0; u < TP_SK_UNROLL; ++u)
    w[u] = kb + 32 * u < ke ? tp_sk_stream(wrow + kb + 32 * u) : make_uint4(0u, 0u, 0u, 0u);
  tp_pdl_enter();
  for (int k = kb; k < ke; k += 32 * TP_SK_UNROLL) {
    if (k != kb) {
#pragma unroll
      for (int u = 0; u < TP_SK_UNROLL; ++u)
        w[u] = k + 32 * u < ke ? tp_sk_stream(wrow + k + 32 * u) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < TP_SK_UNROLL; ++u) {
      if (k + 32 * u < ke) {
        const uint4 a = tp_sk_row(xa + k + 32 * u, in_a), b = tp_sk_row(xb + k + 32 * u, in_b);
        tp_sk_mma(c, a.x, b.x, a.y, b.y, w[u].x, w[u].y);
        tp_sk_mma(c, a.z, b.z, a.w, b.w, w[u].z, w[u].w);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) red[warp][j][lane] = c[j];
  __syncthreads();
  // One thread per output value (lane L = (g, t), fragment value j): row g + 8 (j >> 1),
  // column n0 + 2t + (j & 1); the warps' sums added in warp order.
  for (int e = threadIdx.x; e < 128; e += blockDim.x) {
    const int L = e >> 2, j = e & 3;
    const int row = (L >> 2) + 8 * (j >> 1), col = n0 + 2 * (L & 3) + (j & 1);
    if (row >= M) continue;
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += red[w][j][L];
    const long long at = (long long)row * ldy + col;
    if (gate != 0) s *= gate[col];
    if (y_f32) {
      float* y = reinterpret_cast<float*>(Y);
      y[at] = (add || gate != 0) ? y[at] + s : s;
    } else {
      unsigned short* y = reinterpret_cast<unsigned short*>(Y);
      tp_store(y, at, (add || gate != 0) ? tp_load(y, at) + s : s);
    }
  }
}
#endif
