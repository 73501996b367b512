// Prompt token embedding. Launcher: embed.rs.
// One block per token: out[i, :] = table[ids[i], :] * scale (f32 out, row stride w).
extern "C" __global__ void embed_tokens(const int* __restrict__ ids, const act_t* __restrict__ table,
                                        float* __restrict__ out, int w, float scale) {
  tp_pdl_enter();
  long long row = (long long)ids[blockIdx.x] * w;
  float* o = out + (long long)blockIdx.x * w;
  for (int c = threadIdx.x; c < w; c += blockDim.x) o[c] = tp_load(table, row + c) * scale;
}
