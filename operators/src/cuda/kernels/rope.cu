// Rotary embedding of q|k|v with the scatter to the grouped q and the K/V cache.
// Launcher: rope.rs.
// Block (r, c): row r < rows, items c·blockDim.x + threadIdx.x (then every gridDim.y ·
// blockDim.x further), so that the few rows of the denoise loop still spread over many SMs.
// The rows are a batch of rows / per sequences of `per` rows: row r = b·per + i is row i of
// sequence b, at position pos0[b·pos_stride] + i, with its K/V cache cache_stride elements
// after sequence b-1's (one sequence: per = rows, and the strides are never read).
// qkv: [rows, (nh + 2 kv) hd]; q_out: [b][kv][per][nh / kv][hd]; k_out, v_out: row
// out_row0 + i of sequence b's [_, kv hd].
extern "C" __global__ void rope_qkv(const act_t* __restrict__ qkv, act_t* __restrict__ q_out,
                                    act_t* __restrict__ k_out, act_t* __restrict__ v_out,
                                    const float* __restrict__ inv_freq, const int* __restrict__ pos0,
                                    int rows, int nh, int kv, int hd, int out_row0, int per,
                                    int pos_stride, long long cache_stride) {
  tp_pdl_enter();
  int r = blockIdx.x;
  if (r >= rows) return;
  int half = hd / 2;
  int group = nh / kv;
  int kvw = kv * hd;
  const int seq = r / per, i = r - seq * per;
  const act_t* src = qkv + (long long)r * (nh + 2 * kv) * hd;
  float pos = (float)(pos0[(long long)seq * pos_stride] + i);
  const long long q_seq = (long long)seq * nh * per * hd;
  const long long cache = (long long)seq * cache_stride + (long long)(out_row0 + i) * kvw;
  int n_rot = (nh + kv) * half;
  int total = n_rot + kvw;
  for (int t = blockIdx.y * blockDim.x + threadIdx.x; t < total; t += gridDim.y * blockDim.x) {
    if (t < n_rot) {
      int h = t / half;
      int j = t - h * half;
      float angle = inv_freq[j] * pos;
      float c = cosf(angle);
      float s = sinf(angle);
      float a = tp_load(src, h * hd + j);
      float b = tp_load(src, h * hd + j + half);
      float o1 = a * c - b * s;
      float o2 = b * c + a * s;
      if (h < nh) {
        int g = h / group;
        int jj = h - g * group;
        long long base = q_seq + (((long long)g * per + i) * group + jj) * hd;
        tp_store(q_out, base + j, o1);
        tp_store(q_out, base + j + half, o2);
      } else {
        long long base = cache + (long long)(h - nh) * hd;
        tp_store(k_out, base + j, o1);
        tp_store(k_out, base + j + half, o2);
      }
    } else {
      const int c = t - n_rot;
      v_out[cache + c] = src[(nh + kv) * hd + c];
    }
  }
}
