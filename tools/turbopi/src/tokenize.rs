//! `turbopi tokenize`: a prompt through openpi's `PaligemmaTokenizer` as the server tokenizes
//! it, printed as one JSON object (ids, mask, pieces), for checking what a model is fed.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use operators::openpi::assets::{find_tokenizer, openpi_cache_dir_from_env};
use operators::openpi::tokenizer::{prompt_text, PromptTokenizer};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// The prompt, as a client sends it (cleaned as openpi does: stripped, `_` and newlines to
    /// spaces).
    pub text: String,
    /// PaliGemma's tokenizer: a Hugging Face tokenizer.json or a SentencePiece .model
    /// (openpi's paligemma_tokenizer.model). Default: searched as the server does, in
    /// --checkpoint and openpi's cache ($OPENPI_DATA_HOME or ~/.cache/openpi).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A checkpoint folder to look for the tokenizer in (tokenizer.json,
    /// paligemma_tokenizer.model).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The model's max_token_len (default 48, pi0's; 200 with --pi05).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// The normalised state, comma-separated (e.g. --state=-0.5,0.25): pi0.5's discrete-state
    /// prompt `Task: ..., State: <bins>;\nAction: `.
    #[arg(long, allow_hyphen_values = true, value_delimiter = ',')]
    pub state: Option<Vec<f64>>,
    /// pi0.5: max_token_len 200 by default.
    #[arg(long)]
    pub pi05: bool,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let cache = openpi_cache_dir_from_env();
    let explicit = args
        .tokenizer
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    let path = find_tokenizer(
        explicit.as_deref(),
        args.checkpoint.as_deref(),
        cache.as_deref(),
    )?
    .ok_or_else(|| anyhow!("--tokenizer none: there is nothing to tokenize with"))?;
    let tok = PromptTokenizer::from_file(&path)?;
    let max_len = args.max_len.unwrap_or(if args.pi05 { 200 } else { 48 });
    if max_len == 0 {
        return Err(anyhow!("--max-len must be at least 1"));
    }
    let state = args.state.as_deref();
    let tokens = tok
        .tokenize(&args.text, state, max_len)
        .with_context(|| format!("tokenizing with {}", path.display()))?;
    let n = tokens.mask.iter().filter(|&&m| m).count();
    let pieces: Vec<String> = tokens.ids[..n]
        .iter()
        .map(|&id| tok.id_to_token(id as u32).unwrap_or_default())
        .collect();
    let out = serde_json::json!({
        "ids": tokens.ids,
        "mask": tokens.mask,
        "length": n,
        "truncated": tokens.truncated,
        "pieces": pieces,
        "text": prompt_text(&args.text, state),
        "tokenizer": path,
        "format": tok.format(),
    });
    println!("{out}");
    if tokens.truncated {
        eprintln!("warning: the prompt has more than --max-len {max_len} tokens and was cut");
    }
    Ok(())
}
