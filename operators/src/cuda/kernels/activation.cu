// Bias + activation + cast epilogue. Launcher: activation.rs (TP_ACT_* are its `Act`).
// out[r, c] = act(x[r * ldx + c] + bias[c]) for r < rows, c < width; act TP_ACT_SILU: silu,
// TP_ACT_GELU_TANH: gelu_tanh, anything else: identity. bias, out_f32 and out_act may each
// be null; in place is allowed. Each thread computes `vec` consecutive values of one row (4
// when the launcher found every row and the bias 16-byte aligned, so that they move in
// vector loads and stores; else 1).
__device__ __forceinline__ float tp_bias_act1(float v, const float* bias, long long c, int act) {
  if (bias != 0) v = v + bias[c];
  if (act == TP_ACT_SILU) v = tp_silu(v);
  else if (act == TP_ACT_GELU_TANH) v = tp_gelu_tanh(v);
  return v;
}

extern "C" __global__ void bias_act(const float* x, int ldx, const float* bias, int act,
                                    float* out_f32, act_t* out_act, int ldo, int rows, int width,
                                    int vec) {
  tp_pdl_enter();
  const int per_row = width / vec;
  const long long n = (long long)rows * per_row;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row;
    const long long c = (i - r * per_row) * vec;
    if (vec == 4) {
      const float4 xv = *reinterpret_cast<const float4*>(x + r * ldx + c);
      const float v0 = tp_bias_act1(xv.x, bias, c, act), v1 = tp_bias_act1(xv.y, bias, c + 1, act);
      const float v2 = tp_bias_act1(xv.z, bias, c + 2, act), v3 = tp_bias_act1(xv.w, bias, c + 3, act);
      if (out_f32 != 0) tp_store4(out_f32, r * ldo + c, v0, v1, v2, v3);
      if (out_act != 0) tp_store4(out_act, r * ldo + c, v0, v1, v2, v3);
      continue;
    }
    for (int j = 0; j < vec; ++j) {
      const float v = tp_bias_act1(x[r * ldx + c + j], bias, c + j, act);
      if (out_f32 != 0) out_f32[r * ldo + c + j] = v;
      if (out_act != 0) tp_store(out_act, r * ldo + c + j, v);
    }
  }
}
