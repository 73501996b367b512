// RMSNorm, plain and adaptive. Launcher: rms_norm.rs.
// One block per row. x: f32 [rows, width]. Exactly one of w1p (1 + weight, precomputed in
// f32 as the CPU computes it) and mod ([scale | shift | gate], f32 [3 * width]) is not null.
// With `vec` (the launcher's choice: width == 4 · blockDim.x, every row and parameter 16-byte
// aligned) each thread holds its 4 values in registers from one float4 load; else threads
// stride over the row.
__device__ __forceinline__ float tp_rms_value(float v, float inv, const float* w1p,
                                              const float* mod, int width, int i) {
  v = v * inv;
  return w1p != 0 ? v * w1p[i] : v * (1.0f + mod[i]) + mod[width + i];
}

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w1p,
                                    const float* __restrict__ mod, act_t* __restrict__ y,
                                    int width, double eps, int vec) {
  tp_pdl_enter();
  __shared__ double red[32];
  const float* xr = x + (long long)blockIdx.x * width;
  act_t* yr = y + (long long)blockIdx.x * width;
  if (vec) {
    const int i = 4 * threadIdx.x;
    const float4 v = *reinterpret_cast<const float4*>(xr + i);
    double s = (double)v.x * (double)v.x;
    s += (double)v.y * (double)v.y;
    s += (double)v.z * (double)v.z;
    s += (double)v.w * (double)v.w;
    const double ms = tp_block_sum_d(s, red) / (double)width;
    const float inv = (float)(1.0 / sqrt(ms + eps));
    const float o0 = tp_rms_value(v.x, inv, w1p, mod, width, i);
    const float o1 = tp_rms_value(v.y, inv, w1p, mod, width, i + 1);
    const float o2 = tp_rms_value(v.z, inv, w1p, mod, width, i + 2);
    const float o3 = tp_rms_value(v.w, inv, w1p, mod, width, i + 3);
    tp_store4(yr, i, o0, o1, o2, o3);
    return;
  }
  double s = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    double v = (double)xr[i];
    s += v * v;
  }
  double ms = tp_block_sum_d(s, red) / (double)width;
  float inv = (float)(1.0 / sqrt(ms + eps));
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    tp_store(yr, i, tp_rms_value(xr[i], inv, w1p, mod, width, i));
  }
}
