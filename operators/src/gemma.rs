//! One Gemma block serves both the 2B prefix and the 300M action expert; pi0.5's adaptive
//! RMSNorm is a variant of the norm, not a copy of the block.

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::cpu::{self, Linear};
use crate::keys;
use crate::weights::Loader;
use crate::Result;

pub(crate) mod suffix_vjp;

/// Gemma's RMSNorm (x * (1 + w)) or pi0.5's adaptive variant conditioned on the time.
pub enum Norm {
    Plain(Vec<f32>),
    /// dense(cond) -> (scale, shift, gate), each `width` wide.
    Adaptive(Linear),
}

/// A norm's output and, for the adaptive norm, the gate of the residual it feeds.
pub struct Normed {
    pub x: Vec<f32>,
    pub gate: Option<Vec<f32>>,
}

impl Norm {
    fn load(
        ckpt: &Checkpoint,
        ld: &mut Loader,
        key: &keys::Norm,
        width: usize,
        adaptive: bool,
    ) -> Result<Self> {
        Ok(if adaptive {
            Norm::Adaptive(ld.linear(ckpt, key.dense().base(), 3 * width, width, true)?)
        } else {
            Norm::Plain(ld.tensor(ckpt, &key.weight(), &[width])?)
        })
    }

    /// `cond` is required by the adaptive norm and ignored by the plain one.
    pub fn forward(&self, x: &[f32], width: usize, eps: f64, cond: Option<&[f32]>) -> Normed {
        let mut y = cpu::rms_normalize(x, width, eps);
        match self {
            Norm::Plain(w) => {
                for row in y.chunks_exact_mut(width) {
                    row.iter_mut().zip(w).for_each(|(v, w)| *v *= 1.0 + w);
                }
                Normed { x: y, gate: None }
            }
            Norm::Adaptive(dense) => {
                let cond = cond.unwrap_or_else(|| panic!("adaptive RMSNorm needs a condition"));
                let m = dense.forward(cond, 1);
                let (scale, rest) = m.split_at(width);
                let (shift, gate) = rest.split_at(width);
                for row in y.chunks_exact_mut(width) {
                    for ((v, s), b) in row.iter_mut().zip(scale).zip(shift) {
                        *v = *v * (1.0 + s) + b;
                    }
                }
                Normed {
                    x: y,
                    gate: Some(gate.to_vec()),
                }
            }
        }
    }
}

