//! The f32 CPU backend: the ops every other backend is tested against. Row-major buffers,
//! statistics accumulated in f64, GEMMs through the `gemm` crate on all cores.

use gemm::Parallelism;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    // Below ~1 MFLOP the thread hand-off costs more than it saves.
    if m * n * k < 1 << 20 {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// A strided view of a row-major matrix: element (r, c) at `data[offset + r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose, without moving data.
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
    /// Columns `start..start + cols` of every row.
    pub fn cols(self, start: usize, cols: usize) -> Self {
        MatRef {
            offset: self.offset + start * self.col_stride,
            cols,
            ..self
        }
    }
    fn last_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
    }
}

/// `out[.., out_col..out_col + n]` (row stride `out_stride`) = alpha * (a @ b).
pub fn matmul_into(
    out: &mut [f32],
    out_col: usize,
    out_stride: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(out_col + n <= out_stride && (m - 1) * out_stride + out_col + n <= out.len());
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len());
    if k == 0 {
        for r in 0..m {
            out[r * out_stride + out_col..r * out_stride + out_col + n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every element the kernel touches inside `out`, `a.data`
    // and `b.data`; `out` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(out_col),
            1,
            out_stride as isize,
            false,
            a.data.as_ptr().add(a.offset),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(b.offset),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

/// A PyTorch `Linear`: weight [out, in], optional bias [out].
pub struct Linear {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub n_in: usize,
    pub n_out: usize,
    /// FP8 emulation ([`Linear::quantise_fp8`]); `None` is plain f32.
    pub fp8: Option<Fp8>,
}

/// How a [`Linear`] emulates FP8 (`--dtype fp8` on the CPU backend): its weights hold their
/// E4M3 values (per output channel, [`crate::fp8::round_rows`]); with `activations`, each
/// input row is rounded the same way before the product, as an FP8 GEMM sees it. The
/// product then is an f32 sum of exact products, as on FP8 tensor cores with f32
/// accumulation (up to the order of the additions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8 {
    pub activations: bool,
}

impl Linear {
    /// Quantises the weights to FP8 E4M3 per output channel, for good: the f32 values are
    /// replaced by their FP8 values.
    pub fn quantise_fp8(&mut self, activations: bool) {
        crate::fp8::round_rows(&mut self.weight, self.n_in);
        self.fp8 = Some(Fp8 { activations });
    }

    /// y[rows, out] = x[rows, in] @ W^T + b.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            rows * self.n_in,
            "linear: input is not [rows, {}]",
            self.n_in
        );
        let rounded;
        let x = match self.fp8 {
            Some(Fp8 { activations: true }) => {
                let mut r = x.to_vec();
                crate::fp8::round_rows(&mut r, self.n_in);
                rounded = r;
                &rounded[..]
            }
            _ => x,
        };
        let mut y = vec![0.0; rows * self.n_out];
        let w = MatRef::new(&self.weight, self.n_out, self.n_in).t();
        matmul_into(
            &mut y,
            0,
            self.n_out,
            MatRef::new(x, rows, self.n_in),
            w,
            1.0,
        );
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.n_out) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        y
    }
}

/// Whether one GEMM over blocks of `blocks` rows stacked on top of each other gives every
/// row the same bits as a GEMM over its own block alone, for a `Linear` of `n_in` -> `n_out`
/// (row-major input, weight read transposed). The `gemm` crate (0.19) sums each output over
/// `k` in chunks whose size it picks from `m` only when `m` and `n` are both at most 64 and
/// `k` exceeds 512, and it switches to other kernels (matrix-vector for one row, horizontal
/// dot products when `m * n <= 256`, outer products when `k <= 2`) whose order of additions
/// differs. Outside those cases the order of additions of an output element depends on `k`
/// alone, so stacking changes nothing; inside them, the blocks are multiplied one by one.
/// `forward_blocks_equals_blockwise_forward` holds this to the bit.
pub fn stacking_is_exact(blocks: &[usize], n_in: usize, n_out: usize) -> bool {
    let (n, k) = (n_out, n_in);
    if k <= 2 || n <= 1 {
        return false;
    }
    blocks
        .iter()
        .filter(|&&m| m > 0)
        .all(|&m| m >= 2 && m * n > 256 && (k <= 512 || m > 64 || n > 64))
}

impl Linear {
    /// [`Linear::forward`] of rows made of independent blocks (`blocks[i]` rows each, in
    /// order): one GEMM over all of them where that gives each block's rows the bits a
    /// GEMM over the block alone would ([`stacking_is_exact`]), else one GEMM per block. So a
    /// batch of observations gets, row for row, what each would get on its own.
    pub fn forward_blocks(&self, x: &[f32], blocks: &[usize]) -> Vec<f32> {
        let rows: usize = blocks.iter().sum();
        if blocks.len() <= 1 || stacking_is_exact(blocks, self.n_in, self.n_out) {
            return self.forward(x, rows);
        }
        let mut y = Vec::with_capacity(rows * self.n_out);
        let mut start = 0;
        for &m in blocks {
            y.extend(self.forward(&x[start * self.n_in..(start + m) * self.n_in], m));
            start += m;
        }
        y
    }
}

