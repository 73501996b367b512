// The flow-matching Euler step. Launcher: euler.rs.
// v = v_raw + bias[c]; x = x + dt * v (separately rounded, as the CPU); x_act = x.
extern "C" __global__ void euler_step(float* __restrict__ x, act_t* __restrict__ x_act,
                                      const float* __restrict__ v_raw, const float* __restrict__ bias,
                                      float dt, int width, int n) {
  tp_pdl_enter();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = __fadd_rn(v_raw[i], bias[i % width]);
    float nx = __fadd_rn(x[i], __fmul_rn(dt, v));
    x[i] = nx;
    tp_store(x_act, i, nx);
  }
}
