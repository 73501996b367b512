//! One stage alone, for a split graph's stage node: it loads only its own weights, takes its
//! input from host memory or another process's ring slot (CUDA IPC), and gives its output
//! back to the host or into a ring slot of its own. Each implements the backend's host-tensor
//! stage trait ([`crate::backend::VisionStage`] ...), so it can feed or be fed by a CPU stage.

use std::time::Duration;

use super::device::{guard, CudaResult, DType, Device, DeviceBuffer, Lane, View};
use super::ipc::{Importer, Remote, Ring};
use super::pipeline::FrameSlot;
use super::stages::denoise::Denoise;
use super::stages::prefix::Prefix;
use super::stages::vision::{Staged, Vision};
use super::stages::{act_type, allocate, CacheShape, CacheSlot, Engine, KvSlots};
use crate::backend::{self, Precision};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::gemma::KvCache;
use crate::weights::Loader;
use crate::{Error, ImageEmbeddings, Result};

/// A device view of the activation type (f32 or bf16) as f32, read when `lane` is idle.
fn read_act(lane: &Lane, v: View) -> Result<Vec<f32>> {
    match v.dtype {
        DType::F32 => {
            let mut out = vec![0.0f32; v.len];
            lane.download_now(v, &mut out)?;
            Ok(out)
        }
        DType::Bf16 => {
            let mut bits = vec![0u16; v.len];
            lane.download_now(v, &mut bits)?;
            Ok(bits
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect())
        }
        other => Err(Error::Cuda(format!(
            "internal: reading {other:?} as activations"
        ))),
    }
}

/// f32 values into a device view of the activation type (rounded to nearest even for bf16:
/// exact for values that came from bf16).
fn write_act(lane: &Lane, src: &[f32], dst: View) -> Result<()> {
    match dst.dtype {
        DType::F32 => lane.upload_now(src, dst),
        DType::Bf16 => {
            let bits: Vec<u16> = src
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            lane.upload_now(&bits, dst)
        }
        other => Err(Error::Cuda(format!(
            "internal: writing {other:?} as activations"
        ))),
    }
}

/// The vision stage alone. Fields drop before the engine.
pub struct CudaVision {
    stage: Vision,
    /// f32 [num_images * tokens_per_image, vlm_width]: the image embeddings.
    out: View,
    _out: DeviceBuffer,
    frame: FrameSlot,
    last_gpu: Option<Duration>,
    cfg: Config,
    precision: Precision,
    engine: Engine,
}

impl CudaVision {
    /// The vision stage of `ckpt` (its weights only); [`CudaVision::warm_up`] builds its
    /// graphs.
    pub fn load(ckpt: &Checkpoint, precision: Precision) -> Result<CudaVision> {
        guard("loading the vision stage on the GPU", || {
            let cfg = &ckpt.config;
            let engine = Engine::open(precision)?;
            let stage = Vision::new(&engine, cfg)?;
            let rows = stage.rows(cfg.num_images) * cfg.vlm_width;
            let (out, alloc) = allocate(&engine.dev, &stage.lane, |ar| ar.take(DType::F32, rows))?;
            stage
                .weights
                .fill_from(ckpt, &mut Loader::new(ckpt, |_, _| {}), &stage.lane)?;
            Ok(CudaVision {
                stage,
                out,
                _out: alloc,
                frame: FrameSlot::new(&engine, cfg)?,
                last_gpu: None,
                cfg: cfg.clone(),
                precision,
                engine,
            })
        })
    }

    /// Runs (and captures) the tower for every camera count on placeholder pixels, so that
    /// the first frames cost what later ones do.
    pub fn warm_up(&mut self) -> Result<()> {
        let per_image = self.stage.pixel_values(1);
        for n in 1..=self.cfg.num_images {
            let px = vec![0.0f32; n * per_image];
            self.encode_real(&px, n)?;
        }
        Ok(())
    }

