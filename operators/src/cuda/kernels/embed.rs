//! Prompt token embedding: rows of the (tied) embedding table times sqrt(width) as an f32
//! scalar, written straight into the prefix's residual stream. CPU twin: the gather in
//! [`crate::policy::PrefixEncoder::run`].

use super::Kernels;
use crate::cuda::device::{int, launch, Args, DType, Lane, View};
use crate::Result;

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
