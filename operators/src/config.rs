//! The model's dimensions: `config.json` of a checkpoint directory, with named presets.
//! Field names are binding (see docs/checkpoint.md); one struct serves pi0 and pi0.5.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pi05: bool,
    pub action_dim: usize,
    pub action_horizon: usize,
    pub max_token_len: usize,
    pub num_images: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_width: usize,
    pub vision_depth: usize,
    pub vision_heads: usize,
    pub vision_mlp_dim: usize,
    pub vlm_width: usize,
    pub vlm_depth: usize,
    pub vlm_mlp_dim: usize,
    pub expert_width: usize,
    pub expert_depth: usize,
    pub expert_mlp_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub layer_norm_eps: f64,
    pub rope_theta: f64,
}

/// Names of the presets, for help texts and error messages.
pub const PRESETS: &[&str] = &["pi0", "pi05", "pi0-small", "pi05-small"];

/// The binding field names, in the order of docs/checkpoint.md.
pub const FIELDS: &[&str] = &[
    "pi05",
    "action_dim",
    "action_horizon",
    "max_token_len",
    "num_images",
    "image_size",
    "patch_size",
    "vision_width",
    "vision_depth",
    "vision_heads",
    "vision_mlp_dim",
    "vlm_width",
    "vlm_depth",
    "vlm_mlp_dim",
    "expert_width",
    "expert_depth",
    "expert_mlp_dim",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "layer_norm_eps",
    "rope_theta",
];

/// The largest value each dimension may take, with openpi's pi0 / pi0.5 value in the
/// comment. Generous (16x or more above the real models), and small enough that every size
/// computed from a valid config fits in 64 bits: the checks below run before any product.
pub const LIMITS: &[(&str, usize)] = &[
    ("action_dim", 1024),       // 32
    ("action_horizon", 1024),   // 50
    ("max_token_len", 4096),    // 48 / 200
    ("num_images", 16),         // 3
    ("image_size", 4096),       // 224
    ("patch_size", 1024),       // 14
    ("vision_width", 65536),    // 1152
    ("vision_depth", 1024),     // 27
    ("vision_heads", 1024),     // 16
    ("vision_mlp_dim", 262144), // 4304
    ("vlm_width", 65536),       // 2048
    ("vlm_depth", 1024),        // 18
    ("vlm_mlp_dim", 262144),    // 16384
    ("expert_width", 65536),    // 1024
    ("expert_depth", 1024),     // 18
    ("expert_mlp_dim", 262144), // 4096
    ("num_heads", 1024),        // 8
    ("num_kv_heads", 1024),     // 1
    ("head_dim", 4096),         // 256
    ("vocab_size", 1 << 24),    // 257152
];

/// Most image tokens per camera, (image_size / patch_size)^2 (pi0: 256).
pub const MAX_TOKENS_PER_IMAGE: usize = 16384;
/// Most tokens in one attention: the longest prefix plus the suffix (pi0.5: 1018).
pub const MAX_SEQUENCE: usize = 65536;
/// Most query features, num_heads * head_dim (pi0: 2048).
pub const MAX_ATTENTION_WIDTH: usize = 65536;
/// Most parameters (pi0: 3.3e9); held as f32 on the CPU, that is 64 GiB.
pub const MAX_PARAMETERS: u64 = 1 << 34;
/// Most bytes of activation buffers and K/V cache, f32 (pi0: 0.33 GB); see
/// [`Config::activation_bytes`].
pub const MAX_ACTIVATION_BYTES: u64 = 16 << 30;

/// `factors` multiplied, or None when the product does not fit in a u64.
fn product(factors: &[usize]) -> Option<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(u64::try_from(f).ok()?))
}

/// `terms` added, or None on overflow.
fn sum(terms: &[Option<u64>]) -> Option<u64> {
    terms.iter().try_fold(0u64, |acc, t| acc.checked_add((*t)?))
}

impl Config {
    /// openpi's pi0: PaliGemma (SigLIP So400m/14 + Gemma 2B) and the Gemma 300M action expert.
    pub fn pi0() -> Self {
        Config {
            pi05: false,
            action_dim: 32,
            action_horizon: 50,
            max_token_len: 48,
            num_images: 3,
            image_size: 224,
            patch_size: 14,
            vision_width: 1152,
            vision_depth: 27,
            vision_heads: 16,
            vision_mlp_dim: 4304,
            vlm_width: 2048,
            vlm_depth: 18,
            vlm_mlp_dim: 16384,
            expert_width: 1024,
            expert_depth: 18,
            expert_mlp_dim: 4096,
            num_heads: 8,
            num_kv_heads: 1,
            head_dim: 256,
            vocab_size: 257152,
            rms_norm_eps: 1e-6,
            layer_norm_eps: 1e-6,
            rope_theta: 10000.0,
        }
    }