    /// Enqueues the tower over the `n` cameras of `images` ([n, size, size, 3] in [-1, 1]);
    /// returns the device rows of their embeddings.
    fn encode_real(&mut self, images: &[f32], n: usize) -> Result<View> {
        let c = &self.cfg;
        if n > c.num_images || images.len() != self.stage.pixel_values(n) {
            return Err(Error::Input(format!(
                "vision: expected at most {} images of {}x{}x3, got {} values for {n}",
                c.num_images,
                c.image_size,
                c.image_size,
                images.len()
            )));
        }
        self.engine.dev.bind()?;
        let real: Vec<usize> = (0..n).collect();
        let per_image = self.stage.pixel_values(1);
        // Staged before the start event: the stage's time is device time, not host copies.
        let staged = self
            .frame
            .stage_images(Staged::Unit(images), &real, per_image)?;
        let pixels = self.frame.staged(staged)?;
        self.frame
            .vision
            .start
            .record(&self.stage.lane.stream)
            .cuda("recording a stage's start")?;
        self.stage.enqueue(&self.engine, pixels, n, self.out)?;
        self.frame.vision.record_end(&self.stage.lane)?;
        self.out.at(0, self.stage.rows(n) * c.vlm_width)
    }

    /// The image embeddings [n * tokens_per_image, vlm_width] (f32) of the `n` cameras in
    /// `images`, and the stage's GPU time.
    pub fn run(&mut self, images: &[f32], n: usize) -> Result<(Vec<f32>, Duration)> {
        guard("the CUDA vision stage", || {
            let rows = self.encode_real(images, n)?;
            self.frame
                .vision
                .end
                .synchronize()
                .cuda("running the vision stage")?;
            let mut out = vec![0.0f32; rows.len];
            self.stage.lane.download_now(rows, &mut out)?;
            Ok((out, self.frame.vision.elapsed()?))
        })
    }

    /// The image embeddings of the `n` cameras in `images` into slot `slot` of `ring` (its
    /// event recorded after the copy; nothing crosses the host). The GPU time and the bytes.
    pub fn to_ring(
        &mut self,
        images: &[f32],
        n: usize,
        ring: &Ring,
        slot: usize,
    ) -> Result<(Duration, usize)> {
        guard("the CUDA vision stage (IPC)", || {
            let rows = self.encode_real(images, n)?;
            ring.write(slot, &self.stage.lane, rows)?;
            self.frame
                .vision
                .end
                .synchronize()
                .cuda("running the vision stage")?;
            Ok((self.frame.vision.elapsed()?, rows.bytes()))
        })
    }

    pub fn device(&self) -> &Device {
        &self.engine.dev
    }

    pub fn describe(&self) -> String {
        self.engine.describe(self.precision)
    }
}

impl backend::VisionStage for CudaVision {
    fn encode(&mut self, pixels: &[f32], masks: &[bool]) -> Result<ImageEmbeddings> {
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
        let real: Vec<f32> = pixels
            .chunks_exact(per_image)
            .zip(masks)
            .filter(|(_, &m)| m)
            .flat_map(|(px, _)| px.iter().copied())
            .collect();
        let n = masks.iter().filter(|&&m| m).count();
        let (tokens, gpu) = self.run(&real, n)?;
        self.last_gpu = Some(gpu);
        Ok(ImageEmbeddings {
            tokens,
            real_images: n,
        })
    }
    fn describe(&self) -> String {
        CudaVision::describe(self)
    }
    fn gpu_time(&self) -> Option<Duration> {
        self.last_gpu
    }
}

/// The prefix stage alone, with one K/V cache of its own. Fields drop before the engine.
pub struct CudaPrefix {
    stage: Prefix,
    cache: KvSlots,
    frame: FrameSlot,
    last_gpu: Option<Duration>,
    cfg: Config,
    precision: Precision,
    engine: Engine,
}

impl CudaPrefix {
    /// The prefix stage of `ckpt` (its weights only); [`CudaPrefix::warm_up`] builds its
    /// graphs.
    pub fn load(ckpt: &Checkpoint, precision: Precision) -> Result<CudaPrefix> {
        guard("loading the prefix stage on the GPU", || {
            let cfg = &ckpt.config;
            let engine = Engine::open(precision)?;
            let stage = Prefix::new(&engine, cfg)?;
            let shape = CacheShape::of(cfg, act_type(precision));
            let cache = KvSlots::new(&engine, &stage.lane, shape, 1)?;
            stage
                .weights
                .fill_from(ckpt, &mut Loader::new(ckpt, |_, _| {}), &stage.lane)?;
            Ok(CudaPrefix {
                stage,
                cache,
                frame: FrameSlot::new(&engine, cfg)?,
                last_gpu: None,
                cfg: cfg.clone(),
                precision,
                engine,
            })
        })
    }