/// LayerNorm over the last dimension (biased variance, as PyTorch).
pub fn layer_norm(x: &mut [f32], width: usize, weight: &[f32], bias: &[f32], eps: f64) {
    for row in x.chunks_exact_mut(width) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
        let inv = (1.0 / (var + eps).sqrt()) as f32;
        let mean = mean as f32;
        for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// Gemma's RMSNorm without the weight: x * rsqrt(mean(x^2) + eps), statistics in f64.
pub fn rms_normalize(x: &[f32], width: usize, eps: f64) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(width) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / width as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
    out
}

/// sqrt(2 / pi) in [`gelu_tanh`] (and TP_GELU_BETA in the CUDA twin).
pub const GELU_TANH_BETA: f32 = 0.797_884_6;
/// The cubic coefficient of [`gelu_tanh`] (and TP_GELU_KAPPA in the CUDA twin).
pub const GELU_TANH_KAPPA: f32 = 0.044715;

/// tanh-approximated GELU (PyTorch's `gelu(approximate="tanh")`).
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x * x * x)).tanh())
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Row-wise softmax in place; entries with `visible == false` get probability 0.
pub fn softmax_masked(row: &mut [f32], visible: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, v) in row.iter().enumerate() {
        if visible(j) && *v > max {
            max = *v;
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f64;
    for (j, v) in row.iter_mut().enumerate() {
        *v = if visible(j) { (*v - max).exp() } else { 0.0 };
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// RoPE tables as HF computes them in f32: inv_freq[j] = 1 / theta^(2j / hd).
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

/// Half-split rotary embedding of every head of `x` [rows, heads * hd], row r at `positions[r]`.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], inv_freq: &[f32]) {
    let half = head_dim / 2;
    let mut cos = vec![0.0f32; half];
    let mut sin = vec![0.0f32; half];
    for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for j in 0..half {
            let angle = inv_freq[j] * pos as f32;
            cos[j] = angle.cos();
            sin[j] = angle.sin();
        }
        for head in row.chunks_exact_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * cos[j] - b * sin[j];
                x2[j] = b * cos[j] + a * sin[j];
            }
        }
    }
}

/// Multi-head attention with grouped K/V heads.
/// q: [sq, nh*hd]; k, v: [sk, kvh*hd]; `visible(i, j)` says whether query i sees key j.
/// Returns [sq, nh*hd].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sq: usize,
    sk: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    visible: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Vec<f32> {
    let qw = num_heads * head_dim;
    let kw = num_kv_heads * head_dim;
    let group = num_heads / num_kv_heads;
    let scale = (head_dim as f64).powf(-0.5) as f32;
    let mut out = vec![0.0f32; sq * qw];
    let mut scores = vec![0.0f32; sq * sk];
    for h in 0..num_heads {
        let kvh = h / group;
        let qh = MatRef::new(q, sq, qw).cols(h * head_dim, head_dim);
        let kh = MatRef::new(k, sk, kw).cols(kvh * head_dim, head_dim);
        let vh = MatRef::new(v, sk, kw).cols(kvh * head_dim, head_dim);
        matmul_into(&mut scores, 0, sk, qh, kh.t(), scale);
        for (i, row) in scores.chunks_exact_mut(sk).enumerate() {
            softmax_masked(row, |j| visible(i, j));
        }
        matmul_into(
            &mut out,
            h * head_dim,
            qw,
            MatRef::new(&scores, sq, sk),
            vh,
            1.0,
        );
    }
    out
}