    /// openpi's pi0.5: pi0's dims, adaptive RMSNorm in the expert, 200 prompt tokens.
    pub fn pi05() -> Self {
        Config {
            pi05: true,
            max_token_len: 200,
            ..Self::pi0()
        }
    }

    /// A pi0 small enough to run in milliseconds on a CPU: every structural feature of the
    /// full model (GQA with 2 KV heads, 3 cameras, all blocks), random weights in tests.
    pub fn pi0_small() -> Self {
        Config {
            pi05: false,
            action_dim: 8,
            action_horizon: 10,
            max_token_len: 16,
            num_images: 3,
            image_size: 32,
            patch_size: 8,
            vision_width: 32,
            vision_depth: 2,
            vision_heads: 4,
            vision_mlp_dim: 64,
            vlm_width: 64,
            vlm_depth: 2,
            vlm_mlp_dim: 128,
            expert_width: 32,
            expert_depth: 2,
            expert_mlp_dim: 64,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 256,
            rms_norm_eps: 1e-6,
            layer_norm_eps: 1e-6,
            rope_theta: 10000.0,
        }
    }

    pub fn pi05_small() -> Self {
        Config {
            pi05: true,
            ..Self::pi0_small()
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "pi0" => Ok(Self::pi0()),
            "pi05" => Ok(Self::pi05()),
            "pi0-small" => Ok(Self::pi0_small()),
            "pi05-small" => Ok(Self::pi05_small()),
            other => Err(Error::InvalidConfig(format!(
                "unknown preset `{other}`; known presets: {}",
                PRESETS.join(", ")
            ))),
        }
    }

