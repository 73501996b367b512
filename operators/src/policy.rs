//! The stage operators of pi0 / pi0.5 — vision, prefix K/V, denoise — and the policy that
//! chains them. Each is built once from a checkpoint and then run per frame.

use std::time::{Duration, Instant};

use crate::backend::Precision;
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
    /// FP8 emulation of the vision tower: weights and activations ([`Siglip::quantise_fp8`]).
    pub fn quantise_fp8(&mut self) {
        self.siglip.quantise_fp8(true);
    }

    /// FP8 weights only, activations kept (W8A16): what the activations' rounding costs,
    /// measured against [`VisionEncoder::quantise_fp8`] (the `fp8_parts` example).
    pub fn quantise_fp8_weights(&mut self) {
        self.siglip.quantise_fp8(false);
    }

    /// F32, or Fp8 once quantised.
    pub fn precision(&self) -> Precision {
        Precision::cpu(self.siglip.is_fp8())
    }

    pub fn load(ckpt: &Checkpoint, ld: &mut Loader) -> Result<Self> {
        Ok(VisionEncoder {
            cfg: ckpt.config.clone(),
            siglip: Siglip::load(ckpt, ld)?,
        })
    }

    /// The cameras of one observation (`values` pixel values) that are not masked, after
    /// checking its sizes.
    pub fn real_images(&self, values: usize, masks: &[bool]) -> Result<Vec<usize>> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        if masks.len() != c.num_images || values != c.num_images * per_image {
            return Err(Error::Input(format!(
                "vision: expected {} images of {}x{}x3 and {} masks, got {} values and {} masks",
                c.num_images,
                c.image_size,
                c.image_size,
                c.num_images,
                values,
                masks.len()
            )));
        }
        Ok((0..c.num_images).filter(|&i| masks[i]).collect())
    }

    /// `pixels`: [num_images, image_size, image_size, 3] in [-1, 1]; `masks`: [num_images].
    pub fn run(&self, pixels: &[f32], masks: &[bool]) -> Result<ImageEmbeddings> {
        let mut out = self.run_batch(&[(pixels, masks)])?;
        out.pop()
            .ok_or_else(|| Error::Input("vision: no output for one observation".into()))
    }

    /// [`VisionEncoder::run`] of several observations (pixels, masks) at once: the real
    /// cameras of all of them go through SigLIP together, and each observation gets, bit for
    /// bit, the embeddings it gets alone. Any observation of the wrong size fails the call.
    pub fn run_batch(&self, inputs: &[(&[f32], &[bool])]) -> Result<Vec<ImageEmbeddings>> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        let mut counts = Vec::with_capacity(inputs.len());
        let mut batch = Vec::new();
        for (pixels, masks) in inputs {
            let real = self.real_images(pixels.len(), masks)?;
            for &i in &real {
                batch.extend_from_slice(&pixels[i * per_image..(i + 1) * per_image]);
            }
            counts.push(real.len());
        }
        // Every camera masked: no image tokens (the prompt may still be visible).
        let tokens = if batch.is_empty() {
            vec![]
        } else {
            let live: Vec<usize> = counts.iter().copied().filter(|&n| n > 0).collect();
            self.siglip.forward_blocks(&batch, &live)
        };
        let per_embedding = c.tokens_per_image() * c.vlm_width;
        let mut start = 0;
        Ok(counts
            .into_iter()
            .map(|n| {
                let e = ImageEmbeddings {
                    tokens: tokens[start..start + n * per_embedding].to_vec(),
                    real_images: n,
                };
                start += n * per_embedding;
                e
            })
            .collect())
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
    /// FP8 emulation of Gemma 2B: weights and activations. The prefix's GEMMs have hundreds
    /// of rows and are bound by arithmetic, which FP8 tensor cores double only when both
    /// operands are FP8. The embedding table stays f32.
    pub fn quantise_fp8(&mut self) {
        self.gemma.quantise_fp8(true);
    }

    /// FP8 weights only, activations kept (W8A16), as [`VisionEncoder::quantise_fp8_weights`].
    pub fn quantise_fp8_weights(&mut self) {
        self.gemma.quantise_fp8(false);
    }

    /// F32, or Fp8 once quantised.
    pub fn precision(&self) -> Precision {
        Precision::cpu(self.gemma.is_fp8())
    }

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
        Ok(self
            .gemma
            .prefix_kv(self.embed(images, tokens, token_mask)?))
    }

    /// Checks one observation's prefix (prompt length, image embedding size, something
    /// visible, token ids) and gives its real tokens' embeddings [tokens, vlm_width]: image
    /// tokens, then the real prompt tokens.
    pub fn embed(
        &self,
        images: &ImageEmbeddings,
        tokens: &[i32],
        token_mask: &[bool],
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let w = c.vlm_width;
        check_prompt(c, tokens, token_mask)?;
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
        Ok(x)
    }

    /// The K/V caches of several prefixes ([`PrefixEncoder::embed`]'s outputs) in one pass
    /// of the Gemma, each bit for bit the cache it gets alone.
    pub fn run_batch(&self, prefixes: &[Vec<f32>]) -> Vec<KvCache> {
        let w = self.cfg.vlm_width;
        let rows: Vec<usize> = prefixes.iter().map(|x| x.len() / w).collect();
        self.gemma.prefix_kv_batch(prefixes.concat(), &rows)
    }
}

