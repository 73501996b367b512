//! openpi's `PaligemmaTokenizer` over PaliGemma's tokenizer, read from either of its two
//! formats: the SentencePiece `.model` openpi itself loads (`paligemma_tokenizer.model`, read
//! natively by [`super::sentencepiece`]) or a Hugging Face `tokenizer.json`; both give the same
//! ids. The prompt is cleaned (`strip`, `_` and newlines to spaces) and encoded with a leading
//! `<bos>`; pi0 appends the encoding of "\n" (the start of the answer), pi0.5 with discrete
//! state encodes `Task: {prompt}, State: {bins};\nAction: ` instead, the normalised state
//! digitised into 256 bins over [-1, 1]. Tokens are right-padded with id 0 (mask false) or
//! truncated to `max_len`.

use std::path::Path;

use super::sentencepiece::SentencePiece;
use crate::fsio::{self, limit};
use crate::{Error, Result};

/// The longest prompt tokenized, in bytes of UTF-8 after openpi's `strip()`; a longer one is
/// refused (a `bad observation` error naming `prompt`).
///
/// Tokenizing takes 100 to 200 bytes of memory per prompt byte and is slow (a 15 MB prompt:
/// 1.6 GB and seconds of CPU), and every token past `max_token_len` is dropped anyway. Why
/// refuse instead of cutting the text before tokenizing: BPE's merges next to a cut can differ
/// from the whole text's, and a different merge can change the pieces before it, so no cut
/// point guarantees the first `max_token_len` tokens of the whole prompt; with a refusal every
/// accepted prompt is tokenized whole, exactly as openpi does. 64 KiB is far more than a model
/// reads: for a refused prompt to fit in pi0.5's 200 tokens (pi0: 48), its tokens would have
/// to cover over 320 bytes each; PaliGemma's SentencePiece pieces are words and parts of
/// words, a few bytes each, so openpi cuts such a prompt too.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;

#[cfg(test)]
thread_local! {
    /// The longest text [`PromptTokenizer::encode`] was given on this thread, for tests.
    pub(crate) static LONGEST_ENCODED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The two formats of PaliGemma's tokenizer.
enum Backend {
    /// A Hugging Face `tokenizer.json`.
    HuggingFace(Box<tokenizers::Tokenizer>),
    /// A SentencePiece `.model` (what openpi loads).
    SentencePiece(Box<SentencePiece>),
}

/// A prompt tokenizer loaded from a `tokenizer.json` or a SentencePiece `.model`.
pub struct PromptTokenizer {
    backend: Backend,
    bos: u32,
}

/// A tokenized prompt of exactly `max_len` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i32>,
    pub mask: Vec<bool>,
    /// The prompt had more than `max_len` tokens and was cut (openpi logs a warning).
    pub truncated: bool,
}

