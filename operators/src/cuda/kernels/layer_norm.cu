// LayerNorm. Launcher: layer_norm.rs.
// One block per row. x: f32 [rows, width], the residual stream. When pre_bias is not null,
// x += pre_bias first and is written back: the bias of the Linear that last added into x.
extern "C" __global__ void layer_norm(float* __restrict__ x, const float* __restrict__ pre_bias,
                                      const float* __restrict__ w, const float* __restrict__ b,
                                      act_t* __restrict__ y, int width, double eps) {
  tp_pdl_enter();
  __shared__ double red[32];
  float* xr = x + (long long)blockIdx.x * width;
  act_t* yr = y + (long long)blockIdx.x * width;
  double s = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = xr[i];
    if (pre_bias != 0) { v += pre_bias[i]; xr[i] = v; }
    s += (double)v;
  }
  double mean = tp_block_sum_d(s, red) / (double)width;
  double q = 0.0;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    double d = (double)xr[i] - mean;
    q += d * d;
  }
  double var = tp_block_sum_d(q, red) / (double)width;
  float inv = (float)(1.0 / sqrt(var + eps));
  float m = (float)mean;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    tp_store(yr, i, (xr[i] - m) * inv * w[i] + b[i]);
  }
}
