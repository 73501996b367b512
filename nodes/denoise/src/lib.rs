//! Denoise stage: the flow-matching sampler over the action expert, attending to the prefix
//! K/V cache of the same frame. Noise for frame `seq` is drawn from seed `SEED + seq`, so a
//! run can be reproduced with `turbopi infer --seed`.

use dora_node_api::{DoraNode, EventStream};
use eyre::{bail, eyre, Result};
use node_common::ipc::refuse_ipc;
use node_common::join::{FrameJoin, Joined, Part};
use node_common::stage::{self, Cx, Spec, Stage};
use node_common::{
    backend_from_env, checkpoint_from_env, env_or, expect_tensor, frame_state, kv_from_tensor, Dim,
};
use operators::backend::{self, BackendKind, DenoiseStage};
use operators::observation::noise_from_seed;
use operators::Config;

/// The main input, and the output.
const IN: &str = "kv_cache";
const OUT: &str = "actions";

pub struct Settings {
    pub steps: usize,
    pub seed: u64,
    /// The `state` input is wired: every frame's K/V cache is joined by `seq` to its state.
    pub state_input: bool,
}

impl Settings {
    /// Env: `STEPS` (10), `SEED` (0); the wired inputs.
    pub fn from_env(node: &DoraNode) -> Result<Self> {
        let s = Settings {
            steps: env_or("STEPS", 10)?,
            seed: env_or("SEED", 0)?,
            state_input: !FrameJoin::wired(node, &["state"]).is_empty(),
        };
        if s.steps == 0 {
            bail!("env STEPS must be at least 1");
        }
        Ok(s)
    }

    /// The node's stage: the K/V cache, and the state when it is wired.
    fn spec(&self, node: &DoraNode, backend: String) -> Spec {
        let parts: &[&'static str] = if self.state_input {
            &[IN, "state"]
        } else {
            &[IN]
        };
        Spec::new(node, "denoise", parts, backend)
    }
}

/// Env: `CHECKPOINT`, `BACKEND` (cpu or cuda), `DTYPE`, `STEPS`, `SEED`. With BACKEND=cuda
/// the node reads K/V caches sent by CUDA IPC handle or as host tensors.
pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (kind, precision) = backend_from_env()?;
    let settings = Settings::from_env(&node)?;
    let ckpt = checkpoint_from_env()?;
    if !ckpt.config.pi05 && !settings.state_input {
        bail!("the checkpoint is pi0, which needs the robot state: wire the `state` input");
    }
    if kind == BackendKind::Cuda {
        return run_cuda(&ckpt, precision, &settings, node, events);
    }
    let mut denoiser = backend::load_denoise(kind, precision, &ckpt)?;
    eprintln!("denoise: {}", denoiser.describe());
    run_with(&ckpt.config, denoiser.as_mut(), &settings, node, events)
}

fn kv_part(frame: &Joined) -> Result<&Part> {
    frame
        .part(IN)
        .ok_or_else(|| eyre!("internal: a frame without its K/V cache"))
}

/// A K/V cache sent as a host tensor [layers, 2, len, kv_width] (f32).
fn host_cache(
    cfg: &Config,
    md: &dora_node_api::MetadataParameters,
    data: &dora_node_api::DoraArray,
) -> Result<operators::gemma::KvCache> {
    let kw = cfg.num_kv_heads * cfg.head_dim;
    let (shape, kv) = expect_tensor::<f32>(
        IN,
        md,
        data,
        "float32",
        &[Dim::Is(cfg.vlm_depth), Dim::Is(2), Dim::Any, Dim::Is(kw)],
    )?;
    kv_from_tensor(&shape, kv)
}

/// The sampler of a backend, on K/V caches sent as host tensors.
struct HostIn<'a> {
    cfg: &'a Config,
    denoiser: &'a mut dyn DenoiseStage,
    settings: &'a Settings,
}

