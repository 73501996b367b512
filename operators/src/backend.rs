//! Backend selection: the same policy on the f32 CPU reference or, with feature `cuda`, on
//! the GPU. Callers (CLI, nodes, tests) hold a `Box<dyn Runner>` and never branch on the kind.

use std::str::FromStr;

use crate::checkpoint::Checkpoint;
use crate::gemma::KvCache;
use crate::observation::Observation;
use crate::policy::{
    check_batch, BatchOutput, BatchRow, Denoiser, ImageEmbeddings, Policy, PrefixEncoder,
    StageTimes, VisionEncoder,
};
use crate::weights::Loader;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(Error::Input(format!(
                "unknown backend `{other}`; expected `cpu` or `cuda`"
            ))),
        }
    }
}

/// Arithmetic of a backend's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 everywhere: strict parity with the CPU reference.
    F32,
    /// bf16 weights and activations with f32 accumulation, norms and softmax.
    Bf16,
    /// The large linear layers' weights in FP8 E4M3 (per output channel), quantised at
    /// load; the vision tower's and the prefix's activations too (per token). On the CPU
    /// backend an emulation in f32 arithmetic ([`crate::fp8`]).
    Fp8,
}

impl Precision {
    /// What the CPU backend computes in: f32, or the fp8 emulation once quantised.
    pub fn cpu(fp8: bool) -> Precision {
        if fp8 {
            Precision::Fp8
        } else {
            Precision::F32
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "fp8" => Ok(Precision::Fp8),
            other => Err(Error::Input(format!(
                "unknown dtype `{other}`; expected `f32`, `bf16` or `fp8`"
            ))),
        }
    }
}

