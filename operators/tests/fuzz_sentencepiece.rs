//! Fuzzes the SentencePiece `.model` reader and the encoder it builds: seeded byte mutations
//! (the shared mutator of fuzz_support/mod.rs, plus protobuf-aware edits: wire-type bytes,
//! lying lengths, varints of 10 bytes) of two models trained by the `sentencepiece` package
//! (tests/fixtures/sentencepiece: PaliGemma's settings, 12 KB; the `nmt_nfkc` defaults with a
//! 240 KB precompiled charsmap). Every case must end in a clear error or a model whose
//! encodings of a set of prompts hold only ids of its vocabulary, without a panic and within
//! the shared memory bound.
//!
//! `TURBOPI_FUZZ_CASES=N` (default 3000) and `TURBOPI_FUZZ_SEED=S` as for the other targets;
//! `cargo test --release -p operators --test fuzz_sentencepiece -- --nocapture` prints the
//! counts.

mod fuzz_support;

use fuzz_support::{mutate_bytes, run, CountingAlloc, Outcome, Rng};
use operators::openpi::sentencepiece::SentencePiece;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Protobuf keys and values the models hold: piece (0x0a), score (0x15), type (0x18),
/// trainer_spec (0x12), normalizer_spec (0x1a), self_test_data (0x22), varints.
const PROTO_TOKENS: &[&[u8]] = &[
    b"\x0a",
    b"\x12",
    b"\x15",
    b"\x18",
    b"\x1a",
    b"\x22",
    b"\x18\x02",
    b"\x18\x06",
    b"\x18\x05",
    b"\x0b",
    b"\x0c",
    b"\xff\xff\xff\xff\x0f",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"<0x41>",
    "\u{2581}".as_bytes(),
];

const PROMPTS: &[&str] = &[
    "",
    "pick up the red cup",
    "  two  spaces\tand a tab\n",
    "Task: open it, State: 128 0 255;\nAction: ",
    "日本語 🤖 café ½ Ｆｕｌｌ",
    "<bos><0x41>\u{0}",
];

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sentencepiece")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn fuzz_sentencepiece_model() {
    let seeds = [fixture("paligemma_like.model"), fixture("nfkc.model")];
    for s in &seeds {
        let m = SentencePiece::from_bytes(s).expect("the fixtures load");
        assert!(!m.encode(PROMPTS[1]).unwrap().is_empty());
    }
    let s = run(
        "sentencepiece",
        3000,
        |rng: &mut Rng| {
            let mut bytes = rng.pick(&seeds).clone();
            match rng.below(3) {
                0 => mutate_bytes(rng, &mut bytes, PROTO_TOKENS),
                1 => {
                    // A few bits flipped anywhere (lengths, scores, types, the charsmap).
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= 1 << rng.below(8);
                    }
                }
                _ => {
                    // A byte set to a protobuf key or a varint continuation.
                    for _ in 0..1 + rng.below(3) {
                        let i = rng.below(bytes.len());
                        bytes[i] = *rng.pick(&[0x0a, 0x12, 0x15, 0x18, 0x1a, 0x80, 0xff, 0]);
                    }
                }
            }
            bytes
        },
        |input| match SentencePiece::from_bytes(input) {
            Err(e) => {
                if e.is_empty() {
                    return Err("an empty error".into());
                }
                Ok(Outcome::Error(e))
            }
            Ok(m) => {
                for p in PROMPTS {
                    match m.encode(p) {
                        Ok(ids) => {
                            if let Some(bad) = ids.iter().find(|&&id| id as usize >= m.len()) {
                                return Err(format!(
                                    "id {bad} of {p:?} is outside the {} pieces",
                                    m.len()
                                ));
                            }
                        }
                        Err(e) => return Ok(Outcome::Error(e)),
                    }
                }
                Ok(Outcome::Valid)
            }
        },
    );
    assert!(
        s.errors > 0 && s.valid > 0,
        "{} errors, {} valid",
        s.errors,
        s.valid
    );
}
