//! The stage operators of pi0 / pi0.5 — vision, prefix K/V, denoise — and the policy that
//! chains them. Each is built once from a checkpoint and then run per frame.

use std::time::{Duration, Instant};

use crate::checkpoint::{Checkpoint, EMBED, EXPERT, VLM};
use crate::config::Config;
use crate::cpu::{self, Linear};
use crate::gemma::{Gemma, KvCache};
use crate::observation::Observation;
use crate::siglip::Siglip;
use crate::weights::Loader;
use crate::{Error, Result};

pub mod velocity_vjp;

/// Image tokens of the real cameras, in camera order: [real_images * tokens_per_image, vlm_width].
pub struct ImageEmbeddings {
    pub tokens: Vec<f32>,
    pub real_images: usize,
}

/// Stage 1: SigLIP + projector. Masked cameras are skipped: their tokens are invisible to
/// every other token, so computing them could not change the actions.
pub struct VisionEncoder {
    cfg: Config,
    siglip: Siglip,
}

impl VisionEncoder {
    pub fn load(ckpt: &Checkpoint, ld: &mut Loader) -> Result<Self> {
        Ok(VisionEncoder {
            cfg: ckpt.config.clone(),
            siglip: Siglip::load(ckpt, ld)?,
        })
    }

    /// `pixels`: [num_images, image_size, image_size, 3] in [-1, 1]; `masks`: [num_images].
    pub fn run(&self, pixels: &[f32], masks: &[bool]) -> Result<ImageEmbeddings> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        if masks.len() != c.num_images || pixels.len() != c.num_images * per_image {
            return Err(Error::Input(format!(
                "vision: expected {} images of {}x{}x3 and {} masks, got {} values and {} masks",
                c.num_images,
                c.image_size,
                c.image_size,
                c.num_images,
                pixels.len(),
                masks.len()
            )));
        }
        let real: Vec<usize> = (0..c.num_images).filter(|&i| masks[i]).collect();
        if real.is_empty() {
            // Every camera masked: no image tokens (the prompt may still be visible).
            return Ok(ImageEmbeddings {
                tokens: vec![],
                real_images: 0,
            });
        }
        let mut batch = Vec::with_capacity(real.len() * per_image);
        for &i in &real {
            batch.extend_from_slice(&pixels[i * per_image..(i + 1) * per_image]);
        }
        Ok(ImageEmbeddings {
            tokens: self.siglip.forward(&batch, real.len()),
            real_images: real.len(),
        })
    }
}

/// Stage 2: token embedding and the Gemma 2B prefix, producing the per-layer K/V cache of
/// the real prefix tokens (positions 0..len).
pub struct PrefixEncoder {
    cfg: Config,
    embed: Vec<f32>,
    gemma: Gemma,
}

impl PrefixEncoder {
    pub fn load(ckpt: &Checkpoint, ld: &mut Loader) -> Result<Self> {
        let c = &ckpt.config;
        Ok(PrefixEncoder {
            cfg: c.clone(),
            embed: ld.tensor(ckpt, EMBED, &[c.vocab_size, c.vlm_width])?,
            gemma: Gemma::load(ckpt, ld, VLM, c.vlm_width, c.vlm_mlp_dim, false, false)?,
        })
    }

    pub fn run(
        &self,
        images: &ImageEmbeddings,
        tokens: &[i32],
        token_mask: &[bool],
    ) -> Result<KvCache> {
        let c = &self.cfg;
        let w = c.vlm_width;
        if tokens.len() != token_mask.len() || tokens.len() > c.max_token_len {
            return Err(Error::Input(format!(
                "prefix: {} tokens with {} mask entries; expected equal lengths of at most max_token_len {}",
                tokens.len(),
                token_mask.len(),
                c.max_token_len
            )));
        }
        if images.tokens.len() != images.real_images * c.tokens_per_image() * w {
            return Err(Error::Input(
                "prefix: image embeddings of the wrong size".into(),
            ));
        }
        let real_tokens = token_mask.iter().filter(|&&m| m).count();
        crate::observation::check_visible(images.real_images, real_tokens)?;
        let mut x = images.tokens.clone();
        // openpi multiplies the prompt embeddings by sqrt(width) as an f32 scalar.
        let scale = (w as f64).sqrt() as f32;
        for (&t, _) in tokens.iter().zip(token_mask).filter(|(_, &m)| m) {
            let id = usize::try_from(t)
                .ok()
                .filter(|&id| id < c.vocab_size)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "token id {t} is outside the vocabulary [0, {})",
                        c.vocab_size
                    ))
                })?;
            x.extend(self.embed[id * w..(id + 1) * w].iter().map(|v| v * scale));
        }
        Ok(self.gemma.prefix_kv(x))
    }
}

