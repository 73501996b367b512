//! The policy on one GPU: the three stages of [`super::stages`] in one process, each on its
//! own stream, ordered by events whose timestamps are the stage times, with two K/V cache
//! slots so that two frames can be in flight (frame t+1's vision and prefix run while frame t
//! denoises). A frame allocates nothing and synchronises once: the observation is staged in
//! pinned buffers, the stages' graphs run, the actions come back. A frame guided by real-time
//! chunking ([`Runner::infer_guided`]) runs alone, through the denoise stage's guided graph
//! (the Jacobian term dropped: docs/rtc.md). A batch ([`Runner::infer_batch`]) runs alone
//! too: one vision run over every row's cameras, each row's prefix into its own cache slot
//! (one per row of the largest batch; the first two are the pipelined frames'), one denoise
//! loop over all of them.

use std::collections::VecDeque;

use super::device::{guard, CudaResult, DType, DeviceBuffer, PinnedBuffer, Pod};
use super::stages::denoise::{Denoise, GuideHost};
use super::stages::prefix::Prefix;
use super::stages::vision::{Staged, Vision};
use super::stages::{act_type, CacheShape, CacheSlot, Engine, KvSlots, Span};
use crate::backend::{Precision, Runner};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::observation::{Observation, Pixels};
use crate::policy::StageTimes;
use crate::policy::{check_batch, BatchOutput, BatchRow};
use crate::rtc::{self, Jacobian};
use crate::weights::Loader;
use crate::MAX_BATCH;
use crate::{Error, Result};

/// What one frame in flight holds: its staged inputs and actions (pinned) and the timing
/// events of its three stages. Frame slot i uses K/V cache slot i.
pub(crate) struct FrameSlot {
    pub(crate) pixels: PinnedBuffer,
    pub(crate) ids: PinnedBuffer,
    pub(crate) info: PinnedBuffer,
    pub(crate) noise: PinnedBuffer,
    pub(crate) state: PinnedBuffer,
    pub(crate) actions: PinnedBuffer,
    /// A guided frame's mask and target (real-time chunking), [action_horizon, action_dim].
    pub(crate) guide_weight: PinnedBuffer,
    pub(crate) guide_target: PinnedBuffer,
    pub(crate) vision: Span,
    pub(crate) prefix: Span,
    pub(crate) denoise: Span,
}

/// What [`FrameSlot::stage_images`] staged: how many values, and as what.
#[derive(Clone, Copy)]
pub(crate) enum StagedAs {
    Unit(usize),
    Bytes(usize),
}

/// `images` as the staging copy reads them.
pub(crate) fn staged_of(images: &Pixels) -> Staged<'_> {
    match images {
        Pixels::Unit(v) => Staged::Unit(v),
        Pixels::Bytes(b) => Staged::Bytes(b),
    }
}

impl FrameSlot {
    pub(crate) fn new(e: &Engine, cfg: &Config) -> Result<FrameSlot> {
        let f = std::mem::size_of::<f32>();
        let pin = |values: usize| PinnedBuffer::alloc(&e.dev, values.max(1) * f);
        Ok(FrameSlot {
            pixels: pin(cfg.num_images * cfg.image_size * cfg.image_size * 3)?,
            ids: pin(cfg.max_token_len)?,
            info: pin(4)?,
            noise: pin(cfg.action_horizon * cfg.action_dim)?,
            state: pin(cfg.action_dim)?,
            actions: pin(cfg.action_horizon * cfg.action_dim)?,
            guide_weight: pin(cfg.action_horizon * cfg.action_dim)?,
            guide_target: pin(cfg.action_horizon * cfg.action_dim)?,
            vision: Span::new(e)?,
            prefix: Span::new(e)?,
            denoise: Span::new(e)?,
        })
    }

    /// Copies the real cameras of `images` ([num_images, size, size, 3]) into the pinned
    /// pixels, as they come (values in [-1, 1], or bytes); returns what it staged (read it
    /// with [`FrameSlot::staged`]).
    pub(crate) fn stage_images(
        &mut self,
        images: Staged,
        real: &[usize],
        per_image: usize,
    ) -> Result<StagedAs> {
        fn copy<T: Pod>(dst: &mut [T], src: &[T], real: &[usize], per_image: usize) {
            for (d, &i) in dst.chunks_exact_mut(per_image).zip(real) {
                d.copy_from_slice(&src[i * per_image..(i + 1) * per_image]);
            }
        }
        let n = real.len() * per_image;
        Ok(match images {
            Staged::Unit(v) => {
                copy(self.pixels.slice_mut::<f32>(n)?, v, real, per_image);
                StagedAs::Unit(n)
            }
            Staged::Bytes(b) => {
                copy(self.pixels.slice_mut::<u8>(n)?, b, real, per_image);
                StagedAs::Bytes(n)
            }
        })
    }

