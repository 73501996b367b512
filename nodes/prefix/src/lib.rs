//! Prefix stage: prompt embedding and the Gemma prefix over the real image and prompt
//! tokens, producing the per-layer K/V cache [layers, 2, len, kv_width].

use dora_node_api::{DoraNode, EventStream};
use eyre::{bail, eyre, Result};
use node_common::ipc::{refuse_ipc, transport_from_env, Transport};
use node_common::join::{Joined, Part};
use node_common::prompt::{frame_prompt, prompt_from_env, TOKENS};
use node_common::stage::{self, Cx, Spec, Stage};
use node_common::{
    backend_from_env, checkpoint_from_env, expect_tensor, image_masks, kv_to_tensor, Dim,
};
use operators::backend::{self, BackendKind, PrefixStage};
use operators::{Config, ImageEmbeddings};

/// The main input, and the output.
const IN: &str = "image_embeddings";
const OUT: &str = "kv_cache";

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

    /// The node's stage: the image embeddings, and the prompt when it comes per frame.
    fn spec(&self, node: &DoraNode, backend: String) -> Spec {
        let parts: &[&'static str] = if self.per_frame { &[IN, TOKENS] } else { &[IN] };
        Spec::new(node, "prefix", parts, backend)
    }
}

fn embeddings(frame: &Joined) -> Result<&Part> {
    frame
        .part(IN)
        .ok_or_else(|| eyre!("internal: a frame without image embeddings"))
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

/// The encoder of a backend: image embeddings and the K/V cache as host tensors.
struct HostIo<'a> {
    cfg: &'a Config,
    encoder: &'a mut dyn PrefixStage,
    prompt: &'a Prompt,
}

impl Stage for HostIo<'_> {
    fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
        let cfg = self.cfg;
        let (mut span, meta) = cx.start_span(frame.meta());
        let part = embeddings(&frame)?;
        let md = &part.metadata;
        refuse_ipc(IN, md)?;
        let masks = image_masks(IN, md, cfg.num_images)?;
        let real = masks.iter().filter(|&&m| m).count();
        let (_, emb) = expect_tensor::<f32>(
            IN,
            md,
            &part.data,
            "float32",
            &[
                Dim::Is(real * cfg.tokens_per_image()),
                Dim::Is(cfg.vlm_width),
            ],
        )?;
        let images = ImageEmbeddings {
            tokens: emb.to_vec(),
            real_images: real,
        };
        let (tokens, mask) = self.prompt.for_frame(&frame, cfg)?;
        let cache = self.encoder.encode(&images, &tokens, &mask)?;
        if let Some(gpu) = self.encoder.gpu_time() {
            span.set_gpu(gpu);
        }
        let (shape, values) = kv_to_tensor(&cache);
        cx.send(OUT, meta.tensor_params(&shape, "float32"), values)?;
        span.end();
        Ok(())
    }
}

