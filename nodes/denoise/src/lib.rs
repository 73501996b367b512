//! Denoise stage: the flow-matching sampler over the action expert, attending to the prefix
//! K/V cache of the same frame. Noise for frame `seq` is drawn from seed `SEED + seq`, so a
//! run can be reproduced with `turbopi infer --seed`.

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{bail, eyre, Result};
use node_common::ipc::refuse_ipc;
use node_common::join::{FrameJoin, Frames};
use node_common::reject::declares_rejected;
use node_common::{
    backend_from_env, checkpoint_from_env, env_or, expect_tensor, frame_state, kv_from_tensor, Dim,
};
use operators::backend::{self, BackendKind, DenoiseStage};
use operators::observation::noise_from_seed;
use operators::Config;

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

impl Settings {
    /// The node's frames: the K/V cache, and the state when it is wired.
    fn frames(&self, node: &DoraNode) -> Frames {
        let parts: &[&'static str] = if self.state_input {
            &["kv_cache", "state"]
        } else {
            &["kv_cache"]
        };
        Frames::new(
            node.id().as_ref(),
            "denoise",
            parts,
            declares_rejected(node),
        )
    }
}

/// A K/V cache sent as a host tensor [layers, 2, len, kv_width] (f32).
fn host_cache(
    cfg: &Config,
    md: &dora_node_api::MetadataParameters,
    data: &dora_node_api::DoraArray,
) -> Result<operators::gemma::KvCache> {
    let kw = cfg.num_kv_heads * cfg.head_dim;
    let (shape, kv) = expect_tensor::<f32>(
        "kv_cache",
        md,
        data,
        "float32",
        &[Dim::Is(cfg.vlm_depth), Dim::Is(2), Dim::Any, Dim::Is(kw)],
    )?;
    kv_from_tensor(&shape, kv)
}

pub fn run_with(
    cfg: &Config,
    denoiser: &mut dyn DenoiseStage,
    settings: &Settings,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let out: DataId = "actions".to_string().into();
    let tracer = node_common::tracer(&node, &denoiser.describe())?;
    let (h, ad) = (cfg.action_horizon, cfg.action_dim);
    let mut frames = settings.frames(&node);
    while let Some(event) = events.recv() {
        let Event::Input { id, metadata, data } = event else {
            continue;
        };
        let Some(frame) = frames.take(
            &mut node,
            &tracer,
            id.as_str(),
            metadata.parameters,
            data,
            |_, _| {},
        ) else {
            continue;
        };
        let meta = frame.meta();
        let result = (|| {
            let mut span = tracer.start("denoise", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let part = frame
                .part("kv_cache")
                .ok_or_else(|| eyre!("internal: a frame without its K/V cache"))?;
            refuse_ipc("kv_cache", &part.metadata)?;
            let cache = host_cache(cfg, &part.metadata, &part.data)?;
            let state = frame_state(&frame, ad, !cfg.pi05)?;
            let noise = noise_from_seed(cfg, settings.seed.wrapping_add(meta.seq));
            let actions = denoiser.sample(&cache, state.as_deref(), &noise, settings.steps)?;
            if let Some(gpu) = denoiser.gpu_time() {
                span.set_gpu(gpu);
            }
            node.send_output(
                out.clone(),
                meta.tensor_params(&[h, ad], "float32"),
                actions,
            )
            .map_err(|e| eyre!("sending actions: {e}"))?;
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            frames.reject(&mut node, &tracer, meta, &e);
        }
    }
    frames.close(&mut node, &tracer, |_, _| {});
    eprintln!("denoise: {}", frames.summary());
    Ok(())
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
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    use node_common::int_param;
    use node_common::ipc::{release_params, release_part, IpcTensor};
    use operators::cuda::ipc::{Importer, Remote};
    use operators::cuda::{CudaPolicy, DType};

    let cfg = &ckpt.config;
    let mut policy = CudaPolicy::load(ckpt, precision, |_, _| {})?;
    policy.warm_up(settings.steps)?;
    eprintln!("denoise: {}", operators::backend::Runner::describe(&policy));
    let shape = policy.cache_shape();
    let dtype = if policy.act_dtype() == DType::Bf16 {
        "bfloat16"
    } else {
        "<f4"
    };
    let out: DataId = "actions".to_string().into();
    let release_out: DataId = "release".to_string().into();
    let tracer = node_common::tracer(&node, &operators::backend::Runner::describe(&policy))?;
    let (h, ad) = (cfg.action_horizon, cfg.action_dim);
    let mut importer = Importer::default();
    let mut frames = settings.frames(&node);
    let (mut by_handle, mut host) = (0u64, 0u64);
    while let Some(event) = events.recv() {
        let Event::Input { id, metadata, data } = event else {
            continue;
        };
        // A dropped frame's cache slot goes back to the prefix node unread.
        let Some(frame) = frames.take(
            &mut node,
            &tracer,
            id.as_str(),
            metadata.parameters,
            data,
            release_part,
        ) else {
            continue;
        };
        let meta = frame.meta();
        let mut released = false;
        let result = (|| -> Result<()> {
            let part = frame
                .part("kv_cache")
                .ok_or_else(|| eyre!("internal: a frame without its K/V cache"))?;
            let md = &part.metadata;
            let mut span = tracer.start("denoise", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let state = frame_state(&frame, ad, !cfg.pi05)?;
            let noise = noise_from_seed(cfg, settings.seed.wrapping_add(meta.seq));
            let (actions, gpu) = if IpcTensor::is_ipc(md) {
                let expected: Vec<Dim> = shape.iter().map(|&d| Dim::Is(d)).collect();
                let tensor = IpcTensor::from_input("kv_cache", md, &part.data, dtype, &expected)?;
                let p = int_param(md, "prefix_len")
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| eyre!("input `kv_cache`: metadata `prefix_len` is missing"))?;
                let remote = Remote {
                    mem_handle: tensor.mem_handle,
                    event_handle: tensor.event_handle,
                    offset: tensor.offset,
                    bytes: tensor.size(),
                };
                let run = policy.denoise_from_ring(
                    &mut importer,
                    &remote,
                    p,
                    state.as_deref(),
                    &noise,
                    settings.steps,
                );
                released = true;
                node.send_output(release_out.clone(), release_params(meta, tensor.slot), ())
                    .map_err(|e| eyre!("sending release: {e}"))?;
                by_handle += 1;
                run?
            } else {
                let cache = host_cache(cfg, md, &part.data)?;
                host += 1;
                policy.run_denoise(&cache, state.as_deref(), &noise, settings.steps)?
            };
            span.set_gpu(gpu);
            node.send_output(
                out.clone(),
                meta.tensor_params(&[h, ad], "float32"),
                actions,
            )
            .map_err(|e| eyre!("sending actions: {e}"))?;
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            if !released {
                if let Some(part) = frame.part("kv_cache") {
                    release_part(&mut node, part);
                }
            }
            frames.reject(&mut node, &tracer, meta, &e);
        }
    }
    frames.close(&mut node, &tracer, release_part);
    eprintln!(
        "denoise: {}; in: {by_handle} by cuda-ipc handle ({} slots opened), {host} host tensors",
        frames.summary(),
        importer.opened()
    );
    Ok(())
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
