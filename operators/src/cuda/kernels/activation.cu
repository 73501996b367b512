// Bias + activation + cast epilogue. Launcher: activation.rs (TP_ACT_* are its `Act`).
// out[r, c] = act(x[r * ldx + c] + bias[c]) for r < rows, c < width; act TP_ACT_SILU: silu,
// TP_ACT_GELU_TANH: gelu_tanh, anything else: identity. bias, out_f32 and out_act may each
// be null; in place is allowed.
extern "C" __global__ void bias_act(const float* x, int ldx, const float* bias, int act,
                                    float* out_f32, act_t* out_act, int ldo, int rows, int width) {
  tp_pdl_enter();
  long long n = (long long)rows * width;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    long long r = i / width;
    long long c = i - r * width;
    float v = x[r * ldx + c];
    if (bias != 0) v = v + bias[c];
    if (act == TP_ACT_SILU) v = tp_silu(v);
    else if (act == TP_ACT_GELU_TANH) v = tp_gelu_tanh(v);
    if (out_f32 != 0) out_f32[r * ldo + c] = v;
    if (out_act != 0) tp_store(out_act, r * ldo + c, v);
  }
}
