//! Vector-Jacobian products of the CPU ops the action expert is made of (RMSNorm, tanh-GELU,
//! RoPE, masked multi-head attention with grouped K/V), each checked against finite
//! differences of its forward twin in `cpu`. The expert's VJP (`gemma::suffix_vjp`,
//! `policy::velocity_vjp`) is assembled from them for real-time chunking's guidance (`rtc`).

use crate::cpu::{softmax_masked, GELU_TANH_BETA, GELU_TANH_KAPPA};

/// VJP of [`crate::cpu::rms_normalize`] (`y = x / rms(x)` per row of `width`): given `x` and
/// the cotangent `dy`, returns `dx = (dy - y mean(dy * y)) / rms(x)`.
pub fn rms_normalize_vjp(x: &[f32], dy: &[f32], width: usize, eps: f64) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    for ((xr, dyr), dxr) in x
        .chunks_exact(width)
        .zip(dy.chunks_exact(width))
        .zip(dx.chunks_exact_mut(width))
    {
        let ms = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / width as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        let dot = xr
            .iter()
            .zip(dyr)
            .map(|(&x, &g)| f64::from(x) * inv * f64::from(g))
            .sum::<f64>()
            / width as f64;
        for ((d, &x), &g) in dxr.iter_mut().zip(xr).zip(dyr) {
            *d = ((f64::from(g) - f64::from(x) * inv * dot) * inv) as f32;
        }
    }
    dx
}

