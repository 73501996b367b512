//! Prefix stage: prompt embedding and the Gemma prefix over the real image and prompt
//! tokens, producing the per-layer K/V cache [layers, 2, len, kv_width].

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{bail, eyre, Result};
use node_common::ipc::{refuse_ipc, transport_from_env, Transport};
use node_common::join::{Frames, Joined};
use node_common::prompt::{frame_prompt, prompt_from_env, TOKENS};
use node_common::reject::declares_rejected;
use node_common::{
    backend_from_env, checkpoint_from_env, expect_tensor, image_masks, kv_to_tensor, Dim,
};
use operators::backend::{self, BackendKind, PrefixStage};
use operators::{Config, ImageEmbeddings};

/// The prompt: token ids and their mask (right-padded).
pub struct Prompt {
    pub tokens: Vec<i32>,
    pub mask: Vec<bool>,
    /// The `tokens` input is wired: every frame takes the prompt sent with it, joined to its
    /// image embeddings by `seq` (`tokens` and `mask` are then env PROMPT's, unused, or empty).
    pub per_frame: bool,
}

impl Prompt {
    /// The token ids and mask of a joined frame.
    fn for_frame(&self, frame: &Joined, cfg: &Config) -> Result<(Vec<i32>, Vec<bool>)> {
        frame_prompt(frame, &(self.tokens.clone(), self.mask.clone()), cfg)
    }

    /// The frame's parts: the image embeddings, and the prompt when it comes per frame.
    fn frames(&self, node: &DoraNode) -> Frames {
        let parts: &[&'static str] = if self.per_frame {
            &["image_embeddings", TOKENS]
        } else {
            &["image_embeddings"]
        };
        Frames::new(
            node.id().as_ref(),
            "prefix",
            parts,
            declares_rejected(node),
        )
    }
}

/// Env: `CHECKPOINT`, `PROMPT` (not needed when the `tokens` input is wired), `BACKEND` (cpu
/// or cuda), `DTYPE`, `TRANSPORT` (host or cuda-ipc for the K/V cache), `RING_SLOTS`. With
/// BACKEND=cuda the node reads image embeddings sent either way.
pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (kind, precision) = backend_from_env()?;
    let transport = transport_from_env()?;
    let ckpt = checkpoint_from_env()?;
    let (tokens, mask, per_frame) = prompt_from_env(&node, &ckpt.config)?;
    let prompt = Prompt {
        tokens,
        mask,
        per_frame,
    };
    if kind == BackendKind::Cuda {
        return run_cuda(&ckpt, precision, transport, &prompt, node, events);
    }
    if transport == Transport::CudaIpc {
        bail!("prefix: env TRANSPORT=cuda-ipc needs BACKEND=cuda");
    }
    let mut encoder = backend::load_prefix(kind, precision, &ckpt)?;
    eprintln!("prefix: {}", encoder.describe());
    run_with(&ckpt.config, encoder.as_mut(), &prompt, node, events)
}