    /// The pinned pixels [`FrameSlot::stage_images`] wrote.
    pub(crate) fn staged(&self, s: StagedAs) -> Result<Staged<'_>> {
        Ok(match s {
            StagedAs::Unit(n) => Staged::Unit(self.pixels.slice::<f32>(n)?),
            StagedAs::Bytes(n) => Staged::Bytes(self.pixels.slice::<u8>(n)?),
        })
    }

    /// Copies the prompt ids and the cache info [P, 0, 0, 0] (P: prefix length) into pinned
    /// memory.
    pub(crate) fn stage_prompt(&mut self, ids: &[i32], p: usize) -> Result<()> {
        self.ids.slice_mut::<i32>(ids.len())?.copy_from_slice(ids);
        let p = i32::try_from(p).map_err(|_| Error::Input("prefix too long".into()))?;
        self.info
            .slice_mut::<i32>(4)?
            .copy_from_slice(&[p, 0, 0, 0]);
        Ok(())
    }

    /// Copies the noise and (when given) the state into pinned memory.
    pub(crate) fn stage_sampler(&mut self, noise: &[f32], state: Option<&[f32]>) -> Result<()> {
        self.noise
            .slice_mut::<f32>(noise.len())?
            .copy_from_slice(noise);
        if let Some(s) = state {
            self.state.slice_mut::<f32>(s.len())?.copy_from_slice(s);
        }
        Ok(())
    }

    /// Copies a guide's mask and target (each [action_horizon, action_dim]) into pinned
    /// memory.
    pub(crate) fn stage_guide(&mut self, weight: &[f32], target: &[f32]) -> Result<()> {
        self.guide_weight
            .slice_mut::<f32>(weight.len())?
            .copy_from_slice(weight);
        self.guide_target
            .slice_mut::<f32>(target.len())?
            .copy_from_slice(target);
        Ok(())
    }
}

/// What a batch run together holds beyond its rows' frame slots: every row's real cameras,
/// noise and (pi0) state, and its actions, one row after another (pinned); the image rows of
/// every row, which one vision run writes and each row's prefix copies from (device); and
/// the timing events of its one vision run and one denoise loop.
pub(crate) struct BatchSlot {
    pixels: PinnedBuffer,
    noise: PinnedBuffer,
    state: PinnedBuffer,
    actions: PinnedBuffer,
    image_rows: DeviceBuffer,
    vision: Span,
    denoise: Span,
}

impl BatchSlot {
    fn new(e: &Engine, cfg: &Config) -> Result<BatchSlot> {
        let f = std::mem::size_of::<f32>();
        let chunk = cfg.action_horizon * cfg.action_dim;
        let pin = |values: usize| PinnedBuffer::alloc(&e.dev, (MAX_BATCH * values).max(1) * f);
        let cameras = cfg.num_images * cfg.image_size * cfg.image_size * 3;
        let rows = MAX_BATCH * cfg.num_images * cfg.tokens_per_image() * cfg.vlm_width;
        Ok(BatchSlot {
            pixels: pin(cameras)?,
            noise: pin(chunk)?,
            state: pin(cfg.action_dim)?,
            actions: pin(chunk)?,
            image_rows: DeviceBuffer::alloc(&e.dev, DType::F32, rows.max(1))?,
            vision: Span::new(e)?,
            denoise: Span::new(e)?,
        })
    }

    /// Every row's real cameras (`real`: the cameras of row j of `rows`), one after another,
    /// into the pinned pixels: as bytes when every row's come as bytes, else as values in
    /// [-1, 1] (bytes mapped on the host, [`crate::image::unit_into`]); returns what it staged
    /// (read it with [`BatchSlot::staged`]) and how many cameras.
    fn stage_images(
        &mut self,
        obs: &[&Observation],
        real: &[&[usize]],
        per_image: usize,
    ) -> Result<(StagedAs, usize)> {
        let cameras: usize = real.iter().map(|r| r.len()).sum();
        let n = cameras * per_image;
        let bytes = obs.iter().all(|o| matches!(o.images, Pixels::Bytes(_)));
        if bytes {
            let dst = self.pixels.slice_mut::<u8>(n)?;
            let mut at = dst.chunks_exact_mut(per_image);
            for (o, cams) in obs.iter().zip(real) {
                if let Pixels::Bytes(b) = &o.images {
                    for (&i, d) in cams.iter().zip(at.by_ref()) {
                        d.copy_from_slice(&b[i * per_image..(i + 1) * per_image]);
                    }
                }
            }
            return Ok((StagedAs::Bytes(n), cameras));
        }
        let dst = self.pixels.slice_mut::<f32>(n)?;
        let mut at = dst.chunks_exact_mut(per_image);
        for (o, cams) in obs.iter().zip(real) {
            for (&i, d) in cams.iter().zip(at.by_ref()) {
                let r = i * per_image..(i + 1) * per_image;
                match &o.images {
                    Pixels::Unit(v) => d.copy_from_slice(&v[r]),
                    Pixels::Bytes(b) => crate::image::unit_into(d, &b[r]),
                }
            }
        }
        Ok((StagedAs::Unit(n), cameras))
    }