/// d/dx of [`crate::cpu::gelu_tanh`].
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let u = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x * x * x);
    let t = u.tanh();
    let du = GELU_TANH_BETA * (1.0 + 3.0 * GELU_TANH_KAPPA * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

/// VJP of [`crate::cpu::rope`] (a rotation per pair, so the VJP rotates back): `dy` in place
/// becomes `dx`.
pub fn rope_vjp(
    dy: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    inv_freq: &[f32],
) {
    let half = head_dim / 2;
    for (row, &pos) in dy.chunks_exact_mut(heads * head_dim).zip(positions) {
        for head in row.chunks_exact_mut(head_dim) {
            let (g1, g2) = head.split_at_mut(half);
            for j in 0..half {
                let angle = inv_freq[j] * pos as f32;
                let (c, s) = (angle.cos(), angle.sin());
                let (a, b) = (g1[j], g2[j]);
                g1[j] = a * c + b * s;
                g2[j] = b * c - a * s;
            }
        }
    }
}

/// The cotangents of attention's inputs.
pub struct AttentionGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// VJP of [`crate::cpu::attention`] with respect to `q`, `k` and `v` (same shapes and
/// arguments; `dout` is `[sq, nh*hd]`). Keys a query does not see get no gradient from it.
#[allow(clippy::too_many_arguments)]
pub fn attention_vjp(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    sq: usize,
    sk: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    visible: &(dyn Fn(usize, usize) -> bool + Sync),
) -> AttentionGrads {
    let qw = num_heads * head_dim;
    let kw = num_kv_heads * head_dim;
    let group = num_heads / num_kv_heads;
    let scale = (head_dim as f64).powf(-0.5) as f32;
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let mut p = vec![0.0f32; sk];
    let mut dp = vec![0.0f32; sk];
    for h in 0..num_heads {
        let kvh = h / group;
        let (qo, ko) = (h * head_dim, kvh * head_dim);
        for i in 0..sq {
            let qi = &q[i * qw + qo..i * qw + qo + head_dim];
            let gi = &dout[i * qw + qo..i * qw + qo + head_dim];
            for j in 0..sk {
                let kj = &k[j * kw + ko..j * kw + ko + head_dim];
                p[j] = scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
            }
            softmax_masked(&mut p, |j| visible(i, j));
            // dP = dout v^T; dS = P (dP - sum(P dP)).
            for j in 0..sk {
                let vj = &v[j * kw + ko..j * kw + ko + head_dim];
                dp[j] = gi.iter().zip(vj).map(|(a, b)| a * b).sum();
            }
            let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for j in 0..sk {
                if p[j] == 0.0 {
                    continue;
                }
                let ds = p[j] * (dp[j] - dot) * scale;
                for d in 0..head_dim {
                    dq[i * qw + qo + d] += ds * k[j * kw + ko + d];
                    dk[j * kw + ko + d] += ds * q[i * qw + qo + d];
                    dv[j * kw + ko + d] += p[j] * gi[d];
                }
            }
        }
    }
    AttentionGrads { dq, dk, dv }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{attention, gelu_tanh, rms_normalize, rope, rope_inv_freq};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Central finite differences of `sum(c * f(x))` against `grad`, relative to the norm of
    /// `grad` (f32 forward, step 1e-2 on O(1) inputs: truncation ~1e-5, rounding ~1e-5).
    fn check(x: &[f32], c: &[f32], f: impl Fn(&[f32]) -> Vec<f32>, grad: &[f32], what: &str) {
        let loss = |x: &[f32]| -> f64 {
            f(x).iter()
                .zip(c)
                .map(|(y, c)| f64::from(*y) * f64::from(*c))
                .sum()
        };
        let norm = grad
            .iter()
            .map(|g| f64::from(*g).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(norm > 1e-2, "{what}: a gradient worth checking ({norm})");
        let h = 1e-2f32;
        let mut worst: f64 = 0.0;
        for i in 0..x.len() {
            let mut xp = x.to_vec();
            xp[i] += h;
            let mut xm = x.to_vec();
            xm[i] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * f64::from(h));
            worst = worst.max((fd - f64::from(grad[i])).abs() / norm);
        }
        assert!(worst < 1e-3, "{what}: relative error {worst}");
    }

    #[test]
    fn rms_normalize_vjp_matches_finite_differences() {
        let (rows, width) = (3, 16);
        let x = rand_vec(rows * width, 1);
        let c = rand_vec(rows * width, 2);
        let dx = rms_normalize_vjp(&x, &c, width, 1e-6);
        check(
            &x,
            &c,
            |x| rms_normalize(x, width, 1e-6),
            &dx,
            "rms_normalize",
        );
    }

    #[test]
    fn gelu_grad_matches_finite_differences() {
        let x: Vec<f32> = rand_vec(64, 3).iter().map(|v| v * 4.0).collect();
        let c = rand_vec(64, 4);
        let dx: Vec<f32> = x
            .iter()
            .zip(&c)
            .map(|(x, c)| gelu_tanh_grad(*x) * c)
            .collect();
        check(
            &x,
            &c,
            |x| x.iter().map(|&v| gelu_tanh(v)).collect(),
            &dx,
            "gelu_tanh",
        );
    }

    #[test]
    fn rope_vjp_matches_finite_differences() {
        let (rows, heads, hd) = (3, 2, 8);
        let inv = rope_inv_freq(hd, 10000.0);
        let pos = [0usize, 5, 17];
        let x = rand_vec(rows * heads * hd, 5);
        let c = rand_vec(rows * heads * hd, 6);
        let mut dx = c.clone();
        rope_vjp(&mut dx, heads, hd, &pos, &inv);
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            rope(&mut y, heads, hd, &pos, &inv);
            y
        };
        check(&x, &c, f, &dx, "rope");
    }

    #[test]
    fn attention_vjp_matches_finite_differences() {
        let (sq, sk, nh, kvh, hd) = (3, 5, 4, 2, 4);
        let q = rand_vec(sq * nh * hd, 7);
        let k = rand_vec(sk * kvh * hd, 8);
        let v = rand_vec(sk * kvh * hd, 9);
        let c = rand_vec(sq * nh * hd, 10);
        // Block-causal over the last 3 keys (as the suffix), the first 2 always visible.
        let visible = |i: usize, j: usize| j < 2 || j - 2 <= i;
        let g = attention_vjp(&q, &k, &v, &c, sq, sk, nh, kvh, hd, &visible);
        let att =
            |q: &[f32], k: &[f32], v: &[f32]| attention(q, k, v, sq, sk, nh, kvh, hd, &visible);
        check(&q, &c, |x| att(x, &k, &v), &g.dq, "attention dq");
        check(&k, &c, |x| att(&q, x, &v), &g.dk, "attention dk");
        check(&v, &c, |x| att(&q, &k, x), &g.dv, "attention dv");
    }
}
