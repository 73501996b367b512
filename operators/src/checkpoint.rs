//! openpi PyTorch checkpoints: the list of tensors a config implies (one source of truth for
//! loading, `checkpoint inspect` and the random-weight writer), a memory-mapped reader that
//! validates names, shapes and dtypes up front, and a streaming safetensors writer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::config::{Config, ConfigFile, Schema};
use crate::{fsio, Error, Result};

use crate::keys::{self, Param};
pub use crate::keys::{EMBED, EMBED_ALIAS, EXPERT, PROJECTOR, VISION, VLM};

/// Which part of the policy a tensor belongs to (for `checkpoint inspect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Vision,
    Projector,
    Embedding,
    Prefix,
    Expert,
    ActionHeads,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Vision => "vision (SigLIP)",
            Part::Projector => "projector",
            Part::Embedding => "token embedding",
            Part::Prefix => "prefix (Gemma)",
            Part::Expert => "action expert",
            Part::ActionHeads => "action/time heads",
        }
    }
}

/// A tensor the model reads: its key, PyTorch shape, part, and whether it may be absent.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub key: String,
    pub shape: Vec<usize>,
    pub part: Part,
    /// Present in openpi's checkpoints but not read by the policy (the prefix's final norm).
    pub optional: bool,
}

fn spec(out: &mut Vec<TensorSpec>, part: Part, key: String, shape: &[usize]) {
    out.push(TensorSpec {
        key,
        shape: shape.to_vec(),
        part,
        optional: false,
    });
}

fn linear(
    out: &mut Vec<TensorSpec>,
    part: Part,
    key: &Param,
    n_out: usize,
    n_in: usize,
    bias: bool,
) {
    spec(out, part, key.weight(), &[n_out, n_in]);
    if bias {
        spec(out, part, key.bias(), &[n_out]);
    }
}

/// Every tensor the policy of `cfg` reads, in checkpoint order.
pub fn tensor_specs(cfg: &Config) -> Vec<TensorSpec> {
    let mut s = Vec::new();
    let (vw, p) = (cfg.vision_width, cfg.patch_size);
    let vision = Part::Vision;
    let patch = keys::siglip::patch();
    spec(&mut s, vision, patch.weight(), &[vw, 3, p, p]);
    spec(&mut s, vision, patch.bias(), &[vw]);
    spec(
        &mut s,
        vision,
        keys::siglip::position(),
        &[cfg.tokens_per_image(), vw],
    );
    for i in 0..cfg.vision_depth {
        let l = keys::siglip::layer(i);
        for ln in [&l.layer_norm1, &l.layer_norm2] {
            spec(&mut s, vision, ln.weight(), &[vw]);
            spec(&mut s, vision, ln.bias(), &[vw]);
        }
        for proj in [&l.q, &l.k, &l.v, &l.out] {
            linear(&mut s, vision, proj, vw, vw, true);
        }
        linear(&mut s, vision, &l.fc1, cfg.vision_mlp_dim, vw, true);
        linear(&mut s, vision, &l.fc2, vw, cfg.vision_mlp_dim, true);
    }
    let post = keys::siglip::post_layernorm();
    spec(&mut s, vision, post.weight(), &[vw]);
    spec(&mut s, vision, post.bias(), &[vw]);
    let projector = Param(PROJECTOR.to_string());
    linear(&mut s, Part::Projector, &projector, cfg.vlm_width, vw, true);
    spec(
        &mut s,
        Part::Embedding,
        EMBED.to_string(),
        &[cfg.vocab_size, cfg.vlm_width],
    );
    gemma_specs(
        &mut s,
        cfg,
        Part::Prefix,
        VLM,
        (cfg.vlm_width, cfg.vlm_mlp_dim),
        false,
    );
    gemma_specs(
        &mut s,
        cfg,
        Part::Expert,
        EXPERT,
        (cfg.expert_width, cfg.expert_mlp_dim),
        cfg.pi05,
    );
    let (ew, ad) = (cfg.expert_width, cfg.action_dim);
    let heads = Part::ActionHeads;
    linear(&mut s, heads, &keys::heads::action_in(), ew, ad, true);
    linear(&mut s, heads, &keys::heads::action_out(), ad, ew, true);
    if cfg.pi05 {
        linear(&mut s, heads, &keys::heads::time_in(), ew, ew, true);
        linear(&mut s, heads, &keys::heads::time_out(), ew, ew, true);
    } else {
        linear(&mut s, heads, &keys::heads::state(), ew, ad, true);
        linear(
            &mut s,
            heads,
            &keys::heads::action_time_in(),
            ew,
            2 * ew,
            true,
        );
        linear(&mut s, heads, &keys::heads::action_time_out(), ew, ew, true);
    }
    s
}

