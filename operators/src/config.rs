//! The model's dimensions: `config.json` of a checkpoint directory, with named presets.
//! Field names are binding (see docs/checkpoint.md); one struct serves pi0 and pi0.5.
//! `config.json` comes in two schemas: turbo-pi's (every dimension spelled out) and openpi's
//! (what openpi's converter writes: Gemma variant names, mapped here to their dimensions).

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

/// Names of the presets, for help texts and error messages. The `-dummy` ones are openpi's
/// test models (`Pi0Config(paligemma_variant="dummy", action_expert_variant="dummy")`):
/// tiny Gemmas behind the full SigLIP So400m/14, so they have an openpi `config.json`.
pub const PRESETS: &[&str] = &[
    "pi0",
    "pi05",
    "pi0-small",
    "pi05-small",
    "pi0-dummy",
    "pi05-dummy",
];

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

/// What [`Config::read_file`] read: the config, the schema it was written in, and the fields
/// neither schema knows.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    pub config: Config,
    pub schema: Schema,
    /// Reported as warnings by the callers.
    pub unknown: Vec<String>,
}

/// The field set a `config.json` was written in.
#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    /// turbo-pi's: every field of [`FIELDS`].
    TurboPi,
    /// openpi's (`paligemma_variant`, `action_expert_variant`, ...), recognised by a variant
    /// field; what was read and what was filled in.
    Openpi(openpi::Read),
}

impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schema::TurboPi => write!(f, "turbo-pi config.json"),
            Schema::Openpi(r) => write!(
                f,
                "openpi config.json (paligemma_variant {}, action_expert_variant {})",
                r.paligemma_variant, r.action_expert_variant
            ),
        }
    }
}

