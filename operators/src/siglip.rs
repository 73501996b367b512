//! SigLIP vision tower and PaliGemma's projector: images in [-1, 1] -> prefix embeddings.

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::cpu::{self, Linear};
use crate::keys::{self, Param, PROJECTOR};
use crate::weights::Loader;
use crate::Result;

pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

struct SiglipLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct Siglip {
    cfg: Config,
    /// The patch Conv2d as a Linear over flattened (channel, ky, kx) patches.
    patch: Linear,
    position: Vec<f32>,
    layers: Vec<SiglipLayer>,
    post_ln: LayerNorm,
    projector: Linear,
}

impl Siglip {
    /// Quantises the encoder layers' projections and MLPs and the projector to FP8: their
    /// weights, and with `activations` their inputs ([`Linear::quantise_fp8`]). The patch
    /// embedding (the camera's pixels) and the LayerNorms stay f32.
    pub fn quantise_fp8(&mut self, activations: bool) {
        for l in &mut self.layers {
            for lin in [
                &mut l.q, &mut l.k, &mut l.v, &mut l.out, &mut l.fc1, &mut l.fc2,
            ] {
                lin.quantise_fp8(activations);
            }
        }
        self.projector.quantise_fp8(activations);
    }

    /// Whether [`Siglip::quantise_fp8`] ran.
    pub fn is_fp8(&self) -> bool {
        self.projector.fp8.is_some()
    }

    pub fn load(ckpt: &Checkpoint, ld: &mut Loader) -> Result<Self> {
        let cfg = ckpt.config.clone();
        let (vw, p) = (cfg.vision_width, cfg.patch_size);
        let ln = |ld: &mut Loader, key: &Param| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: ld.tensor(ckpt, &key.weight(), &[vw])?,
                bias: ld.tensor(ckpt, &key.bias(), &[vw])?,
            })
        };
        let patch_key = keys::siglip::patch();
        let patch = Linear {
            weight: ld.tensor(ckpt, &patch_key.weight(), &[vw, 3, p, p])?,
            bias: Some(ld.tensor(ckpt, &patch_key.bias(), &[vw])?),
            n_in: 3 * p * p,
            n_out: vw,
            fp8: None,
        };
        let position = ld.tensor(
            ckpt,
            &keys::siglip::position(),
            &[cfg.tokens_per_image(), vw],
        )?;
        let mlp = cfg.vision_mlp_dim;
        let mut layers = Vec::with_capacity(cfg.vision_depth);
        for i in 0..cfg.vision_depth {
            let l = keys::siglip::layer(i);
            layers.push(SiglipLayer {
                ln1: ln(ld, &l.layer_norm1)?,
                q: ld.linear(ckpt, l.q.base(), vw, vw, true)?,
                k: ld.linear(ckpt, l.k.base(), vw, vw, true)?,
                v: ld.linear(ckpt, l.v.base(), vw, vw, true)?,
                out: ld.linear(ckpt, l.out.base(), vw, vw, true)?,
                ln2: ln(ld, &l.layer_norm2)?,
                fc1: ld.linear(ckpt, l.fc1.base(), mlp, vw, true)?,
                fc2: ld.linear(ckpt, l.fc2.base(), vw, mlp, true)?,
            });
        }
        let post_ln = ln(ld, &keys::siglip::post_layernorm())?;
        let projector = ld.linear(ckpt, PROJECTOR, cfg.vlm_width, vw, true)?;
        Ok(Siglip {
            cfg,
            patch,
            position,
            layers,
            post_ln,
            projector,
        })
    }

    /// Encodes `n` images, each [size, size, 3] HWC in [-1, 1], concatenated in `pixels`.
    /// Returns [n * tokens_per_image, vlm_width]. Images do not attend to each other, so
    /// they are batched through every Linear and split only for attention.
    pub fn forward(&self, pixels: &[f32], n: usize) -> Vec<f32> {
        self.forward_blocks(pixels, &[n])
    }

    /// [`Siglip::forward`] of the images of several observations at once (`images[i]` of
    /// observation i after those of observation i-1): every Linear runs over all their
    /// tokens, row for row with the bits each observation's images get alone
    /// ([`Linear::forward_blocks`]).
    pub fn forward_blocks(&self, pixels: &[f32], images: &[usize]) -> Vec<f32> {
        let n: usize = images.iter().sum();
        let c = &self.cfg;
        let (size, p, vw) = (c.image_size, c.patch_size, c.vision_width);
        let t = c.tokens_per_image();
        assert_eq!(
            pixels.len(),
            n * size * size * 3,
            "siglip: pixel buffer size"
        );
        let rows = n * t;
        let blocks: Vec<usize> = images.iter().map(|&i| i * t).collect();
        let grid = size / p;
        // im2col: patch (gy, gx) of image i -> row i*t + gy*grid + gx, columns (ch, ky, kx).
        let mut patches = vec![0.0f32; rows * 3 * p * p];
        for i in 0..n {
            let img = &pixels[i * size * size * 3..(i + 1) * size * size * 3];
            for gy in 0..grid {
                for gx in 0..grid {
                    let row = &mut patches[(i * t + gy * grid + gx) * 3 * p * p..][..3 * p * p];
                    for ch in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                let (y, x) = (gy * p + ky, gx * p + kx);
                                row[(ch * p + ky) * p + kx] = img[(y * size + x) * 3 + ch];
                            }
                        }
                    }
                }
            }
        }
        let mut x = self.patch.forward_blocks(&patches, &blocks);
        for tok in x.chunks_exact_mut(t * vw) {
            tok.iter_mut()
                .zip(&self.position)
                .for_each(|(a, b)| *a += b);
        }
        let heads = c.vision_heads;
        let hd = c.vision_head_dim();
        for layer in &self.layers {
            let mut h = x.clone();
            cpu::layer_norm(
                &mut h,
                vw,
                &layer.ln1.weight,
                &layer.ln1.bias,
                c.layer_norm_eps,
            );
            let q = layer.q.forward_blocks(&h, &blocks);
            let k = layer.k.forward_blocks(&h, &blocks);
            let v = layer.v.forward_blocks(&h, &blocks);
            let mut att = vec![0.0f32; rows * vw];
            for i in 0..n {
                let r = i * t * vw..(i + 1) * t * vw;
                let o = cpu::attention(
                    &q[r.clone()],
                    &k[r.clone()],
                    &v[r.clone()],
                    t,
                    t,
                    heads,
                    heads,
                    hd,
                    &|_, _| true,
                );
                att[r].copy_from_slice(&o);
            }
            cpu::add_residual(&mut x, &layer.out.forward_blocks(&att, &blocks), None);
            let mut h = x.clone();
            cpu::layer_norm(
                &mut h,
                vw,
                &layer.ln2.weight,
                &layer.ln2.bias,
                c.layer_norm_eps,
            );
            let mut m = layer.fc1.forward_blocks(&h, &blocks);
            m.iter_mut().for_each(|v| *v = cpu::gelu_tanh(*v));
            cpu::add_residual(&mut x, &layer.fc2.forward_blocks(&m, &blocks), None);
        }
        cpu::layer_norm(
            &mut x,
            vw,
            &self.post_ln.weight,
            &self.post_ln.bias,
            c.layer_norm_eps,
        );
        self.projector.forward_blocks(&x, &blocks)
    }
}