fn gemma_specs(
    s: &mut Vec<TensorSpec>,
    cfg: &Config,
    part: Part,
    root: &str,
    (width, mlp): (usize, usize),
    adaptive: bool,
) {
    let (nh, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let norm = |s: &mut Vec<TensorSpec>, key: &keys::Norm| {
        if adaptive {
            linear(s, part, &key.dense(), 3 * width, width, true);
        } else {
            spec(s, part, key.weight(), &[width]);
        }
    };
    for i in 0..cfg.vlm_depth {
        let l = keys::gemma::layer(root, i);
        norm(s, &l.input_layernorm);
        linear(s, part, &l.q, nh * hd, width, false);
        linear(s, part, &l.k, kv * hd, width, false);
        linear(s, part, &l.v, kv * hd, width, false);
        linear(s, part, &l.o, width, nh * hd, false);
        norm(s, &l.post_attention_layernorm);
        linear(s, part, &l.gate, mlp, width, false);
        linear(s, part, &l.up, mlp, width, false);
        linear(s, part, &l.down, width, mlp, false);
    }
    let before = s.len();
    norm(s, &keys::gemma::final_norm(root));
    if part == Part::Prefix {
        for t in &mut s[before..] {
            t.optional = true;
        }
    }
}

/// An opened checkpoint directory: config plus a validated, memory-mapped `model.safetensors`.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    /// Fields of config.json that turbo-pi does not know (reported as warnings).
    pub unknown_config_fields: Vec<String>,
    /// The schema config.json was written in (turbo-pi's or openpi's), for `inspect`.
    pub config_schema: Schema,
    pub weights_path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    /// The key the token embedding was found under (the tied lm_head or its alias).
    embed_key: String,
}

