//! Prompt token embedding: rows of the (tied) embedding table times sqrt(width) as an f32
//! scalar, written straight into the prefix's residual stream. CPU twin: the gather in
//! [`crate::policy::PrefixEncoder::run`].

use super::compile::Kernels;
use super::device::{int, launch, Args, DType, Lane, View};
use crate::Result;

pub(crate) const SOURCE: &str = r#"
// One block per token: out[i, :] = table[ids[i], :] * scale (f32 out, row stride w).
extern "C" __global__ void embed_tokens(const int* __restrict__ ids, const act_t* __restrict__ table,
                                        float* __restrict__ out, int w, float scale) {
  long long row = (long long)ids[blockIdx.x] * w;
  float* o = out + (long long)blockIdx.x * w;
  for (int c = threadIdx.x; c < w; c += blockDim.x) o[c] = tp_load(table, row + c) * scale;
}
"#;

/// out[n, w] = table[ids] * scale. The ids were checked against the vocabulary on the host.
#[allow(clippy::too_many_arguments)]
pub fn embed_tokens(
    k: &Kernels,
    lane: &Lane,
    ids: View,
    table: View,
    out: View,
    n: usize,
    vocab: usize,
    w: usize,
    scale: f32,
) -> Result<()> {
    ids.need(DType::I32, n, "token ids")?;
    table.need(k.act, vocab * w, "embedding table")?;
    out.need(DType::F32, n * w, "token embeddings")?;
    let args = Args::new()
        .ptr(ids)
        .ptr(table)
        .ptr(out)
        .i32(int(w, "width")?)
        .f32(scale);
    launch(&k.embed_tokens, lane, "embed_tokens", n, 256, args)
}
