// GeGLU's gated product. Launcher: mlp.rs.
// gu: [rows, 2 * mlp] (gate | up); out: [rows, mlp]; n = rows * mlp.
extern "C" __global__ void gelu_gate(const act_t* __restrict__ gu, act_t* __restrict__ out,
                                     int mlp, long long n) {
  tp_pdl_enter();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    long long r = i / mlp;
    long long c = i - r * mlp;
    float g = tp_load(gu, r * 2 * mlp + c);
    float u = tp_load(gu, r * 2 * mlp + mlp + c);
    tp_store(out, i, tp_gelu_tanh(g) * u);
  }
}