/// Adds `src` to `dst` elementwise, scaled per column by `gate` when given.
pub fn add_residual(dst: &mut [f32], src: &[f32], gate: Option<&[f32]>) {
    match gate {
        None => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
        Some(g) => {
            let w = g.len();
            for (drow, srow) in dst.chunks_exact_mut(w).zip(src.chunks_exact(w)) {
                for ((d, s), g) in drow.iter_mut().zip(srow).zip(g) {
                    *d += s * g;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_including_transposed_and_strided_views() {
        let (m, k, n) = (37, 129, 70);
        let a = rand_vec(m * k, 1);
        let b = rand_vec(k * n, 2);
        let want = naive_matmul(&a, &b, m, k, n);
        let mut got = vec![f32::NAN; m * n];
        matmul_into(
            &mut got,
            0,
            n,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            1.0,
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // Linear: weight [n, k], y = a @ W^T.
        let mut wt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                wt[j * k + p] = b[p * n + j];
            }
        }
        let lin = Linear {
            weight: wt,
            bias: Some(vec![0.5; n]),
            n_in: k,
            n_out: n,
            fp8: None,
        };
        let y = lin.forward(&a, m);
        for (g, w) in y.iter().zip(&want) {
            assert!(
                (g - (w + 0.5)).abs() <= 1e-4 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
        // Writing into a column block of a wider output leaves the other columns alone.
        let mut wide = vec![7.0f32; m * (n + 3)];
        matmul_into(
            &mut wide,
            2,
            n + 3,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            1.0,
        );
        assert_eq!(wide[0], 7.0);
        assert_eq!(wide[n + 2], 7.0);
        assert!((wide[2] - want[0]).abs() <= 1e-4 * (1.0 + want[0].abs()));
    }

    /// Stacked blocks get the bits of each block alone, in every regime of the GEMM
    /// crate's dispatch (short and long `k`, narrow and wide outputs, single rows, blocks
    /// above and below 64 rows) and whichever way `forward_blocks` takes.
    #[test]
    fn forward_blocks_equals_blockwise_forward() {
        let shapes: [(usize, usize, &[usize]); 10] = [
            (64, 64, &[7, 13, 1, 30]),
            (32, 64, &[10, 10, 10]),
            (128, 32, &[10, 10]),
            (1100, 96, &[3, 70, 5]),
            (1100, 32, &[50, 50, 50]),
            (1100, 32, &[80, 90]),
            (700, 200, &[1, 2, 65]),
            (2, 40, &[5, 6]),
            (64, 8, &[10, 11, 12]),
            (520, 64, &[64, 65, 3]),
        ];
        for (seed, (k, n, blocks)) in shapes.into_iter().enumerate() {
            let rows: usize = blocks.iter().sum();
            let lin = Linear {
                weight: rand_vec(n * k, 100 + seed as u64),
                bias: Some(rand_vec(n, 200 + seed as u64)),
                n_in: k,
                n_out: n,
                fp8: None,
            };
            let x = rand_vec(rows * k, 300 + seed as u64);
            let got = lin.forward_blocks(&x, blocks);
            let mut start = 0;
            for &m in blocks {
                let want = lin.forward(&x[start * k..(start + m) * k], m);
                let have = &got[start * n..(start + m) * n];
                assert!(
                    want.iter()
                        .zip(have)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "k {k}, n {n}, blocks {blocks:?}: block at row {start} differs (stacked: {})",
                    stacking_is_exact(blocks, k, n)
                );
                start += m;
            }
        }
        assert!(stacking_is_exact(&[3, 70, 5], 1100, 96));
        assert!(!stacking_is_exact(&[50, 50], 1100, 32));
        assert!(!stacking_is_exact(&[1, 5], 64, 64));
    }

    #[test]
    fn softmax_ignores_invisible_and_sums_to_one() {
        let mut row = vec![1.0, 1000.0, 2.0, 3.0];
        softmax_masked(&mut row, |j| j != 1);
        assert_eq!(row[1], 0.0);
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(row[3] > row[2] && row[2] > row[0]);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let hd = 8;
        let inv = rope_inv_freq(hd, 10000.0);
        assert_eq!(inv[0], 1.0);
        let mut x = rand_vec(2 * hd, 3);
        let orig = x.clone();
        rope(&mut x, 2, hd, &[5], &inv);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&orig)).abs() < 1e-4);
        // position 0 is the identity
        let mut y = orig.clone();
        rope(&mut y, 2, hd, &[0], &inv);
        assert_eq!(y, orig);
        // pair (0, 4) of head 0 rotated by angle 5 * inv_freq[0] = 5
        let (c, s) = (5.0f32.cos(), 5.0f32.sin());
        assert!((x[0] - (orig[0] * c - orig[4] * s)).abs() < 1e-6);
        assert!((x[4] - (orig[4] * c + orig[0] * s)).abs() < 1e-6);
    }

    #[test]
    fn attention_matches_naive_with_groups_and_mask() {
        let (sq, sk, nh, kvh, hd) = (3, 5, 4, 2, 4);
        let q = rand_vec(sq * nh * hd, 4);
        let k = rand_vec(sk * kvh * hd, 5);
        let v = rand_vec(sk * kvh * hd, 6);
        let vis = |i: usize, j: usize| j <= i + 2;
        let out = attention(&q, &k, &v, sq, sk, nh, kvh, hd, &vis);
        for h in 0..nh {
            let g = h / (nh / kvh);
            for i in 0..sq {
                let mut s: Vec<f64> = (0..sk)
                    .map(|j| {
                        (0..hd)
                            .map(|d| {
                                q[i * nh * hd + h * hd + d] as f64
                                    * k[j * kvh * hd + g * hd + d] as f64
                            })
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = (0..sk)
                    .filter(|&j| vis(i, j))
                    .map(|j| s[j])
                    .fold(f64::MIN, f64::max);
                let mut tot = 0.0;
                for (j, x) in s.iter_mut().enumerate() {
                    *x = if vis(i, j) { (*x - m).exp() } else { 0.0 };
                    tot += *x;
                }
                for d in 0..hd {
                    let want: f64 = (0..sk)
                        .map(|j| s[j] / tot * v[j * kvh * hd + g * hd + d] as f64)
                        .sum();
                    let got = out[i * nh * hd + h * hd + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "head {h} row {i} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn norms_and_activations() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, 4, &[1.0; 4], &[0.0; 4], 0.0);
        assert!((x.iter().sum::<f32>()).abs() < 1e-6);
        assert!((x[3] - 1.341_640_8).abs() < 1e-5);
        let r = rms_normalize(&[3.0, 4.0], 2, 0.0);
        assert!((r[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