impl PromptTokenizer {
    /// Loads PaliGemma's tokenizer from `path`, a `tokenizer.json` or a SentencePiece `.model`
    /// (told apart by their content: a `ModelProto` starts with its first piece, byte 0x0a;
    /// JSON with `{`). A `.model` file may hold at most [`limit::SENTENCEPIECE_MODEL`] bytes,
    /// anything else [`limit::TOKENIZER_JSON`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let is_model = path.extension().is_some_and(|e| e == "model");
        let (max, what) = if is_model {
            (limit::SENTENCEPIECE_MODEL, "SentencePiece .model")
        } else {
            (limit::TOKENIZER_JSON, "tokenizer")
        };
        let bytes = fsio::read_limited(path, max, what)?;
        let config = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let json_like = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{');
        if bytes.first() == Some(&0x0a) || !json_like {
            if bytes.len() as u64 > limit::SENTENCEPIECE_MODEL {
                return Err(config(format!(
                    "{} bytes: more than the {} a SentencePiece .model may have",
                    bytes.len(),
                    limit::SENTENCEPIECE_MODEL
                )));
            }
            match Self::from_sentencepiece(&bytes) {
                Ok(t) => return Ok(t),
                Err(e) if !json_like => {
                    return Err(config(format!(
                        "neither a SentencePiece .model nor a Hugging Face tokenizer.json (which starts with `{{`): as a .model: {e}"
                    )))
                }
                Err(_) => {}
            }
        }
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            config(format!(
                "the tokenizer.json is not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        Self::from_json(text).map_err(config)
    }

    /// A tokenizer from the text of a `tokenizer.json`; it must define PaliGemma's `<bos>`.
    /// Its added tokens are matched as SentencePiece matches the pieces they come from (see
    /// [`as_sentencepiece`]), so that it gives openpi's ids.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let mut json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("not a Hugging Face tokenizer.json: {e}"))?;
        as_sentencepiece(&mut json);
        let mut inner: tokenizers::Tokenizer = serde_json::from_value(json)
            .map_err(|e| format!("not a Hugging Face tokenizer.json: {e}"))?;
        // Control pieces (<bos>, <eos>, <pad>) in a prompt are text to SentencePiece.
        inner.set_encode_special_tokens(true);
        let bos = inner
            .token_to_id("<bos>")
            .ok_or("the tokenizer has no `<bos>` token (PaliGemma's tokenizer has it as id 2)")?;
        Ok(PromptTokenizer {
            backend: Backend::HuggingFace(Box::new(inner)),
            bos,
        })
    }

    /// A tokenizer from the bytes of a SentencePiece BPE `.model`; `<bos>` is its
    /// `trainer_spec.bos_piece`, as for SentencePiece's `encode(add_bos=True)`.
    pub fn from_sentencepiece(bytes: &[u8]) -> std::result::Result<Self, String> {
        let model = SentencePiece::from_bytes(bytes)?;
        Ok(PromptTokenizer {
            bos: model.bos_id(),
            backend: Backend::SentencePiece(Box::new(model)),
        })
    }

    /// The file format the tokenizer was read from.
    pub fn format(&self) -> &'static str {
        match self.backend {
            Backend::HuggingFace(_) => "Hugging Face tokenizer.json",
            Backend::SentencePiece(_) => "SentencePiece .model",
        }
    }

    /// The id that starts every prompt.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id of a token (a piece), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::HuggingFace(t) => t.token_to_id(token),
            Backend::SentencePiece(m) => {
                let id = m.piece_to_id(token.as_bytes());
                (id != m.unk_id() || token.as_bytes() == m.id_to_piece(id)?.as_bytes())
                    .then_some(id)
            }
        }
    }

    /// The piece of an id, if the vocabulary has it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::HuggingFace(t) => t.id_to_token(id),
            Backend::SentencePiece(m) => m.id_to_piece(id),
        }
    }

    /// The number of ids.
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::HuggingFace(t) => t.get_vocab_size(true),
            Backend::SentencePiece(m) => m.len(),
        }
    }

    /// Token ids of `text` without special tokens (SentencePiece's `encode`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        #[cfg(test)]
        LONGEST_ENCODED.with(|l| l.set(l.get().max(text.len())));
        match &self.backend {
            Backend::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Input(format!("cannot tokenize the prompt: {e}"))),
            Backend::SentencePiece(m) => m
                .encode(text)
                .map_err(|e| Error::Input(format!("cannot tokenize the prompt: {e}"))),
        }
    }

    /// openpi's `PaligemmaTokenizer.tokenize(prompt, state)`: `state` (normalised, unpadded)
    /// selects pi0.5's discrete-state format. A prompt over [`MAX_PROMPT_BYTES`] (stripped)
    /// is refused before any of it is tokenized.
    pub fn tokenize(&self, prompt: &str, state: Option<&[f64]>, max_len: usize) -> Result<Tokens> {
        let stripped = prompt.trim_matches(py_space);
        if stripped.len() > MAX_PROMPT_BYTES {
            return Err(Error::Input(format!(
                "`prompt`: {} bytes of text, more than the {MAX_PROMPT_BYTES} a prompt may have (the model reads at most {max_len} tokens)",
                stripped.len()
            )));
        }
        let mut ids = vec![self.bos];
        ids.extend(self.encode(&prompt_text(stripped, state))?);
        if state.is_none() {
            // pi0: "\n" encoded on its own, the start of the answer.
            ids.extend(self.encode("\n")?);
        }
        let ids: Vec<i32> = ids
            .into_iter()
            .map(|id| {
                i32::try_from(id)
                    .map_err(|_| Error::Input(format!("token id {id} does not fit in int32")))
            })
            .collect::<Result<_>>()?;
        Ok(pad_tokens(ids, None, max_len))
    }
}