pub fn run_with(
    cfg: &Config,
    encoder: &mut dyn PrefixStage,
    prompt: &Prompt,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    let spec = prompt.spec(&node, encoder.describe());
    stage::run(
        &spec,
        &mut HostIo {
            cfg,
            encoder,
            prompt,
        },
        node,
        events,
    )
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
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    use node_common::ipc::ring_slots_from_env;
    use node_common::ring::{RingOut, HOLD_LIMIT};
    use operators::cuda::ipc::{Importer, Ring};
    use operators::cuda::{CudaPrefix, DType};

    let cfg = &ckpt.config;
    let mut policy = CudaPrefix::load(ckpt, precision)?;
    // Prompts of other lengths (sent on `tokens`) build their graphs when they first arrive.
    let n_ids = prompt.mask.iter().filter(|&&m| m).count().max(1);
    policy.warm_up(n_ids)?;
    let shape = policy.cache_shape();
    let (dtype, elem) = if policy.act_dtype() == DType::Bf16 {
        ("bfloat16", 2)
    } else {
        ("<f4", 4)
    };
    let ring = match transport {
        Transport::CudaIpc => Some(Ring::new(
            policy.device(),
            shape.iter().product::<usize>() * elem,
            ring_slots_from_env()?,
            HOLD_LIMIT,
        )?),
        Transport::Host => None,
    };
    let describe = policy.describe();
    eprintln!(
        "prefix: {describe}, K/V cache out by {}",
        if ring.is_some() {
            "cuda-ipc"
        } else {
            "host tensor"
        }
    );
    let spec = prompt.spec(&node, describe);
    let mut stage = cuda::Gpu {
        cfg,
        prompt,
        shape: shape.to_vec(),
        dtype,
        importer: Importer::default(),
        ring: ring.map(|r| RingOut::new(r, "prefix")),
        policy,
        stale_without_ring: 0,
        counts: Default::default(),
    };
    stage::run(&spec, &mut stage, node, events)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use node_common::ipc::{release_params, release_part, IpcTensor};
    use node_common::ring::RingOut;
    use operators::cuda::ipc::{Importer, Remote, Ring};
    use operators::cuda::CudaPrefix;

    /// What went in and out, and how.
    #[derive(Default)]
    pub(super) struct Counts {
        by_handle_in: u64,
        host_in: u64,
        by_handle_out: u64,
        host_bytes_out: usize,
    }

    /// The prefix stage of a policy on the GPU. Fields drop in order: the imported and the
    /// exported device memory before the policy's context.
    pub(super) struct Gpu<'a> {
        pub cfg: &'a Config,
        pub prompt: &'a Prompt,
        /// The K/V cache as sent by handle: [layers, 2, cache_rows, kv_width] of `dtype`.
        pub shape: Vec<usize>,
        pub dtype: &'static str,
        pub importer: Importer,
        pub ring: Option<RingOut<Ring>>,
        pub policy: CudaPrefix,
        /// Releases that arrived with no ring to take them (`TRANSPORT: host`).
        pub stale_without_ring: u64,
        pub counts: Counts,
    }

    /// The real (unmasked) prompt ids.
    fn real_ids(tokens: &[i32], mask: &[bool]) -> Vec<i32> {
        tokens
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect()
    }

    impl Gpu<'_> {
        /// Runs `frame`; `released` tells whether its embeddings' ring slot (when sent by
        /// handle) went back to the producer.
        fn run(&mut self, cx: &mut Cx, frame: &Joined, released: &mut bool) -> Result<()> {
            let cfg = self.cfg;
            let part = embeddings(frame)?;
            let md = &part.metadata;
            let (mut span, meta) = cx.start_span(frame.meta());
            let (tokens, mask) = self.prompt.for_frame(frame, cfg)?;
            let ids = real_ids(&tokens, &mask);
            let masks = image_masks(IN, md, cfg.num_images)?;
            let real = masks.iter().filter(|&&m| m).count();
            let expected = [
                Dim::Is(real * cfg.tokens_per_image()),
                Dim::Is(cfg.vlm_width),
            ];
            let (p, gpu) = if IpcTensor::is_ipc(md) {
                let tensor = IpcTensor::from_input(IN, md, &part.data, "<f4", &expected)?;
                let remote = Remote {
                    mem_handle: tensor.mem_handle,
                    event_handle: tensor.event_handle,
                    offset: tensor.offset,
                    bytes: tensor.size(),
                };
                let read = self
                    .policy
                    .from_ring(&mut self.importer, &remote, real, &ids);
                // The slot is copied (or unusable): hand it back either way.
                *released = true;
                cx.send("release", release_params(meta, tensor.slot), ())?;
                self.counts.by_handle_in += 1;
                read?
            } else {
                let (_, emb) = expect_tensor::<f32>(IN, md, &part.data, "float32", &expected)?;
                self.counts.host_in += 1;
                self.policy.from_host(emb, real, &ids)?
            };
            span.set_gpu(gpu);
            match self.ring.as_mut() {
                Some(out) => {
                    let slot = out.acquire(meta.seq)?;
                    let ring = &mut out.ring;
                    if let Err(e) = self.policy.cache_to_ring(ring, slot) {
                        ring.cancel(slot);
                        return Err(e.into());
                    }
                    let s = ring.slot(slot)?;
                    let tensor = IpcTensor {
                        mem_handle: s.mem_handle,
                        event_handle: s.event_handle,
                        slot: slot as u64,
                        shape: self.shape.clone(),
                        dtype: self.dtype.into(),
                        offset: 0,
                    };
                    let mut params = tensor.params(meta);
                    params.insert(
                        "prefix_len".into(),
                        dora_node_api::Parameter::Integer(p as i64),
                    );
                    cx.send(OUT, params, tensor.data())?;
                    self.counts.by_handle_out += 1;
                }
                None => {
                    let cache = self.policy.download_cache(p)?;
                    let (shape, values) = kv_to_tensor(&cache);
                    self.counts.host_bytes_out += values.len() * 4;
                    cx.send(OUT, meta.tensor_params(&shape, "float32"), values)?;
                }
            }
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

        fn on_release(&mut self, slot: usize, seq: u64) {
            match self.ring.as_mut() {
                Some(out) => {
                    out.release(slot, seq);
                }
                None => self.stale_without_ring += 1,
            }
        }

        fn held_slots(&self) -> usize {
            self.ring.as_ref().map_or(0, |r| r.busy())
        }

        /// A dropped frame's embeddings slot goes back to the vision node unread.
        fn on_dropped_part(&mut self, node: &mut DoraNode, part: &Part) {
            release_part(node, part);
        }

        fn summary(&self) -> String {
            let c = &self.counts;
            let ring = match &self.ring {
                Some(r) => r.summary(),
                None => node_common::ring::summary(0, 0, self.stale_without_ring),
            };
            format!(
                "; in: {} by cuda-ipc handle, {} host tensors ({} slots opened); out: {} by cuda-ipc handle, {:.1} MB through the host; {ring}",
                c.by_handle_in,
                c.host_in,
                self.importer.opened(),
                c.by_handle_out,
                c.host_bytes_out as f64 / 1e6,
            )
        }
    }
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
