//! Vision stage: SigLIP + projector over the real cameras of a frame.

use dora_node_api::{DoraNode, EventStream};
use eyre::{bail, eyre, Result};
use node_common::ipc::{transport_from_env, Transport};
use node_common::join::{Joined, Part};
use node_common::stage::{self, Cx, Spec, Stage};
use node_common::{backend_from_env, checkpoint_from_env, masks_param, model_images};
use operators::backend::{self, BackendKind, VisionStage};
use operators::Config;

/// The output: the embeddings of a frame's real cameras.
const OUT: &str = "image_embeddings";

/// Env: `CHECKPOINT`, `BACKEND` (cpu or cuda), `DTYPE`, `TRANSPORT` (host or cuda-ipc, the
/// latter with BACKEND=cuda), `RING_SLOTS`.
pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (kind, precision) = backend_from_env()?;
    let transport = transport_from_env()?;
    let ckpt = checkpoint_from_env()?;
    if transport == Transport::CudaIpc {
        if kind != BackendKind::Cuda {
            bail!("vision: env TRANSPORT=cuda-ipc needs BACKEND=cuda");
        }
        return run_cuda_ipc(&ckpt, precision, node, events);
    }
    let mut encoder = backend::load_vision(kind, precision, &ckpt)?;
    eprintln!("vision: {}", encoder.describe());
    run_with(&ckpt.config, encoder.as_mut(), node, events)
}

/// The node's stage: one `images` message per frame.
fn spec(node: &DoraNode, backend: String) -> Spec {
    Spec::new(node, "vision", &["images"], backend)
}

fn images(frame: &Joined) -> Result<&Part> {
    frame
        .part("images")
        .ok_or_else(|| eyre!("internal: a frame without images"))
}

/// The encoder of a backend; embeddings out as host tensors.
struct HostOut<'a> {
    cfg: &'a Config,
    encoder: &'a mut dyn VisionStage,
}

impl Stage for HostOut<'_> {
    fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
        let cfg = self.cfg;
        let part = images(&frame)?;
        let (mut span, meta) = cx.start_span(frame.meta());
        let (pixels, masks) = model_images(&part.metadata, &part.data, cfg)?;
        let emb = self.encoder.encode(&pixels.unit(), &masks)?;
        if let Some(gpu) = self.encoder.gpu_time() {
            span.set_gpu(gpu);
        }
        let mut p = meta.tensor_params(
            &[emb.real_images * cfg.tokens_per_image(), cfg.vlm_width],
            "float32",
        );
        p.insert("image_masks".into(), masks_param(&masks));
        cx.send(OUT, p, emb.tokens)?;
        span.end();
        Ok(())
    }
}