    /// Reads `config.json`. Unknown fields are returned (the caller warns about them); a
    /// missing field or a value of the wrong type is an error naming the field.
    pub fn from_json_file(path: &Path) -> Result<(Self, Vec<String>)> {
        let text =
            crate::fsio::read_string_limited(path, crate::fsio::limit::CONFIG_JSON, "config.json")?;
        Self::from_json_str(&text).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn from_json_str(text: &str) -> std::result::Result<(Self, Vec<String>), String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err("expected a JSON object at the top level".into());
        };
        let unknown: Vec<String> = map
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in &unknown {
            map.remove(k);
        }
        if let Some(missing) = FIELDS.iter().find(|f| !map.contains_key(**f)) {
            return Err(format!("missing field `{missing}`"));
        }
        for field in FIELDS {
            let v = &map[*field];
            let ok = match *field {
                "pi05" => v.is_boolean(),
                "rms_norm_eps" | "layer_norm_eps" | "rope_theta" => v.is_number(),
                _ => v.is_u64(),
            };
            if !ok {
                let expected = match *field {
                    "pi05" => "a boolean",
                    "rms_norm_eps" | "layer_norm_eps" | "rope_theta" => "a number",
                    _ => "a non-negative integer",
                };
                return Err(format!("field `{field}` must be {expected}, found {v}"));
            }
        }
        let config: Config = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| format!("invalid config: {e}"))?;
        config.validate().map_err(|e| e.to_string())?;
        Ok((config, unknown))
    }

    pub fn to_json_pretty(&self) -> String {
        // Serialising a struct of plain numbers and bools cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Every size field by its `config.json` name, in [`LIMITS`] order.
    fn dims(&self) -> [(&'static str, usize); 20] {
        [
            ("action_dim", self.action_dim),
            ("action_horizon", self.action_horizon),
            ("max_token_len", self.max_token_len),
            ("num_images", self.num_images),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("vision_width", self.vision_width),
            ("vision_depth", self.vision_depth),
            ("vision_heads", self.vision_heads),
            ("vision_mlp_dim", self.vision_mlp_dim),
            ("vlm_width", self.vlm_width),
            ("vlm_depth", self.vlm_depth),
            ("vlm_mlp_dim", self.vlm_mlp_dim),
            ("expert_width", self.expert_width),
            ("expert_depth", self.expert_depth),
            ("expert_mlp_dim", self.expert_mlp_dim),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ]
    }

    /// Checks every size against [`LIMITS`], the relations between fields that the model
    /// relies on, and the parameter and activation totals, in that order: the products are
    /// only formed once the factors are known to be small, so none can wrap.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::InvalidConfig(msg));
        for ((name, v), (limit_name, limit)) in self.dims().into_iter().zip(LIMITS) {
            debug_assert_eq!(name, *limit_name);
            if v > *limit {
                return fail(format!("field `{name}` = {v} is above the limit {limit}"));
            }
        }
        for (name, v) in [
            ("action_dim", self.action_dim),
            ("action_horizon", self.action_horizon),
            ("max_token_len", self.max_token_len),
            ("num_images", self.num_images),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("vision_width", self.vision_width),
            ("vision_heads", self.vision_heads),
            ("vision_mlp_dim", self.vision_mlp_dim),
            ("vlm_width", self.vlm_width),
            ("vlm_depth", self.vlm_depth),
            ("vlm_mlp_dim", self.vlm_mlp_dim),
            ("expert_width", self.expert_width),
            ("expert_mlp_dim", self.expert_mlp_dim),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return fail(format!("field `{name}` must be positive"));
            }
        }
        if self.image_size % self.patch_size != 0 {
            return fail(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.vision_width % self.vision_heads != 0 {
            return fail(format!(
                "vision_width {} is not a multiple of vision_heads {}",
                self.vision_width, self.vision_heads
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return fail(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.expert_depth != self.vlm_depth {
            return fail(format!(
                "expert_depth {} must equal vlm_depth {}: each expert layer attends to the cache of the same prefix layer",
                self.expert_depth, self.vlm_depth
            ));
        }
        if self.head_dim % 2 != 0 {
            return fail(format!("head_dim {} must be even (RoPE)", self.head_dim));
        }
        if self.expert_width % 2 != 0 {
            return fail(format!(
                "expert_width {} must be even (sin-cos time embedding)",
                self.expert_width
            ));
        }
        for (name, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("layer_norm_eps", self.layer_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return fail(format!(
                    "field `{name}` must be a positive number, found {v}"
                ));
            }
        }
        // The fields are within LIMITS: these products are at most 2^44.
        let t = self.tokens_per_image();
        if t > MAX_TOKENS_PER_IMAGE {
            return fail(format!(
                "image_size {} / patch_size {} gives {t} tokens per image, above the limit {MAX_TOKENS_PER_IMAGE}",
                self.image_size, self.patch_size
            ));
        }
        let seq = self.max_prefix_len() + self.suffix_len();
        if seq > MAX_SEQUENCE {
            return fail(format!(
                "num_images {} x {t} image tokens + max_token_len {} + {} suffix tokens = {seq} tokens, above the limit {MAX_SEQUENCE}",
                self.num_images,
                self.max_token_len,
                self.suffix_len()
            ));
        }
        let qw = self.num_heads * self.head_dim;
        if qw > MAX_ATTENTION_WIDTH {
            return fail(format!(
                "num_heads {} x head_dim {} = {qw} query features, above the limit {MAX_ATTENTION_WIDTH}",
                self.num_heads, self.head_dim
            ));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_PARAMETERS => {}
            n => {
                return fail(format!(
                    "the dimensions imply {} parameters, above the limit {MAX_PARAMETERS} (64 GiB as f32)",
                    n.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
                ))
            }
        }
        match self.activation_bytes() {
            Some(n) if n <= MAX_ACTIVATION_BYTES => {}
            n => {
                return fail(format!(
                    "the dimensions imply {} bytes of activations and K/V cache, above the limit {MAX_ACTIVATION_BYTES} (16 GiB)",
                    n.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
                ))
            }
        }
        Ok(())
    }

    /// Parameters of every tensor the policy reads (`checkpoint::tensor_specs`, the prefix's
    /// final norm included), or None when the count does not fit in a u64.
    pub fn parameter_count(&self) -> Option<u64> {
        let (vw, p, t) = (self.vision_width, self.patch_size, self.tokens_per_image());
        let linear = |n_out: usize, n_in: usize, bias: bool| {
            sum(&[
                product(&[n_out, n_in]),
                Some(if bias { n_out as u64 } else { 0 }),
            ])
        };
        let vision_layer = sum(&[
            product(&[4, vw]),
            product(&[4, vw, vw]),
            product(&[4, vw]),
            linear(self.vision_mlp_dim, vw, true),
            linear(vw, self.vision_mlp_dim, true),
        ]);
        let vision = sum(&[
            product(&[vw, 3, p, p]),
            Some(vw as u64),
            product(&[t, vw]),
            vision_layer.and_then(|l| l.checked_mul(self.vision_depth as u64)),
            product(&[2, vw]),
        ]);
        let (nh, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let gemma = |width: usize, mlp: usize, adaptive: bool| {
            let norm = if adaptive {
                linear(3 * width, width, true)
            } else {
                Some(width as u64)
            };
            let layer = sum(&[
                norm,
                product(&[nh, hd, width]),
                product(&[2, kv, hd, width]),
                product(&[width, nh, hd]),
                norm,
                product(&[3, mlp, width]),
            ]);
            sum(&[
                layer.and_then(|l| l.checked_mul(self.vlm_depth as u64)),
                norm,
            ])
        };
        let (ew, ad) = (self.expert_width, self.action_dim);
        let heads = if self.pi05 {
            sum(&[
                linear(ew, ad, true),
                linear(ad, ew, true),
                linear(ew, ew, true),
                linear(ew, ew, true),
            ])
        } else {
            sum(&[
                linear(ew, ad, true),
                linear(ad, ew, true),
                linear(ew, ad, true),
                linear(ew, 2 * ew, true),
                linear(ew, ew, true),
            ])
        };
        sum(&[
            vision,
            linear(self.vlm_width, vw, true),
            product(&[self.vocab_size, self.vlm_width]),
            gemma(self.vlm_width, self.vlm_mlp_dim, false),
            gemma(self.expert_width, self.expert_mlp_dim, self.pi05),
            heads,
        ])
    }

    /// An upper estimate of the f32 activation buffers a forward pass holds (on the CPU or
    /// in the CUDA arena): the vision tower over every camera at once with all its heads'
    /// scores, the prefix with its MLP and scores, the suffix, and two K/V cache slots. None
    /// when it does not fit in a u64.
    pub fn activation_bytes(&self) -> Option<u64> {
        let (n, t) = (self.num_images, self.tokens_per_image());
        let (pmax, s) = (self.max_prefix_len(), self.suffix_len());
        let cap = pmax + s;
        let kvw = self.num_kv_heads * self.head_dim;
        let qw = self.num_heads * self.head_dim;
        let floats = sum(&[
            // Vision: pixels, patches, x/h/qkv/att, MLP, scores of every camera and head.
            product(&[n, self.image_size, self.image_size, 3]),
            product(&[n, t, 3, self.patch_size, self.patch_size]),
            product(&[n, t, 6, self.vision_width]),
            product(&[n, t, self.vision_mlp_dim]),
            product(&[2, n, self.vision_heads, t, t]),
            // Prefix: x/h, q/k/v/att, gate and up, scores and probabilities.
            product(&[pmax, 4, self.vlm_width]),
            product(&[pmax, 2, qw + 2 * kvw]),
            product(&[pmax, 2, self.vlm_mlp_dim]),
            product(&[2, self.num_heads, pmax, pmax]),
            // Two K/V cache slots of every layer.
            product(&[2, self.vlm_depth, 2, cap, kvw]),
            // Denoise: x/h/tmp, q/k/v/att, gate and up, scores and probabilities.
            product(&[s, 4, self.expert_width]),
            product(&[s, 2, qw + 2 * kvw]),
            product(&[s, 2, self.expert_mlp_dim]),
            product(&[2, self.num_heads, s, cap]),
        ]);
        floats?.checked_mul(4)
    }

    pub fn tokens_per_image(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g
    }

    /// Longest possible prefix: every camera real and a full prompt.
    pub fn max_prefix_len(&self) -> usize {
        self.num_images * self.tokens_per_image() + self.max_token_len
    }

    /// Suffix tokens: the state token (pi0 only) and the action tokens.
    pub fn suffix_len(&self) -> usize {
        self.action_horizon + usize::from(!self.pi05)
    }

    pub fn vision_head_dim(&self) -> usize {
        self.vision_width / self.vision_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() {
        for name in PRESETS {
            let c = Config::preset(name).unwrap();
            c.validate().unwrap();
            let (back, unknown) = Config::from_json_str(&c.to_json_pretty()).unwrap();
            assert_eq!(back, c);
            assert!(unknown.is_empty());
        }
        assert_eq!(Config::pi05().max_token_len, 200);
        assert_eq!(Config::pi0().tokens_per_image(), 256);
    }

    #[test]
    fn missing_field_is_named() {
        let mut v: serde_json::Value =
            serde_json::from_str(&Config::pi0().to_json_pretty()).unwrap();
        v.as_object_mut().unwrap().remove("head_dim");
        let err = Config::from_json_str(&v.to_string()).unwrap_err();
        assert!(err.contains("missing field `head_dim`"), "{err}");
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal() {
        let mut v: serde_json::Value =
            serde_json::from_str(&Config::pi0().to_json_pretty()).unwrap();
        v.as_object_mut()
            .unwrap()
            .insert("precision".into(), "bfloat16".into());
        let (_, unknown) = Config::from_json_str(&v.to_string()).unwrap();
        assert_eq!(unknown, vec!["precision".to_string()]);
    }

    fn with(field: &str, value: serde_json::Value) -> std::result::Result<Config, String> {
        let mut v: serde_json::Value =
            serde_json::from_str(&Config::pi0().to_json_pretty()).unwrap();
        v[field] = value;
        Config::from_json_str(&v.to_string()).map(|(c, _)| c)
    }

    /// Every size field has a limit, named in the error with the value found; values at the
    /// limit of one field pass where the totals allow.
    #[test]
    fn sizes_above_their_limit_are_named() {
        assert_eq!(LIMITS.len(), Config::pi0().dims().len());
        for (field, limit) in LIMITS {
            let above = *limit as u64 + 1;
            let err = with(field, above.into()).unwrap_err();
            assert!(
                err.contains(&format!(
                    "field `{field}` = {above} is above the limit {limit}"
                )),
                "{err}"
            );
            let err = with(field, u64::MAX.into()).unwrap_err();
            assert!(
                err.contains(&format!("field `{field}` = {}", u64::MAX)),
                "{err}"
            );
        }
        let err = with("action_horizon", (1u64 << 61).into()).unwrap_err();
        assert_eq!(
            err,
            "field `action_horizon` = 2305843009213693952 is above the limit 1024"
        );
        assert_eq!(
            with("action_horizon", 1024.into()).unwrap().action_horizon,
            1024
        );
        // At its limit a field passes its own check; pi0's width then makes the embedding
        // alone 2^24 x 2048 parameters, which the total refuses.
        let err = with("vocab_size", (1 << 24).into()).unwrap_err();
        assert!(
            err.starts_with("the dimensions imply 37071139600 parameters, above the limit"),
            "{err}"
        );
    }

    #[test]
    fn derived_sizes_and_totals_are_bounded() {
        for (c, msg) in [
            (
                Config {
                    image_size: 4096,
                    patch_size: 16,
                    ..Config::pi0()
                },
                "image_size 4096 / patch_size 16 gives 65536 tokens per image, above the limit 16384",
            ),
            (
                Config {
                    image_size: 2048,
                    patch_size: 16,
                    num_images: 16,
                    ..Config::pi0()
                },
                "num_images 16 x 16384 image tokens + max_token_len 48 + 51 suffix tokens = 262243 tokens, above the limit 65536",
            ),
            (
                Config {
                    num_heads: 1024,
                    head_dim: 4096,
                    ..Config::pi0()
                },
                "num_heads 1024 x head_dim 4096 = 4194304 query features, above the limit 65536",
            ),
            (
                Config {
                    vlm_width: 65536,
                    vlm_mlp_dim: 262144,
                    ..Config::pi0()
                },
                "parameters, above the limit 17179869184",
            ),
            (
                // 16384 tokens per camera: 49251 in the prefix, whose scores alone take
                // 8 heads x 49200^2 x 4 bytes.
                Config {
                    image_size: 1792,
                    ..Config::pi0()
                },
                "bytes of activations and K/V cache, above the limit 17179869184",
            ),
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(msg), "{err}");
        }
        for name in PRESETS {
            let c = Config::preset(name).unwrap();
            assert!(c.parameter_count().unwrap() < MAX_PARAMETERS / 4);
            assert!(c.activation_bytes().unwrap() < MAX_ACTIVATION_BYTES / 16);
        }
        // openpi's pi0: 3.3 billion parameters.
        let n = Config::pi0().parameter_count().unwrap();
        assert!((3_200_000_000..3_400_000_000).contains(&n), "{n}");
    }

    #[test]
    fn wrong_type_and_bad_relations_are_named() {
        let mut v: serde_json::Value =
            serde_json::from_str(&Config::pi0().to_json_pretty()).unwrap();
        v["num_heads"] = "8".into();
        let err = Config::from_json_str(&v.to_string()).unwrap_err();
        assert!(err.contains("`num_heads`"), "{err}");
        v["num_heads"] = 6.into();
        v["num_kv_heads"] = 4.into();
        let err = Config::from_json_str(&v.to_string()).unwrap_err();
        assert!(
            err.contains("num_heads 6 is not a multiple of num_kv_heads 4"),
            "{err}"
        );
    }
}
