// The masked softmax and head unpermute of the GEMM attention path. Launchers: attention.rs.
// One warp per row of S [rows, n_keys] (f32, already scaled, row stride ld); writes P (same
// layout; the padding columns n_keys..ld are left alone).
// Key j is visible to row r when
//   j <  prefix_cap: j < plen (plen = *prefix_len, or prefix_cap when prefix_len is null);
//   j >= prefix_cap: s = j - prefix_cap is a suffix key, visible when s < n_state or
//                    q >= n_state, with q = (r % rows_per_batch) / group the query index.
// Rows that see nothing get all-zero probabilities, as cpu::softmax_masked.
extern "C" __global__ void softmax_masked(const float* __restrict__ S, act_t* __restrict__ P,
                                          int rows, int n_keys, int ld, const int* __restrict__ prefix_len,
                                          int prefix_cap, int n_state, int rows_per_batch, int group) {
  tp_pdl_enter();
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  long long r = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
  if (r >= rows) return;
  int plen = prefix_len != 0 ? prefix_len[0] : prefix_cap;
  int q = (int)((r % rows_per_batch) / group);
  bool late = q >= n_state;
  const float* s = S + r * ld;
  act_t* p = P + r * ld;
  float m = tp_neg_inf();
  for (int j = lane; j < n_keys; j += 32) {
    bool vis = j < prefix_cap ? j < plen : ((j - prefix_cap) < n_state || late);
    if (vis) m = fmaxf(m, s[j]);
  }
  m = tp_warp_max(m);
  if (m == tp_neg_inf()) {
    for (int j = lane; j < n_keys; j += 32) tp_store(p, j, 0.0f);
    return;
  }
  float sum = 0.0f;
  for (int j = lane; j < n_keys; j += 32) {
    bool vis = j < prefix_cap ? j < plen : ((j - prefix_cap) < n_state || late);
    if (vis) sum += expf(s[j] - m);
  }
  sum = tp_warp_sum(sum);
  float inv = 1.0f / sum;
  for (int j = lane; j < n_keys; j += 32) {
    bool vis = j < prefix_cap ? j < plen : ((j - prefix_cap) < n_state || late);
    tp_store(p, j, vis ? expf(s[j] - m) * inv : 0.0f);
  }
}

// in: grouped [kv][rows][group][hd] -> out: [rows][kv * group * hd] (heads in order).
extern "C" __global__ void unpermute_heads(const act_t* __restrict__ in, act_t* __restrict__ out,
                                           int rows, int kv, int group, int hd) {
  tp_pdl_enter();
  long long width = (long long)kv * group * hd;
  long long n = (long long)rows * width;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    long long r = i / width;
    long long rem = i - r * width;
    long long h = rem / hd;
    long long d = rem - h * hd;
    long long g = h / group;
    long long jj = h - g * group;
    out[i] = in[((g * rows + r) * group + jj) * hd + d];
  }
}
