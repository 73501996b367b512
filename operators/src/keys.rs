//! The checkpoint key of every tensor the policy reads, as openpi's PyTorch checkpoints
//! (its JAX-to-PyTorch converter) name them: the one place they are spelled. The tensor list
//! ([`crate::checkpoint::tensor_specs`]), the CPU loaders ([`crate::siglip`],
//! [`crate::gemma`], [`crate::policy`]) and the CUDA weight layout all take their names here.

/// SigLIP's root.
pub const VISION: &str = "paligemma_with_expert.paligemma.model.vision_tower.vision_model";
/// The linear projector from SigLIP's width to Gemma's.
pub const PROJECTOR: &str = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear";
/// Gemma 2B's root.
pub const VLM: &str = "paligemma_with_expert.paligemma.model.language_model";
/// The action expert's root.
pub const EXPERT: &str = "paligemma_with_expert.gemma_expert.model";
/// The token embedding, stored only as the tied output head.
pub const EMBED: &str = "paligemma_with_expert.paligemma.lm_head.weight";
/// Where some converters put the token embedding instead (accepted for [`EMBED`]).
pub const EMBED_ALIAS: &str =
    "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight";

/// A layer with `{base}.weight` and (optionally) `{base}.bias`: a Linear, a LayerNorm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param(pub String);

impl Param {
    pub fn base(&self) -> &str {
        &self.0
    }
    pub fn weight(&self) -> String {
        format!("{}.weight", self.0)
    }
    pub fn bias(&self) -> String {
        format!("{}.bias", self.0)
    }
}

/// A Gemma RMSNorm: `{base}.weight` (plain), or pi0.5's adaptive `{base}.dense` Linear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Norm(pub String);

impl Norm {
    /// The weight of a plain RMSNorm.
    pub fn weight(&self) -> String {
        format!("{}.weight", self.0)
    }
    /// The dense layer of an adaptive RMSNorm (cond -> scale, shift, gate).
    pub fn dense(&self) -> Param {
        Param(format!("{}.dense", self.0))
    }
}

/// SigLIP's tensors.
pub mod siglip {
    use super::{Param, VISION};

    /// The patch embedding (a convolution: weight [width, 3, patch, patch], bias [width]).
    pub fn patch() -> Param {
        Param(format!("{VISION}.embeddings.patch_embedding"))
    }

    /// The learned position embedding [tokens_per_image, width].
    pub fn position() -> String {
        format!("{VISION}.embeddings.position_embedding.weight")
    }

    /// The final LayerNorm.
    pub fn post_layernorm() -> Param {
        Param(format!("{VISION}.post_layernorm"))
    }

    /// One encoder layer.
    pub struct Layer {
        pub layer_norm1: Param,
        pub q: Param,
        pub k: Param,
        pub v: Param,
        pub out: Param,
        pub layer_norm2: Param,
        pub fc1: Param,
        pub fc2: Param,
    }

    pub fn layer(i: usize) -> Layer {
        let l = format!("{VISION}.encoder.layers.{i}");
        let p = |s: &str| Param(format!("{l}.{s}"));
        Layer {
            layer_norm1: p("layer_norm1"),
            q: p("self_attn.q_proj"),
            k: p("self_attn.k_proj"),
            v: p("self_attn.v_proj"),
            out: p("self_attn.out_proj"),
            layer_norm2: p("layer_norm2"),
            fc1: p("mlp.fc1"),
            fc2: p("mlp.fc2"),
        }
    }
}

/// Gemma's tensors (the prefix's Gemma 2B under [`super::VLM`], the expert under
/// [`super::EXPERT`]).
pub mod gemma {
    use super::{Norm, Param};

    /// One decoder layer (no biases).
    pub struct Layer {
        pub input_layernorm: Norm,
        pub q: Param,
        pub k: Param,
        pub v: Param,
        pub o: Param,
        pub post_attention_layernorm: Norm,
        pub gate: Param,
        pub up: Param,
        pub down: Param,
    }

    pub fn layer(root: &str, i: usize) -> Layer {
        let l = format!("{root}.layers.{i}");
        let p = |s: &str| Param(format!("{l}.{s}"));
        Layer {
            input_layernorm: Norm(format!("{l}.input_layernorm")),
            q: p("self_attn.q_proj"),
            k: p("self_attn.k_proj"),
            v: p("self_attn.v_proj"),
            o: p("self_attn.o_proj"),
            post_attention_layernorm: Norm(format!("{l}.post_attention_layernorm")),
            gate: p("mlp.gate_proj"),
            up: p("mlp.up_proj"),
            down: p("mlp.down_proj"),
        }
    }

    /// The final norm (the expert's; the prefix's is never read).
    pub fn final_norm(root: &str) -> Norm {
        Norm(format!("{root}.norm"))
    }
}

/// The heads around the expert.
pub mod heads {
    use super::Param;

    fn p(s: &str) -> Param {
        Param(s.to_string())
    }
    /// Noisy actions into the expert's width.
    pub fn action_in() -> Param {
        p("action_in_proj")
    }
    /// The expert's action tokens out to the velocity.
    pub fn action_out() -> Param {
        p("action_out_proj")
    }
    /// pi0: the state token.
    pub fn state() -> Param {
        p("state_proj")
    }
    /// pi0: the MLP over [action embedding, time embedding].
    pub fn action_time_in() -> Param {
        p("action_time_mlp_in")
    }
    pub fn action_time_out() -> Param {
        p("action_time_mlp_out")
    }
    /// pi0.5: the MLP over the time embedding (the adaptive norms' condition).
    pub fn time_in() -> Param {
        p("time_mlp_in")
    }
    pub fn time_out() -> Param {
        p("time_mlp_out")
    }
}
