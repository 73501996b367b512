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

// y[r, c] = act(xs[r] * ws[c] * p[r, c] + bias[c]), or that added to y[r, c] (add 1): an
// E4M3 product whose codes were multiplied with unit scales (p, dense [rows, n]) taken to the
// values it stands for, where cuBLASLt applies no scale per row of its operands (Hopper),
// with the bias (null: none) and activation (TP_ACT_*, as bias_act) of the layer folded in.
// y has row stride ldy. One grid-stride loop over the rows x n outputs; P and Y are f32 or
// act_t. Rounded operations throughout, so that the bf16 build's --fmad never fuses an add
// into the multiplies: the CPU twin's f32 operations.
template <typename Y, typename P>
__device__ __forceinline__ void tp_rescale_e4m3(Y* __restrict__ y, long long ldy,
                                                const P* __restrict__ p,
                                                const float* __restrict__ xs,
                                                const float* __restrict__ ws,
                                                const float* __restrict__ bias, int act, int n,
                                                long long total, int add) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / n;
    const int c = (int)(i - r * n);
    float v = tp_e4m3_value(tp_load(p, i), xs[r], ws[c]);
    if (bias != 0) v = __fadd_rn(v, bias[c]);
    v = tp_bias_act1(v, 0, c, act);
    const long long j = r * ldy + c;
    tp_store(y, j, add != 0 ? __fadd_rn(tp_load(y, j), v) : v);
  }
}

// The launcher's entry: y_f32 / p_f32 say which of f32 and act_t y and p hold.
extern "C" __global__ void rescale_e4m3(void* y, long long ldy, int y_f32, const void* p,
                                        int p_f32, const float* __restrict__ xs,
                                        const float* __restrict__ ws,
                                        const float* __restrict__ bias, int act, int rows, int n,
                                        int add) {
  tp_pdl_enter();
  const long long total = (long long)rows * n;
  if (y_f32 != 0 && p_f32 != 0) {
    tp_rescale_e4m3((float*)y, ldy, (const float*)p, xs, ws, bias, act, n, total, add);
  } else if (y_f32 != 0) {
    tp_rescale_e4m3((float*)y, ldy, (const act_t*)p, xs, ws, bias, act, n, total, add);
  } else if (p_f32 != 0) {
    tp_rescale_e4m3((act_t*)y, ldy, (const float*)p, xs, ws, bias, act, n, total, add);
  } else {
    tp_rescale_e4m3((act_t*)y, ldy, (const act_t*)p, xs, ws, bias, act, n, total, add);
  }
}
