// LayerNorm. Launcher: layer_norm.rs.
// One block per row. x: f32 [rows, width], the residual stream. When pre_bias is not null,
// x += pre_bias first and is written back: the bias of the Linear that last added into x.
// With `vec` (the launcher's choice: width == 4 · blockDim.x, every row and parameter 16-byte
// aligned) each thread holds its 4 values in registers from one float4 load; else threads
// stride over the row.
extern "C" __global__ void layer_norm(float* __restrict__ x, const float* __restrict__ pre_bias,
                                      const float* __restrict__ w, const float* __restrict__ b,
                                      act_t* __restrict__ y, int width, double eps, int vec) {
  tp_pdl_enter();
  __shared__ double red[32];
  float* xr = x + (long long)blockIdx.x * width;
  act_t* yr = y + (long long)blockIdx.x * width;
  if (vec) {
    const int i = 4 * threadIdx.x;
    float4 v = *reinterpret_cast<const float4*>(xr + i);
    if (pre_bias != 0) {
      const float4 pb = *reinterpret_cast<const float4*>(pre_bias + i);
      v = make_float4(v.x + pb.x, v.y + pb.y, v.z + pb.z, v.w + pb.w);
      *reinterpret_cast<float4*>(xr + i) = v;
    }
    double s = (double)v.x;
    s += (double)v.y;
    s += (double)v.z;
    s += (double)v.w;
    const double mean = tp_block_sum_d(s, red) / (double)width;
    const double d0 = (double)v.x - mean, d1 = (double)v.y - mean;
    const double d2 = (double)v.z - mean, d3 = (double)v.w - mean;
    double q = d0 * d0;
    q += d1 * d1;
    q += d2 * d2;
    q += d3 * d3;
    const double var = tp_block_sum_d(q, red) / (double)width;
    const float inv = (float)(1.0 / sqrt(var + eps));
    const float m = (float)mean;
    const float4 wv = *reinterpret_cast<const float4*>(w + i);
    const float4 bv = *reinterpret_cast<const float4*>(b + i);
    tp_store4(yr, i, (v.x - m) * inv * wv.x + bv.x, (v.y - m) * inv * wv.y + bv.y,
              (v.z - m) * inv * wv.z + bv.z, (v.w - m) * inv * wv.w + bv.w);
    return;
  }
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
