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
    /// Quantises every layer's projections and MLP to FP8 ([`Linear::quantise_fp8`]); the
    /// norms (pi0.5's adaptive norms with their time-conditioned dense layers) stay f32.
    pub fn quantise_fp8(&mut self, activations: bool) {
        for l in &mut self.layers {
            for lin in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                lin.quantise_fp8(activations);
            }
        }
    }

    /// Whether [`Gemma::quantise_fp8`] ran.
    pub fn is_fp8(&self) -> bool {
        self.layers.first().is_some_and(|l| l.q.fp8.is_some())
    }

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

    fn mlp(&self, layer: &Layer, h: &[f32], blocks: &[usize]) -> Vec<f32> {
        let mut g = layer.gate.forward_blocks(h, blocks);
        let u = layer.up.forward_blocks(h, blocks);
        g.iter_mut()
            .zip(&u)
            .for_each(|(g, u)| *g = cpu::gelu_tanh(*g) * u);
        layer.down.forward_blocks(&g, blocks)
    }

    /// Runs the prefix `x` [rows, width] (real tokens only, bidirectional, positions 0..rows)
    /// and returns every layer's K/V. The last layer's attention output and MLP feed nothing
    /// the policy reads, so they are skipped.
    pub fn prefix_kv(&self, x: Vec<f32>) -> KvCache {
        let rows = x.len() / self.width;
        let mut caches = self.prefix_kv_batch(x, &[rows]);
        caches.pop().unwrap_or_else(|| KvCache {
            len: 0,
            kv_width: self.kv_width(),
            k: vec![],
            v: vec![],
        })
    }

    /// [`Gemma::prefix_kv`] of several prefixes at once: `x` holds prefix i's `rows[i]`
    /// tokens after prefix i-1's. Linear layers run over all the tokens together (row for
    /// row the bits each prefix gets alone, [`Linear::forward_blocks`]); positions and
    /// attention are per prefix. One cache per prefix.
    pub fn prefix_kv_batch(&self, mut x: Vec<f32>, rows: &[usize]) -> Vec<KvCache> {
        let total: usize = rows.iter().sum();
        debug_assert_eq!(x.len(), total * self.width);
        let positions: Vec<usize> = rows.iter().flat_map(|&r| 0..r).collect();
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let kw = self.kv_width();
        let mut caches: Vec<KvCache> = rows
            .iter()
            .map(|&r| KvCache {
                len: r,
                kv_width: kw,
                k: Vec::with_capacity(self.layers.len()),
                v: Vec::with_capacity(self.layers.len()),
            })
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x, self.width, self.eps, None);
            let mut k = layer.k.forward_blocks(&h.x, rows);
            let v = layer.v.forward_blocks(&h.x, rows);
            cpu::rope(&mut k, kvh, hd, &positions, &self.inv_freq);
            if i + 1 < self.layers.len() {
                let mut q = layer.q.forward_blocks(&h.x, rows);
                cpu::rope(&mut q, nh, hd, &positions, &self.inv_freq);
                let qw = nh * hd;
                let mut att = Vec::with_capacity(total * qw);
                let mut start = 0;
                for &r in rows {
                    att.extend(cpu::attention(
                        &q[start * qw..(start + r) * qw],
                        &k[start * kw..(start + r) * kw],
                        &v[start * kw..(start + r) * kw],
                        r,
                        r,
                        nh,
                        kvh,
                        hd,
                        &|_, _| true,
                    ));
                    start += r;
                }
                cpu::add_residual(&mut x, &layer.o.forward_blocks(&att, rows), None);
                let h2 = layer.post_norm.forward(&x, self.width, self.eps, None);
                cpu::add_residual(&mut x, &self.mlp(layer, &h2.x, rows), None);
            }
            let mut start = 0;
            for (cache, &r) in caches.iter_mut().zip(rows) {
                cache.k.push(k[start * kw..(start + r) * kw].to_vec());
                cache.v.push(v[start * kw..(start + r) * kw].to_vec());
                start += r;
            }
        }
        caches
    }

    /// Runs suffix tokens `x` [rows, width] at `positions` against the prefix `cache`.
    /// `visible(i, j)` says whether suffix token i sees suffix token j (every suffix token
    /// sees the whole prefix). Returns the final-normed hidden states.
    pub fn suffix_forward(
        &self,
        x: Vec<f32>,
        positions: &[usize],
        cache: &KvCache,
        visible: &(dyn Fn(usize, usize) -> bool + Sync),
        cond: Option<&[f32]>,
    ) -> Vec<f32> {
        self.suffix_forward_batch(x, positions, &[cache], visible, cond)
    }

    /// [`Gemma::suffix_forward`] of several suffixes at once, each of `positions.len() /
    /// caches.len()` tokens against its own prefix cache (`x` and `positions` hold suffix
    /// i's tokens after suffix i-1's), sharing `visible` and the condition `cond` (the
    /// denoise time, the same for every row of a batch). Linear layers run over all the
    /// tokens together (row for row the bits each suffix gets alone); attention is per
    /// suffix.
    pub fn suffix_forward_batch(
        &self,
        mut x: Vec<f32>,
        positions: &[usize],
        caches: &[&KvCache],
        visible: &(dyn Fn(usize, usize) -> bool + Sync),
        cond: Option<&[f32]>,
    ) -> Vec<f32> {
        let batch = caches.len().max(1);
        let rows = positions.len() / batch;
        let blocks = vec![rows; caches.len()];
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (kw, qw) = (self.kv_width(), nh * hd);
        let longest = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let mut keys = Vec::with_capacity((longest + rows) * kw);
        let mut values = Vec::with_capacity((longest + rows) * kw);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x, self.width, self.eps, cond);
            let mut q = layer.q.forward_blocks(&h.x, &blocks);
            let mut k = layer.k.forward_blocks(&h.x, &blocks);
            let v = layer.v.forward_blocks(&h.x, &blocks);
            cpu::rope(&mut q, nh, hd, positions, &self.inv_freq);
            cpu::rope(&mut k, kvh, hd, positions, &self.inv_freq);
            let mut att = Vec::with_capacity(batch * rows * qw);
            for (b, cache) in caches.iter().enumerate() {
                let p = cache.len;
                let see = |i: usize, j: usize| j < p || visible(i, j - p);
                let own = b * rows..(b + 1) * rows;
                keys.clear();
                keys.extend_from_slice(&cache.k[l]);
                keys.extend_from_slice(&k[own.start * kw..own.end * kw]);
                values.clear();
                values.extend_from_slice(&cache.v[l]);
                values.extend_from_slice(&v[own.start * kw..own.end * kw]);
                att.extend(cpu::attention(
                    &q[own.start * qw..own.end * qw],
                    &keys,
                    &values,
                    rows,
                    p + rows,
                    nh,
                    kvh,
                    hd,
                    &see,
                ));
            }
            cpu::add_residual(
                &mut x,
                &layer.o.forward_blocks(&att, &blocks),
                h.gate.as_deref(),
            );
            let h2 = layer.post_norm.forward(&x, self.width, self.eps, cond);
            cpu::add_residual(&mut x, &self.mlp(layer, &h2.x, &blocks), h2.gate.as_deref());
        }
        match &self.final_norm {
            Some(norm) => norm.forward(&x, self.width, self.eps, cond).x,
            None => x,
        }
    }
}