/// The heads around the expert that differ between pi0 and pi0.5.
enum Heads {
    Pi0 {
        state_proj: Linear,
        time_in: Linear,
        time_out: Linear,
    },
    Pi05 {
        time_in: Linear,
        time_out: Linear,
    },
}

/// Stage 3: the flow-matching Euler sampler over the action expert.
pub struct Denoiser {
    cfg: Config,
    expert: Gemma,
    action_in: Linear,
    action_out: Linear,
    heads: Heads,
}

impl Denoiser {
    pub fn load(ckpt: &Checkpoint, ld: &mut Loader) -> Result<Self> {
        let c = &ckpt.config;
        let (ew, ad) = (c.expert_width, c.action_dim);
        let expert = Gemma::load(ckpt, ld, EXPERT, ew, c.expert_mlp_dim, c.pi05, true)?;
        use crate::keys::heads;
        let mut lin =
            |key: crate::keys::Param, n_out, n_in| ld.linear(ckpt, key.base(), n_out, n_in, true);
        let action_in = lin(heads::action_in(), ew, ad)?;
        let action_out = lin(heads::action_out(), ad, ew)?;
        let heads = if c.pi05 {
            Heads::Pi05 {
                time_in: lin(heads::time_in(), ew, ew)?,
                time_out: lin(heads::time_out(), ew, ew)?,
            }
        } else {
            Heads::Pi0 {
                state_proj: lin(heads::state(), ew, ad)?,
                time_in: lin(heads::action_time_in(), ew, 2 * ew)?,
                time_out: lin(heads::action_time_out(), ew, ew)?,
            }
        };
        Ok(Denoiser {
            cfg: c.clone(),
            expert,
            action_in,
            action_out,
            heads,
        })
    }

    /// Samples actions [action_horizon, action_dim] from `noise` in exactly `steps` Euler
    /// steps: t = 1, dt = -1/steps, x += dt * v(x, t), all in f32 as openpi.
    pub fn run(
        &self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<Vec<f32>> {
        check_sampler_inputs(&self.cfg, state, noise, steps)?;
        // The state token does not depend on x or t: project it once.
        let state_token = match (&self.heads, state) {
            (Heads::Pi0 { state_proj, .. }, Some(s)) => Some(state_proj.forward(s, 1)),
            _ => None,
        };
        let dt = (-1.0f64 / steps as f64) as f32;
        let mut t = 1.0f32;
        let mut x = noise.to_vec();
        for _ in 0..steps {
            let v = self.velocity(cache, state_token.as_deref(), &x, t);
            x.iter_mut().zip(&v).for_each(|(x, v)| *x += dt * v);
            t += dt;
        }
        Ok(x)
    }

    /// One evaluation of the velocity field v(x_t, t): [action_horizon, action_dim].
    pub fn velocity(
        &self,
        cache: &KvCache,
        state_token: Option<&[f32]>,
        x_t: &[f32],
        t: f32,
    ) -> Vec<f32> {
        let c = &self.cfg;
        let (h, ew) = (c.action_horizon, c.expert_width);
        let temb = time_embedding(t, ew);
        let actions = self.action_in.forward(x_t, h);
        let (tokens, cond) = match &self.heads {
            Heads::Pi0 {
                time_in, time_out, ..
            } => {
                let mut cat = Vec::with_capacity(h * 2 * ew);
                for row in actions.chunks_exact(ew) {
                    cat.extend_from_slice(row);
                    cat.extend_from_slice(&temb);
                }
                let mut m = time_in.forward(&cat, h);
                m.iter_mut().for_each(|v| *v = cpu::silu(*v));
                let mut tokens = state_token.map(<[f32]>::to_vec).unwrap_or_default();
                tokens.extend(time_out.forward(&m, h));
                (tokens, None)
            }
            Heads::Pi05 { time_in, time_out } => {
                let mut m = time_in.forward(&temb, 1);
                m.iter_mut().for_each(|v| *v = cpu::silu(*v));
                let mut cond = time_out.forward(&m, 1);
                cond.iter_mut().for_each(|v| *v = cpu::silu(*v));
                (actions, Some(cond))
            }
        };
        let rows = tokens.len() / ew;
        let positions: Vec<usize> = (cache.len..cache.len + rows).collect();
        // pi0: block 0 = state, block 1 = actions (the state does not see the actions).
        let first_action = rows - h;
        let block = |i: usize| usize::from(i >= first_action);
        let visible = |i: usize, j: usize| block(j) <= block(i);
        let out = self
            .expert
            .suffix_forward(tokens, &positions, cache, &visible, cond.as_deref());
        self.action_out.forward(&out[first_action * ew..], h)
    }
}

/// Checks what every backend's sampler needs: noise [action_horizon, action_dim], at least
/// one step, and for pi0 a state of action_dim values.
pub fn check_sampler_inputs(
    cfg: &Config,
    state: Option<&[f32]>,
    noise: &[f32],
    steps: usize,
) -> Result<()> {
    let (h, ad) = (cfg.action_horizon, cfg.action_dim);
    if noise.len() != h * ad {
        return Err(Error::Input(format!(
            "denoise: noise has {} values, expected [{h}, {ad}]",
            noise.len()
        )));
    }
    if steps == 0 {
        return Err(Error::Input("denoise: steps must be at least 1".into()));
    }
    if !cfg.pi05 {
        let s = state.ok_or_else(|| Error::Input("pi0 needs a state (state.npy)".into()))?;
        if s.len() != ad {
            return Err(Error::Input(format!(
                "state has {} values, expected {ad}",
                s.len()
            )));
        }
    }
    Ok(())
}

/// openpi's sine-cosine time embedding (periods 4e-3 .. 4), computed in f64, cast to f32.
pub fn time_embedding(t: f32, width: usize) -> Vec<f32> {
    let half = width / 2;
    let t = t as f64;
    let (min_p, max_p) = (4e-3f64, 4.0f64);
    let args: Vec<f64> = (0..half)
        .map(|i| {
            let fraction = if half == 1 {
                0.0
            } else {
                i as f64 / (half - 1) as f64
            };
            let period = min_p * (max_p / min_p).powf(fraction);
            1.0 / period * 2.0 * std::f64::consts::PI * t
        })
        .collect();
    args.iter()
        .map(|a| a.sin() as f32)
        .chain(args.iter().map(|a| a.cos() as f32))
        .collect()
}

/// Wall time of each stage of one inference.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub vision: Duration,
    pub prefix: Duration,
    pub denoise: Duration,
}