pub fn run_with(
    cfg: &Config,
    encoder: &mut dyn VisionStage,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    let spec = spec(&node, encoder.describe());
    stage::run(&spec, &mut HostOut { cfg, encoder }, node, events)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda_ipc(
    _: &operators::checkpoint::Checkpoint,
    _: operators::backend::Precision,
    _: DoraNode,
    _: EventStream,
) -> Result<()> {
    bail!("vision: CUDA support is not built in: rebuild with `cargo build --release -p vision --features cuda`")
}

/// The vision stage on the GPU writing each frame's embeddings into a ring slot and sending
/// the slot's handles (`TRANSPORT: cuda-ipc`); the consumer hands slots back on `release`.
#[cfg(feature = "cuda")]
fn run_cuda_ipc(
    ckpt: &operators::checkpoint::Checkpoint,
    precision: operators::backend::Precision,
    node: DoraNode,
    events: EventStream,
) -> Result<()> {
    use node_common::ipc::ring_slots_from_env;
    use node_common::ring::{RingOut, HOLD_LIMIT};
    use operators::cuda::ipc::Ring;
    use operators::cuda::CudaVision;

    let cfg = &ckpt.config;
    let slots = ring_slots_from_env()?;
    let mut policy = CudaVision::load(ckpt, precision)?;
    policy.warm_up()?;
    let describe = policy.describe();
    eprintln!("vision: {describe}, cuda-ipc with {slots} ring slots");
    let ring = Ring::new(
        policy.device(),
        cfg.num_images * cfg.tokens_per_image() * cfg.vlm_width * 4,
        slots,
        HOLD_LIMIT,
    )?;
    let spec = spec(&node, describe);
    let mut stage = cuda::IpcOut {
        cfg,
        ring: RingOut::new(ring, "vision"),
        policy,
        sent: 0,
        bytes: 0,
    };
    stage::run(&spec, &mut stage, node, events)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use node_common::ipc::IpcTensor;
    use node_common::ring::RingOut;
    use operators::cuda::ipc::Ring;
    use operators::cuda::CudaVision;

    /// The vision stage on the GPU; embeddings out by CUDA IPC handle of a ring
    /// slot. Fields drop in order: the ring's device memory before the policy's context.
    pub(super) struct IpcOut<'a> {
        pub cfg: &'a Config,
        pub ring: RingOut<Ring>,
        pub policy: CudaVision,
        /// Tensors sent by handle, and their bytes.
        pub sent: u64,
        pub bytes: usize,
    }

    impl Stage for IpcOut<'_> {
        fn on_frame(&mut self, cx: &mut Cx, frame: Joined) -> Result<()> {
            let cfg = self.cfg;
            let (t, w) = (cfg.tokens_per_image(), cfg.vlm_width);
            let per_image = cfg.image_size * cfg.image_size * 3;
            let part = images(&frame)?;
            let (mut span, meta) = cx.start_span(frame.meta());
            let (pixels, masks) = model_images(&part.metadata, &part.data, cfg)?;
            let real: Vec<f32> = pixels
                .unit()
                .chunks_exact(per_image)
                .zip(&masks)
                .filter(|(_, &m)| m)
                .flat_map(|(px, _)| px.iter().copied())
                .collect();
            let n = masks.iter().filter(|&&m| m).count();
            let slot = self.ring.acquire(meta.seq)?;
            let ring = &mut self.ring.ring;
            let written = match self.policy.to_ring(&real, n, ring, slot) {
                Ok((gpu, b)) => {
                    span.set_gpu(gpu);
                    b
                }
                Err(e) => {
                    ring.cancel(slot);
                    return Err(e.into());
                }
            };
            let s = ring.slot(slot)?;
            let tensor = IpcTensor {
                mem_handle: s.mem_handle,
                event_handle: s.event_handle,
                slot: slot as u64,
                shape: vec![n * t, w],
                dtype: "<f4".into(),
                offset: 0,
            };
            let mut p = tensor.params(meta);
            p.insert("image_masks".into(), masks_param(&masks));
            cx.send(OUT, p, tensor.data())?;
            self.sent += 1;
            self.bytes += written;
            span.end();
            Ok(())
        }

        fn on_release(&mut self, slot: usize, seq: u64) {
            self.ring.release(slot, seq);
        }

        fn held_slots(&self) -> usize {
            self.ring.busy()
        }

        fn summary(&self) -> String {
            format!(
                "; cuda-ipc: {} tensors ({:.1} MB) passed by handle, 0 bytes through the host; {}",
                self.sent,
                self.bytes as f64 / 1e6,
                self.ring.summary()
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
    use operators::image;
    use operators::weights::Loader;
    use operators::VisionEncoder;

    #[test]
    fn encodes_real_cameras_and_rejects_a_wrong_shape() {
        let ckpt = Checkpoint::open(&golden("pi05_small").join("checkpoint")).unwrap();
        let cfg = ckpt.config.clone();
        let mut enc = VisionEncoder::load(&ckpt, &mut Loader::new(&ckpt, |_, _| {})).unwrap();
        let (n, s) = (cfg.num_images, cfg.image_size);
        let px: Vec<u8> = (0..n * s * s * 3).map(|i| (i * 31 % 251) as u8).collect();
        let masks = Parameter::ListInt(vec![1, 0, 1]);
        let msg = |seq, shape: &'static [usize], px: &[u8]| TensorInput {
            id: "images",
            seq,
            shape,
            dtype: "uint8",
            arrow_type: "UInt8",
            values: json(px),
            extra: vec![("image_masks", masks.clone())],
        };
        let shape: &'static [usize] = Box::leak(vec![n, s, s, 3].into_boxed_slice());
        let bad: &'static [usize] = Box::leak(vec![n - 1, s, s, 3].into_boxed_slice());
        let events = vec![
            event(0.0, msg(0, shape, &px)),
            event(0.01, msg(1, bad, &px[..(n - 1) * s * s * 3])),
            event(0.02, msg(2, shape, &px)),
        ];
        let out = run_node("vision", events, |node, ev| {
            run_with(&cfg, &mut enc, node, ev)
        })
        .unwrap();
        assert_eq!(
            out.len(),
            2,
            "the wrong-shape frame is rejected, the node keeps going"
        );
        let pixels: Vec<f32> = px
            .chunks_exact(s * s * 3)
            .flat_map(|c| image::to_model_input(c, s, s, s))
            .collect();
        let want = enc.run(&pixels, &[true, false, true]).unwrap();
        assert_eq!(want.real_images, 2);
        let got: Vec<f32> = values(&out[1]).iter().map(|&v| v as f32).collect();
        assert_eq!(got, want.tokens);
    }
}