    /// Runs (and captures) the prefix for every camera count with `prompt_tokens` real
    /// prompt tokens on placeholder inputs (prompts of other lengths build their graphs when
    /// they first arrive).
    pub fn warm_up(&mut self, prompt_tokens: usize) -> Result<()> {
        if prompt_tokens > self.cfg.max_token_len {
            return Err(Error::Input(format!(
                "prefix: {prompt_tokens} prompt tokens, at most max_token_len {}",
                self.cfg.max_token_len
            )));
        }
        let ids = vec![0i32; prompt_tokens];
        let t = self.cfg.tokens_per_image();
        for n in 0..=self.cfg.num_images {
            if n == 0 && ids.is_empty() {
                continue;
            }
            let zeros = vec![0.0f32; n * t * self.cfg.vlm_width];
            self.from_host(&zeros, n, &ids)?;
        }
        Ok(())
    }

    /// The prefix over `real_images` cameras whose embeddings `fill` writes into the
    /// prefix's input rows (ordered on the prefix stream) and the prompt `ids`; waited for.
    /// The K/V cache stays on the device. The prefix length and the GPU time.
    fn run_with(
        &mut self,
        real_images: usize,
        ids: &[i32],
        fill: impl FnOnce(&Engine, &Lane, View) -> Result<()>,
    ) -> Result<(usize, Duration)> {
        self.stage.check(real_images, ids)?;
        self.engine.dev.bind()?;
        let img_rows = real_images * self.cfg.tokens_per_image();
        let p = img_rows + ids.len();
        self.frame.stage_prompt(ids, p)?;
        let lane = &self.stage.lane;
        self.frame.prefix.record_start(lane)?;
        fill(&self.engine, lane, self.stage.input_rows(img_rows)?)?;
        let (pids, info) = (
            self.frame.ids.slice::<i32>(ids.len())?,
            self.frame.info.slice::<i32>(4)?,
        );
        let cache = self.cache.get(0)?;
        self.stage
            .enqueue(&self.engine, pids, info, img_rows, cache)?;
        self.frame.prefix.record_end(&self.stage.lane)?;
        self.frame
            .prefix
            .end
            .synchronize()
            .cuda("running the prefix stage")?;
        Ok((p, self.frame.prefix.elapsed()?))
    }

    /// The prefix from host image embeddings ([real_images * tokens_per_image, vlm_width]
    /// f32) and the real prompt ids; the cache stays on the device.
    pub fn from_host(
        &mut self,
        embeddings: &[f32],
        real_images: usize,
        ids: &[i32],
    ) -> Result<(usize, Duration)> {
        guard("the CUDA prefix stage", || {
            let rows = real_images * self.cfg.tokens_per_image();
            let w = self.cfg.vlm_width;
            if embeddings.len() != rows * w {
                return Err(Error::Input(format!(
                    "prefix: expected [{rows}, {w}] image embeddings for {real_images} cameras, got {} values",
                    embeddings.len()
                )));
            }
            self.run_with(real_images, ids, |_, lane, dst| {
                lane.upload_now(embeddings, dst)
            })
        })
    }

    /// The prefix reading its image embeddings from a producer's ring slot (stream-ordered
    /// after the producer's event).
    pub fn from_ring(
        &mut self,
        importer: &mut Importer,
        remote: &Remote,
        real_images: usize,
        ids: &[i32],
    ) -> Result<(usize, Duration)> {
        guard("the CUDA prefix stage (IPC)", || {
            self.run_with(real_images, ids, |e, lane, dst| {
                importer.read(&e.dev, lane, remote, dst)
            })
        })
    }

    /// [layers, 2, cache rows, kv_width]: the device K/V cache that
    /// [`CudaPrefix::cache_to_ring`] exports, in [`CudaPrefix::act_dtype`].
    pub fn cache_shape(&self) -> [usize; 4] {
        CacheShape::of(&self.cfg, self.act_dtype()).dims()
    }

    pub fn act_dtype(&self) -> DType {
        self.engine.act()
    }

    /// Copies the whole device K/V cache into slot `slot` of `ring` and records its event.
    pub fn cache_to_ring(&mut self, ring: &Ring, slot: usize) -> Result<usize> {
        guard("exporting the K/V cache", || {
            self.engine.dev.bind()?;
            let kv = self.cache.get(0)?.kv;
            ring.write(slot, &self.stage.lane, kv)?;
            Ok(kv.bytes())
        })
    }

