//! Vision stage: SigLIP + projector over the real cameras of a frame.

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{bail, eyre, Result};
use node_common::ipc::{transport_from_env, Transport};
use node_common::join::Frames;
use node_common::reject::declares_rejected;
use node_common::{backend_from_env, checkpoint_from_env, masks_param, model_images};
use operators::backend::{self, BackendKind, VisionStage};
use operators::Config;

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

/// The node's frames: one `images` message each.
fn frames(node: &DoraNode) -> Frames {
    Frames::new(
        node.id().as_ref(),
        "vision",
        &["images"],
        declares_rejected(node),
    )
}

pub fn run_with(
    cfg: &Config,
    encoder: &mut dyn VisionStage,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let out: DataId = "image_embeddings".to_string().into();
    let tracer = node_common::tracer(&node, &encoder.describe())?;
    let mut frames = frames(&node);
    while let Some(event) = events.recv() {
        let (id, metadata, data) = match event {
            Event::Input { id, metadata, data } => (id, metadata, data),
            // Not waiting for every input to close: `release` may loop back from a consumer.
            Event::InputClosed { id } if id.as_str() == "images" => break,
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
            let part = frame
                .part("images")
                .ok_or_else(|| eyre!("internal: a frame without images"))?;
            let mut span = tracer.start("vision", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let (pixels, masks) = model_images(&part.metadata, &part.data, cfg)?;
            let emb = encoder.encode(&pixels, &masks)?;
            if let Some(gpu) = encoder.gpu_time() {
                span.set_gpu(gpu);
            }
            let mut p = meta.tensor_params(
                &[emb.real_images * cfg.tokens_per_image(), cfg.vlm_width],
                "float32",
            );
            p.insert("image_masks".into(), masks_param(&masks));
            node.send_output(out.clone(), p, emb.tokens)
                .map_err(|e| eyre!("sending image_embeddings: {e}"))?;
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            frames.reject(&mut node, &tracer, meta, &e);
        }
    }
    eprintln!("vision: {}", frames.summary());
    Ok(())
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
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    use node_common::ipc::{release_from, ring_slots_from_env, IpcTensor};
    use operators::cuda::ipc::Ring;
    use operators::cuda::CudaPolicy;

    let cfg = &ckpt.config;
    let slots = ring_slots_from_env()?;
    let mut policy = CudaPolicy::load(ckpt, precision, |_, _| {})?;
    policy.warm_up_stages(None)?;
    eprintln!(
        "vision: {}, cuda-ipc with {slots} ring slots",
        operators::backend::Runner::describe(&policy)
    );
    let (t, w) = (cfg.tokens_per_image(), cfg.vlm_width);
    let mut ring = Ring::new(
        policy.device(),
        cfg.num_images * t * w * 4,
        slots,
        std::time::Duration::from_secs(2),
    )?;
    let out: DataId = "image_embeddings".to_string().into();
    let tracer = node_common::tracer(&node, &operators::backend::Runner::describe(&policy))?;
    let per_image = cfg.image_size * cfg.image_size * 3;
    let mut frames = frames(&node);
    let (mut sent, mut bytes, mut full, mut stale) = (0u64, 0usize, 0u64, 0u64);
    while let Some(event) = events.recv() {
        let (id, metadata, data) = match event {
            Event::Input { id, metadata, data } => (id, metadata, data),
            // The stream ended upstream: stop, after handing back what consumers still read.
            Event::InputClosed { id } if id.as_str() == "images" => break,
            Event::Stop(_) => break,
            _ => continue,
        };
        if id.as_str() == "release" {
            match release_from(&metadata.parameters) {
                Ok((slot, seq)) => {
                    if !ring.release(slot as usize, seq) {
                        stale += 1;
                    }
                }
                Err(e) => frames.rejections.message(&e),
            }
            continue;
        }
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
        let result = (|| -> Result<()> {
            let part = frame
                .part("images")
                .ok_or_else(|| eyre!("internal: a frame without images"))?;
            let mut span = tracer.start("vision", meta.seq, meta.trace);
            let meta = meta.traced(span.id());
            let (pixels, masks) = model_images(&part.metadata, &part.data, cfg)?;
            let real: Vec<f32> = pixels
                .chunks_exact(per_image)
                .zip(&masks)
                .filter(|(_, &m)| m)
                .flat_map(|(px, _)| px.iter().copied())
                .collect();
            let n = masks.iter().filter(|&&m| m).count();
            let before = ring.reclaimed;
            let slot = ring.acquire(meta.seq);
            if ring.reclaimed > before {
                eprintln!(
                    "vision: {} ring slot(s) not handed back within 2 s taken back (consumer gone or restarting?)",
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
            let written = match policy.vision_to_ring(&real, n, &ring, slot) {
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
            node.send_output(out.clone(), p, tensor.data())
                .map_err(|e| eyre!("sending image_embeddings: {e}"))?;
            sent += 1;
            bytes += written;
            span.end();
            Ok(())
        })();
        if let Err(e) = result {
            frames.reject(&mut node, &tracer, meta, &e);
        }
    }
    // Slots still held by the consumer may be mid-copy: wait for their release (at most 2 s,
    // a consumer that is gone never answers) before the ring's memory is freed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while ring.busy() > 0 {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
            break;
        };
        match events.recv_timeout(left) {
            Some(Event::Input { id, metadata, .. }) if id.as_str() == "release" => {
                if let Ok((slot, seq)) = release_from(&metadata.parameters) {
                    ring.release(slot as usize, seq);
                }
            }
            Some(Event::InputClosed { id }) if id.as_str() == "release" => break,
            None | Some(Event::Stop(_)) => break,
            _ => {}
        }
    }
    eprintln!(
        "vision: {}; cuda-ipc: {sent} tensors ({:.1} MB) passed by handle, 0 bytes through the host; {full} frames dropped with the ring full, {} slots reclaimed, {stale} stale releases",
        frames.summary(),
        bytes as f64 / 1e6,
        ring.reclaimed
    );
    Ok(())
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