/// A loaded policy on some backend.
pub trait Runner: Send {
    /// Runs all stages on `obs` with noise [action_horizon, action_dim]; returns the actions
    /// and the time of each stage (GPU time for GPU backends).
    fn infer(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, StageTimes)>;
    /// Runs up to [`crate::MAX_BATCH`] observations, each with its own noise (the noise a
    /// single request with the same seed gets), and gives each row its actions or its own
    /// error (a bad row fails alone; too many rows fail the call), with the stage times of
    /// the whole batch. Row i's actions are those of [`Runner::infer`] on row i: bit for bit
    /// on the CPU backend, whose override ([`Policy::infer_batch`]) runs each stage once over
    /// all rows; within the precision's tolerance on the CUDA backend, whose override runs
    /// one denoise loop over all rows. This default runs the rows one after another through
    /// [`Runner::infer`] (the stage times are the rows' sums).
    fn infer_batch(&mut self, rows: &[BatchRow<'_>], steps: usize) -> Result<BatchOutput> {
        check_batch(rows.len())?;
        let mut out = BatchOutput {
            actions: Vec::with_capacity(rows.len()),
            times: StageTimes::default(),
        };
        for row in rows {
            match self.infer(row.obs, row.noise, steps) {
                Ok((actions, times)) => {
                    out.actions.push(Ok(actions));
                    out.times += times;
                }
                Err(e) => out.actions.push(Err(e)),
            }
        }
        Ok(out)
    }
    /// A short description, e.g. "cpu f32" or "cuda bf16 on NVIDIA H100".
    fn describe(&self) -> String;
    /// [`Runner::infer`] with the denoise guided by real-time chunking toward the previous
    /// chunk's leftover (`crate::rtc`, docs/rtc.md), with the Jacobian as
    /// [`Runner::rtc_jacobian`] says: exact on the CPU backend, dropped on the CUDA backend.
    /// A backend without guidance answers that it is not implemented rather than a wrong
    /// answer (this default).
    fn infer_guided(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
        guide: &crate::rtc::Guide,
    ) -> Result<(Vec<f32>, StageTimes)> {
        let _ = (obs, noise, steps, guide);
        Err(crate::rtc::not_implemented(&self.describe()))
    }
    /// How [`Runner::infer_guided`] treats the velocity's Jacobian; None without guidance.
    fn rtc_jacobian(&self) -> Option<crate::rtc::Jacobian> {
        None
    }
    /// A table of the device time per kind of operation of one denoise step of `steps`,
    /// where the backend can measure it (run after at least one frame, whose prefix the
    /// denoiser reads); None otherwise.
    fn profile_denoise(&mut self, steps: usize) -> Result<Option<String>> {
        let _ = steps;
        Ok(None)
    }
    /// Pipelined use, where the backend overlaps frames (CUDA: the next frame's vision and
    /// prefix run while this one denoises): starts a frame and returns true; `collect` gives
    /// the actions later, oldest first. Backends that do not overlap return false (use
    /// `infer`).
    fn submit(&mut self, obs: &Observation, noise: &[f32], steps: usize) -> Result<bool> {
        let _ = (obs, noise, steps);
        Ok(false)
    }
    /// Builds ahead of the first frame whatever that frame would otherwise wait for (CUDA:
    /// the stage graphs for every camera count with `prompt_tokens` real prompt tokens, and
    /// the denoise graph of `steps`, for both pipelining slots). Nothing to do by default.
    fn prepare(&mut self, steps: usize, prompt_tokens: usize) -> Result<()> {
        let _ = (steps, prompt_tokens);
        Ok(())
    }
    /// Frames submitted and not collected.
    fn in_flight(&self) -> usize {
        0
    }
    /// Whether the oldest frame in flight has finished (does not wait).
    fn ready(&self) -> bool {
        true
    }
    /// Waits for the oldest frame in flight (None when nothing is in flight).
    fn collect(&mut self) -> Result<Option<(Vec<f32>, StageTimes)>> {
        Ok(None)
    }
    /// What the last frame launched (kernels per stage) and the denoise loop's weight bytes,
    /// where the backend can tell (CUDA: from the stages' graphs); None otherwise.
    fn census(&self) -> Result<Option<crate::bench::Census>> {
        Ok(None)
    }
    /// Like [`Runner::profile_denoise`], for one layer of the prefix (run after a frame).
    fn profile_prefix(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
    /// Like [`Runner::profile_denoise`], for one layer of the vision tower (run after a frame).
    fn profile_vision(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
}

impl Runner for Policy {
    fn infer(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
    ) -> Result<(Vec<f32>, StageTimes)> {
        Policy::infer(self, obs, noise, steps)
    }
    fn infer_batch(&mut self, rows: &[BatchRow<'_>], steps: usize) -> Result<BatchOutput> {
        Policy::infer_batch(self, rows, steps)
    }
    fn infer_guided(
        &mut self,
        obs: &Observation,
        noise: &[f32],
        steps: usize,
        guide: &crate::rtc::Guide,
    ) -> Result<(Vec<f32>, StageTimes)> {
        Policy::infer_guided(self, obs, noise, steps, guide)
    }
    fn rtc_jacobian(&self) -> Option<crate::rtc::Jacobian> {
        Some(crate::rtc::Jacobian::Exact)
    }
    fn describe(&self) -> String {
        let stages = self.fp8_stages();
        if stages.any() && !stages.is_all() {
            return format!("cpu fp8 (emulated; {} only)", stages.names());
        }
        describe_cpu(self.vision.precision())
    }
}

/// "cpu f32", or "cpu fp8 (emulated)".
fn describe_cpu(precision: Precision) -> String {
    match precision {
        Precision::Fp8 => "cpu fp8 (emulated)".into(),
        p => format!("cpu {}", p.name()),
    }
}

/// Loads the policy of `ckpt` on `kind`. The CPU backend computes in f32, or emulates fp8.
pub fn load(
    kind: BackendKind,
    precision: Precision,
    ckpt: &Checkpoint,
    progress: impl FnMut(u64, u64),
) -> Result<Box<dyn Runner>> {
    match kind {
        BackendKind::Cpu => {
            let fp8 = cpu_fp8(precision)?;
            let mut policy = Policy::load(ckpt, progress)?;
            if fp8 {
                policy.quantise_fp8_stages(crate::settings::fp8_stages()?);
            }
            Ok(Box::new(policy))
        }
        BackendKind::Cuda => load_cuda(precision, ckpt, progress),
    }
}

#[cfg(feature = "cuda")]
fn load_cuda(
    precision: Precision,
    ckpt: &Checkpoint,
    progress: impl FnMut(u64, u64),
) -> Result<Box<dyn Runner>> {
    Ok(Box::new(crate::cuda::CudaPolicy::load(
        ckpt, precision, progress,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_: Precision, _: &Checkpoint, _: impl FnMut(u64, u64)) -> Result<Box<dyn Runner>> {
    Err(Error::Input(NO_CUDA.into()))
}

/// One stage of the policy in a process of its own (the split graph's nodes): the vision
/// tower, the prefix, or the sampler, on some backend. Inputs and outputs are host values, so
/// any stage can feed any other whatever their backends.
pub trait VisionStage: Send {
    /// `pixels`: [num_images, image_size, image_size, 3] in [-1, 1]; `masks`: [num_images].
    fn encode(&mut self, pixels: &[f32], masks: &[bool]) -> Result<ImageEmbeddings>;
    fn describe(&self) -> String;
    /// The device time of the last call (CUDA events), for backends that measure it.
    fn gpu_time(&self) -> Option<std::time::Duration> {
        None
    }
}

pub trait PrefixStage: Send {
    /// The K/V cache of the real image tokens and the real prompt tokens.
    fn encode(
        &mut self,
        images: &ImageEmbeddings,
        tokens: &[i32],
        token_mask: &[bool],
    ) -> Result<KvCache>;
    fn describe(&self) -> String;
    /// The device time of the last call (CUDA events), for backends that measure it.
    fn gpu_time(&self) -> Option<std::time::Duration> {
        None
    }
}

pub trait DenoiseStage: Send {
    /// Actions [action_horizon, action_dim] from `noise` in `steps` Euler steps.
    fn sample(
        &mut self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<Vec<f32>>;
    fn describe(&self) -> String;
    /// The device time of the last call (CUDA events), for backends that measure it.
    fn gpu_time(&self) -> Option<std::time::Duration> {
        None
    }
}

impl VisionStage for VisionEncoder {
    fn encode(&mut self, pixels: &[f32], masks: &[bool]) -> Result<ImageEmbeddings> {
        self.run(pixels, masks)
    }
    fn describe(&self) -> String {
        describe_cpu(self.precision())
    }
}

impl PrefixStage for PrefixEncoder {
    fn encode(
        &mut self,
        images: &ImageEmbeddings,
        tokens: &[i32],
        token_mask: &[bool],
    ) -> Result<KvCache> {
        self.run(images, tokens, token_mask)
    }
    fn describe(&self) -> String {
        describe_cpu(self.precision())
    }
}

impl DenoiseStage for Denoiser {
    fn sample(
        &mut self,
        cache: &KvCache,
        state: Option<&[f32]>,
        noise: &[f32],
        steps: usize,
    ) -> Result<Vec<f32>> {
        self.run(cache, state, noise, steps)
    }
    fn describe(&self) -> String {
        describe_cpu(self.precision())
    }
}

/// Whether `kind` can run `precision` at all, as far as can be told without loading a model
/// or opening a GPU (the CPU has no bf16; a build without the `cuda` feature has no CUDA):
/// the error [`load`] would give, before minutes of other work.
pub fn check(kind: BackendKind, precision: Precision) -> Result<()> {
    match kind {
        BackendKind::Cpu => cpu_fp8(precision).map(|_| ()),
        BackendKind::Cuda if cfg!(feature = "cuda") => Ok(()),
        BackendKind::Cuda => Err(Error::Input(NO_CUDA.into())),
    }
}

const NO_CUDA: &str =
    "CUDA support is not built in: rebuild with `cargo build --release --features cuda`";

/// Whether the CPU backend emulates fp8 for `precision` (it computes in f32 otherwise, and
/// has no bf16).
fn cpu_fp8(precision: Precision) -> Result<bool> {
    match precision {
        Precision::F32 => Ok(false),
        Precision::Fp8 => Ok(true),
        Precision::Bf16 => Err(Error::Input(
            "the cpu backend computes in f32 (or emulates fp8); bf16 runs on cuda: use dtype \
             f32 (--dtype f32, DTYPE: f32) or the cuda backend"
                .into(),
        )),
    }
}

/// The vision stage of `ckpt` on `kind` (on CUDA: its own weights only).
pub fn load_vision(
    kind: BackendKind,
    precision: Precision,
    ckpt: &Checkpoint,
) -> Result<Box<dyn VisionStage>> {
    match kind {
        BackendKind::Cpu => {
            let fp8 = cpu_fp8(precision)? && crate::settings::fp8_stages()?.vision;
            let mut stage = VisionEncoder::load(ckpt, &mut Loader::new(ckpt, |_, _| {}))?;
            if fp8 {
                stage.quantise_fp8();
            }
            Ok(Box::new(stage))
        }
        BackendKind::Cuda => cuda_stages::vision(precision, ckpt),
    }
}

/// The prefix stage of `ckpt` on `kind`.
pub fn load_prefix(
    kind: BackendKind,
    precision: Precision,
    ckpt: &Checkpoint,
) -> Result<Box<dyn PrefixStage>> {
    match kind {
        BackendKind::Cpu => {
            let fp8 = cpu_fp8(precision)? && crate::settings::fp8_stages()?.prefix;
            let mut stage = PrefixEncoder::load(ckpt, &mut Loader::new(ckpt, |_, _| {}))?;
            if fp8 {
                stage.quantise_fp8();
            }
            Ok(Box::new(stage))
        }
        BackendKind::Cuda => cuda_stages::prefix(precision, ckpt),
    }
}

/// The denoise stage of `ckpt` on `kind`.
pub fn load_denoise(
    kind: BackendKind,
    precision: Precision,
    ckpt: &Checkpoint,
) -> Result<Box<dyn DenoiseStage>> {
    match kind {
        BackendKind::Cpu => {
            let fp8 = cpu_fp8(precision)? && crate::settings::fp8_stages()?.expert;
            let mut stage = Denoiser::load(ckpt, &mut Loader::new(ckpt, |_, _| {}))?;
            if fp8 {
                stage.quantise_fp8();
            }
            Ok(Box::new(stage))
        }
        BackendKind::Cuda => cuda_stages::denoise(precision, ckpt),
    }
}

#[cfg(feature = "cuda")]
mod cuda_stages {
    use super::*;
    use crate::cuda::{CudaDenoise, CudaPrefix, CudaVision};

    pub fn vision(precision: Precision, ckpt: &Checkpoint) -> Result<Box<dyn VisionStage>> {
        Ok(Box::new(CudaVision::load(ckpt, precision)?))
    }
    pub fn prefix(precision: Precision, ckpt: &Checkpoint) -> Result<Box<dyn PrefixStage>> {
        Ok(Box::new(CudaPrefix::load(ckpt, precision)?))
    }
    pub fn denoise(precision: Precision, ckpt: &Checkpoint) -> Result<Box<dyn DenoiseStage>> {
        Ok(Box::new(CudaDenoise::load(ckpt, precision)?))
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda_stages {
    use super::*;

    fn unbuilt<T>() -> Result<T> {
        Err(Error::Input(
            "CUDA support is not built in: rebuild with `--features cuda`".into(),
        ))
    }
    pub fn vision(_: Precision, _: &Checkpoint) -> Result<Box<dyn VisionStage>> {
        unbuilt()
    }
    pub fn prefix(_: Precision, _: &Checkpoint) -> Result<Box<dyn PrefixStage>> {
        unbuilt()
    }
    pub fn denoise(_: Precision, _: &Checkpoint) -> Result<Box<dyn DenoiseStage>> {
        unbuilt()
    }
}
