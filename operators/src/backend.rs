//! Backend selection: the same policy on the f32 CPU reference or, with feature `cuda`, on
//! the GPU. Callers (CLI, nodes, tests) hold a `Box<dyn Runner>` and never branch on the kind.

use std::str::FromStr;

use crate::checkpoint::Checkpoint;
use crate::observation::Observation;
use crate::policy::{Policy, StageTimes};
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
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Input(format!(
                "unknown dtype `{other}`; expected `f32` or `bf16`"
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
    /// A short description, e.g. "cpu f32" or "cuda bf16 on NVIDIA H100".
    fn describe(&self) -> String;
    /// A table of the device time per kind of operation of one denoise step of `steps`,
    /// where the backend can measure it (run after at least one frame, whose prefix the
    /// denoiser reads); None otherwise.
    fn profile_denoise(&mut self, steps: usize) -> Result<Option<String>> {
        let _ = steps;
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
    fn describe(&self) -> String {
        "cpu f32".into()
    }
}

/// Loads the policy of `ckpt` on `kind`. The CPU backend is f32 only.
pub fn load(
    kind: BackendKind,
    precision: Precision,
    ckpt: &Checkpoint,
    progress: impl FnMut(u64, u64),
) -> Result<Box<dyn Runner>> {
    match kind {
        BackendKind::Cpu => {
            if precision != Precision::F32 {
                return Err(Error::Input(
                    "the cpu backend computes in f32 only; use --dtype f32".into(),
                ));
            }
            Ok(Box::new(Policy::load(ckpt, progress)?))
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
    Err(Error::Input(
        "CUDA support is not built in: rebuild with `cargo build --release --features cuda`".into(),
    ))
}