    fn staged(&self, s: StagedAs) -> Result<Staged<'_>> {
        Ok(match s {
            StagedAs::Unit(n) => Staged::Unit(self.pixels.slice::<f32>(n)?),
            StagedAs::Bytes(n) => Staged::Bytes(self.pixels.slice::<u8>(n)?),
        })
    }
}

/// A guided frame's guide as the device reads it: the mask and target per value and the
/// guidance weight per step (f32, from [`rtc::Prepared`]).
struct DeviceGuide {
    weight: Vec<f32>,
    target: Vec<f32>,
    coef: Vec<f32>,
}

/// The policy on one GPU. Fields drop in order: stages (graphs, buffers, weights) before the
/// engine (kernels, cuBLASLt, the context).
pub struct CudaPolicy {
    vision: Vision,
    prefix: Prefix,
    denoise: Denoise,
    /// One slot per row of the largest batch (at least two: pipelined frames use 0 and 1).
    caches: KvSlots,
    frames: [FrameSlot; 2],
    batch: BatchSlot,
    /// Frames submitted and not yet collected (their slots, oldest first).
    in_flight: VecDeque<usize>,
    cfg: Config,
    precision: Precision,
    engine: Engine,
}

impl CudaPolicy {
    /// The stages whose large linear layers run in FP8 (none outside `--dtype fp8`; with it,
    /// what this card's cuBLASLt allows of `TURBOPI_FP8_STAGES`).
    pub fn fp8_stages(&self) -> crate::fp8::Stages {
        self.engine.fp8
    }

    /// Loads `ckpt` onto the GPU (device `TURBOPI_CUDA_DEVICE`, default 0): compiles the
    /// kernels, lays out and uploads every stage's weights, allocates every buffer a frame
    /// needs. `progress(bytes_read, bytes_total)` is called as tensors are read.
    pub fn load(
        ckpt: &Checkpoint,
        precision: Precision,
        progress: impl FnMut(u64, u64),
    ) -> Result<CudaPolicy> {
        Self::load_with_stages(ckpt, precision, None, progress)
    }

    /// [`CudaPolicy::load`] with the FP8 stages given, as `TURBOPI_FP8_STAGES` would give
    /// them (None: that setting; see [`Engine::open_with`]).
    pub fn load_with_stages(
        ckpt: &Checkpoint,
        precision: Precision,
        stages: Option<crate::fp8::Stages>,
        progress: impl FnMut(u64, u64),
    ) -> Result<CudaPolicy> {
        guard("loading the policy on the GPU", move || {
            let p = Self::build(&ckpt.config, precision, stages)?;
            let mut ld = Loader::new(ckpt, progress);
            p.vision.weights.fill_from(ckpt, &mut ld, &p.vision.lane)?;
            p.prefix.weights.fill_from(ckpt, &mut ld, &p.prefix.lane)?;
            p.denoise
                .weights
                .fill_from(ckpt, &mut ld, &p.denoise.lane)?;
            Ok(p)
        })
    }

    /// A policy of `cfg` with random weights generated on the device (for benchmarks: no
    /// checkpoint to write or read). The values differ from `random::write_random_checkpoint`'s
    /// (another generator) but have the same scales.
    pub fn random(cfg: &Config, precision: Precision, seed: u64) -> Result<CudaPolicy> {
        guard("building a random-weight policy on the GPU", || {
            cfg.validate()?;
            let p = Self::build(cfg, precision, None)?;
            let k = (&p.engine.dev, &p.engine.kernels);
            p.vision.weights.fill_random(k, &p.vision.lane, seed)?;
            p.prefix.weights.fill_random(k, &p.prefix.lane, seed)?;
            p.denoise.weights.fill_random(k, &p.denoise.lane, seed)?;
            Ok(p)
        })
    }

