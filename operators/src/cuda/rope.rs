//! Half-split rotary embedding of the fused q|k|v projection, with HF's f32 inv_freq. It also
//! scatters: q goes to the grouped layout that attention's GEMMs read ([kv][rows][group][hd]:
//! the query heads sharing a KV head are consecutive rows), k (rotated) and v go to rows
//! `out_row0..` of the per-layer K/V cache. CPU twin: [`crate::cpu::rope`].

use super::compile::Kernels;
use super::device::{int, launch, Args, DType, Lane, View};
use crate::{Error, Result};

pub(crate) const SOURCE: &str = r#"
// One block per row r < rows. qkv: [rows, (nh + 2 kv) hd]; position of row r = pos0[0] + r.
// q_out: [kv][rows][nh / kv][hd]; k_out, v_out: row out_row0 + r of [_, kv hd].
extern "C" __global__ void rope_qkv(const act_t* __restrict__ qkv, act_t* __restrict__ q_out,
                                    act_t* __restrict__ k_out, act_t* __restrict__ v_out,
                                    const float* __restrict__ inv_freq, const int* __restrict__ pos0,
                                    int rows, int nh, int kv, int hd, int out_row0) {
  int r = blockIdx.x;
  if (r >= rows) return;
  int half = hd / 2;
  int group = nh / kv;
  int kvw = kv * hd;
  const act_t* src = qkv + (long long)r * (nh + 2 * kv) * hd;
  float pos = (float)(pos0[0] + r);
  int n_rot = (nh + kv) * half;
  int total = n_rot + kvw;
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
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
        long long base = (((long long)g * rows + r) * group + jj) * hd;
        tp_store(q_out, base + j, o1);
        tp_store(q_out, base + j + half, o2);
      } else {
        long long base = (long long)(out_row0 + r) * kvw + (long long)(h - nh) * hd;
        tp_store(k_out, base + j, o1);
        tp_store(k_out, base + j + half, o2);
      }
    } else {
      int i = t - n_rot;
      v_out[(long long)(out_row0 + r) * kvw + i] = src[(nh + kv) * hd + i];
    }
  }
}
"#;

/// Head geometry of a Gemma attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub nh: usize,
    pub kv: usize,
    pub hd: usize,
}

impl Heads {
    pub fn group(&self) -> usize {
        self.nh / self.kv
    }
    pub fn kv_width(&self) -> usize {
        self.kv * self.hd
    }
    /// Width of the fused q|k|v projection.
    pub fn qkv_width(&self) -> usize {
        (self.nh + 2 * self.kv) * self.hd
    }
}

/// RoPE on q and k of `qkv` [rows, qkv_width] at positions `pos0[0] + r` (`pos0`: device
/// i32); writes q grouped to `q_out` and k, v to rows `out_row0..out_row0 + rows` of the
/// caches `k_out`, `v_out` ([cap, kv * hd]).
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    k: &Kernels,
    lane: &Lane,
    qkv: View,
    q_out: View,
    k_out: View,
    v_out: View,
    inv_freq: View,
    pos0: View,
    rows: usize,
    heads: Heads,
    out_row0: usize,
) -> Result<()> {
    let Heads { nh, kv, hd } = heads;
    if kv == 0 || nh % kv != 0 || hd % 2 != 0 {
        return Err(Error::Cuda(format!(
            "internal: rope heads {nh}/{kv}, head_dim {hd}"
        )));
    }
    qkv.need(k.act, rows * heads.qkv_width(), "rope qkv")?;
    q_out.need(k.act, rows * nh * hd, "rope q output")?;
    k_out.need(k.act, (out_row0 + rows) * heads.kv_width(), "rope k cache")?;
    v_out.need(k.act, (out_row0 + rows) * heads.kv_width(), "rope v cache")?;
    inv_freq.need(DType::F32, hd / 2, "rope inv_freq")?;
    pos0.need(DType::I32, 1, "rope position")?;
    let args = Args::new()
        .ptr(qkv)
        .ptr(q_out)
        .ptr(k_out)
        .ptr(v_out)
        .ptr(inv_freq)
        .ptr(pos0)
        .i32(int(rows, "rows")?)
        .i32(int(nh, "heads")?)
        .i32(int(kv, "kv heads")?)
        .i32(int(hd, "head_dim")?)
        .i32(int(out_row0, "cache row")?);
    launch(&k.rope_qkv, lane, "rope_qkv", rows, 256, args)
}