    /// Rows 0..p of every layer's K and V cache, as f32.
    pub fn download_cache(&self, p: usize) -> Result<KvCache> {
        let cache = self.cache.get(0)?;
        let kvw = cache.shape.kv_width;
        let lane = &self.stage.lane;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for layer in 0..cache.shape.layers {
            let (kc, vc) = cache.layer(layer)?;
            k.push(read_act(lane, kc.at(0, p * kvw)?)?);
            v.push(read_act(lane, vc.at(0, p * kvw)?)?);
        }
        Ok(KvCache {
            len: p,
            kv_width: kvw,
            k,
            v,
        })
    }

    /// The K/V cache from host embeddings and ids, downloaded, and the GPU time.
    pub fn run(
        &mut self,
        embeddings: &[f32],
        real_images: usize,
        ids: &[i32],
    ) -> Result<(KvCache, Duration)> {
        let (p, time) = self.from_host(embeddings, real_images, ids)?;
        Ok((self.download_cache(p)?, time))
    }

    pub fn device(&self) -> &Device {
        &self.engine.dev
    }

    pub fn describe(&self) -> String {
        self.engine.describe(self.precision)
    }
}

impl backend::PrefixStage for CudaPrefix {
    fn encode(
        &mut self,
        images: &ImageEmbeddings,
        tokens: &[i32],
        token_mask: &[bool],
    ) -> Result<KvCache> {
        if tokens.len() != token_mask.len() {
            return Err(Error::Input(format!(
                "prefix: {} tokens with {} mask entries; expected equal lengths",
                tokens.len(),
                token_mask.len()
            )));
        }
        let ids: Vec<i32> = tokens
            .iter()
            .zip(token_mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        let (cache, gpu) = self.run(&images.tokens, images.real_images, &ids)?;
        self.last_gpu = Some(gpu);
        Ok(cache)
    }
    fn describe(&self) -> String {
        CudaPrefix::describe(self)
    }
    fn gpu_time(&self) -> Option<Duration> {
        self.last_gpu
    }
}

/// The denoise stage alone, with one K/V cache of its own that its input fills. Fields drop
/// before the engine.
pub struct CudaDenoise {
    stage: Denoise,
    cache: KvSlots,
    frame: FrameSlot,
    last_gpu: Option<Duration>,
    cfg: Config,
    precision: Precision,
    engine: Engine,
}

impl CudaDenoise {
    /// The denoise stage of `ckpt` (its weights only); [`CudaDenoise::warm_up`] builds the
    /// loop's graph for a step count (else it is built when first used).
    pub fn load(ckpt: &Checkpoint, precision: Precision) -> Result<CudaDenoise> {
        guard("loading the denoise stage on the GPU", || {
            let cfg = &ckpt.config;
            let engine = Engine::open(precision)?;
            let stage = Denoise::new(&engine, cfg)?;
            let shape = CacheShape::of(cfg, act_type(precision));
            let cache = KvSlots::new(&engine, &stage.lane, shape, 1)?;
            stage
                .weights
                .fill_from(ckpt, &mut Loader::new(ckpt, |_, _| {}), &stage.lane)?;
            Ok(CudaDenoise {
                stage,
                cache,
                frame: FrameSlot::new(&engine, cfg)?,
                last_gpu: None,
                cfg: cfg.clone(),
                precision,
                engine,
            })
        })
    }

