//! PaliGemma's tokenizer in both formats against the `sentencepiece` package that openpi uses:
//! tools/openpi/sentencepiece_cases.py trains SentencePiece BPE models (PaliGemma's settings,
//! plus an NFKC charsmap model and one without byte fallback), converts the PaliGemma-like one
//! to a `tokenizer.json` with transformers' `GemmaConverter`, and writes the ids that
//! `sentencepiece` 0.2.1 and openpi's `PaligemmaTokenizer.tokenize` give for a few hundred
//! strings. The `.model` read natively and the `tokenizer.json` must give the same ids.
//!
//! The Python packages come from target/python/sentencepiece (tools/test.sh installs them
//! with pip; SENTENCEPIECE_PYTHONPATH overrides the folder).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use operators::openpi::sentencepiece::SentencePiece;
use operators::openpi::tokenizer::PromptTokenizer;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cases, made once per test binary in cargo's temp folder.
fn cases() -> &'static (PathBuf, Value) {
    static CASES: OnceLock<(PathBuf, Value)> = OnceLock::new();
    CASES.get_or_init(|| {
        let py = std::env::var_os("SENTENCEPIECE_PYTHONPATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target/python/sentencepiece"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sentencepiece_cases");
        let out = Command::new("python3")
            .arg(root().join("tools/openpi/sentencepiece_cases.py"))
            .arg(&dir)
            .env("PYTHONPATH", &py)
            .output()
            .expect("python3 is required");
        assert!(
            out.status.success(),
            "tools/openpi/sentencepiece_cases.py failed (sentencepiece, transformers and tokenizers must be importable from {}: run tools/test.sh, which installs them with pip):\n{}",
            py.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["sentencepiece"], "0.2.1", "the pinned sentencepiece");
        (dir, v)
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

fn show(s: &str) -> String {
    let s: String = s.chars().take(80).collect();
    format!("{s:?}")
}

#[test]
fn sentencepiece_models_match_the_sentencepiece_package() {
    let (dir, v) = cases();
    let encode = v["encode"].as_object().unwrap();
    assert_eq!(encode.len(), 3);
    for (name, cases) in encode {
        let path = dir.join(format!("{name}.model"));
        let bytes = std::fs::read(&path).unwrap();
        let model = SentencePiece::from_bytes(&bytes).unwrap();
        assert_eq!(
            model.bos_id() as u64,
            v["bos"][name].as_u64().unwrap(),
            "{name}"
        );
        let tok = PromptTokenizer::from_file(&path).unwrap();
        assert_eq!(tok.format(), "SentencePiece .model");
        let cases = cases.as_array().unwrap();
        assert!(cases.len() >= 200, "{name}: {} strings", cases.len());
        let mut bad = Vec::new();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want = ids(&c["ids"]);
            let found = tok.encode(text).unwrap();
            let pieces: Vec<String> = model
                .encode_pieces(text)
                .unwrap()
                .into_iter()
                .map(|(p, _)| String::from_utf8_lossy(&p).into_owned())
                .collect();
            let want_pieces: Vec<String> = c["pieces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            if found != want || pieces != want_pieces {
                bad.push(format!(
                    "{}:\n  sentencepiece {want:?} {want_pieces:?}\n  turbo-pi      {found:?} {pieces:?}",
                    show(text)
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{name}.model: {} of {} strings differ:\n{}",
            bad.len(),
            cases.len(),
            bad[..bad.len().min(10)].join("\n")
        );
    }
    // What the strings cover (see texts() in the helper).
    let texts: Vec<&str> = encode["paligemma"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    for (what, has) in [
        ("the empty string", texts.contains(&"")),
        ("leading spaces", texts.iter().any(|t| t.starts_with("  p"))),
        ("trailing spaces", texts.iter().any(|t| t.ends_with("cup "))),
        ("tabs", texts.iter().any(|t| t.contains('\t'))),
        ("newlines", texts.iter().any(|t| t.contains('\n'))),
        ("▁", texts.iter().any(|t| t.contains('▁'))),
        ("digits", texts.iter().any(|t| t.contains("2024"))),
        ("emoji", texts.iter().any(|t| t.contains('🤖'))),
        ("CJK", texts.iter().any(|t| t.contains('机'))),
        ("long prompts", texts.iter().any(|t| t.len() > 1000)),
    ] {
        assert!(has, "no string with {what}");
    }
    // The PaliGemma-like model falls back to bytes and uses its user-defined symbols.
    let pal = &encode["paligemma"];
    let model =
        SentencePiece::from_bytes(&std::fs::read(dir.join("paligemma.model")).unwrap()).unwrap();
    let used: Vec<u32> = pal
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| ids(&c["ids"]))
        .collect();
    let byte = model.piece_to_id(b"<0xF0>");
    assert!(used.contains(&byte), "no emoji byte fallback in the cases");
    assert!(used.contains(&model.piece_to_id(b"\n")));
    let unk = &encode["unk"];
    assert!(
        unk.as_array()
            .unwrap()
            .iter()
            .any(|c| ids(&c["ids"]).contains(&0)),
        "no <unk> in the cases of the model without byte fallback"
    );
}

#[test]
fn tokenizer_json_gives_the_same_ids_as_the_model() {
    let (dir, v) = cases();
    let path = dir.join("paligemma.tokenizer.json");
    let tok = PromptTokenizer::from_file(&path).unwrap();
    assert_eq!(tok.format(), "Hugging Face tokenizer.json");
    let cases = v["encode"]["paligemma"].as_array().unwrap();
    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let found = tok.encode(text).unwrap();
        if found != want {
            bad.push(format!(
                "{}: sentencepiece {want:?}, tokenizer.json {found:?}",
                show(text)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} strings differ:\n{}",
        bad.len(),
        cases.len(),
        bad[..bad.len().min(10)].join("\n")
    );
}

/// openpi's `PaligemmaTokenizer.tokenize` (pi0: `<bos>` prompt "\n"; pi0.5: the discrete-state
/// prompt), cut or padded to max_token_len, through both formats.
#[test]
fn prompts_match_openpis_paligemma_tokenizer() {
    let (dir, v) = cases();
    let prompts = v["openpi"].as_array().unwrap();
    assert!(prompts.len() >= 200, "{} prompts", prompts.len());
    let with_state = prompts.iter().filter(|c| !c["state"].is_null()).count();
    assert!(with_state >= 50, "{with_state} pi0.5 state prompts");
    let mut truncated = 0;
    for file in ["paligemma.model", "paligemma.tokenizer.json"] {
        let tok = PromptTokenizer::from_file(&dir.join(file)).unwrap();
        let mut bad = Vec::new();
        for c in prompts {
            let prompt = c["prompt"].as_str().unwrap();
            let max_len = c["max_len"].as_u64().unwrap() as usize;
            let state: Option<Vec<f64>> = c["state"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect());
            let t = tok.tokenize(prompt, state.as_deref(), max_len).unwrap();
            let want: Vec<i32> = ids(&c["ids"]).into_iter().map(|i| i as i32).collect();
            let mask: Vec<bool> = c["mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_bool().unwrap())
                .collect();
            truncated += t.truncated as usize;
            if t.ids != want || t.mask != mask {
                bad.push(format!(
                    "{} state {state:?} max_len {max_len}:\n  openpi    {want:?} {mask:?}\n  turbo-pi  {:?} {:?}",
                    show(prompt),
                    t.ids,
                    t.mask
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{file}: {} of {} prompts differ:\n{}",
            bad.len(),
            prompts.len(),
            bad[..bad.len().min(10)].join("\n")
        );
    }
    assert!(
        truncated >= 20,
        "only {truncated} prompts were cut at max_len"
    );
}

fn turbopi(args: &[&str], cache: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_turbopi"))
        .args(args)
        .env("OPENPI_DATA_HOME", cache)
        .output()
        .expect("the turbopi binary runs")
}

/// `turbopi tokenize` prints what the server feeds the model, and finds the tokenizer where
/// openpi keeps it.
#[test]
fn tokenize_command_prints_ids_and_mask() {
    let (dir, v) = cases();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("openpi");
    let model = dir.join("paligemma.model");
    let model_s = model.to_str().unwrap();
    let prompts = v["openpi"].as_array().unwrap();
    let mut checked = 0;
    for c in prompts.iter().filter(|c| {
        let p = c["prompt"].as_str().unwrap();
        !p.is_empty() && !p.starts_with('-') && p.len() < 2000
    }) {
        let max_len = c["max_len"].as_u64().unwrap().to_string();
        let state = c["state"].as_array().map(|a| {
            let s: Vec<String> = a.iter().map(|x| x.as_f64().unwrap().to_string()).collect();
            format!("--state={}", s.join(","))
        });
        let mut args = vec!["tokenize", "--tokenizer", model_s, "--max-len", &max_len];
        if let Some(s) = &state {
            args.push(s);
        }
        args.push("--");
        args.push(c["prompt"].as_str().unwrap());
        let out = turbopi(&args, &cache);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["ids"], c["ids"], "{args:?}");
        assert_eq!(got["mask"], c["mask"], "{args:?}");
        assert_eq!(got["format"], "SentencePiece .model");
        checked += 1;
        if checked == 12 {
            break;
        }
    }
    assert_eq!(checked, 12);
    // pi0.5's prompt and its pieces.
    let out = turbopi(
        &[
            "tokenize",
            "--tokenizer",
            model_s,
            "--pi05",
            "--state=-1.5,0,0.999",
            "pick_up the cup\n",
        ],
        &cache,
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got["text"],
        "Task: pick up the cup, State: -1 128 255;\nAction: "
    );
    assert_eq!(got["ids"].as_array().unwrap().len(), 200);
    assert_eq!(got["pieces"][0], "<bos>");
    // Without --tokenizer: openpi's cache, then an error naming every place looked at.
    let out = turbopi(
        &[
            "tokenize",
            "--checkpoint",
            tmp.path().to_str().unwrap(),
            "hi",
        ],
        &cache,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for p in [
        tmp.path().join("tokenizer.json"),
        tmp.path().join("paligemma_tokenizer.model"),
        cache.join("big_vision/paligemma_tokenizer.model"),
    ] {
        assert!(err.contains(&p.display().to_string()), "{err}");
    }
    std::fs::create_dir_all(cache.join("big_vision")).unwrap();
    std::fs::copy(&model, cache.join("big_vision/paligemma_tokenizer.model")).unwrap();
    let out = turbopi(&["tokenize", "hi"], &cache);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        got["tokenizer"],
        cache
            .join("big_vision/paligemma_tokenizer.model")
            .to_str()
            .unwrap()
    );
    // A file that is neither format is named.
    let junk = tmp.path().join("junk.bin");
    std::fs::write(&junk, b"\x01\x02junk").unwrap();
    let out = turbopi(
        &["tokenize", "--tokenizer", junk.to_str().unwrap(), "hi"],
        &cache,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("junk.bin: neither a SentencePiece .model nor a Hugging Face tokenizer.json"),
        "{err}"
    );
}
