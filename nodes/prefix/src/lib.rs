//! Prefix stage: prompt embedding and the Gemma prefix over the real image and prompt
//! tokens, producing the per-layer K/V cache [layers, 2, len, kv_width].

use std::path::PathBuf;

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, EventStream};
use eyre::{eyre, Result, WrapErr};
use node_common::{
    backend_from_env, checkpoint_from_env, env_path, expect_tensor, image_masks, kv_to_tensor,
    report_rejected, Dim, FrameMeta, SeqGaps,
};
use operators::backend::{self, PrefixStage};
use operators::observation::load_prompt;
use operators::{Config, ImageEmbeddings};

/// The prompt: token ids and their mask (right-padded).
pub struct Prompt {
    pub tokens: Vec<i32>,
    pub mask: Vec<bool>,
}

/// Env: `CHECKPOINT`, `PROMPT`, `BACKEND` (cpu or cuda), `DTYPE`.
pub fn run(node: DoraNode, events: EventStream) -> Result<()> {
    let (kind, precision) = backend_from_env()?;
    let ckpt = checkpoint_from_env()?;
    let dir: PathBuf = env_path("PROMPT")?;
    let (tokens, mask) = load_prompt(&dir, &ckpt.config)
        .wrap_err_with(|| format!("env PROMPT={}", dir.display()))?;
    let mut encoder = backend::load_prefix(kind, precision, &ckpt)?;
    eprintln!("prefix: {}", encoder.describe());
    run_with(
        &ckpt.config,
        encoder.as_mut(),
        &Prompt { tokens, mask },
        node,
        events,
    )
}

pub fn run_with(
    cfg: &Config,
    encoder: &mut dyn PrefixStage,
    prompt: &Prompt,
    mut node: DoraNode,
    mut events: EventStream,
) -> Result<()> {
    let out: DataId = "kv_cache".to_string().into();
    let t = cfg.tokens_per_image();
    let mut gaps = SeqGaps::default();
    while let Some(event) = events.recv() {
        let Event::Input { id, metadata, data } = event else {
            continue;
        };
        if id.as_str() != "image_embeddings" {
            continue;
        }
        let md = &metadata.parameters;
        let result = (|| {
            let meta = FrameMeta::from_metadata("image_embeddings", md)?;
            gaps.observe(meta.seq);
            let masks = image_masks("image_embeddings", md, cfg.num_images)?;
            let real = masks.iter().filter(|&&m| m).count();
            let (_, emb) = expect_tensor::<f32>(
                "image_embeddings",
                md,
                &data,
                "float32",
                &[Dim::Is(real * t), Dim::Is(cfg.vlm_width)],
            )?;
            let images = ImageEmbeddings {
                tokens: emb.to_vec(),
                real_images: real,
            };
            let cache = encoder.encode(&images, &prompt.tokens, &prompt.mask)?;
            let (shape, values) = kv_to_tensor(&cache);
            node.send_output(out.clone(), meta.tensor_params(&shape, "float32"), values)
                .map_err(|e| eyre!("sending kv_cache: {e}"))
        })();
        if let Err(e) = result {
            report_rejected("prefix", &e);
        }
    }
    eprintln!("prefix: {} frames, {} gaps", gaps.frames, gaps.gaps);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::Parameter;
    use node_common::testing::{event, golden, json, run_node, values, TensorInput};
    use operators::checkpoint::Checkpoint;
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
