// Residual add, plain or gated, and the f32 stream taking an activation-typed product.
// Launcher: residual.rs.
// x[r, c] += y[r, c] * gate[c] (gate null: x += y); f32 [rows, width], n = rows * width.
extern "C" __global__ void add_residual(float* __restrict__ x, const float* __restrict__ y,
                                        const float* __restrict__ gate, int width, long long n) {
  tp_pdl_enter();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    if (gate != 0) {
      x[i] += y[i] * gate[i % width];
    } else {
      x[i] += y[i];
    }
  }
}

// x[i] = y[i] (add 0) or x[i] + y[i] (add 1): f32 x from an activation-typed y (a product
// stored in bf16 where cuBLASLt has no f32 output for it); n elements.
extern "C" __global__ void add_act(float* __restrict__ x, const act_t* __restrict__ y, int add,
                                   long long n) {
  tp_pdl_enter();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    x[i] = (add != 0 ? x[i] : 0.0f) + tp_load(y, i);
  }
}
