//! The vector-Jacobian product of [`Gemma::suffix_forward`] with respect to its input tokens,
//! for real-time chunking's guidance (`rtc`): the forward is run again keeping what the
//! backward needs, then every block is differentiated in reverse with the VJPs of
//! `crate::vjp`. The prefix K/V cache and the norm condition are constants.

use super::{Gemma, KvCache, Norm};
use crate::cpu::{self, Linear, MatRef};
use crate::vjp;

/// dX of `Y = X W^T + b` given dY: `dX = dY W`.
pub(crate) fn linear_vjp(l: &Linear, dy: &[f32], rows: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; rows * l.n_in];
    cpu::matmul_into(
        &mut dx,
        0,
        l.n_in,
        MatRef::new(dy, rows, l.n_out),
        MatRef::new(&l.weight, l.n_out, l.n_in),
        1.0,
    );
    dx
}

/// dX of a norm's output `Norm::forward(x, ..).x` given dY (the gate does not depend on x).
fn norm_vjp(
    norm: &Norm,
    x: &[f32],
    dy: &[f32],
    width: usize,
    eps: f64,
    cond: Option<&[f32]>,
) -> Vec<f32> {
    let scale: Vec<f32> = match norm {
        Norm::Plain(w) => w.iter().map(|w| 1.0 + w).collect(),
        Norm::Adaptive(dense) => {
            let c = cond.unwrap_or_else(|| panic!("adaptive RMSNorm needs a condition"));
            dense.forward(c, 1)[..width]
                .iter()
                .map(|s| 1.0 + s)
                .collect()
        }
    };
    let mut dn = dy.to_vec();
    for row in dn.chunks_exact_mut(width) {
        row.iter_mut().zip(&scale).for_each(|(g, s)| *g *= s);
    }
    vjp::rms_normalize_vjp(x, &dn, width, eps)
}

/// What one layer's forward keeps for its backward.
struct Saved {
    x_in: Vec<f32>,
    gate1: Option<Vec<f32>>,
    q: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    x_mid: Vec<f32>,
    gate2: Option<Vec<f32>>,
    g: Vec<f32>,
    u: Vec<f32>,
}

impl Gemma {
    /// `(d suffix_forward / d x)^T dout`, at the same arguments as [`Gemma::suffix_forward`];
    /// `dout` is `[rows, width]`.
    pub(crate) fn suffix_vjp(
        &self,
        x: &[f32],
        positions: &[usize],
        cache: &KvCache,
        visible: &(dyn Fn(usize, usize) -> bool + Sync),
        cond: Option<&[f32]>,
        dout: &[f32],
    ) -> Vec<f32> {
        let rows = positions.len();
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let p = cache.len;
        let kw = self.kv_width();
        let see = |i: usize, j: usize| j < p || visible(i, j - p);
        let mut x = x.to_vec();
        let mut saved = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let x_in = x.clone();
            let h = layer.input_norm.forward(&x, self.width, self.eps, cond);
            let mut q = layer.q.forward(&h.x, rows);
            let mut k = layer.k.forward(&h.x, rows);
            let v = layer.v.forward(&h.x, rows);
            cpu::rope(&mut q, nh, hd, positions, &self.inv_freq);
            cpu::rope(&mut k, kvh, hd, positions, &self.inv_freq);
            let mut keys = cache.k[l].clone();
            keys.extend_from_slice(&k);
            let mut values = cache.v[l].clone();
            values.extend_from_slice(&v);
            let att = cpu::attention(&q, &keys, &values, rows, p + rows, nh, kvh, hd, &see);
            cpu::add_residual(&mut x, &layer.o.forward(&att, rows), h.gate.as_deref());
            let x_mid = x.clone();
            let h2 = layer.post_norm.forward(&x, self.width, self.eps, cond);
            let g = layer.gate.forward(&h2.x, rows);
            let u = layer.up.forward(&h2.x, rows);
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| cpu::gelu_tanh(*g) * u)
                .collect();
            cpu::add_residual(&mut x, &layer.down.forward(&a, rows), h2.gate.as_deref());
            saved.push(Saved {
                x_in,
                gate1: h.gate,
                q,
                keys,
                values,
                x_mid,
                gate2: h2.gate,
                g,
                u,
            });
        }
        let mut dx = match &self.final_norm {
            Some(norm) => norm_vjp(norm, &x, dout, self.width, self.eps, cond),
            None => dout.to_vec(),
        };
        let gated = |d: &[f32], gate: &Option<Vec<f32>>| -> Vec<f32> {
            match gate {
                Some(gt) => d
                    .chunks_exact(self.width)
                    .flat_map(|row| row.iter().zip(gt).map(|(d, g)| d * g))
                    .collect(),
                None => d.to_vec(),
            }
        };
        for (layer, s) in self.layers.iter().zip(saved).rev() {
            // x_out = x_mid + gate2 * down(gelu(gate(h2)) * up(h2)), h2 = post_norm(x_mid).
            let da = linear_vjp(&layer.down, &gated(&dx, &s.gate2), rows);
            let dg: Vec<f32> = da
                .iter()
                .zip(&s.u)
                .zip(&s.g)
                .map(|((d, u), g)| d * u * vjp::gelu_tanh_grad(*g))
                .collect();
            let du: Vec<f32> = da
                .iter()
                .zip(&s.g)
                .map(|(d, g)| d * cpu::gelu_tanh(*g))
                .collect();
            let mut dh2 = linear_vjp(&layer.gate, &dg, rows);
            dh2.iter_mut()
                .zip(linear_vjp(&layer.up, &du, rows))
                .for_each(|(a, b)| *a += b);
            let dmid = norm_vjp(&layer.post_norm, &s.x_mid, &dh2, self.width, self.eps, cond);
            dx.iter_mut().zip(&dmid).for_each(|(a, b)| *a += b);
            // x_mid = x_in + gate1 * o(attention(rope(q(h)), [cache; rope(k(h))], [cache; v(h)])).
            let datt = linear_vjp(&layer.o, &gated(&dx, &s.gate1), rows);
            let g = vjp::attention_vjp(
                &s.q,
                &s.keys,
                &s.values,
                &datt,
                rows,
                p + rows,
                nh,
                kvh,
                hd,
                &see,
            );
            let mut dq = g.dq;
            let mut dk = g.dk[p * kw..].to_vec();
            let dv = &g.dv[p * kw..];
            vjp::rope_vjp(&mut dq, nh, hd, positions, &self.inv_freq);
            vjp::rope_vjp(&mut dk, kvh, hd, positions, &self.inv_freq);
            let mut dh = linear_vjp(&layer.q, &dq, rows);
            for (lin, d) in [(&layer.k, &dk[..]), (&layer.v, dv)] {
                dh.iter_mut()
                    .zip(linear_vjp(lin, d, rows))
                    .for_each(|(a, b)| *a += b);
            }
            let din = norm_vjp(&layer.input_norm, &s.x_in, &dh, self.width, self.eps, cond);
            dx.iter_mut().zip(&din).for_each(|(a, b)| *a += b);
        }
        dx
    }
}