impl Stage for HostIn<'_> {
    fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
        let cfg = self.cfg;
        let (mut span, meta) = cx.start_span(frame.meta());
        let part = kv_part(&frame)?;
        refuse_ipc(IN, &part.metadata)?;
        let cache = host_cache(cfg, &part.metadata, &part.data)?;
        let state = frame_state(&frame, cfg.action_dim, !cfg.pi05)?;
        let noise = noise_from_seed(cfg, self.settings.seed.wrapping_add(meta.seq));
        let actions =
            self.denoiser
                .sample(&cache, state.as_deref(), &noise, self.settings.steps)?;
        if let Some(gpu) = self.denoiser.gpu_time() {
            span.set_gpu(gpu);
        }
        let shape = [cfg.action_horizon, cfg.action_dim];
        cx.send(OUT, meta.tensor_params(&shape, "float32"), actions)?;
        span.end();
        Ok(())
    }
}

pub fn run_with(
    cfg: &Config,
    denoiser: &mut dyn DenoiseStage,
    settings: &Settings,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    let spec = settings.spec(&node, denoiser.describe());
    stage::run(
        &spec,
        &mut HostIn {
            cfg,
            denoiser,
            settings,
        },
        node,
        events,
    )
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _: &operators::checkpoint::Checkpoint,
    _: operators::backend::Precision,
    _: &Settings,
    _: DoraNode,
    _: EventStream,
) -> Result<()> {
    bail!("denoise: CUDA support is not built in: rebuild with `cargo build --release -p denoise --features cuda`")
}