impl Checkpoint {
    /// Opens `dir`, reads its config and checks that every tensor the policy needs is present
    /// with the expected shape and a float dtype. Nothing is converted yet.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let ConfigFile {
            config,
            schema: config_schema,
            unknown: unknown_config_fields,
        } = Config::read_file(&config_path)?;
        let weights_path = dir.join("model.safetensors");
        // Any size: the file is mapped, not read. A device or FIFO is refused unopened.
        let (file, _) = fsio::open_regular(&weights_path, u64::MAX, "model.safetensors")?;
        // SAFETY: the file is opened read-only and mapped privately; turbo-pi never writes to
        // it while mapped. A concurrent writer truncating the file could fault the process,
        // which is the documented contract of memory-mapped checkpoints (as in safetensors).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&weights_path, e))?;
        // The JSON header is parsed into memory: bound its length (safetensors allows 100 MB).
        if let Some(&len) = mmap.first_chunk::<8>() {
            let header_len = u64::from_le_bytes(len);
            if header_len > fsio::limit::SAFETENSORS_HEADER {
                return Err(Error::Safetensors {
                    path: weights_path,
                    reason: format!(
                        "the header length field says {header_len} bytes, more than the {} allowed",
                        fsio::limit::SAFETENSORS_HEADER
                    ),
                });
            }
        }
        let (header_len, metadata): (usize, Metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: weights_path.clone(),
                reason: describe_safetensors_error(&e),
            })?;
        let tensors: BTreeMap<String, TensorInfo> = metadata
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.clone()))
            .collect();
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            unknown_config_fields,
            config_schema,
            weights_path,
            mmap,
            data_start: 8 + header_len,
            tensors,
            embed_key: EMBED.to_string(),
        };
        if !ckpt.tensors.contains_key(EMBED) && ckpt.tensors.contains_key(EMBED_ALIAS) {
            ckpt.embed_key = EMBED_ALIAS.to_string();
        }
        ckpt.validate()?;
        Ok(ckpt)
    }

    fn resolve<'a>(&'a self, key: &'a str) -> &'a str {
        if key == EMBED {
            &self.embed_key
        } else {
            key
        }
    }

    fn validate(&self) -> Result<()> {
        for t in tensor_specs(&self.config) {
            let key = self.resolve(&t.key);
            let Some(info) = self.tensors.get(key) else {
                if t.optional {
                    continue;
                }
                return Err(Error::MissingTensor {
                    path: self.weights_path.clone(),
                    key: t.key.clone(),
                });
            };
            if info.shape != t.shape {
                return Err(Error::TensorShape {
                    path: self.weights_path.clone(),
                    key: key.to_string(),
                    expected: t.shape.clone(),
                    found: info.shape.clone(),
                });
            }
            if !matches!(info.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
                return Err(Error::TensorDtype {
                    path: self.weights_path.clone(),
                    key: key.to_string(),
                    found: format!("{:?}", info.dtype),
                });
            }
        }
        Ok(())
    }

    /// All tensors in the file: key -> (dtype name, shape).
    pub fn tensor_infos(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn info(&self, key: &str) -> Option<&TensorInfo> {
        self.tensors.get(self.resolve(key))
    }

    /// Total bytes of the tensors the policy reads (for progress bars).
    pub fn policy_bytes(&self) -> u64 {
        tensor_specs(&self.config)
            .iter()
            .filter_map(|t| self.info(&t.key))
            .map(|i| (i.data_offsets.1 - i.data_offsets.0) as u64)
            .sum()
    }

    /// The tensor `key` as f32, checked against `shape` (upcast from bf16/f16 in parallel).
    pub fn read_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let resolved = self.resolve(key);
        let info = self
            .tensors
            .get(resolved)
            .ok_or_else(|| Error::MissingTensor {
                path: self.weights_path.clone(),
                key: key.to_string(),
            })?;
        if info.shape != shape {
            return Err(Error::TensorShape {
                path: self.weights_path.clone(),
                key: resolved.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (s, e) = info.data_offsets;
        // `read_metadata` checked that the offsets tile the data section exactly.
        let bytes = self
            .mmap
            .get(self.data_start + s..self.data_start + e)
            .ok_or_else(|| Error::Safetensors {
                path: self.weights_path.clone(),
                reason: format!("tensor `{resolved}` lies outside the file"),
            })?;
        const CHUNK: usize = 1 << 16;
        let out = match info.dtype {
            Dtype::F32 => bytes
                .par_chunks(4 * CHUNK)
                .flat_map_iter(|c| {
                    c.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                })
                .collect(),
            Dtype::BF16 => bytes
                .par_chunks(2 * CHUNK)
                .flat_map_iter(|c| {
                    c.chunks_exact(2)
                        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                })
                .collect(),
            Dtype::F16 => bytes
                .par_chunks(2 * CHUNK)
                .flat_map_iter(|c| {
                    c.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                })
                .collect(),
            other => {
                return Err(Error::TensorDtype {
                    path: self.weights_path.clone(),
                    key: resolved.to_string(),
                    found: format!("{other:?}"),
                })
            }
        };
        Ok(out)
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the header describes more (or less) data than the file holds (truncated?)".into()
        }
        E::HeaderTooSmall => "the file is shorter than the 8-byte header length".into(),
        E::InvalidHeaderLength => "the header length points past the end of the file".into(),
        other => format!("{other}"),
    }
}

/// Element type of a written tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDtype {
    F32,
    Bf16,
}

