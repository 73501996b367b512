//! Random-weight checkpoints in openpi's layout, so anyone can run the model without
//! downloading weights. Values are deterministic in the seed.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::checkpoint::{tensor_specs, write_safetensors, WriteDtype};
use crate::config::Config;
use crate::{Error, Result};

/// (centre, half-width) of the uniform distribution tensor `key` is drawn from: Linear
/// weights with variance 1/fan_in (activations stay O(1) through depth), biases and norm
/// weights small, position embeddings wider; LayerNorm weights multiply (not 1 + w), so they
/// are centred on 1. The CUDA backend's on-device random weights use the same ranges.
pub fn init_range(key: &str, shape: &[usize]) -> (f32, f32) {
    let bound =
        if key.ends_with(".bias") || key.ends_with("norm.weight") || key.contains("layer_norm") {
            0.1
        } else if key.contains("position_embedding") {
            0.5
        } else {
            let fan_in = if shape.len() == 1 {
                shape[0]
            } else {
                shape[1..].iter().product::<usize>().max(1)
            };
            (3.0 / fan_in as f32).sqrt()
        };
    let centre = if key.contains("layer_norm") && key.ends_with(".weight")
        || key.contains("post_layernorm.weight")
    {
        1.0
    } else {
        0.0
    };
    (centre, bound)
}

/// Fills `out` with the values of tensor `index` (`key`, `shape`), deterministic in `seed`.
fn fill(seed: u64, index: usize, key: &str, shape: &[usize], out: &mut Vec<f32>) {
    let n: usize = shape.iter().product();
    let (offset, bound) = init_range(key, shape);
    const CHUNK: usize = 1 << 16;
    out.resize(n, 0.0);
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng =
                rand::rngs::SmallRng::seed_from_u64(seed ^ ((index as u64) << 32) ^ c as u64);
            chunk
                .iter_mut()
                .for_each(|v| *v = offset + rng.random_range(-bound..bound));
        });
}

/// Writes `config.json` and `model.safetensors` for `cfg` into `dir`.
pub fn write_random_checkpoint(
    dir: &Path,
    cfg: &Config,
    dtype: WriteDtype,
    seed: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, cfg.to_json_pretty() + "\n")
        .map_err(|e| Error::io(&config_path, e))?;
    let specs = tensor_specs(cfg);
    let tensors: Vec<_> = specs
        .iter()
        .map(|s| (s.key.clone(), s.shape.clone(), dtype))
        .collect();
    let total: u64 = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();
    let mut done = 0u64;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("turbopi_random_seed".to_string(), seed.to_string());
    write_safetensors(&dir.join("model.safetensors"), &tensors, &meta, |i, out| {
        let s = &specs[i];
        fill(seed, i, &s.key, &s.shape, out);
        done += out.len() as u64;
        progress(done, total);
    })
}