/// A turbo-pi field's JSON type, or an error naming the field.
fn check_type(field: &str, v: &serde_json::Value) -> std::result::Result<(), String> {
    let (ok, expected) = match field {
        "pi05" => (v.is_boolean(), "a boolean"),
        "rms_norm_eps" | "layer_norm_eps" | "rope_theta" => (v.is_number(), "a number"),
        _ => (v.is_u64(), "a non-negative integer"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("field `{field}` must be {expected}, found {v}"))
    }
}

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

    /// openpi's model for `fields` (its `Pi0Config`): the two Gemmas of the named variants
    /// (`gemma.get_config`), SigLIP So400m/14 at 224x224 over three cameras, PaliGemma's
    /// vocabulary. The variants must agree where openpi's `gemma.Module` asserts they do.
    pub fn openpi(fields: &openpi::Fields) -> Result<Self> {
        use openpi::*;
        let fail = |msg: String| Error::InvalidConfig(msg);
        let vlm = variant("paligemma_variant", &fields.paligemma_variant).map_err(fail)?;
        let expert =
            variant("action_expert_variant", &fields.action_expert_variant).map_err(fail)?;
        for (what, a, b) in [
            ("depth", vlm.depth, expert.depth),
            ("num_heads", vlm.num_heads, expert.num_heads),
            ("num_kv_heads", vlm.num_kv_heads, expert.num_kv_heads),
            ("head_dim", vlm.head_dim, expert.head_dim),
        ] {
            if a != b {
                return Err(fail(format!(
                    "paligemma_variant `{}` ({what} {a}) and action_expert_variant `{}` ({what} {b}) do not fit together: openpi's gemma.Module needs the same depth, num_heads, num_kv_heads and head_dim in both",
                    vlm.name, expert.name
                )));
            }
        }
        let config = Config {
            pi05: fields.pi05,
            action_dim: fields.action_dim,
            action_horizon: fields.action_horizon,
            max_token_len: fields.max_token_len,
            num_images: NUM_IMAGES,
            image_size: IMAGE_SIZE,
            patch_size: SIGLIP.patch_size,
            vision_width: SIGLIP.width,
            vision_depth: SIGLIP.depth,
            vision_heads: SIGLIP.num_heads,
            vision_mlp_dim: SIGLIP.mlp_dim,
            vlm_width: vlm.width,
            vlm_depth: vlm.depth,
            vlm_mlp_dim: vlm.mlp_dim,
            expert_width: expert.width,
            expert_depth: expert.depth,
            expert_mlp_dim: expert.mlp_dim,
            num_heads: vlm.num_heads,
            num_kv_heads: vlm.num_kv_heads,
            head_dim: vlm.head_dim,
            vocab_size: VOCAB_SIZE,
            rms_norm_eps: RMS_NORM_EPS,
            layer_norm_eps: LAYER_NORM_EPS,
            rope_theta: ROPE_THETA,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "pi0" => Ok(Self::pi0()),
            "pi05" => Ok(Self::pi05()),
            "pi0-small" => Ok(Self::pi0_small()),
            "pi05-small" => Ok(Self::pi05_small()),
            "pi0-dummy" => Self::openpi(&openpi::Fields::dummy(false)),
            "pi05-dummy" => Self::openpi(&openpi::Fields::dummy(true)),
            other => Err(Error::InvalidConfig(format!(
                "unknown preset `{other}`; known presets: {}",
                PRESETS.join(", ")
            ))),
        }
    }

    /// Reads `config.json` in either schema ([`Schema`]). Unknown fields are returned (the
    /// caller warns about them); a missing field or a value of the wrong type is an error
    /// naming the field.
    pub fn from_json_file(path: &Path) -> Result<(Self, Vec<String>)> {
        Self::read_file(path).map(|f| (f.config, f.unknown))
    }

    /// [`Config::from_json_file`] with the schema it was written in. openpi's converter does
    /// not write `pi05`: an openpi `config.json` without it is completed from the tensor names
    /// of the `model.safetensors` beside it.
    pub fn read_file(path: &Path) -> Result<ConfigFile> {
        let text =
            crate::fsio::read_string_limited(path, crate::fsio::limit::CONFIG_JSON, "config.json")?;
        let weights = path.with_file_name("model.safetensors");
        let probe = || openpi::pi05_from_weights(&weights);
        Self::parse_json(&text, Some(&probe)).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// A `config.json` text in either schema; an openpi one must name `pi05` here, since
    /// there are no weights to read it from.
    pub fn from_json_str(text: &str) -> std::result::Result<(Self, Vec<String>), String> {
        Self::parse_json(text, None).map(|f| (f.config, f.unknown))
    }

    /// Either schema; `probe` says whether the weights are pi0.5's, for an openpi config
    /// without `pi05`.
    pub fn parse_json(
        text: &str,
        probe: Option<&dyn Fn() -> std::result::Result<(bool, String), String>>,
    ) -> std::result::Result<ConfigFile, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let serde_json::Value::Object(map) = value else {
            return Err("expected a JSON object at the top level".into());
        };
        if openpi::VARIANT_FIELDS.iter().any(|f| map.contains_key(*f)) {
            return openpi::parse(map, probe);
        }
        let (config, unknown) = Self::from_turbopi_map(map)?;
        Ok(ConfigFile {
            config,
            schema: Schema::TurboPi,
            unknown,
        })
    }

    /// turbo-pi's schema: every field of [`FIELDS`], typed; others are returned as unknown.
    fn from_turbopi_map(
        mut map: serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<(Self, Vec<String>), String> {
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
            check_type(field, &map[*field])?;
        }
        let config: Config = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| format!("invalid config: {e}"))?;
        config.validate().map_err(|e| e.to_string())?;
        Ok((config, unknown))
    }

    /// This config as openpi's converter writes `config.json` (`action_dim`,
    /// `action_horizon`, the two variants, `precision`; `max_token_len` only when it is not
    /// openpi's default), or an error naming the first field openpi's schema cannot express.
    pub fn to_openpi_json(&self, precision: &str) -> Result<String> {
        openpi::to_json(self, precision).map_err(Error::InvalidConfig)
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
        if !self.image_size.is_multiple_of(self.patch_size) {
            return fail(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !self.vision_width.is_multiple_of(self.vision_heads) {
            return fail(format!(
                "vision_width {} is not a multiple of vision_heads {}",
                self.vision_width, self.vision_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
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
        if !self.head_dim.is_multiple_of(2) {
            return fail(format!("head_dim {} must be even (RoPE)", self.head_dim));
        }
        if !self.expert_width.is_multiple_of(2) {
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

/// openpi's `config.json`: the Gemma variants and the fixed parts of openpi's model, each
/// number with the place in openpi's source it comes from (Physical-Intelligence/openpi,
/// `src/openpi/models/`), the reader of that schema and its writer.
pub mod openpi {
    use std::collections::BTreeSet;
    use std::io::Read as _;
    use std::path::Path;

    use serde_json::{Map, Value};

    use super::{check_type, Config, ConfigFile, Schema};

    /// One of openpi's Gemmas: `gemma.get_config(variant)` (`models/gemma.py`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GemmaVariant {
        pub name: &'static str,
        pub width: usize,
        pub depth: usize,
        pub mlp_dim: usize,
        pub num_heads: usize,
        pub num_kv_heads: usize,
        pub head_dim: usize,
    }

    const fn gemma(
        name: &'static str,
        width: usize,
        depth: usize,
        mlp_dim: usize,
        head_dim: usize,
    ) -> GemmaVariant {
        // Every variant of openpi's get_config has 8 query heads and one K/V head.
        GemmaVariant {
            name,
            width,
            depth,
            mlp_dim,
            num_heads: 8,
            num_kv_heads: 1,
            head_dim,
        }
    }

    /// Every variant of openpi's `gemma.Variant`, in get_config's order. The `_lora` forms
    /// have their base's dimensions: the LoRA adapters (`lora_configs`) add no width, and
    /// openpi's PyTorch converter does not carry them into `model.safetensors`.
    pub const GEMMA_VARIANTS: [GemmaVariant; 5] = [
        gemma("dummy", 64, 4, 128, 16),
        gemma("gemma_300m", 1024, 18, 4096, 256),
        gemma("gemma_2b", 2048, 18, 16_384, 256),
        gemma("gemma_2b_lora", 2048, 18, 16_384, 256),
        gemma("gemma_300m_lora", 1024, 18, 4096, 256),
    ];

    /// A ViT of openpi's `siglip.decode_variant`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct VisionVariant {
        pub name: &'static str,
        pub width: usize,
        pub depth: usize,
        pub mlp_dim: usize,
        pub num_heads: usize,
        pub patch_size: usize,
    }

    /// The vision tower of every pi0 / pi0.5 whatever the Gemma variants:
    /// `_siglip.Module(variant="So400m/14", ...)` in `models/pi0.py`, dimensions from the
    /// "So400m" rows of `siglip.decode_variant` (`models/siglip.py`), patch 14 from "/14".
    pub const SIGLIP: VisionVariant = VisionVariant {
        name: "So400m/14",
        width: 1152,
        depth: 27,
        mlp_dim: 4304,
        num_heads: 16,
        patch_size: 14,
    };
    /// `IMAGE_RESOLUTION = (224, 224)` in `models/model.py`.
    pub const IMAGE_SIZE: usize = 224;
    /// `IMAGE_KEYS` in `models/model.py`: base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb.
    pub const NUM_IMAGES: usize = 3;
    /// `PALIGEMMA_VOCAB_SIZE = 257_152` in `models/gemma.py`.
    pub const VOCAB_SIZE: usize = 257_152;
    /// `gemma.RMSNorm`: `var + 1e-06`.
    pub const RMS_NORM_EPS: f64 = 1e-6;
    /// `nn.LayerNorm` in `models/siglip.py`, flax's default epsilon.
    pub const LAYER_NORM_EPS: f64 = 1e-6;
    /// `gemma._apply_rope(..., max_wavelength=10_000)`.
    pub const ROPE_THETA: f64 = 10_000.0;
    /// `Pi0Config.__post_init__`: `max_token_len = 200 if pi05 else 48`.
    pub fn default_max_token_len(pi05: bool) -> usize {
        if pi05 {
            200
        } else {
            48
        }
    }
    /// The precisions openpi's converter writes (`--precision`), and `Pi0Config.dtype`'s.
    pub const PRECISIONS: [&str; 3] = ["bfloat16", "float32", "float16"];

    /// A `config.json` holding either of these is read in openpi's schema.
    pub const VARIANT_FIELDS: [&str; 2] = ["paligemma_variant", "action_expert_variant"];
    /// The fields of openpi's schema: what `examples/convert_jax_model_to_pytorch.py` writes
    /// (`action_dim`, `action_horizon`, the variants, `precision`) and the other fields of
    /// `Pi0Config` (`models/pi0_config.py`) a config may carry.
    pub const FIELDS: [&str; 10] = [
        "paligemma_variant",
        "action_expert_variant",
        "action_dim",
        "action_horizon",
        "max_token_len",
        "pi05",
        "discrete_state_input",
        "dtype",
        "precision",
        "pytorch_compile_mode",
    ];

    /// openpi's description of a model: `Pi0Config`'s fields that decide its shapes.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Fields {
        pub paligemma_variant: String,
        pub action_expert_variant: String,
        pub action_dim: usize,
        pub action_horizon: usize,
        pub max_token_len: usize,
        pub pi05: bool,
    }

    impl Fields {
        /// openpi's test model: `Pi0Config(pi05=..., paligemma_variant="dummy",
        /// action_expert_variant="dummy")` (the debug configs of `training/config.py`).
        pub fn dummy(pi05: bool) -> Self {
            Fields {
                paligemma_variant: "dummy".into(),
                action_expert_variant: "dummy".into(),
                action_dim: 32,
                action_horizon: 50,
                max_token_len: default_max_token_len(pi05),
                pi05,
            }
        }
    }

    /// What an openpi `config.json` said, and what was filled in.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Read {
        pub paligemma_variant: String,
        pub action_expert_variant: String,
        /// `pi05` was absent: the tensor of `model.safetensors` that told.
        pub pi05_from_weights: Option<String>,
        /// `max_token_len` was absent: openpi's default for the model was taken.
        pub max_token_len_default: bool,
        /// `discrete_state_input` when the file has it (openpi's default: the value of pi05).
        pub discrete_state_input: Option<bool>,
        /// `precision` (or `dtype`) when the file has it.
        pub precision: Option<String>,
        /// turbo-pi fields the file has too (each agrees with the variants).
        pub turbopi_fields: Vec<String>,
    }

    /// The variant named `name`, or an error naming `field` and the known variants.
    pub fn variant(field: &str, name: &str) -> Result<GemmaVariant, String> {
        GEMMA_VARIANTS
            .iter()
            .find(|v| v.name == name)
            .copied()
            .ok_or_else(|| {
                let known: Vec<&str> = GEMMA_VARIANTS.iter().map(|v| v.name).collect();
                format!(
                    "field `{field}`: unknown variant `{name}` (openpi's variants: {})",
                    known.join(", ")
                )
            })
    }

    /// Where each derived turbo-pi field comes from, for a disagreement's message.
    fn source_of(field: &str, r: &Read) -> String {
        match field {
            "vlm_width" | "vlm_depth" | "vlm_mlp_dim" => {
                format!("paligemma_variant `{}`", r.paligemma_variant)
            }
            "expert_width" | "expert_depth" | "expert_mlp_dim" => {
                format!("action_expert_variant `{}`", r.action_expert_variant)
            }
            "num_heads" | "num_kv_heads" | "head_dim" => format!(
                "paligemma_variant `{}` and action_expert_variant `{}`",
                r.paligemma_variant, r.action_expert_variant
            ),
            "image_size" | "num_images" => "openpi's model (224x224 images, three cameras)".into(),
            "vocab_size" => "PaliGemma's vocabulary".into(),
            "rms_norm_eps" | "layer_norm_eps" | "rope_theta" => "openpi's Gemma and SigLIP".into(),
            _ => format!("openpi's vision tower SigLIP {}", SIGLIP.name),
        }
    }

    /// An optional unsigned field; None when absent (or null, for the fields whose openpi
    /// default is None).
    fn uint(map: &Map<String, Value>, field: &str, null_ok: bool) -> Result<Option<usize>, String> {
        match map.get(field) {
            None => Ok(None),
            Some(Value::Null) if null_ok => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    format!("field `{field}` must be a non-negative integer, found {v}")
                }),
        }
    }

    /// Reads openpi's schema. `probe` gives pi05 (and the tensor that told) when the file
    /// has no `pi05`, as the converter's files do not.
    pub(super) fn parse(
        map: Map<String, Value>,
        probe: Option<&dyn Fn() -> Result<(bool, String), String>>,
    ) -> Result<ConfigFile, String> {
        let name = |field: &str, default: &str| -> Result<String, String> {
            match map.get(field) {
                None => Ok(default.to_string()),
                Some(Value::String(s)) => variant(field, s).map(|v| v.name.to_string()),
                Some(v) => Err(format!(
                    "field `{field}` must be a string naming a Gemma variant, found {v}"
                )),
            }
        };
        // Pi0Config's defaults where a field is absent.
        let paligemma_variant = name("paligemma_variant", "gemma_2b")?;
        let action_expert_variant = name("action_expert_variant", "gemma_300m")?;
        let (pi05, pi05_from_weights) = match map.get("pi05") {
            Some(Value::Bool(b)) => (*b, None),
            Some(v) => return Err(format!("field `pi05` must be a boolean, found {v}")),
            None => match probe {
                Some(probe) => {
                    let (pi05, key) = probe().map_err(|e| {
                        format!("field `pi05` is absent (openpi's converter does not write it) and {e}")
                    })?;
                    (pi05, Some(key))
                }
                None => {
                    return Err("missing field `pi05` (openpi's converter does not write it; read from a checkpoint folder, it is taken from model.safetensors)".into())
                }
            },
        };
        let max_token_len = uint(&map, "max_token_len", true)?;
        let discrete_state_input = match map.get("discrete_state_input") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                return Err(format!(
                    "field `discrete_state_input` must be a boolean, found {v}"
                ))
            }
        };
        let mut precision = None;
        for field in ["dtype", "precision"] {
            match map.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if PRECISIONS.contains(&s.as_str()) => {
                    precision = Some(s.clone())
                }
                Some(v) => {
                    return Err(format!(
                        "field `{field}` must be one of {}, found {v}",
                        PRECISIONS.join(", ")
                    ))
                }
            }
        }
        match map.get("pytorch_compile_mode") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(v) => {
                return Err(format!(
                    "field `pytorch_compile_mode` must be a string or null, found {v}"
                ))
            }
        }
        let fields = Fields {
            paligemma_variant,
            action_expert_variant,
            action_dim: uint(&map, "action_dim", false)?.unwrap_or(32),
            action_horizon: uint(&map, "action_horizon", false)?.unwrap_or(50),
            max_token_len: max_token_len.unwrap_or_else(|| default_max_token_len(pi05)),
            pi05,
        };
        let config = Config::openpi(&fields).map_err(|e| e.to_string())?;
        let mut read = Read {
            paligemma_variant: fields.paligemma_variant,
            action_expert_variant: fields.action_expert_variant,
            pi05_from_weights,
            max_token_len_default: max_token_len.is_none(),
            discrete_state_input,
            precision,
            turbopi_fields: vec![],
        };
        // turbo-pi's fields beside openpi's: each must say what the variants say.
        let derived = serde_json::to_value(&config).map_err(|e| e.to_string())?;
        for field in super::FIELDS {
            let Some(v) = map.get(*field) else { continue };
            if !FIELDS.contains(field) {
                check_type(field, v)?;
                let want = &derived[*field];
                let same = match (v.as_u64(), want.as_u64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => v.as_f64() == want.as_f64(),
                };
                if !same {
                    return Err(format!(
                        "field `{field}` = {v} disagrees with {}, which gives {want}",
                        source_of(field, &read)
                    ));
                }
                read.turbopi_fields.push(field.to_string());
            }
        }
        let unknown = map
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()) && !super::FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok(ConfigFile {
            config,
            schema: Schema::Openpi(read),
            unknown,
        })
    }

    /// `cfg` as openpi's converter writes `config.json`, in its field order; `max_token_len`
    /// is added when it is not openpi's default. An error names the first dimension openpi
    /// cannot express.
    pub(super) fn to_json(cfg: &Config, precision: &str) -> Result<String, String> {
        if !PRECISIONS.contains(&precision) {
            return Err(format!(
                "precision `{precision}`: openpi's are {}",
                PRECISIONS.join(", ")
            ));
        }
        let fixed = Config::openpi(&Fields::dummy(cfg.pi05)).map_err(|e| e.to_string())?;
        let fixed = serde_json::to_value(&fixed).map_err(|e| e.to_string())?;
        let ours = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
        for field in [
            "num_images",
            "image_size",
            "patch_size",
            "vision_width",
            "vision_depth",
            "vision_heads",
            "vision_mlp_dim",
            "vocab_size",
            "rms_norm_eps",
            "layer_norm_eps",
            "rope_theta",
        ] {
            if ours[field] != fixed[field] {
                return Err(format!(
                    "`{field}` = {} has no openpi form: openpi's model always has {}",
                    ours[field], fixed[field]
                ));
            }
        }
        let find = |what: &str, width: usize, depth: usize, mlp_dim: usize| {
            GEMMA_VARIANTS
                .iter()
                .find(|v| {
                    (v.width, v.depth, v.mlp_dim, v.num_heads, v.num_kv_heads, v.head_dim)
                        == (width, depth, mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
                })
                .map(|v| v.name)
                .ok_or_else(|| {
                    format!(
                        "no openpi Gemma variant has the {what}'s dimensions (width {width}, depth {depth}, mlp_dim {mlp_dim}, num_heads {}, num_kv_heads {}, head_dim {})",
                        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
                    )
                })
        };
        let vlm = find("prefix", cfg.vlm_width, cfg.vlm_depth, cfg.vlm_mlp_dim)?;
        let expert = find(
            "action expert",
            cfg.expert_width,
            cfg.expert_depth,
            cfg.expert_mlp_dim,
        )?;
        let mut text = format!(
            "{{\n  \"action_dim\": {},\n  \"action_horizon\": {},\n  \"paligemma_variant\": \"{vlm}\",\n  \"action_expert_variant\": \"{expert}\",\n  \"precision\": \"{precision}\"",
            cfg.action_dim, cfg.action_horizon
        );
        if cfg.max_token_len != default_max_token_len(cfg.pi05) {
            text += &format!(",\n  \"max_token_len\": {}", cfg.max_token_len);
        }
        text += "\n}\n";
        Ok(text)
    }

    /// pi0.5 or pi0, told by the heads in the safetensors header at `path`: `time_mlp_in`
    /// exists only in pi0.5, `state_proj` only in pi0. Returns the key that told.
    pub fn pi05_from_weights(path: &Path) -> Result<(bool, String), String> {
        let keys = safetensors_keys(path)?;
        let pi05_key = crate::keys::heads::time_in().weight();
        let pi0_key = crate::keys::heads::state().weight();
        match (keys.contains(&pi05_key), keys.contains(&pi0_key)) {
            (true, false) => Ok((true, pi05_key)),
            (false, true) => Ok((false, pi0_key)),
            (both, _) => Err(format!(
                "{} holds {} `{pi05_key}` (pi0.5) {} `{pi0_key}` (pi0): add \"pi05\": true or false to config.json",
                path.display(),
                if both { "both" } else { "neither" },
                if both { "and" } else { "nor" },
            )),
        }
    }

    /// The tensor names of a safetensors file, from its header alone.
    fn safetensors_keys(path: &Path) -> Result<BTreeSet<String>, String> {
        let (mut file, size) = crate::fsio::open_regular(path, u64::MAX, "model.safetensors")
            .map_err(|e| e.to_string())?;
        let bad = |reason: String| {
            format!(
                "{}: corrupt or truncated safetensors file: {reason}",
                path.display()
            )
        };
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|e| bad(format!("cannot read the header length: {e}")))?;
        let len = u64::from_le_bytes(len);
        let limit = crate::fsio::limit::SAFETENSORS_HEADER;
        if len > limit || len > size.saturating_sub(8) {
            return Err(bad(format!(
                "the header length field says {len} bytes (file: {size} bytes, limit {limit})"
            )));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let header: Map<String, Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("the header is not a JSON object: {e}")))?;
        Ok(header.into_iter().map(|(k, _)| k).collect())
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

    /// What openpi's converter writes (`examples/convert_jax_model_to_pytorch.py`).
    fn converter(paligemma: &str, expert: &str, horizon: u64) -> serde_json::Value {
        serde_json::json!({
            "action_dim": 32,
            "action_horizon": horizon,
            "paligemma_variant": paligemma,
            "action_expert_variant": expert,
            "precision": "bfloat16",
        })
    }

    fn openpi_read(v: &serde_json::Value, pi05: bool) -> std::result::Result<ConfigFile, String> {
        let key = if pi05 {
            "time_mlp_in.weight"
        } else {
            "state_proj.weight"
        };
        let probe = move || Ok((pi05, key.to_string()));
        Config::parse_json(&v.to_string(), Some(&probe))
    }

    #[test]
    fn openpi_converter_configs_map_to_the_presets() {
        // pi05_libero: horizon 10, pi05 told by the weights, openpi's max_token_len.
        let f = openpi_read(&converter("gemma_2b", "gemma_300m", 10), true).unwrap();
        assert_eq!(
            f.config,
            Config {
                action_horizon: 10,
                ..Config::pi05()
            }
        );
        assert!(f.unknown.is_empty(), "{:?}", f.unknown);
        assert_eq!(
            f.schema.to_string(),
            "openpi config.json (paligemma_variant gemma_2b, action_expert_variant gemma_300m)"
        );
        let Schema::Openpi(read) = &f.schema else {
            panic!("{:?}", f.schema)
        };
        assert_eq!(
            read.pi05_from_weights.as_deref(),
            Some("time_mlp_in.weight")
        );
        assert!(read.max_token_len_default);
        assert_eq!(read.precision.as_deref(), Some("bfloat16"));
        let f = openpi_read(&converter("gemma_2b", "gemma_300m", 50), false).unwrap();
        assert_eq!(f.config, Config::pi0());
        // LoRA variants have their base's dimensions.
        let f = openpi_read(&converter("gemma_2b_lora", "gemma_300m_lora", 50), false).unwrap();
        assert_eq!(f.config, Config::pi0());
        // openpi's dummy test model: tiny Gemmas, the full SigLIP.
        let f = openpi_read(&converter("dummy", "dummy", 50), true).unwrap();
        assert_eq!(f.config, Config::preset("pi05-dummy").unwrap());
        assert_eq!(
            (f.config.vlm_width, f.config.vlm_depth, f.config.head_dim),
            (64, 4, 16)
        );
        assert_eq!(f.config.vision_width, 1152);
        // Pi0Config's defaults for absent fields; an explicit pi05 needs no weights.
        let (c, _) =
            Config::from_json_str(r#"{"paligemma_variant": "gemma_2b", "pi05": true}"#).unwrap();
        assert_eq!(c, Config::pi05());
        let (c, _) = Config::from_json_str(
            r#"{"action_expert_variant": "gemma_300m", "pi05": false, "max_token_len": 180}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Config {
                max_token_len: 180,
                ..Config::pi0()
            }
        );
    }

    #[test]
    fn openpi_json_round_trips_and_small_presets_have_none() {
        for name in ["pi0", "pi05", "pi0-dummy", "pi05-dummy"] {
            let c = Config::preset(name).unwrap();
            let text = c.to_openpi_json("float32").unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            assert_eq!(keys.len(), 5, "{text}");
            // No turbo-pi field: only what the converter writes.
            for f in FIELDS.iter().filter(|f| !openpi::FIELDS.contains(*f)) {
                assert!(v.get(*f).is_none(), "{f} in {text}");
            }
            assert_eq!(openpi_read(&v, c.pi05).unwrap().config, c, "{name}");
        }
        let c = Config {
            max_token_len: 100,
            ..Config::pi05()
        };
        let text = c.to_openpi_json("bfloat16").unwrap();
        assert!(text.contains("\"max_token_len\": 100"), "{text}");
        assert_eq!(
            openpi_read(&serde_json::from_str(&text).unwrap(), true)
                .unwrap()
                .config,
            c
        );
        let err = Config::pi05_small()
            .to_openpi_json("bfloat16")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "`image_size` = 32 has no openpi form: openpi's model always has 224"
        );
        let c = Config {
            expert_mlp_dim: 2048,
            ..Config::pi0()
        };
        let err = c.to_openpi_json("bfloat16").unwrap_err().to_string();
        assert!(
            err.starts_with("no openpi Gemma variant has the action expert's dimensions"),
            "{err}"
        );
        assert!(Config::pi0().to_openpi_json("fp8").is_err());
    }

    #[test]
    fn openpi_errors_name_the_field() {
        let base = converter("gemma_2b", "gemma_300m", 10);
        let err_with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base.clone();
            edit(&mut v);
            openpi_read(&v, true).unwrap_err()
        };
        for (edit, msg) in [
            (
                &(|v: &mut serde_json::Value| v["paligemma_variant"] = "gemma_7b".into())
                    as &dyn Fn(&mut serde_json::Value),
                "field `paligemma_variant`: unknown variant `gemma_7b` (openpi's variants: dummy, gemma_300m, gemma_2b, gemma_2b_lora, gemma_300m_lora)",
            ),
            (
                &|v: &mut serde_json::Value| v["action_expert_variant"] = 300.into(),
                "field `action_expert_variant` must be a string naming a Gemma variant, found 300",
            ),
            (
                &|v: &mut serde_json::Value| v["action_dim"] = 0.into(),
                "field `action_dim` must be positive",
            ),
            (
                &|v: &mut serde_json::Value| v["action_dim"] = (-3).into(),
                "field `action_dim` must be a non-negative integer, found -3",
            ),
            (
                &|v: &mut serde_json::Value| v["action_horizon"] = 2000.into(),
                "field `action_horizon` = 2000 is above the limit 1024",
            ),
            (
                &|v: &mut serde_json::Value| v["pi05"] = "yes".into(),
                "field `pi05` must be a boolean, found \"yes\"",
            ),
            (
                &|v: &mut serde_json::Value| v["precision"] = "int8".into(),
                "field `precision` must be one of bfloat16, float32, float16, found \"int8\"",
            ),
            (
                &|v: &mut serde_json::Value| v["action_expert_variant"] = "dummy".into(),
                "paligemma_variant `gemma_2b` (depth 18) and action_expert_variant `dummy` (depth 4) do not fit together",
            ),
            // Both schemas, disagreeing.
            (
                &|v: &mut serde_json::Value| v["vlm_width"] = 1024.into(),
                "field `vlm_width` = 1024 disagrees with paligemma_variant `gemma_2b`, which gives 2048",
            ),
            (
                &|v: &mut serde_json::Value| v["vision_depth"] = 12.into(),
                "field `vision_depth` = 12 disagrees with openpi's vision tower SigLIP So400m/14, which gives 27",
            ),
            (
                &|v: &mut serde_json::Value| v["head_dim"] = "256".into(),
                "field `head_dim` must be a non-negative integer, found \"256\"",
            ),
        ] {
            let err = err_with(edit);
            assert!(err.contains(msg), "{err}\nexpected: {msg}");
        }
        // Both schemas, agreeing: read, and the turbo-pi fields are noted.
        let mut v: serde_json::Value = serde_json::from_str(
            &Config {
                action_horizon: 10,
                ..Config::pi05()
            }
            .to_json_pretty(),
        )
        .unwrap();
        for (k, x) in base.as_object().unwrap() {
            v[k] = x.clone();
        }
        v["rope_theta"] = 10000.into();
        v["comment"] = "hand-written".into();
        let f = openpi_read(&v, true).unwrap();
        let Schema::Openpi(read) = &f.schema else {
            panic!()
        };
        assert_eq!(read.turbopi_fields.len(), FIELDS.len() - 4);
        assert_eq!(read.pi05_from_weights, None);
        assert_eq!(f.unknown, vec!["comment".to_string()]);
        // Without weights to ask, pi05 must be in the file.
        let err = Config::from_json_str(&base.to_string()).unwrap_err();
        assert!(err.starts_with("missing field `pi05`"), "{err}");
        let fail = || Err("the weights say nothing".to_string());
        let err = Config::parse_json(&base.to_string(), Some(&fail)).unwrap_err();
        assert_eq!(
            err,
            "field `pi05` is absent (openpi's converter does not write it) and the weights say nothing"
        );
    }

    /// pi05 from the heads in a safetensors header; neither or both is an error.
    #[test]
    fn pi05_is_read_from_the_weights_header() {
        let dir = tempfile::tempdir().unwrap();
        let write = |keys: &[&str]| {
            let entries: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "\"{k}\": {{\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}}"
                    )
                })
                .collect();
            let header = format!("{{{}}}", entries.join(", "));
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            let p = dir.path().join("model.safetensors");
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let p = write(&["time_mlp_in.weight", "x"]);
        assert_eq!(
            openpi::pi05_from_weights(&p).unwrap(),
            (true, "time_mlp_in.weight".to_string())
        );
        let p = write(&["state_proj.weight"]);
        assert!(!openpi::pi05_from_weights(&p).unwrap().0);
        let p = write(&["x"]);
        let err = openpi::pi05_from_weights(&p).unwrap_err();
        assert!(err.contains("holds neither `time_mlp_in.weight` (pi0.5) nor `state_proj.weight` (pi0): add \"pi05\""), "{err}");
        std::fs::write(&p, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        let err = openpi::pi05_from_weights(&p).unwrap_err();
        assert!(
            err.contains("the header length field says 200 bytes"),
            "{err}"
        );
        // Read through a folder: config.json beside the weights.
        write(&["state_proj.weight"]);
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, converter("dummy", "dummy", 50).to_string()).unwrap();
        let f = Config::read_file(&cfg).unwrap();
        assert_eq!(f.config, Config::preset("pi0-dummy").unwrap());
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = Config::read_file(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("field `pi05` is absent") && err.contains("model.safetensors"),
            "{err}"
        );
    }
}