pub fn run_with(
    cfg: &Config,
    encoder: &mut dyn PrefixStage,
    prompt: &Prompt,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let out: DataId = "kv_cache".to_string().into();
    let tracer = node_common::tracer(&node, &encoder.describe())?;
    let t = cfg.tokens_per_image();
    let mut frames = prompt.frames(&node);
    while let Some(event) = events.recv() {
        let (id, metadata, data) = match event {
            Event::Input { id, metadata, data } => (id, metadata, data),
            // Not waiting for every input to close: `release` may loop back from a consumer.
            Event::InputClosed { id } if id.as_str() == "image_embeddings" => break,
            Event::Stop(_) => break,
            _ => continue,
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
            let mut span = tracer.start("prefix", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let part = frame
                .part("image_embeddings")
                .ok_or_else(|| eyre!("internal: a frame without image embeddings"))?;
            let md = &part.metadata;
            refuse_ipc("image_embeddings", md)?;
            let masks = image_masks("image_embeddings", md, cfg.num_images)?;
            let real = masks.iter().filter(|&&m| m).count();
            let (_, emb) = expect_tensor::<f32>(
                "image_embeddings",
                md,
                &part.data,
                "float32",
                &[Dim::Is(real * t), Dim::Is(cfg.vlm_width)],
            )?;
            let images = ImageEmbeddings {
                tokens: emb.to_vec(),
                real_images: real,
            };
            let (tokens, mask) = prompt.for_frame(&frame, cfg)?;
            let cache = encoder.encode(&images, &tokens, &mask)?;
            if let Some(gpu) = encoder.gpu_time() {
                span.set_gpu(gpu);
            }
            let (shape, values) = kv_to_tensor(&cache);
            node.send_output(out.clone(), meta.tensor_params(&shape, "float32"), values)
                .map_err(|e| eyre!("sending kv_cache: {e}"))?;
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            frames.reject(&mut node, &tracer, meta, &e);
        }
    }
    frames.close(&mut node, &tracer, |_, _| {});
    eprintln!("prefix: {}", frames.summary());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _: &operators::checkpoint::Checkpoint,
    _: operators::backend::Precision,
    _: Transport,
    _: &Prompt,
    _: DoraNode,
    _: EventStream,
) -> Result<()> {
    bail!("prefix: CUDA support is not built in: rebuild with `cargo build --release -p prefix --features cuda`")
}

/// The prefix stage on the GPU: image embeddings by handle (`transport: cuda-ipc`, handed
/// back on `release` once copied) or as host tensors; the K/V cache out by handle from its
/// own ring (`TRANSPORT: cuda-ipc`, handed back by the denoise node on this node's `release`
/// input) or as a host tensor.
#[cfg(feature = "cuda")]
fn run_cuda(
    ckpt: &operators::checkpoint::Checkpoint,
    precision: operators::backend::Precision,
    transport: Transport,
    prompt: &Prompt,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    use node_common::ipc::{
        release_from, release_params, release_part, ring_slots_from_env, IpcTensor,
    };
    use operators::cuda::ipc::{Importer, Remote, Ring};
    use operators::cuda::{CudaPolicy, DType};

    let cfg = &ckpt.config;
    let mut policy = CudaPolicy::load(ckpt, precision, |_, _| {})?;
    // Prompts of other lengths (sent on `tokens`) build their graphs when they first arrive.
    let n_ids = prompt.mask.iter().filter(|&&m| m).count().max(1);
    policy.warm_up_stages(Some(n_ids))?;
    let shape = policy.cache_shape();
    let dtype = if policy.act_dtype() == DType::Bf16 {
        "bfloat16"
    } else {
        "<f4"
    };
    let elem = if policy.act_dtype() == DType::Bf16 {
        2
    } else {
        4
    };
    let mut ring = match transport {
        Transport::CudaIpc => Some(Ring::new(
            policy.device(),
            shape.iter().product::<usize>() * elem,
            ring_slots_from_env()?,
            std::time::Duration::from_secs(2),
        )?),
        Transport::Host => None,
    };
    eprintln!(
        "prefix: {}, K/V cache out by {}",
        operators::backend::Runner::describe(&policy),
        if ring.is_some() {
            "cuda-ipc"
        } else {
            "host tensor"
        }
    );
    let real_ids = |tokens: &[i32], mask: &[bool]| -> Vec<i32> {
        tokens
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect()
    };
    let mut frames = prompt.frames(&node);
    let out: DataId = "kv_cache".to_string().into();
    let release_out: DataId = "release".to_string().into();
    let tracer = node_common::tracer(&node, &operators::backend::Runner::describe(&policy))?;
    let t = cfg.tokens_per_image();
    let mut importer = Importer::default();
    let (mut by_handle_in, mut host_in, mut by_handle_out, mut host_bytes_out) =
        (0u64, 0u64, 0u64, 0usize);
    let (mut full, mut stale) = (0u64, 0u64);
    while let Some(event) = events.recv() {
        let (id, metadata, data) = match event {
            Event::Input { id, metadata, data } => (id, metadata, data),
            // The stream ended upstream: stop, after handing back what consumers still read.
            Event::InputClosed { id } if id.as_str() == "image_embeddings" => break,
            Event::Stop(_) => break,
            _ => continue,
        };
        if id.as_str() == "release" {
            match release_from(&metadata.parameters) {
                Ok((slot, seq)) => {
                    if !ring.as_mut().is_some_and(|r| r.release(slot as usize, seq)) {
                        stale += 1;
                    }
                }
                Err(e) => frames.rejections.message(&e),
            }
            continue;
        }
        // A dropped frame's embeddings slot goes back to the vision node unread.
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
        // Whether the embeddings' ring slot (when sent by handle) went back to the producer.
        let mut released = false;
        let result = (|| -> Result<()> {
            let part = frame
                .part("image_embeddings")
                .ok_or_else(|| eyre!("internal: a frame without image embeddings"))?;
            let md = &part.metadata;
            let mut span = tracer.start("prefix", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let (tokens, mask) = prompt.for_frame(&frame, cfg)?;
            let ids = real_ids(&tokens, &mask);
            let masks = image_masks("image_embeddings", md, cfg.num_images)?;
            let real = masks.iter().filter(|&&m| m).count();
            let expected = [Dim::Is(real * t), Dim::Is(cfg.vlm_width)];
            let (p, gpu) = if IpcTensor::is_ipc(md) {
                let tensor =
                    IpcTensor::from_input("image_embeddings", md, &part.data, "<f4", &expected)?;
                let remote = Remote {
                    mem_handle: tensor.mem_handle,
                    event_handle: tensor.event_handle,
                    offset: tensor.offset,
                    bytes: tensor.size(),
                };
                let read = policy.prefix_from_ring(&mut importer, &remote, real, &ids);
                // The slot is copied (or unusable): hand it back either way.
                released = true;
                node.send_output(release_out.clone(), release_params(meta, tensor.slot), ())
                    .map_err(|e| eyre!("sending release: {e}"))?;
                by_handle_in += 1;
                read?
            } else {
                let (_, emb) =
                    expect_tensor::<f32>("image_embeddings", md, &part.data, "float32", &expected)?;
                host_in += 1;
                policy.prefix_from_host(emb, real, &ids)?
            };
            span.set_gpu(gpu);
            match ring.as_mut() {
                Some(ring) => {
                    let before = ring.reclaimed;
                    let slot = ring.acquire(meta.seq);
                    if ring.reclaimed > before {
                        eprintln!(
                            "prefix: {} ring slot(s) not handed back within 2 s taken back (consumer gone or restarting?)",
                            ring.reclaimed - before
                        );
                    }
                    let Some(slot) = slot else {
                        full += 1;
                        bail!(
                            "frame {}: dropped, every ring slot is still held by the consumer",
                            meta.seq
                        );
                    };
                    if let Err(e) = policy.cache_to_ring(ring, slot) {
                        ring.cancel(slot);
                        return Err(e.into());
                    }
                    let s = ring.slot(slot)?;
                    let tensor = IpcTensor {
                        mem_handle: s.mem_handle,
                        event_handle: s.event_handle,
                        slot: slot as u64,
                        shape: shape.to_vec(),
                        dtype: dtype.into(),
                        offset: 0,
                    };
                    let mut params = tensor.params(meta);
                    params.insert(
                        "prefix_len".into(),
                        dora_node_api::Parameter::Integer(p as i64),
                    );
                    node.send_output(out.clone(), params, tensor.data())
                        .map_err(|e| eyre!("sending kv_cache: {e}"))?;
                    by_handle_out += 1;
                }
                None => {
                    let cache = policy.download_cache(p)?;
                    let (shape, values) = kv_to_tensor(&cache);
                    host_bytes_out += values.len() * 4;
                    node.send_output(out.clone(), meta.tensor_params(&shape, "float32"), values)
                        .map_err(|e| eyre!("sending kv_cache: {e}"))?;
                }
            }
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            if !released {
                if let Some(part) = frame.part("image_embeddings") {
                    release_part(&mut node, part);
                }
            }
            frames.reject(&mut node, &tracer, meta, &e);
        }
    }
    frames.close(&mut node, &tracer, release_part);
    // Slots still held by the consumer may be mid-copy: wait for their release (at most 2 s,
    // a consumer that is gone never answers) before the ring's memory is freed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while ring.as_ref().is_some_and(|r| r.busy() > 0) {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
            break;
        };
        match events.recv_timeout(left) {
            Some(Event::Input { id, metadata, .. }) if id.as_str() == "release" => {
                if let Ok((slot, seq)) = release_from(&metadata.parameters) {
                    if let Some(r) = ring.as_mut() {
                        r.release(slot as usize, seq);
                    }
                }
            }
            Some(Event::InputClosed { id }) if id.as_str() == "release" => break,
            None | Some(Event::Stop(_)) => break,
            _ => {}
        }
    }
    eprintln!(
        "prefix: {}; in: {by_handle_in} by cuda-ipc handle, {host_in} host tensors ({} slots opened); out: {by_handle_out} by cuda-ipc handle, {:.1} MB through the host; {full} frames dropped with the ring full, {} slots reclaimed, {stale} stale releases",
        frames.summary(),
        importer.opened(),
        host_bytes_out as f64 / 1e6,
        ring.as_ref().map_or(0, |r| r.reclaimed)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::Parameter;
    use node_common::testing::{event, golden, json, run_node, values, TensorInput};
    use operators::checkpoint::Checkpoint;
    use operators::observation::load_prompt;
    use operators::weights::Loader;
    use operators::PrefixEncoder;

    #[test]
    fn builds_the_kv_cache_and_rejects_a_wrong_shape() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut enc = PrefixEncoder::load(&ckpt, &mut Loader::new(&ckpt, |_, _| {})).unwrap();
        let (tokens, mask) = load_prompt(&golden("pi05_small").join("observation"), &cfg).unwrap();
        let rows = 2 * cfg.tokens_per_image();
        let emb: Vec<f32> = (0..rows * cfg.vlm_width)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let shape: &'static [usize] = Box::leak(vec![rows, cfg.vlm_width].into_boxed_slice());
        let msg = |seq, shape: &'static [usize], v: &[f32]| TensorInput {
            id: "image_embeddings",
            seq,
            shape,
            dtype: "float32",
            arrow_type: "Float32",
            values: json(v),
            extra: vec![("image_masks", Parameter::ListInt(vec![1, 1, 0]))],
        };
        let events = vec![
            event(0.0, msg(0, &[5, 64], &[0.0; 320])),
            event(0.01, msg(1, shape, &emb)),
        ];
        let prompt = Prompt {
            tokens: tokens.clone(),
            mask: mask.clone(),
            per_frame: false,
        };
        let out = run_node("prefix", events, |node, ev| {
            run_with(&cfg, &mut enc, &prompt, node, ev)
        })
        .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        let cache = enc
            .run(
                &ImageEmbeddings {
                    tokens: emb,
                    real_images: 2,
                },
                &tokens,
                &mask,
            )
            .unwrap();
        let (_, want) = kv_to_tensor(&cache);
        let got: Vec<f32> = values(&out[0]).iter().map(|&v| v as f32).collect();
        assert_eq!(got, want);
    }
}