    fn build(
        cfg: &Config,
        precision: Precision,
        stages: Option<crate::fp8::Stages>,
    ) -> Result<CudaPolicy> {
        let engine = Engine::open_with(precision, stages)?;
        let vision = Vision::with_capacity(&engine, cfg, MAX_BATCH * cfg.num_images)?;
        let prefix = Prefix::new(&engine, cfg)?;
        let denoise = Denoise::new(&engine, cfg)?;
        let shape = CacheShape::of(cfg, act_type(precision));
        let caches = KvSlots::new(&engine, &prefix.lane, shape, MAX_BATCH.max(2))?;
        let frames = [FrameSlot::new(&engine, cfg)?, FrameSlot::new(&engine, cfg)?];
        let batch = BatchSlot::new(&engine, cfg)?;
        Ok(CudaPolicy {
            vision,
            prefix,
            denoise,
            caches,
            frames,
            batch,
            in_flight: VecDeque::new(),
            cfg: cfg.clone(),
            precision,
            engine,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Device memory held by the weights, in bytes.
    pub fn weight_bytes(&self) -> usize {
        self.vision.weights.bytes() + self.prefix.weights.bytes() + self.denoise.weights.bytes()
    }

    /// Builds (once per step count) the denoise graph of both cache slots and the guided
    /// one of slot 0 (where guided frames, which run alone, denoise), so that the first
    /// timed frame does not pay for the capture.
    pub fn warm_up(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::Input("denoise: steps must be at least 1".into()));
        }
        guard("warming up the denoise graph", || {
            self.engine.dev.bind()?;
            for slot in 0..2 {
                let cache = self.caches.get(slot)?;
                self.denoise.prepare(&self.engine, steps, cache)?;
            }
            let cache = self.caches.get(0)?;
            self.denoise.prepare_guided(&self.engine, steps, cache)?;
            for n in 2..=MAX_BATCH {
                let caches = self.caches.batch(n)?;
                self.denoise.prepare_batch(&self.engine, steps, caches)?;
            }
            self.denoise.lane.synchronize()
        })
    }

    /// Runs and captures the vision graph of every camera count and, for `prompt_tokens` real
    /// prompt tokens, the prefix graph of every camera count and cache slot, on placeholder
    /// inputs: the first frames then cost what later ones do.
    pub fn warm_up_stages(&mut self, prompt_tokens: usize) -> Result<()> {
        guard("warming up the stage graphs", || {
            self.engine.dev.bind()?;
            let c = self.cfg.clone();
            if prompt_tokens > c.max_token_len {
                return Err(Error::Input(format!(
                    "prefix: {prompt_tokens} prompt tokens, at most max_token_len {}",
                    c.max_token_len
                )));
            }
            let per_image = c.image_size * c.image_size * 3;
            let out_rows = self.prefix.input_rows(self.vision.rows(c.num_images))?;
            for n in 1..=c.num_images {
                let real: Vec<usize> = (0..n).collect();
                let px = vec![0.0f32; n * per_image];
                let f = &mut self.frames[0];
                let staged = f.stage_images(Staged::Unit(&px), &real, per_image)?;
                let pinned = f.staged(staged)?;
                self.vision.enqueue(&self.engine, pinned, n, out_rows)?;
                self.vision.lane.synchronize()?;
            }
            // A batch's vision runs every row's cameras at once, into the batch's image rows.
            let batch_rows = self.batch.image_rows.view();
            for n in 1..=MAX_BATCH * c.num_images {
                let px = self.batch.pixels.slice_mut::<f32>(n * per_image)?;
                px.fill(0.0);
                let pinned = Staged::Unit(self.batch.pixels.slice::<f32>(n * per_image)?);
                let out = batch_rows.at(0, self.vision.rows(n) * c.vlm_width)?;
                self.vision.enqueue(&self.engine, pinned, n, out)?;
                self.vision.lane.synchronize()?;
            }
            let ids = vec![0i32; prompt_tokens];
            for slot in 0..self.caches.len() {
                let cache = self.caches.get(slot)?;
                for n in 0..=c.num_images {
                    let img_rows = self.vision.rows(n);
                    let f = &mut self.frames[slot % 2];
                    f.stage_prompt(&ids, img_rows + ids.len())?;
                    let (ids, info) = (f.ids.slice::<i32>(ids.len())?, f.info.slice::<i32>(4)?);
                    self.prefix
                        .enqueue(&self.engine, ids, info, img_rows, cache)?;
                    // The pinned prompt is rewritten next round.
                    self.prefix.lane.synchronize()?;
                }
            }
            Ok(())
        })
    }

    /// The real cameras and the real prompt token ids of `obs`, checked as the CPU checks them.
    fn check_inputs(
        &self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<usize>, Vec<i32>)> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        if obs.image_masks.len() != c.num_images || obs.images.len() != c.num_images * per_image {
            return Err(Error::Input(format!(
                "vision: expected {} images of {}x{}x3 and {} masks, got {} values and {} masks",
                c.num_images,
                c.image_size,
                c.image_size,
                c.num_images,
                obs.images.len(),
                obs.image_masks.len()
            )));
        }
        if obs.tokens.len() != obs.token_mask.len() || obs.tokens.len() > c.max_token_len {
            return Err(Error::Input(format!(
                "prefix: {} tokens with {} mask entries; expected equal lengths of at most max_token_len {}",
                obs.tokens.len(),
                obs.token_mask.len(),
                c.max_token_len
            )));
        }
        let ids: Vec<i32> = obs
            .tokens
            .iter()
            .zip(&obs.token_mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        crate::policy::check_sampler_inputs(c, obs.state.as_deref(), noise, steps)?;
        let real: Vec<usize> = (0..c.num_images).filter(|&i| obs.image_masks[i]).collect();
        self.prefix.check(real.len(), &ids)?;
        Ok((real, ids))
    }

    /// One frame, run alone (guided toward `guide` when given): refused while frames are in
    /// flight.
    fn frame(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
        guide: Option<&DeviceGuide>,
    ) -> Result<(Vec<f32>, StageTimes)> {
        if !self.in_flight.is_empty() {
            return Err(Error::Input(
                "frames submitted with `submit` are in flight: collect them first".into(),
            ));
        }
        self.submit_inner(obs, noise, steps, guide)?;
        self.collect_inner()?
            .ok_or_else(|| Error::Cuda("internal: the frame was not in flight".into()))
    }

    /// One frame guided by real-time chunking toward `guide`, with the Jacobian term dropped
    /// ([`Jacobian::Dropped`]; CPU twin: `Policy::infer_guided_with`). Runs alone: refused
    /// while frames are in flight.
    fn frame_guided(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
        guide: &rtc::Guide,
    ) -> Result<(Vec<f32>, StageTimes)> {
        let prepared = guide
            .prepare(self.cfg.action_horizon, self.cfg.action_dim)
            .map_err(|e| Error::Input(e.to_string()))?
            .with_jacobian(Jacobian::Dropped);
        let device = DeviceGuide {
            weight: prepared.weight_f32(),
            target: prepared.target_f32(),
            coef: prepared
                .schedule(steps)
                .iter()
                .map(|s| s.c as f32)
                .collect(),
        };
        self.frame(obs, noise, steps, Some(&device))
    }

    /// Starts a frame without waiting for it (pipelined use): its vision and prefix run on
    /// their streams while the previous frame's denoise still runs, which reads its K/V cache
    /// from the other of two cache slots. At most two frames are in flight; `collect` returns
    /// them oldest first.
    pub fn submit(&mut self, obs: &Observation, noise: &[f32], steps: usize) -> Result<()> {
        guard("submitting a frame", || {
            self.submit_inner(obs, noise, steps, None)
        })
    }

    /// Frames submitted and not collected yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the oldest frame in flight has finished (does not wait).
    pub fn ready(&self) -> bool {
        self.in_flight
            .front()
            .is_some_and(|&s| self.frames[s].denoise.end.is_complete())
    }

    /// Waits for the oldest frame in flight: its actions and stage times (None when nothing
    /// is in flight).
    pub fn collect(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        guard("collecting a frame", || self.collect_inner())
    }

    fn submit_inner(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
        guide: Option<&DeviceGuide>,
    ) -> Result<()> {
        if self.in_flight.len() >= 2 {
            return Err(Error::Input(
                "two frames are in flight: collect one before submitting another".into(),
            ));
        }
        let (real, ids) = self.check_inputs(obs, noise, steps)?;
        self.engine.dev.bind()?;
        let slot = match self.in_flight.back() {
            Some(&busy) => busy ^ 1,
            None => 0,
        };
        let cache = self.caches.get(slot)?;
        self.enqueue_context(slot, obs, (&real, &ids), cache)?;
        let c = &self.cfg;
        let e = &self.engine;
        let f = &mut self.frames[slot];
        let state = obs.state.as_deref().filter(|_| !c.pi05);
        f.stage_sampler(noise, state)?;
        if let Some(g) = guide {
            f.stage_guide(&g.weight, &g.target)?;
        }
        let ld = &self.denoise.lane;
        ld.stream
            .wait(&f.prefix.end)
            .cuda("ordering denoise after prefix")?;
        f.denoise.record_start(ld)?;
        let n = noise.len();
        let sampler = (
            f.noise.slice::<f32>(n)?,
            state.map(|s| f.state.slice::<f32>(s.len())).transpose()?,
        );
        let actions = f.actions.slice_mut::<f32>(n)?;
        match guide {
            None => self.denoise.enqueue(e, sampler, steps, cache, actions)?,
            Some(g) => {
                let host = GuideHost {
                    weight: f.guide_weight.slice::<f32>(n)?,
                    target: f.guide_target.slice::<f32>(n)?,
                    coef: &g.coef,
                };
                self.denoise
                    .enqueue_guided(e, sampler, host, steps, cache, actions)?
            }
        }
        f.denoise.record_end(&self.denoise.lane)?;
        self.in_flight.push_back(slot);
        Ok(())
    }

    /// Stages `obs`'s cameras and prompt (`real`, `ids`: what [`CudaPolicy::check_inputs`]
    /// gave) in frame slot `slot` and queues its vision and prefix, which fills `cache`. The
    /// vision waits for the other frame slot's prefix (which reads the rows it writes); the
    /// caller makes sure frame slot `slot`'s pinned inputs are no longer read.
    fn enqueue_context(
        &mut self,
        slot: usize,
        obs: &Observation,
        (real, ids): (&[usize], &[i32]),
        cache: CacheSlot,
    ) -> Result<()> {
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        let img_rows = self.vision.rows(real.len());
        let e = &self.engine;
        let [f0, f1] = &mut self.frames;
        let (f, other) = if slot == 0 { (f0, &*f1) } else { (f1, &*f0) };
        f.stage_prompt(ids, img_rows + ids.len())?;
        // Vision rewrites the prefix's input rows: only after the other slot's prefix (the
        // previous frame) has read them.
        let (lv, lp) = (&self.vision.lane, &self.prefix.lane);
        lv.stream
            .wait(&other.prefix.end)
            .cuda("ordering vision after the previous prefix")?;
        let rows = self.prefix.input_rows(img_rows)?;
        // Staged before the start event: the stage's time is device time, not host copies.
        let staged = f.stage_images(staged_of(&obs.images), real, per_image)?;
        let pixels = f.staged(staged)?;
        f.vision
            .start
            .record(&lv.stream)
            .cuda("recording a stage's start")?;
        self.vision.enqueue(e, pixels, real.len(), rows)?;
        f.vision.record_end(&self.vision.lane)?;
        lp.stream
            .wait(&f.vision.end)
            .cuda("ordering prefix after vision")?;
        f.prefix.record_start(lp)?;
        let (pids, info) = (f.ids.slice::<i32>(ids.len())?, f.info.slice::<i32>(4)?);
        self.prefix.enqueue(e, pids, info, img_rows, cache)?;
        f.prefix.record_end(&self.prefix.lane)
    }

    /// The rows of a batch that passed their checks (index into the batch, cameras, prompt
    /// ids), at least two: one vision run over every row's cameras, then each row's prefix in
    /// turn (its image rows copied into the prefix's input) into K/V cache slot j (row j),
    /// the prompts staged alternately in the two frame slots, then one denoise loop over every
    /// cache. The stage times are the vision run's, the rows' prefix times summed, and the
    /// loop's.
    fn batch_frames(
        &mut self,
        rows: &[BatchRow<'_>],
        good: &[(usize, Vec<usize>, Vec<i32>)],
        steps: usize,
    ) -> Result<(Vec<Vec<f32>>, StageTimes)> {
        self.engine.dev.bind()?;
        let caches = self.caches.batch(good.len())?;
        let c = &self.cfg;
        let per_image = c.image_size * c.image_size * 3;
        let width = c.vlm_width;
        let obs: Vec<&Observation> = good.iter().map(|g| rows[g.0].obs).collect();
        let real: Vec<&[usize]> = good.iter().map(|g| g.1.as_slice()).collect();
        let e = &self.engine;
        let b = &mut self.batch;
        let (staged, cameras) = b.stage_images(&obs, &real, per_image)?;
        let lv = &self.vision.lane;
        b.vision.record_start(lv)?;
        let image_rows = b
            .image_rows
            .view()
            .at(0, self.vision.rows(cameras) * width)?;
        self.vision
            .enqueue(e, b.staged(staged)?, cameras, image_rows)?;
        b.vision.record_end(&self.vision.lane)?;
        let mut times = StageTimes::default();
        let mut first_row = 0;
        for (j, (_, real, ids)) in good.iter().enumerate() {
            let slot = j % 2;
            let f = &mut self.frames[slot];
            if j >= 2 {
                // Row j - 2's prefix has read the slot's pinned prompt.
                f.prefix
                    .end
                    .synchronize()
                    .cuda("running a batch's prefix")?;
                times.prefix += f.prefix.elapsed()?;
            }
            let img_rows = self.vision.rows(real.len());
            f.stage_prompt(ids, img_rows + ids.len())?;
            let lp = &self.prefix.lane;
            lp.stream
                .wait(&b.vision.end)
                .cuda("ordering a batch's prefix after its vision")?;
            f.prefix.record_start(lp)?;
            if img_rows > 0 {
                let from = b
                    .image_rows
                    .view()
                    .at(first_row * width, img_rows * width)?;
                lp.copy(from, self.prefix.input_rows(img_rows)?)?;
            }
            first_row += img_rows;
            let (pids, info) = (f.ids.slice::<i32>(ids.len())?, f.info.slice::<i32>(4)?);
            let cache = self.caches.get(j)?;
            self.prefix.enqueue(e, pids, info, img_rows, cache)?;
            f.prefix.record_end(&self.prefix.lane)?;
        }
        let c = &self.cfg;
        let (chunk, ad) = (c.action_horizon * c.action_dim, c.action_dim);
        let n = good.len();
        let b = &mut self.batch;
        let noise = b.noise.slice_mut::<f32>(n * chunk)?;
        for ((_, row), dst) in good
            .iter()
            .map(|g| (g, &rows[g.0]))
            .zip(noise.chunks_exact_mut(chunk))
        {
            dst.copy_from_slice(row.noise);
        }
        let states = if c.pi05 {
            None
        } else {
            let states = b.state.slice_mut::<f32>(n * ad)?;
            for ((i, _, _), dst) in good.iter().zip(states.chunks_exact_mut(ad)) {
                let state = rows[*i].obs.state.as_deref().ok_or_else(|| {
                    Error::Cuda("internal: a checked pi0 row without its state".into())
                })?;
                dst.copy_from_slice(state);
            }
            Some(b.state.slice::<f32>(n * ad)?)
        };
        let ld = &self.denoise.lane;
        let last = &self.frames[(n - 1) % 2];
        ld.stream
            .wait(&last.prefix.end)
            .cuda("ordering denoise after prefix")?;
        b.denoise.record_start(ld)?;
        let sampler = (b.noise.slice::<f32>(n * chunk)?, states);
        let actions = b.actions.slice_mut::<f32>(n * chunk)?;
        self.denoise
            .enqueue_batch(&self.engine, sampler, steps, caches, actions)?;
        b.denoise.record_end(&self.denoise.lane)?;
        b.denoise.end.synchronize().cuda("running a batch")?;
        for j in n.saturating_sub(2)..n {
            times.prefix += self.frames[j % 2].prefix.elapsed()?;
        }
        times.vision = b.vision.elapsed()?;
        times.denoise = b.denoise.elapsed()?;
        let actions = b.actions.slice::<f32>(n * chunk)?;
        Ok((
            actions.chunks_exact(chunk).map(<[f32]>::to_vec).collect(),
            times,
        ))
    }

    fn collect_inner(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        let Some(slot) = self.in_flight.pop_front() else {
            return Ok(None);
        };
        let f = &self.frames[slot];
        f.denoise.end.synchronize().cuda("running the frame")?;
        let times = StageTimes {
            vision: f.vision.elapsed()?,
            prefix: f.prefix.elapsed()?,
            denoise: f.denoise.elapsed()?,
        };
        let n = self.cfg.action_horizon * self.cfg.action_dim;
        let actions = f.actions.slice::<f32>(n)?.to_vec();
        Ok(Some((actions, times)))
    }
}

impl Drop for CudaPolicy {
    /// Waits for any work still queued (a frame that failed half-way) before the fields
    /// free the memory it uses.
    fn drop(&mut self) {
        if self.engine.dev.bind().is_ok() {
            let _ = self.engine.dev.synchronize();
        }
    }
}

impl CudaPolicy {
    /// [`Runner::infer_batch`]: each row checked alone (a bad row fails alone); a batch of
    /// one good row is [`Runner::infer`]; more run as [`CudaPolicy::batch_frames`].
    fn batch_inner(&mut self, rows: &[BatchRow<'_>], steps: usize) -> Result<BatchOutput> {
        check_batch(rows.len())?;
        if !self.in_flight.is_empty() {
            return Err(Error::Input(
                "frames submitted with `submit` are in flight: collect them first".into(),
            ));
        }
        let mut answers: Vec<Option<Result<Vec<f32>>>> = rows.iter().map(|_| None).collect();
        let mut good = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            match self.check_inputs(row.obs, row.noise, steps) {
                Ok((real, ids)) => good.push((i, real, ids)),
                Err(e) => answers[i] = Some(Err(e)),
            }
        }
        let times = match good.as_slice() {
            [] => StageTimes::default(),
            [(i, _, _)] => {
                let (actions, times) = self.frame(rows[*i].obs, rows[*i].noise, steps, None)?;
                answers[*i] = Some(Ok(actions));
                times
            }
            _ => {
                let (actions, times) = self.batch_frames(rows, &good, steps)?;
                for ((i, _, _), a) in good.iter().zip(actions) {
                    answers[*i] = Some(Ok(a));
                }
                times
            }
        };
        let actions = answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(Error::Cuda(
                        "internal: a batch row without its answer".into(),
                    ))
                })
            })
            .collect();
        Ok(BatchOutput { actions, times })
    }
}

