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

// The Euler step guided by real-time chunking with the Jacobian term dropped (g = e; CPU
// twin: rtc::guided_euler_update), every operation rounded on its own in the twin's order:
// v = v_raw + bias[c]; a_hat = x - t v; e = w (y - a_hat); vg = v - coef[step] e;
// x = x + dt vg; x_act = x. coef (the guidance weight per step) is read from the device, so a
// captured graph serves any beta; t and dt are the step's constants.
extern "C" __global__ void euler_step_guided(float* __restrict__ x, act_t* __restrict__ x_act,
                                             const float* __restrict__ v_raw,
                                             const float* __restrict__ bias,
                                             const float* __restrict__ weight,
                                             const float* __restrict__ target,
                                             const float* __restrict__ coef, int step, float t,
                                             float dt, int width, int n) {
  tp_pdl_enter();
  const float c = coef[step];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float v = __fadd_rn(v_raw[i], bias[i % width]);
    float xi = x[i];
    float a_hat = __fsub_rn(xi, __fmul_rn(t, v));
    float e = __fmul_rn(weight[i], __fsub_rn(target[i], a_hat));
    float vg = __fsub_rn(v, __fmul_rn(c, e));
    float nx = __fadd_rn(xi, __fmul_rn(dt, vg));
    x[i] = nx;
    tp_store(x_act, i, nx);
  }
}