impl WriteDtype {
    fn st_name(self) -> &'static str {
        match self {
            WriteDtype::F32 => "F32",
            WriteDtype::Bf16 => "BF16",
        }
    }
    fn size(self) -> usize {
        match self {
            WriteDtype::F32 => 4,
            WriteDtype::Bf16 => 2,
        }
    }
}

/// Writes a safetensors file tensor by tensor, so a 7 GB checkpoint never sits in memory whole.
/// `fill(index, spec, buffer)` fills each tensor's f32 values in order.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, WriteDtype)],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut Vec<f32>),
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut offset = 0usize;
    for (key, shape, dtype) in tensors {
        let n: usize = shape.iter().product();
        let end = offset + n * dtype.size();
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": dtype.st_name(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header_bytes = serde_json::Value::Object(header).to_string().into_bytes();
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (i, (_, shape, dtype)) in tensors.iter().enumerate() {
        values.clear();
        fill(i, &mut values);
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(Error::Input(format!(
                "writer produced {} values for tensor {i}, expected {n}",
                values.len()
            )));
        }
        bytes.clear();
        match dtype {
            WriteDtype::F32 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
            WriteDtype::Bf16 => values
                .iter()
                .for_each(|v| bytes.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::write_random_checkpoint;

    /// A pi0-small checkpoint in a temporary directory, its config.json edited by `edit`.
    fn checkpoint_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_random_checkpoint(
            dir.path(),
            &Config::pi0_small(),
            WriteDtype::Bf16,
            1,
            |_, _| {},
        )
        .unwrap();
        let path = dir.path().join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
        dir
    }

    /// Sizes that wrap around 2^64 to the small model's own shapes used to pass the tensor
    /// check (`checkpoint inspect` called them valid) and then overflowed in `infer`.
    #[test]
    fn dimensions_that_wrap_to_matching_shapes_are_refused_by_name() {
        Checkpoint::open(checkpoint_with(|_| {}).path()).unwrap();
        for (field, value, msg) in [
            // (2^61 - 4)^2 wraps to 16 = (32 / 8)^2.
            (
                "image_size",
                18446744073709551584u64,
                "field `image_size` = 18446744073709551584 is above the limit 4096",
            ),
            // 4 x and 2 x (16 + 2^63) wrap to 4 x 16 and 2 x 16.
            (
                "head_dim",
                9223372036854775824,
                "field `head_dim` = 9223372036854775824 is above the limit 4096",
            ),
            (
                "action_horizon",
                100_000,
                "field `action_horizon` = 100000 is above the limit 1024",
            ),
            (
                "action_horizon",
                1 << 61,
                "field `action_horizon` = 2305843009213693952 is above the limit 1024",
            ),
        ] {
            let dir = checkpoint_with(|v| v[field] = value.into());
            let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
            assert!(err.contains("config.json: ") && err.contains(msg), "{err}");
        }
    }

    #[test]
    fn parameter_count_matches_the_tensor_list() {
        let mut configs: Vec<Config> = crate::config::PRESETS
            .iter()
            .map(|p| Config::preset(p).unwrap())
            .collect();
        configs.push(Config {
            vision_depth: 0,
            action_dim: 3,
            vocab_size: 7,
            ..Config::pi05_small()
        });
        for c in configs {
            let specs: u64 = tensor_specs(&c)
                .iter()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(c.parameter_count(), Some(specs), "{c:?}");
        }
    }

    #[test]
    fn refuses_a_weights_file_that_is_a_directory_or_has_a_huge_header() {
        let dir = checkpoint_with(|_| {});
        let weights = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[..8].copy_from_slice(&(99_000_000u64).to_le_bytes());
        std::fs::write(&weights, &bytes).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors: corrupt or truncated safetensors file: the header length field says 99000000 bytes, more than the 16777216 allowed"),
            "{err}"
        );
        std::fs::remove_file(&weights).unwrap();
        std::fs::create_dir(&weights).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors: is a directory; expected a model.safetensors file"),
            "{err}"
        );
    }
}