/// Added tokens that transformers' `GemmaConverter` marks special although they are
/// user-defined symbols of Gemma's SentencePiece model (matched in text, unlike control pieces).
const USER_DEFINED_MARKED_SPECIAL: [&str; 2] = ["<start_of_turn>", "<end_of_turn>"];

/// Makes a `tokenizer.json` converted from a SentencePiece model match its added tokens as
/// SentencePiece does. A converter (transformers' `SpmConverter`) makes every control piece and
/// user-defined symbol an added token, control pieces special. Hugging Face then matches them
/// all in the raw text; SentencePiece never matches a control piece in text (so special tokens
/// are left to the model: [`tokenizers::Tokenizer::set_encode_special_tokens`]) and matches
/// user-defined symbols in the normalised text, where a space is already `▁` (so they become
/// `normalized`): `a▁` then a user-defined `▁▁▁▁` is `a`, `▁▁▁▁`, `▁` to SentencePiece.
fn as_sentencepiece(json: &mut serde_json::Value) {
    let Some(tokens) = json.get_mut("added_tokens").and_then(|t| t.as_array_mut()) else {
        return;
    };
    for t in tokens {
        let Some(t) = t.as_object_mut() else {
            continue;
        };
        let content = t.get("content").and_then(|c| c.as_str()).unwrap_or("");
        let user_defined = USER_DEFINED_MARKED_SPECIAL.contains(&content)
            || !t.get("special").and_then(|s| s.as_bool()).unwrap_or(false);
        if user_defined {
            t.insert("special".into(), false.into());
            t.insert("normalized".into(), true.into());
        }
    }
}

/// Right-pads (id 0, mask false) or truncates token ids to `max_len`; `mask` defaults to all
/// true.
pub fn pad_tokens(mut ids: Vec<i32>, mask: Option<Vec<bool>>, max_len: usize) -> Tokens {
    let mut mask = mask.unwrap_or_else(|| vec![true; ids.len()]);
    let truncated = ids.len() > max_len;
    ids.resize(max_len, 0);
    mask.resize(max_len, false);
    Tokens {
        ids,
        mask,
        truncated,
    }
}

/// Python's `str.isspace` (Rust's whitespace plus the ASCII separators 0x1c-0x1f).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `prompt.strip().replace("_", " ").replace("\n", " ")`.
pub fn clean_prompt(prompt: &str) -> String {
    prompt.trim_matches(py_space).replace(['_', '\n'], " ")
}

/// The text openpi encodes after `<bos>`: the cleaned prompt (pi0, followed by the separate
/// encoding of "\n"), or pi0.5's discrete-state prompt when `state` is given.
pub fn prompt_text(prompt: &str, state: Option<&[f64]>) -> String {
    let cleaned = clean_prompt(prompt);
    match state {
        Some(s) => discrete_state_prompt(&cleaned, s),
        None => cleaned,
    }
}

/// `np.digitize(state, bins=np.linspace(-1, 1, 257)[:-1]) - 1`: bin i covers
/// [-1 + i/128, -1 + (i+1)/128); below -1 gives -1, 1 and above give 255 (NaN gives 255).
pub fn discretize_state(state: &[f64]) -> Vec<i64> {
    state
        .iter()
        .map(|&x| {
            if x.is_nan() {
                return 255;
            }
            // The bin edges -1 + i/128 are exact in f64: count those <= x.
            (0..256i64)
                .take_while(|&i| -1.0 + i as f64 / 128.0 <= x)
                .count() as i64
                - 1
        })
        .collect()
}

