//! SigLIP's patch embedding: im2col of the HWC image into rows of (channel, ky, kx) patches
//! for one GEMM with the Conv2d weight, then bias and learned position embedding. CPU twin:
//! the im2col loop and patch Linear of [`crate::siglip::Siglip::forward`].

use super::compile::Kernels;
use super::device::{blocks_for, int, launch, Args, DType, Lane, View};
use crate::Result;

pub(crate) const SOURCE: &str = r#"
// pixels: f32 [n, size, size, 3] (HWC); patches: [n * grid^2, 3 p p], patch (gy, gx) of image
// i at row i * grid^2 + gy * grid + gx, column (ch * p + ky) * p + kx.
extern "C" __global__ void im2col(const float* __restrict__ pixels, act_t* __restrict__ patches,
                                  int n, int size, int p) {
  int grid = size / p;
  int t = grid * grid;
  int cols = 3 * p * p;
  long long total = (long long)n * t * cols;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    long long row = i / cols;
    int col = (int)(i - row * cols);
    long long img = row / t;
    int tok = (int)(row - img * t);
    int gy = tok / grid, gx = tok - (tok / grid) * grid;
    int ch = col / (p * p);
    int ky = (col / p) % p;
    int kx = col % p;
    long long y = (long long)gy * p + ky, x = (long long)gx * p + kx;
    tp_store(patches, i, pixels[((img * size + y) * size + x) * 3 + ch]);
  }
}

// x: f32 [rows, vw] (the patch GEMM output) = (x + bias) + pos[row % t]; total = rows * vw.
extern "C" __global__ void patch_embed_finish(float* __restrict__ x, const float* __restrict__ bias,
                                              const float* __restrict__ pos, int t, int vw,
                                              long long total) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    long long row = i / vw;
    long long c = i - row * vw;
    long long tok = row % t;
    x[i] = (x[i] + bias[c]) + pos[tok * vw + c];
  }
}
"#;

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
    let total = n * t * 3 * p * p;
    pixels.need(DType::F32, n * size * size * 3, "im2col pixels")?;
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
