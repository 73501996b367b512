// Residual add, plain or gated. Launcher: residual.rs.
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
