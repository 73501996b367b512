// Random weights on the device (benchmarks). Launcher: crate::cuda::weights::fill_uniform.
// Uniform values in [lo, hi) from a counter hash (splitmix64) of (seed, i); one of the two
// outputs is not null.
extern "C" __global__ void fill_uniform(act_t* out_act, float* out_f32, long long n,
                                        unsigned long long seed, float lo, float hi) {
  tp_pdl_enter();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    unsigned long long z = seed + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    float v = lo + (hi - lo) * u;
    if (out_act != 0) tp_store(out_act, i, v);
    if (out_f32 != 0) out_f32[i] = v;
  }
}
