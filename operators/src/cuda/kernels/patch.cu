// SigLIP's patch embedding: im2col and the bias + position epilogue. Launchers: patch.rs.

// Camera bytes to the model's range: dst[i] = src[i] / 255 * 2 - 1, each operation rounded
// to f32 on its own (no contraction into an fma), as the CPU's image::extend_unit computes it.
extern "C" __global__ void unit_pixels(const unsigned char* __restrict__ src,
                                       float* __restrict__ dst, long long n) {
  tp_pdl_enter();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    dst[i] = __fsub_rn(__fmul_rn(__fdiv_rn((float)src[i], 255.0f), 2.0f), 1.0f);
  }
}

// pixels: f32 [n, size, size, 3] (HWC, 3 = TP_IMAGE_CHANNELS); patches: [n * grid^2, 3 p p],
// patch (gy, gx) of image i at row i * grid^2 + gy * grid + gx, column (ch * p + ky) * p + kx.
extern "C" __global__ void im2col(const float* __restrict__ pixels, act_t* __restrict__ patches,
                                  int n, int size, int p) {
  tp_pdl_enter();
  int grid = size / p;
  int t = grid * grid;
  int cols = TP_IMAGE_CHANNELS * p * p;
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
    tp_store(patches, i, pixels[((img * size + y) * size + x) * TP_IMAGE_CHANNELS + ch]);
  }
}

// x: f32 [rows, vw] (the patch GEMM output) = (x + bias) + pos[row % t]; total = rows * vw.
extern "C" __global__ void patch_embed_finish(float* __restrict__ x, const float* __restrict__ bias,
                                              const float* __restrict__ pos, int t, int vw,
                                              long long total) {
  tp_pdl_enter();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    long long row = i / vw;
    long long c = i - row * vw;
    long long tok = row % t;
    x[i] = (x[i] + bias[c]) + pos[tok * vw + c];
  }
}