/// pi0.5's prompt with the state as text.
pub fn discrete_state_prompt(cleaned: &str, state: &[f64]) -> String {
    let bins: Vec<String> = discretize_state(state)
        .iter()
        .map(|b| b.to_string())
        .collect();
    format!("Task: {cleaned}, State: {};\nAction: ", bins.join(" "))
}

/// A SentencePiece-style BPE `tokenizer.json` small enough for the small presets' 256-id
/// vocabulary (random-weight checkpoints in tests and demos): PaliGemma's special tokens,
/// `▁` for spaces, letters, digits, punctuation and a few merges.
pub fn tiny_tokenizer_json() -> String {
    let mut vocab: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "▁"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend(('a'..='z').map(String::from));
    vocab.extend(('A'..='Z').map(String::from));
    vocab.extend(('0'..='9').map(String::from));
    vocab.extend([":", ",", ";", "-", "."].iter().map(|s| s.to_string()));
    let merges = [
        ("▁", "t"),
        ("▁t", "h"),
        ("▁th", "e"),
        ("a", "s"),
        ("k", ":"),
    ];
    for (a, b) in merges {
        vocab.push(format!("{a}{b}"));
    }
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pi0_prompt_is_bos_text_newline() {
        let t = PromptTokenizer::from_json(&tiny_tokenizer_json()).unwrap();
        let toks = t.tokenize("  pick_the cup\n", None, 12).unwrap();
        // "pick the cup" -> p i c k ▁the ▁ c u p, then "\n".
        let id = |s: &str| t.token_to_id(s).unwrap() as i32;
        let want = vec![
            2,
            id("p"),
            id("i"),
            id("c"),
            id("k"),
            id("▁the"),
            id("▁"),
            id("c"),
            id("u"),
            id("p"),
            id("\n"),
            0,
        ];
        assert_eq!(toks.ids, want);
        assert_eq!(toks.mask.iter().filter(|&&m| m).count(), 11);
        assert!(!toks.truncated);
        let short = t.tokenize("pick the cup", None, 4).unwrap();
        assert_eq!(short.ids, want[..4]);
        assert!(short.truncated && short.mask.iter().all(|&m| m));
    }

    #[test]
    fn pi05_discrete_state_prompt() {
        assert_eq!(
            discretize_state(&[-1.5, -1.0, -0.995, 0.0, 0.999, 1.0, 7.0]),
            vec![-1, 0, 0, 128, 255, 255, 255]
        );
        // Bin edges: -1 + 1/128 opens bin 1.
        assert_eq!(
            discretize_state(&[-1.0 + 1.0 / 128.0, -1.0 + 0.99 / 128.0]),
            vec![1, 0]
        );
        assert_eq!(
            discrete_state_prompt("open it", &[0.0, -2.0]),
            "Task: open it, State: 128 -1;\nAction: "
        );
        let t = PromptTokenizer::from_json(&tiny_tokenizer_json()).unwrap();
        let toks = t.tokenize("go", Some(&[0.5]), 64).unwrap();
        let text = "Task: go, State: 192;\nAction: ";
        let mut want = vec![2i32];
        want.extend(t.encode(text).unwrap().iter().map(|&i| i as i32));
        let n = want.len();
        assert_eq!(&toks.ids[..n], &want[..]);
        assert!(toks.ids[n..].iter().all(|&i| i == 0));
        assert_eq!(toks.mask.iter().filter(|&&m| m).count(), n);
    }

    #[test]
    fn rejects_a_tokenizer_without_bos() {
        let json = tiny_tokenizer_json().replace("<bos>", "<start>");
        let e = PromptTokenizer::from_json(&json).err().unwrap();
        assert!(e.contains("<bos>"), "{e}");
        assert!(PromptTokenizer::from_json("{}").is_err());
        assert_eq!(clean_prompt("\u{1f} a_b\nc \t"), "a b c");
    }
}
