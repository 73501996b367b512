// Helpers shared by every kernel family, compiled first. `act_t` is the element type of
// weights and of the activations that feed GEMMs (f32, or bf16 kept as its 16 bits: the
// kernels convert by hand and need no CUDA header, so NVRTC needs no include path); the
// residual stream, norm statistics and softmax are f32. No fast-math: the kernels match the
// CPU twins. Every TP_* macro comes from NVRTC's -D options (kernels::defines in mod.rs).

#if TP_BF16
typedef unsigned short act_t;
#else
typedef float act_t;
#endif

// Programmatic dependent launch (sm_90+; no-ops before, and when the launch did not ask for
// it). A kernel may be started while the previous kernel on its stream drains (device.rs
// launches it so inside recorded graphs); `tp_pdl_wait` blocks until that predecessor has
// finished and its writes are visible, so every kernel calls it before it touches memory that
// another launch writes or reads (only constant weights may be read before it).
// `tp_pdl_launch_dependents` then lets the next kernel start early.
__device__ __forceinline__ void tp_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void tp_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Both, at the top of a kernel that reads nothing before its predecessor's results.
__device__ __forceinline__ void tp_pdl_enter() {
  tp_pdl_wait();
  tp_pdl_launch_dependents();
}

// The value v of an FP8 product of codes taken with unit scales stands for, given its input
// row's scale sx and its weight row's sw: v * (sx * sw) in rounded operations, so that the
// bf16 build's --fmad fuses nothing into it (CPU twin: fp8::rescale_product).
__device__ __forceinline__ float tp_e4m3_value(float v, float sx, float sw) {
  return __fmul_rn(__fmul_rn(sx, sw), v);
}

__device__ __forceinline__ float tp_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float tp_load(const unsigned short* p, long long i) {
  return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void tp_store(float* p, long long i, float v) { p[i] = v; }
// Round to nearest even, NaN kept quiet: the same rounding as half::bf16::from_f32.
__device__ __forceinline__ unsigned tp_bf16_bits(float v) {
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
// Two values as a bf16x2 register, the lower index in the low half (mma operand order).
__device__ __forceinline__ unsigned tp_pack_bf16(float lo, float hi) {
  return tp_bf16_bits(lo) | (tp_bf16_bits(hi) << 16);
}
__device__ __forceinline__ void tp_store(unsigned short* p, long long i, float v) {
  p[i] = (unsigned short)tp_bf16_bits(v);
}
// Four consecutive values from element i (16-byte aligned for f32, 8 for bf16) in one store.
__device__ __forceinline__ void tp_store4(float* p, long long i, float a, float b, float c,
                                          float d) {
  *reinterpret_cast<float4*>(p + i) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void tp_store4(unsigned short* p, long long i, float a, float b,
                                          float c, float d) {
  *reinterpret_cast<uint2*>(p + i) = make_uint2(tp_pack_bf16(a, b), tp_pack_bf16(c, d));
}
__device__ __forceinline__ float tp_neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float tp_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float tp_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double tp_warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum over the block (blockDim.x a multiple of 32); every thread gets the total.
// `red` is __shared__ double[32]; the leading barrier makes back-to-back calls safe.
__device__ double tp_block_sum_d(double v, double* red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = tp_warp_sum_d(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < warps ? red[lane] : 0.0;
    t = tp_warp_sum_d(t);
    if (lane == 0) red[0] = t;
  }
  __syncthreads();
  return red[0];
}

// PyTorch's gelu(approximate="tanh"), as cpu::gelu_tanh.
__device__ __forceinline__ float tp_gelu_tanh(float x) {
  const float k_beta = TP_GELU_BETA;
  const float k_kappa = TP_GELU_KAPPA;
  return 0.5f * x * (1.0f + tanhf(k_beta * (x + k_kappa * x * x * x)));
}
// As cpu::silu.
__device__ __forceinline__ float tp_silu(float x) { return x / (1.0f + expf(-x)); }
