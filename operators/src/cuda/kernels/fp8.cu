// FP8 E4M3 quantisation per row (the "fn" variant: no infinities, largest finite 448). Launcher:
// fp8.rs; CPU twin: fp8::quantise_rows (codes and scales bit for bit). Used on weights at load
// (per output channel) and on the activations of W8A8 layers per frame (per token). The
// conversion is written out on the bits rather than with cvt.e4m3x2 (sm_89+), so it compiles
// for every architecture and is exactly the CPU's; it is elementwise work next to the GEMMs.

// x as E4M3: round to nearest even, saturate at 448, NaN kept, sign of zero kept.
__device__ __forceinline__ unsigned char tp_e4m3(float x) {
  const unsigned int u = __float_as_uint(x);
  const unsigned char sign = (unsigned char)((u >> 24) & 0x80u);
  const float a = fabsf(x);
  if (a != a) return sign | 0x7Fu;
  if (a >= 448.0f) return sign | 0x7Eu;
  // Below 2^-6: steps of 2^-9 from zero (8 steps is the smallest normal's code, 0x08).
  if (a < 0.015625f) return sign | (unsigned char)rintf(a * 512.0f);
  const unsigned int b = __float_as_uint(a);
  const int e = (int)(b >> 23) - 127;
  const unsigned int keep = (b >> 20) & 7u, rest = b & 0xFFFFFu;
  const unsigned int up = rest > 0x80000u || (rest == 0x80000u && (keep & 1u));
  const unsigned int code = ((((unsigned int)(e + 7)) << 3) | keep) + up;
  return sign | (unsigned char)(code < 0x7Eu ? code : 0x7Eu);
}

// The largest of v over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets it. NaNs are passed over (fmaxf), as the CPU twin's f32::max does.
__device__ float tp_block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = tp_warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : 0.0f;
  return tp_warp_max(v);
}

// Row r of x [rows, width] (row stride ldx, act_t) -> scale[r] = max |row| / 448 (1 where
// that is not a normal float: a row of zeros stays zeros), q[r, c] = E4M3(x[r, c] / scale[r])
// (row stride ldq). One block per row.
extern "C" __global__ void quantise_e4m3(const act_t* __restrict__ x, long long ldx, int width,
                                         unsigned char* __restrict__ q, long long ldq,
                                         float* __restrict__ scale, int rows) {
  __shared__ float red[32];
  tp_pdl_enter();
  const int r = blockIdx.x;
  if (r >= rows) return;
  const act_t* xr = x + (long long)r * ldx;
  float amax = 0.0f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) amax = fmaxf(amax, fabsf(tp_load(xr, c)));
  amax = tp_block_max(amax, red);
  float s = amax / 448.0f;
  // is-normal: not zero, subnormal, infinite or NaN.
  if (!(s >= 1.17549435e-38f && s <= 3.40282347e38f)) s = 1.0f;
  if (threadIdx.x == 0) scale[r] = s;
  unsigned char* qr = q + (long long)r * ldq;
  for (int c = threadIdx.x; c < width; c += blockDim.x) qr[c] = tp_e4m3(tp_load(xr, c) / s);
}
