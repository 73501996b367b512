//! Per-frame prompts: the `tokens` message (Int32 [L] token ids with a `token_mask` ListInt of
//! the same length, the frame's `seq`), sent by a source that tokenizes prompts (the openpi
//! server) to the nodes that embed them (`policy`, `prefix`), which join it to its frame by
//! `seq` ([`crate::join`]). Without a `tokens` input those nodes use the fixed prompt of env
//! `PROMPT`.

use dora_node_api::{DoraArray, MetadataParameters, Parameter};
use eyre::{bail, eyre, Result, WrapErr};

use crate::{expect_tensor, list_param, Dim, FrameMeta};

/// The `tokens` input id.
pub const TOKENS: &str = "tokens";

/// The node's fixed prompt (env `PROMPT`: a folder with tokens.npy and token_mask.npy) and
/// whether its `tokens` input is wired; `PROMPT` may be left out (empty prompt) only then.
pub fn prompt_from_env(
    node: &dora_node_api::DoraNode,
    cfg: &operators::Config,
) -> Result<(Vec<i32>, Vec<bool>, bool)> {
    let per_frame = node
        .node_config()
        .inputs
        .keys()
        .any(|k| k.as_str() == TOKENS);
    let (tokens, mask) = match crate::env_opt::<std::path::PathBuf>("PROMPT")? {
        Some(dir) => operators::observation::load_prompt(&dir, cfg)
            .wrap_err_with(|| format!("env PROMPT={}", dir.display()))?,
        None if per_frame => (vec![], vec![]),
        None => bail!("env PROMPT is required (or wire the `tokens` input)"),
    };
    Ok((tokens, mask, per_frame))
}

/// Metadata of a `tokens` message of frame `meta` (pair with the ids as Int32 values).
pub fn tokens_params(meta: &FrameMeta, mask: &[bool]) -> MetadataParameters {
    let mut p = meta.tensor_params(&[mask.len()], "int32");
    p.insert(
        "token_mask".into(),
        Parameter::ListInt(mask.iter().map(|&m| m as i64).collect()),
    );
    p
}

/// A `tokens` message, checked: at most `max_token_len` ids, each in [0, `vocab_size`), and a
/// `token_mask` of the same length.
pub fn parse_tokens(
    md: &MetadataParameters,
    data: &DoraArray,
    cfg: &operators::Config,
) -> Result<(Vec<i32>, Vec<bool>)> {
    let (_, ids) = expect_tensor::<i32>(TOKENS, md, data, "int32", &[Dim::Any])?;
    if ids.len() > cfg.max_token_len {
        bail!(
            "input `{TOKENS}`: {} tokens, more than the checkpoint's max_token_len {}",
            ids.len(),
            cfg.max_token_len
        );
    }
    if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= cfg.vocab_size) {
        bail!(
            "input `{TOKENS}`: token id {bad} is outside the vocabulary [0, {})",
            cfg.vocab_size
        );
    }
    let mask = list_param(md, "token_mask")
        .ok_or_else(|| eyre!("input `{TOKENS}`: metadata `token_mask` is missing"))?;
    if mask.len() != ids.len() {
        bail!(
            "input `{TOKENS}`: `token_mask` has {} entries for {} tokens",
            mask.len(),
            ids.len()
        );
    }
    Ok((ids.to_vec(), mask.into_iter().map(|m| m != 0).collect()))
}

/// The prompt of a joined frame: its `tokens` part when that input is wired, otherwise
/// `fixed` (env PROMPT).
pub fn frame_prompt(
    frame: &crate::join::Joined,
    fixed: &(Vec<i32>, Vec<bool>),
    cfg: &operators::Config,
) -> Result<(Vec<i32>, Vec<bool>)> {
    match frame.part(TOKENS) {
        Some(p) => parse_tokens(&p.metadata, &p.data, cfg),
        None => Ok(fixed.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_node_api::IntoArrow;

    #[test]
    fn prompts_are_checked() {
        let cfg = operators::Config::pi05_small();
        let meta = |seq| FrameMeta {
            seq,
            t_capture_ns: 0,
            trace: None,
        };
        let md = tokens_params(&meta(1), &[true, true, false]);
        assert_eq!(
            parse_tokens(&md, &vec![2i32, 11, 0].into_arrow(), &cfg).unwrap(),
            (vec![2, 11, 0], vec![true, true, false])
        );
        let md = tokens_params(&meta(4), &[true]);
        let e = parse_tokens(&md, &vec![300i32].into_arrow(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token id 300"), "{e}");
        let md = tokens_params(&meta(4), &[true, true]);
        let e = parse_tokens(&md, &vec![1i32].into_arrow(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 2 values"), "{e}");
        let mut md = meta(4).tensor_params(&[1], "int32");
        md.insert("token_mask".into(), Parameter::ListInt(vec![1, 1]));
        let e = parse_tokens(&md, &vec![1i32].into_arrow(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`token_mask` has 2 entries for 1 tokens"), "{e}");
        let long = vec![true; cfg.max_token_len + 1];
        let md = tokens_params(&meta(4), &long);
        let e = parse_tokens(&md, &vec![1i32; long.len()].into_arrow(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_token_len"), "{e}");
    }
}