/// The three model stages in one process (one load of the weights).
pub struct Policy {
    pub config: Config,
    pub vision: VisionEncoder,
    pub prefix: PrefixEncoder,
    pub denoise: Denoiser,
}

impl Policy {
    /// Loads every tensor as f32; `progress(bytes_done, bytes_total)` is called as it goes.
    pub fn load(ckpt: &Checkpoint, progress: impl FnMut(u64, u64)) -> Result<Self> {
        let mut ld = Loader::new(ckpt, progress);
        Ok(Policy {
            config: ckpt.config.clone(),
            vision: VisionEncoder::load(ckpt, &mut ld)?,
            prefix: PrefixEncoder::load(ckpt, &mut ld)?,
            denoise: Denoiser::load(ckpt, &mut ld)?,
        })
    }

    /// Runs all stages on `obs` with the given noise [action_horizon, action_dim].
    pub fn infer(
        &self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, StageTimes)> {
        let real_images = obs.image_masks.iter().filter(|&&m| m).count();
        let real_tokens = obs.token_mask.iter().filter(|&&m| m).count();
        crate::observation::check_visible(real_images, real_tokens)?;
        let t0 = Instant::now();
        let emb = self.vision.run(&obs.images, &obs.image_masks)?;
        let t1 = Instant::now();
        let cache = self.prefix.run(&emb, &obs.tokens, &obs.token_mask)?;
        let t2 = Instant::now();
        let actions = self
            .denoise
            .run(&cache, obs.state.as_deref(), noise, steps)?;
        let t3 = Instant::now();
        Ok((
            actions,
            StageTimes {
                vision: t1 - t0,
                prefix: t2 - t1,
                denoise: t3 - t2,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_embedding_matches_closed_form() {
        let e = time_embedding(0.5, 8);
        // fraction 0 -> period 4e-3 -> arg = 0.5 * 2pi / 4e-3
        let a0 = 0.5f64 * 2.0 * std::f64::consts::PI / 4e-3;
        assert_eq!(e[0], a0.sin() as f32);
        assert_eq!(e[4], a0.cos() as f32);
        // fraction 1 -> period 4 -> arg = pi / 4
        assert!((e[3] - (std::f64::consts::PI / 4.0).sin() as f32).abs() < 1e-7);
        assert_eq!(time_embedding(0.0, 4), vec![0.0, 0.0, 1.0, 1.0]);
    }
}