/// A prompt of equal token and mask lengths, at most `max_token_len`.
fn check_prompt(c: &Config, tokens: &[i32], token_mask: &[bool]) -> Result<()> {
    if tokens.len() != token_mask.len() || tokens.len() > c.max_token_len {
        return Err(Error::Input(format!(
            "prefix: {} tokens with {} mask entries; expected equal lengths of at most max_token_len {}",
            tokens.len(),
            token_mask.len(),
            c.max_token_len
        )));
    }
    Ok(())
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
    /// FP8 emulation of the action expert: weights only. Its GEMMs have 10-51 rows and are
    /// bound by reading the weights, which FP8 halves whatever the activations are; rounding
    /// the activations too would cost accuracy and buy no time. The action and time
    /// projections and the adaptive norms stay f32.
    pub fn quantise_fp8(&mut self) {
        self.expert.quantise_fp8(false);
    }

    /// F32, or Fp8 once quantised.
    pub fn precision(&self) -> Precision {
        Precision::cpu(self.expert.is_fp8())
    }

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
        let mut out = self.run_batch(&[cache], &[state], &[noise], steps)?;
        out.pop()
            .ok_or_else(|| Error::Input("denoise: no output for one observation".into()))
    }

    /// [`Denoiser::run`] of several observations at once, each with its own prefix cache,
    /// state and noise: the expert's Linear layers run over every observation's suffix
    /// tokens together, attention per observation, and each gets, bit for bit, the actions
    /// it gets alone. Any observation with bad inputs fails the call.
    pub fn run_batch(
        &self,
        caches: &[&KvCache],
        states: &[Option<&[f32]>],
        noises: &[&[f32]],
        steps: usize,
    ) -> Result<Vec<Vec<f32>>> {
        if states.len() != caches.len() || noises.len() != caches.len() {
            return Err(Error::Input(format!(
                "denoise: {} caches, {} states and {} noises; expected one of each per observation",
                caches.len(),
                states.len(),
                noises.len()
            )));
        }
        for (state, noise) in states.iter().zip(noises) {
            check_sampler_inputs(&self.cfg, *state, noise, steps)?;
        }
        // The state token does not depend on x or t: project it once.
        let state_tokens: Vec<Option<Vec<f32>>> = states
            .iter()
            .map(|state| match (&self.heads, state) {
                (Heads::Pi0 { state_proj, .. }, Some(s)) => Some(state_proj.forward(s, 1)),
                _ => None,
            })
            .collect();
        let dt = (-1.0f64 / steps as f64) as f32;
        let mut t = 1.0f32;
        let mut x = noises.concat();
        for _ in 0..steps {
            let v = self.velocity_batch(caches, &state_tokens, &x, t);
            x.iter_mut().zip(&v).for_each(|(x, v)| *x += dt * v);
            t += dt;
        }
        let per_row = self.cfg.action_horizon * self.cfg.action_dim;
        Ok(x.chunks_exact(per_row).map(<[f32]>::to_vec).collect())
    }

    /// One evaluation of the velocity field v(x_t, t): [action_horizon, action_dim].
    pub fn velocity(
        &self,
        cache: &KvCache,
        state_token: Option<&[f32]>,
        x_t: &[f32],
        t: f32,
    ) -> Vec<f32> {
        self.velocity_batch(&[cache], &[state_token.map(<[f32]>::to_vec)], x_t, t)
    }

    /// [`Denoiser::velocity`] of several observations at the same time `t`: `x_t` holds
    /// their [action_horizon, action_dim] one after another, and so does the result.
    pub fn velocity_batch(
        &self,
        caches: &[&KvCache],
        state_tokens: &[Option<Vec<f32>>],
        x_t: &[f32],
        t: f32,
    ) -> Vec<f32> {
        let c = &self.cfg;
        let (h, ew) = (c.action_horizon, c.expert_width);
        let batch = caches.len();
        let blocks = vec![h; batch];
        let temb = time_embedding(t, ew);
        let actions = self.action_in.forward_blocks(x_t, &blocks);
        let (tokens, cond, per_row) = match &self.heads {
            Heads::Pi0 {
                time_in, time_out, ..
            } => {
                let mut cat = Vec::with_capacity(batch * h * 2 * ew);
                for row in actions.chunks_exact(ew) {
                    cat.extend_from_slice(row);
                    cat.extend_from_slice(&temb);
                }
                let mut m = time_in.forward_blocks(&cat, &blocks);
                m.iter_mut().for_each(|v| *v = cpu::silu(*v));
                let action_tokens = time_out.forward_blocks(&m, &blocks);
                let with_state = state_tokens.iter().any(Option::is_some);
                let per_row = h + usize::from(with_state);
                let mut tokens = Vec::with_capacity(batch * per_row * ew);
                for (b, state) in state_tokens.iter().enumerate() {
                    if let Some(s) = state {
                        tokens.extend_from_slice(s);
                    }
                    tokens.extend_from_slice(&action_tokens[b * h * ew..(b + 1) * h * ew]);
                }
                (tokens, None, per_row)
            }
            Heads::Pi05 { time_in, time_out } => {
                // The condition depends on t alone: one for the whole batch.
                let mut m = time_in.forward(&temb, 1);
                m.iter_mut().for_each(|v| *v = cpu::silu(*v));
                let mut cond = time_out.forward(&m, 1);
                cond.iter_mut().for_each(|v| *v = cpu::silu(*v));
                (actions, Some(cond), h)
            }
        };
        let positions: Vec<usize> = caches
            .iter()
            .flat_map(|cache| cache.len..cache.len + per_row)
            .collect();
        // pi0: block 0 = state, block 1 = actions (the state does not see the actions).
        let first_action = per_row - h;
        let block = |i: usize| usize::from(i >= first_action);
        let visible = |i: usize, j: usize| block(j) <= block(i);
        let out =
            self.expert
                .suffix_forward_batch(tokens, &positions, caches, &visible, cond.as_deref());
        let mut action_rows = Vec::with_capacity(batch * h * ew);
        for b in 0..batch {
            let start = (b * per_row + first_action) * ew;
            action_rows.extend_from_slice(&out[start..start + h * ew]);
        }
        self.action_out.forward_blocks(&action_rows, &blocks)
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

impl std::ops::AddAssign for StageTimes {
    fn add_assign(&mut self, other: StageTimes) {
        self.vision += other.vision;
        self.prefix += other.prefix;
        self.denoise += other.denoise;
    }
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

    /// FP8 emulation of every stage ([`crate::fp8`]): what `--dtype fp8` computes, in f32
    /// arithmetic on FP8 values.
    pub fn quantise_fp8(&mut self) {
        self.quantise_fp8_stages(crate::fp8::Stages::ALL);
    }

    /// FP8 emulation of the stages in `stages` (`TURBOPI_FP8_STAGES`); the others stay f32.
    pub fn quantise_fp8_stages(&mut self, stages: crate::fp8::Stages) {
        if stages.vision {
            self.vision.quantise_fp8();
        }
        if stages.prefix {
            self.prefix.quantise_fp8();
        }
        if stages.expert {
            self.denoise.quantise_fp8();
        }
    }

    /// The stages emulated in FP8.
    pub fn fp8_stages(&self) -> crate::fp8::Stages {
        let fp8 = |p: Precision| p == Precision::Fp8;
        crate::fp8::Stages {
            vision: fp8(self.vision.precision()),
            prefix: fp8(self.prefix.precision()),
            expert: fp8(self.denoise.precision()),
        }
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
        let emb = self.vision.run(&obs.images.unit(), &obs.image_masks)?;
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

    /// Runs up to [`MAX_BATCH`] observations, each with its own noise, in one forward per
    /// stage: the real cameras of all of them through SigLIP together, every prefix through
    /// the Gemma together (each at its own positions, with its own prompt length and image
    /// masks, attending only to itself), every suffix through the expert together against its
    /// own K/V cache. Row i's actions are bit for bit those of [`Policy::infer`] on row i
    /// (the GEMMs stack rows only where that keeps each row's order of additions,
    /// [`crate::cpu::Linear::forward_blocks`]). A row whose inputs are bad gets its error and
    /// the others still run; too many rows or zero steps fail the call.
    pub fn infer_batch(&self, rows: &[BatchRow<'_>], steps: usize) -> Result<BatchOutput> {
        check_batch(rows.len())?;
        if steps == 0 {
            return Err(Error::Input("denoise: steps must be at least 1".into()));
        }
        let mut results: Vec<Option<Result<Vec<f32>>>> = rows.iter().map(|_| None).collect();
        let mut live = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            match self.check_row(row, steps) {
                Ok(()) => live.push(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let t0 = Instant::now();
        let pixels: Vec<_> = live.iter().map(|&i| rows[i].obs.images.unit()).collect();
        let inputs: Vec<(&[f32], &[bool])> = live
            .iter()
            .zip(&pixels)
            .map(|(&i, px)| (&px[..], &rows[i].obs.image_masks[..]))
            .collect();
        let embeddings = self.vision.run_batch(&inputs)?;
        let t1 = Instant::now();
        let mut prefixes = Vec::with_capacity(live.len());
        let mut embedded = Vec::with_capacity(live.len());
        for (&i, emb) in live.iter().zip(&embeddings) {
            let obs = rows[i].obs;
            match self.prefix.embed(emb, &obs.tokens, &obs.token_mask) {
                Ok(x) => {
                    prefixes.push(x);
                    embedded.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let caches = self.prefix.run_batch(&prefixes);
        let t2 = Instant::now();
        let cache_refs: Vec<&KvCache> = caches.iter().collect();
        let states: Vec<Option<&[f32]>> = embedded
            .iter()
            .map(|&i| rows[i].obs.state.as_deref())
            .collect();
        let noises: Vec<&[f32]> = embedded.iter().map(|&i| rows[i].noise).collect();
        let actions = self
            .denoise
            .run_batch(&cache_refs, &states, &noises, steps)?;
        let t3 = Instant::now();
        for (i, a) in embedded.into_iter().zip(actions) {
            results[i] = Some(Ok(a));
        }
        Ok(BatchOutput {
            actions: results
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| Err(Error::Input("internal: a row was not run".into())))
                })
                .collect(),
            times: StageTimes {
                vision: t1 - t0,
                prefix: t2 - t1,
                denoise: t3 - t2,
            },
        })
    }

    /// What [`Policy::infer`] checks of one observation before running it (token ids are
    /// checked when the prompt is embedded).
    fn check_row(&self, row: &BatchRow<'_>, steps: usize) -> Result<()> {
        let obs = row.obs;
        let real_images = self
            .vision
            .real_images(obs.images.len(), &obs.image_masks)?
            .len();
        check_prompt(&self.config, &obs.tokens, &obs.token_mask)?;
        let real_tokens = obs.token_mask.iter().filter(|&&m| m).count();
        crate::observation::check_visible(real_images, real_tokens)?;
        check_sampler_inputs(&self.config, obs.state.as_deref(), row.noise, steps)
    }
}

/// The most observations one batched forward takes ([`Policy::infer_batch`],
/// [`crate::backend::Runner::infer_batch`]).
pub const MAX_BATCH: usize = 8;

/// A batch of `rows` observations is at most [`MAX_BATCH`].
pub fn check_batch(rows: usize) -> Result<()> {
    if rows > MAX_BATCH {
        return Err(Error::Input(format!(
            "a batch of {rows} observations; at most {MAX_BATCH} run together"
        )));
    }
    Ok(())
}

/// One observation of a batch and its noise [action_horizon, action_dim] (the noise a
/// single request with the same seed gets: [`crate::observation::noise_from_seed`]).
#[derive(Clone, Copy)]
pub struct BatchRow<'a> {
    pub obs: &'a Observation,
    pub noise: &'a [f32],
}

/// A batch's answer: each row's actions [action_horizon, action_dim], or why that row could
/// not run; and the time of each stage for the whole batch.
#[derive(Debug)]
pub struct BatchOutput {
    pub actions: Vec<Result<Vec<f32>>>,
    pub times: StageTimes,
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
