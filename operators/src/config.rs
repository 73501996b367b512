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
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
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

    /// Checks the relations between fields that the model relies on.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::InvalidConfig(msg));
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
        Ok(())
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