struct Layer {
    input_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Norm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Per-layer keys (after RoPE) and values of the real prefix tokens.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Real prefix tokens (invisible ones are never stored).
    pub len: usize,
    /// num_kv_heads * head_dim.
    pub kv_width: usize,
    /// Per layer, [len, kv_width].
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

pub struct Gemma {
    width: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    inv_freq: Vec<f32>,
    layers: Vec<Layer>,
    /// The expert's final norm; the prefix's is never needed.
    final_norm: Option<Norm>,
}

impl Gemma {
    pub fn load(
        ckpt: &Checkpoint,
        ld: &mut Loader,
        root: &str,
        width: usize,
        mlp: usize,
        adaptive: bool,
        with_final_norm: bool,
    ) -> Result<Self> {
        let c: &Config = &ckpt.config;
        let (nh, kv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let mut layers = Vec::with_capacity(c.vlm_depth);
        for i in 0..c.vlm_depth {
            let l = keys::gemma::layer(root, i);
            let mut lin =
                |key: &keys::Param, n_out, n_in| ld.linear(ckpt, key.base(), n_out, n_in, false);
            let (q, k, v, o) = (
                lin(&l.q, nh * hd, width)?,
                lin(&l.k, kv * hd, width)?,
                lin(&l.v, kv * hd, width)?,
                lin(&l.o, width, nh * hd)?,
            );
            let (gate, up, down) = (
                lin(&l.gate, mlp, width)?,
                lin(&l.up, mlp, width)?,
                lin(&l.down, width, mlp)?,
            );
            layers.push(Layer {
                input_norm: Norm::load(ckpt, ld, &l.input_layernorm, width, adaptive)?,
                q,
                k,
                v,
                o,
                post_norm: Norm::load(ckpt, ld, &l.post_attention_layernorm, width, adaptive)?,
                gate,
                up,
                down,
            });
        }
        let final_norm = if with_final_norm {
            let key = keys::gemma::final_norm(root);
            Some(Norm::load(ckpt, ld, &key, width, adaptive)?)
        } else {
            None
        };
        Ok(Gemma {
            width,
            num_heads: nh,
            num_kv_heads: kv,
            head_dim: hd,
            eps: c.rms_norm_eps,
            inv_freq: cpu::rope_inv_freq(hd, c.rope_theta),
            layers,
            final_norm,
        })
    }

    fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    fn mlp(&self, layer: &Layer, h: &[f32], rows: usize) -> Vec<f32> {
        let mut g = layer.gate.forward(h, rows);
        let u = layer.up.forward(h, rows);
        g.iter_mut()
            .zip(&u)
            .for_each(|(g, u)| *g = cpu::gelu_tanh(*g) * u);
        layer.down.forward(&g, rows)
    }

    /// Runs the prefix `x` [rows, width] (real tokens only, bidirectional, positions 0..rows)
    /// and returns every layer's K/V. The last layer's attention output and MLP feed nothing
    /// the policy reads, so they are skipped.
    pub fn prefix_kv(&self, mut x: Vec<f32>) -> KvCache {
        let rows = x.len() / self.width;
        let positions: Vec<usize> = (0..rows).collect();
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut cache = KvCache {
            len: rows,
            kv_width: self.kv_width(),
            k: Vec::with_capacity(self.layers.len()),
            v: Vec::with_capacity(self.layers.len()),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x, self.width, self.eps, None);
            let mut k = layer.k.forward(&h.x, rows);
            let v = layer.v.forward(&h.x, rows);
            cpu::rope(&mut k, kvh, hd, &positions, &self.inv_freq);
            if i + 1 < self.layers.len() {
                let mut q = layer.q.forward(&h.x, rows);
                cpu::rope(&mut q, nh, hd, &positions, &self.inv_freq);
                let att = cpu::attention(&q, &k, &v, rows, rows, nh, kvh, hd, &|_, _| true);
                cpu::add_residual(&mut x, &layer.o.forward(&att, rows), None);
                let h2 = layer.post_norm.forward(&x, self.width, self.eps, None);
                cpu::add_residual(&mut x, &self.mlp(layer, &h2.x, rows), None);
            }
            cache.k.push(k);
            cache.v.push(v);
        }
        cache
    }

    /// Runs suffix tokens `x` [rows, width] at `positions` against the prefix `cache`.
    /// `visible(i, j)` says whether suffix token i sees suffix token j (every suffix token
    /// sees the whole prefix). Returns the final-normed hidden states.
    pub fn suffix_forward(
        &self,
        mut x: Vec<f32>,
        positions: &[usize],
        cache: &KvCache,
        visible: &(dyn Fn(usize, usize) -> bool + Sync),
        cond: Option<&[f32]>,
    ) -> Vec<f32> {
        let rows = positions.len();
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let p = cache.len;
        let kw = self.kv_width();
        let mut keys = vec![0.0f32; (p + rows) * kw];
        let mut values = vec![0.0f32; (p + rows) * kw];
        let see = |i: usize, j: usize| j < p || visible(i, j - p);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x, self.width, self.eps, cond);
            let mut q = layer.q.forward(&h.x, rows);
            let mut k = layer.k.forward(&h.x, rows);
            let v = layer.v.forward(&h.x, rows);
            cpu::rope(&mut q, nh, hd, positions, &self.inv_freq);
            cpu::rope(&mut k, kvh, hd, positions, &self.inv_freq);
            keys[..p * kw].copy_from_slice(&cache.k[l]);
            keys[p * kw..].copy_from_slice(&k);
            values[..p * kw].copy_from_slice(&cache.v[l]);
            values[p * kw..].copy_from_slice(&v);
            let att = cpu::attention(&q, &keys, &values, rows, p + rows, nh, kvh, hd, &see);
            cpu::add_residual(&mut x, &layer.o.forward(&att, rows), h.gate.as_deref());
            let h2 = layer.post_norm.forward(&x, self.width, self.eps, cond);
            cpu::add_residual(&mut x, &self.mlp(layer, &h2.x, rows), h2.gate.as_deref());
        }
        match &self.final_norm {
            Some(norm) => norm.forward(&x, self.width, self.eps, cond).x,
            None => x,
        }
    }
}
