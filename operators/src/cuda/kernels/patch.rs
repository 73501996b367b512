//! SigLIP's patch embedding: im2col of the HWC image into rows of (channel, ky, kx) patches
//! for one GEMM with the Conv2d weight, then bias and learned position embedding. CPU twin:
//! the im2col loop and patch Linear of [`crate::siglip::Siglip::forward`]. Before them, camera
//! bytes to the model's range (`unit_pixels`; CPU twin [`crate::image::extend_unit`]).

use super::Kernels;
use crate::cuda::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

/// Channels of an input image (RGB, HWC; TP_IMAGE_CHANNELS in patch.cu).
pub const CHANNELS: usize = 3;

/// pixels [n] (f32, in [-1, 1]) from camera bytes [n] (u8): x/255*2-1, the bits of the CPU's
/// [`crate::image::extend_unit`].
pub fn unit_pixels(k: &Kernels, lane: &Lane, bytes: View, pixels: View, n: usize) -> Result<()> {
    bytes.need(DType::U8, n, "camera bytes")?;
    pixels.need(DType::F32, n, "pixels")?;
    if n == 0 {
        return Ok(());
    }
    let args = Args::new().ptr(bytes).ptr(pixels).i64(n as i64);
    launch(
        &k.unit_pixels,
        lane,
        "unit_pixels",
        blocks_for(n, 256),
        256,
        args,
    )
}

/// patches [n * (size/p)^2, 3 p p] (act) from pixels [n, size, size, 3] (f32).
pub fn im2col(
    k: &Kernels,
    lane: &Lane,
    pixels: View,
    patches: View,
    n: usize,
    size: usize,
    p: usize,
) -> Result<()> {
    let t = (size / p) * (size / p);
    let total = n * t * CHANNELS * p * p;
    pixels.need(DType::F32, n * size * size * CHANNELS, "im2col pixels")?;
    patches.need(k.act, total, "im2col patches")?;
    let args = Args::new()
        .ptr(pixels)
        .ptr(patches)
        .i32(int(n, "images")?)
        .i32(int(size, "image size")?)
        .i32(int(p, "patch")?);
    launch(&k.im2col, lane, "im2col", blocks_for(total, 256), 256, args)
}

/// x [rows, vw] = (x + bias) + pos[row % t].
#[allow(clippy::too_many_arguments)]
pub fn patch_embed_finish(
    k: &Kernels,
    lane: &Lane,
    x: View,
    bias: View,
    pos: View,
    rows: usize,
    t: usize,
    vw: usize,
) -> Result<()> {
    let total = rows * vw;
    x.need(DType::F32, total, "patch embedding")?;
    bias.need(DType::F32, vw, "patch bias")?;
    pos.need(DType::F32, t * vw, "position embedding")?;
    let args = Args::new()
        .ptr(x)
        .ptr(bias)
        .ptr(pos)
        .i32(int(t, "tokens per image")?)
        .i32(int(vw, "vision width")?)
        .i64(total as i64);
    launch(
        &k.patch_embed_finish,
        lane,
        "patch_embed_finish",
        blocks_for(total, 256),
        256,
        args,
    )
}
