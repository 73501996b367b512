// RMSNorm, plain and adaptive. Launcher: rms_norm.rs.
// One block per row. x: f32 [rows, width]. Exactly one of w1p (1 + weight, precomputed in
// f32 as the CPU computes it) and mod ([scale | shift | gate], f32 [3 * width]) is not null.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w1p,
                                    const float* __restrict__ mod, act_t* __restrict__ y,
                                    int width, double eps) {
  tp_pdl_enter();
  __shared__ double red[32];
  const float* xr = x + (long long)blockIdx.x * width;
  act_t* yr = y + (long long)blockIdx.x * width;
  double s = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    double v = (double)xr[i];
    s += v * v;
  }
  double ms = tp_block_sum_d(s, red) / (double)width;
  float inv = (float)(1.0 / sqrt(ms + eps));
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = xr[i] * inv;
    if (w1p != 0) {
      v = v * w1p[i];
    } else {
      v = v * (1.0f + mod[i]) + mod[width + i];
    }
    tp_store(yr, i, v);
  }
}