impl Runner for CudaPolicy {
    /// The rows of up to [`MAX_BATCH`] observations in one forward where it pays: each row's
    /// vision and prefix in turn (each into its own K/V cache), then one denoise loop over
    /// every row (the expert's weights read once per step for all of them); a row that fails
    /// its checks fails alone.
    fn infer_batch(&mut self, rows: &[BatchRow<'_>], steps: usize) -> Result<BatchOutput> {
        guard("CUDA batched inference", || self.batch_inner(rows, steps))
    }

    /// One frame: uploads the observation, runs vision, prefix and the denoise graph, and
    /// downloads the actions; no device allocation except the first time a step count is
    /// used (its time table and graph).
    fn infer(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, StageTimes)> {
        guard("CUDA inference", || self.frame(obs, noise, steps, None))
    }

    /// [`Runner::infer`] guided by real-time chunking with the Jacobian term dropped (the
    /// pull `W (Y - A_hat)` without the VJP through the expert; docs/rtc.md).
    fn infer_guided(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
        guide: &rtc::Guide,
    ) -> Result<(Vec<f32>, StageTimes)> {
        guard("CUDA guided inference", || {
            self.frame_guided(obs, noise, steps, guide)
        })
    }

    fn rtc_jacobian(&self) -> Option<Jacobian> {
        Some(Jacobian::Dropped)
    }

    fn profile_denoise(&mut self, steps: usize) -> Result<Option<String>> {
        if steps == 0 {
            return Err(Error::Input("denoise: steps must be at least 1".into()));
        }
        guard("profiling the denoise loop", || {
            self.engine.dev.bind()?;
            let cache = self.caches.get(0)?;
            self.denoise.profile(&self.engine, steps, cache)
        })
        .map(Some)
    }

    fn submit(&mut self, obs: &Observation, noise: &[f32], steps: usize) -> Result<bool> {
        CudaPolicy::submit(self, obs, noise, steps).map(|()| true)
    }

    fn in_flight(&self) -> usize {
        CudaPolicy::in_flight(self)
    }

    fn prepare(&mut self, steps: usize, prompt_tokens: usize) -> Result<()> {
        if !self.in_flight.is_empty() {
            return Err(Error::Input(
                "frames are in flight: collect them before preparing".into(),
            ));
        }
        self.warm_up(steps)?;
        self.warm_up_stages(prompt_tokens)
    }

    fn ready(&self) -> bool {
        CudaPolicy::ready(self)
    }

    fn collect(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        CudaPolicy::collect(self)
    }

    fn describe(&self) -> String {
        self.engine.describe(self.precision)
    }

    fn census(&self) -> Result<Option<crate::bench::Census>> {
        let stages = [
            self.vision.census()?,
            self.prefix.census()?,
            self.denoise.census()?,
        ];
        let count = |f: fn(&super::runtime::graph::NodeCensus) -> usize| {
            stages.map(|c| c.as_ref().map_or(0, f))
        };
        Ok(Some(crate::bench::Census {
            kernels: count(|c| c.kernels),
            copies: count(|c| c.copies),
            programmatic: count(|c| c.programmatic),
            denoise_step_weight_bytes: self.denoise.step_weight_bytes(),
            peak_bandwidth: self.engine.dev.peak_bandwidth(),
        }))
    }

    fn profile_vision(&mut self) -> Result<Option<String>> {
        guard("profiling the vision tower", || {
            self.engine.dev.bind()?;
            self.vision.profile(&self.engine)
        })
    }

    fn profile_prefix(&mut self) -> Result<Option<String>> {
        guard("profiling the prefix", || {
            self.engine.dev.bind()?;
            self.prefix.profile(&self.engine)
        })
    }
}
