// GeGLU's gated product. Launcher: mlp.rs.
// gu: [rows, 2 * mlp] (gate | up); out: [rows, mlp]. Each thread computes `vec` consecutive
// outputs of one row (8 when mlp is a multiple of 8 and the rows are 16-byte aligned, so
// that bf16 operands move in 16-byte loads; else 1); `groups` = rows * mlp / vec.
// With xs non-null, gu is an FP8 product of codes taken with unit scales, and each value is
// first brought to what it stands for (tp_e4m3_value; ws over all 2 * mlp columns), as
// rescale_e4m3 computes it.
__device__ __forceinline__ float tp_gate_scaled(float v, const float* xs, const float* ws,
                                                long long r, long long c) {
  return xs == 0 ? v : tp_e4m3_value(v, xs[r], ws[c]);
}

extern "C" __global__ void gelu_gate(const act_t* __restrict__ gu, act_t* __restrict__ out,
                                     int mlp, int vec, long long groups,
                                     const float* __restrict__ xs,
                                     const float* __restrict__ ws) {
  tp_pdl_enter();
  const int per_row = mlp / vec;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < groups;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / per_row;
    const long long c = (i - r * per_row) * vec;
    const act_t* gr = gu + r * 2 * mlp + c;
    act_t* o = out + r * mlp + c;
#if TP_BF16
    if (vec == 8) {
      const uint4 gv = *reinterpret_cast<const uint4*>(gr);
      const uint4 uv = *reinterpret_cast<const uint4*>(gr + mlp);
      const unsigned gw[4] = {gv.x, gv.y, gv.z, gv.w}, uw[4] = {uv.x, uv.y, uv.z, uv.w};
      unsigned ow[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const long long c0 = c + 2 * j;
        const float g0 = tp_gate_scaled(__uint_as_float(gw[j] << 16), xs, ws, r, c0);
        const float g1 = tp_gate_scaled(__uint_as_float(gw[j] & 0xffff0000u), xs, ws, r, c0 + 1);
        const float u0 = tp_gate_scaled(__uint_as_float(uw[j] << 16), xs, ws, r, mlp + c0);
        const float u1 =
            tp_gate_scaled(__uint_as_float(uw[j] & 0xffff0000u), xs, ws, r, mlp + c0 + 1);
        ow[j] = tp_pack_bf16(tp_gelu_tanh(g0) * u0, tp_gelu_tanh(g1) * u1);
      }
      *reinterpret_cast<uint4*>(o) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
      continue;
    }
#endif
    for (int j = 0; j < vec; ++j) {
      const float g = tp_gate_scaled(tp_load(gr, j), xs, ws, r, c + j);
      const float u = tp_gate_scaled(tp_load(gr, mlp + j), xs, ws, r, mlp + c + j);
      tp_store(o, j, tp_gelu_tanh(g) * u);
    }
  }
}