    /// Builds the loop's graph for `steps` (once per step count).
    pub fn warm_up(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::Input("denoise: steps must be at least 1".into()));
        }
        self.engine.dev.bind()?;
        let cache = self.cache.get(0)?;
        self.stage.prepare(&self.engine, steps, cache)?;
        self.stage.lane.synchronize()
    }

    /// The sampler over a cache of `p` prefix rows that `fill` writes (ordered on the denoise
    /// stream): the actions and the GPU time.
    fn run_with(
        &mut self,
        p: usize,
        (state, noise, steps): (Option<&[f32]>, &[f32], usize),
        fill: impl FnOnce(&Engine, &Lane, CacheSlot) -> Result<()>,
    ) -> Result<(Vec<f32>, Duration)> {
        let max = self.cfg.max_prefix_len();
        if p > max {
            return Err(Error::Input(format!(
                "denoise: a prefix of {p} rows, at most {max} fit the cache"
            )));
        }
        crate::policy::check_sampler_inputs(&self.cfg, state, noise, steps)?;
        self.engine.dev.bind()?;
        let state = state.filter(|_| !self.cfg.pi05);
        self.frame.stage_sampler(noise, state)?;
        let cache = self.cache.get(0)?;
        let lane = &self.stage.lane;
        let p = i32::try_from(p).map_err(|_| Error::Input("prefix too long".into()))?;
        lane.upload_now(&[p, 0, 0, 0], cache.info)?;
        self.frame.denoise.record_start(lane)?;
        fill(&self.engine, lane, cache)?;
        let f = &mut self.frame;
        let sampler = (
            f.noise.slice::<f32>(noise.len())?,
            state.map(|s| f.state.slice::<f32>(s.len())).transpose()?,
        );
        let actions = f.actions.slice_mut::<f32>(noise.len())?;
        self.stage
            .enqueue(&self.engine, sampler, steps, cache, actions)?;
        let f = &self.frame;
        f.denoise.record_end(&self.stage.lane)?;
        f.denoise
            .end
            .synchronize()
            .cuda("running the denoise stage")?;
        let actions = f.actions.slice::<f32>(noise.len())?.to_vec();
        Ok((actions, f.denoise.elapsed()?))
    }

    /// Actions [horizon, action_dim] from a host K/V cache, the state (pi0) and the noise,
    /// and the GPU time.
    pub fn run(
        &mut self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, Duration)> {
        guard("the CUDA denoise stage", || {
            let want = CacheShape::of(&self.cfg, self.engine.act());
            let kvw = want.kv_width;
            if cache.kv_width != kvw
                || cache.k.len() != want.layers
                || cache.v.len() != want.layers
                || cache.len > want.max_prefix
                || cache
                    .k
                    .iter()
                    .chain(&cache.v)
                    .any(|l| l.len() != cache.len * kvw)
            {
                return Err(Error::Input(format!(
                    "denoise: expected a K/V cache of {} layers, width {kvw}, at most {} rows; got {} / {} layers, width {}, {} rows",
                    want.layers,
                    want.max_prefix,
                    cache.k.len(),
                    cache.v.len(),
                    cache.kv_width,
                    cache.len
                )));
            }
            self.run_with(cache.len, (state, noise, steps), |_, lane, slot| {
                for layer in 0..want.layers {
                    let (kc, vc) = slot.layer(layer)?;
                    write_act(lane, &cache.k[layer], kc.at(0, cache.k[layer].len())?)?;
                    write_act(lane, &cache.v[layer], vc.at(0, cache.v[layer].len())?)?;
                }
                Ok(())
            })
        })
    }

    /// The sampler reading the K/V cache (of `p` real prefix rows) from a producer's ring
    /// slot, stream-ordered after the producer's event.
    pub fn from_ring(
        &mut self,
        importer: &mut Importer,
        remote: &Remote,
        p: usize,
        (state, noise, steps): (Option<&[f32]>, &[f32], usize),
    ) -> Result<(Vec<f32>, Duration)> {
        guard("the CUDA denoise stage (IPC)", || {
            self.run_with(p, (state, noise, steps), |e, lane, slot| {
                importer.read(&e.dev, lane, remote, slot.kv)
            })
        })
    }

    /// [layers, 2, cache rows, kv_width]: the cache a producer's ring slot must hold.
    pub fn cache_shape(&self) -> [usize; 4] {
        CacheShape::of(&self.cfg, self.act_dtype()).dims()
    }

    pub fn act_dtype(&self) -> DType {
        self.engine.act()
    }

    pub fn device(&self) -> &Device {
        &self.engine.dev
    }

    pub fn describe(&self) -> String {
        self.engine.describe(self.precision)
    }
}

impl backend::DenoiseStage for CudaDenoise {
    fn sample(
        &mut self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<Vec<f32>> {
        let (actions, gpu) = self.run(cache, state, noise, steps)?;
        self.last_gpu = Some(gpu);
        Ok(actions)
    }
    fn describe(&self) -> String {
        CudaDenoise::describe(self)
    }
    fn gpu_time(&self) -> Option<Duration> {
        self.last_gpu
    }
}

impl Drop for CudaVision {
    fn drop(&mut self) {
        let _ = self
            .engine
            .dev
            .bind()
            .and_then(|()| self.engine.dev.synchronize());
    }
}

impl Drop for CudaPrefix {
    fn drop(&mut self) {
        let _ = self
            .engine
            .dev
            .bind()
            .and_then(|()| self.engine.dev.synchronize());
    }
}

impl Drop for CudaDenoise {
    fn drop(&mut self) {
        let _ = self
            .engine
            .dev
            .bind()
            .and_then(|()| self.engine.dev.synchronize());
    }
}