/// The sampler on the GPU: the K/V cache by CUDA IPC handle (copied device to device after
/// the producer's event, then handed back on `release`) or as a host tensor.
#[cfg(feature = "cuda")]
fn run_cuda(
    ckpt: &operators::checkpoint::Checkpoint,
    precision: operators::backend::Precision,
    settings: &Settings,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    use operators::cuda::ipc::Importer;
    use operators::cuda::{CudaDenoise, DType};

    let mut policy = CudaDenoise::load(ckpt, precision)?;
    policy.warm_up(settings.steps)?;
    let describe = policy.describe();
    eprintln!("denoise: {describe}");
    let dtype = if policy.act_dtype() == DType::Bf16 {
        "bfloat16"
    } else {
        "<f4"
    };
    let spec = settings.spec(&node, describe);
    let mut stage = cuda::Gpu {
        cfg: &ckpt.config,
        settings,
        shape: policy.cache_shape().to_vec(),
        dtype,
        importer: Importer::default(),
        policy,
        by_handle: 0,
        host: 0,
    };
    stage::run(&spec, &mut stage, node, events)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use node_common::int_param;
    use node_common::ipc::{release_params, release_part, IpcTensor};
    use operators::cuda::ipc::{Importer, Remote};
    use operators::cuda::CudaDenoise;

    /// The denoise stage of a policy on the GPU. Fields drop in order: the imported device
    /// memory before the policy's context.
    pub(super) struct Gpu<'a> {
        pub cfg: &'a Config,
        pub settings: &'a Settings,
        /// The K/V cache as sent by handle: [layers, 2, cache_rows, kv_width] of `dtype`.
        pub shape: Vec<usize>,
        pub dtype: &'static str,
        pub importer: Importer,
        pub policy: CudaDenoise,
        /// Caches received by handle, and as host tensors.
        pub by_handle: u64,
        pub host: u64,
    }

    impl Gpu<'_> {
        /// Runs `frame`; `released` tells whether its cache's ring slot (when sent by
        /// handle) went back to the producer.
        fn run(&mut self, cx: &mut Cx, frame: &Joined, released: &mut bool) -> Result<()> {
            let (cfg, settings) = (self.cfg, self.settings);
            let part = kv_part(frame)?;
            let md = &part.metadata;
            let (mut span, meta) = cx.start_span(frame.meta());
            let state = frame_state(frame, cfg.action_dim, !cfg.pi05)?;
            let noise = noise_from_seed(cfg, settings.seed.wrapping_add(meta.seq));
            let (actions, gpu) = if IpcTensor::is_ipc(md) {
                let expected: Vec<Dim> = self.shape.iter().map(|&d| Dim::Is(d)).collect();
                let tensor = IpcTensor::from_input(IN, md, &part.data, self.dtype, &expected)?;
                let p = int_param(md, "prefix_len")
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| eyre!("input `kv_cache`: metadata `prefix_len` is missing"))?;
                let remote = Remote {
                    mem_handle: tensor.mem_handle,
                    event_handle: tensor.event_handle,
                    offset: tensor.offset,
                    bytes: tensor.size(),
                };
                let run = self.policy.from_ring(
                    &mut self.importer,
                    &remote,
                    p,
                    (state.as_deref(), &noise, settings.steps),
                );
                *released = true;
                cx.send("release", release_params(meta, tensor.slot), ())?;
                self.by_handle += 1;
                run?
            } else {
                let cache = host_cache(cfg, md, &part.data)?;
                self.host += 1;
                self.policy
                    .run(&cache, state.as_deref(), &noise, settings.steps)?
            };
            span.set_gpu(gpu);
            let shape = [cfg.action_horizon, cfg.action_dim];
            cx.send(OUT, meta.tensor_params(&shape, "float32"), actions)?;
            span.end();
            Ok(())
        }
    }

    impl Stage for Gpu<'_> {
        fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
            let mut released = false;
            let result = self.run(cx, &frame, &mut released);
            if result.is_err() && !released {
                if let Some(part) = frame.part(IN) {
                    release_part(cx.node, part);
                }
            }
            result
        }

        /// A dropped frame's cache slot goes back to the prefix node unread.
        fn on_dropped_part(&mut self, node: &mut DoraNode, part: &Part) {
            release_part(node, part);
        }

        fn summary(&self) -> String {
            format!(
                "; in: {} by cuda-ipc handle ({} slots opened), {} host tensors",
                self.by_handle,
                self.importer.opened(),
                self.host
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_common::kv_to_tensor;
    use node_common::testing::{event, golden, json, run_node, values, TensorInput};
    use operators::checkpoint::Checkpoint;
    use operators::gemma::KvCache;
    use operators::weights::Loader;
    use operators::Denoiser;

    #[test]
    fn samples_with_per_frame_noise_and_rejects_a_wrong_shape() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut den = Denoiser::load(&ckpt, &mut Loader::new(&ckpt, |_, _| {})).unwrap();
        let kw = cfg.num_kv_heads * cfg.head_dim;
        let len = 7;
        let cache = KvCache {
            len,
            kv_width: kw,
            k: (0..cfg.vlm_depth)
                .map(|l| {
                    (0..len * kw)
                        .map(|i| ((i + l) % 13) as f32 / 13.0)
                        .collect()
                })
                .collect(),
            v: (0..cfg.vlm_depth)
                .map(|l| {
                    (0..len * kw)
                        .map(|i| ((i * 3 + l) % 11) as f32 / 11.0)
                        .collect()
                })
                .collect(),
        };
        let (shape, kv) = kv_to_tensor(&cache);
        let shape: &'static [usize] = Box::leak(shape.into_boxed_slice());
        let msg = |seq, shape: &'static [usize], v: &[f32]| TensorInput {
            id: "kv_cache",
            seq,
            shape,
            dtype: "float32",
            arrow_type: "Float32",
            values: json(v),
            extra: vec![],
        };
        let events = vec![
            event(0.0, msg(4, &[1, 2, 3, 4], &[0.0; 24])),
            event(0.01, msg(5, shape, &kv)),
        ];
        let settings = Settings {
            steps: 3,
            seed: 100,
            state_input: false,
        };
        let out = run_node("denoise", events, |node, ev| {
            run_with(&cfg, &mut den, &settings, node, ev)
        })
        .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        let want = den
            .run(&cache, None, &noise_from_seed(&cfg, 105), 3)
            .unwrap();
        let got: Vec<f32> = values(&out[0]).iter().map(|&v| v as f32).collect();
        assert_eq!(got, want);
    }
}
