#!/usr/bin/env python3
"""Reference tokenizations for turbo-pi's SentencePiece reader (tools/turbopi/tests/tokenizer.rs).

Trains small SentencePiece BPE models with the `sentencepiece` package on a generated corpus,
then writes what that package (the one openpi's `PaligemmaTokenizer` uses) makes of a fixed
set of strings, and what openpi's `PaligemmaTokenizer.tokenize` makes of prompts (pi0 and
pi0.5's discrete-state format), so that the Rust side can be compared id for id:

  * `paligemma`: PaliGemma's settings: BPE, byte fallback, `identity` normalisation (no
    precompiled charsmap), no dummy prefix, extra whitespace kept, digits split, whitespace-only
    pieces, user-defined symbols (newlines, tabs, a run of spaces, <loc>/<seg>-like tokens),
    <pad>=0 <eos>=1 <bos>=2 <unk>=3. Also converted to a Hugging Face `tokenizer.json` with
    transformers' `GemmaConverter` (how PaliGemma's tokenizer.json was made).
  * `nfkc`: SentencePiece's defaults: the `nmt_nfkc` precompiled charsmap, a dummy prefix,
    extra whitespace removed; byte fallback.
  * `unk`: no byte fallback (unknown characters become <unk>, runs of them one <unk>),
    whitespace as a suffix.

Usage: PYTHONPATH=target/python/sentencepiece python3 tools/openpi/sentencepiece_cases.py OUT_DIR
Writes OUT_DIR/{paligemma,nfkc,unk}.model, OUT_DIR/paligemma.tokenizer.json, OUT_DIR/cases.json
(operators/tests/fixtures/sentencepiece holds a paligemma.model and nfkc.model made by it, the
seeds of the fuzz test).
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import sentencepiece as spm

WORDS = (
    "pick up the red cup and put it in the basket open top drawer close microwave door "
    "turn on stove place bowl on plate push the button fold towel stack blocks left right "
    "wipe table pour water grasp handle slide lift lower robot arm gripper move forward back "
    "Put Pick Open Close The A LIBERO DROID ALOHA task state action"
).split()
RARE = ["café", "naïve", "Ångström", "über", "日本語", "机器人", "抓取", "杯子", "ロボット",
        "한국어", "Привет", "mañana", "½", "①", "ﬁ", "Ｆｕｌｌ", "™"]
EMOJI = ["🤖", "👍", "🍎", "🥤", "❤️", "👩‍🔬", "🇫🇷"]
USER_DEFINED = ["\n", "\n\n", "\t", "▁▁▁▁", "<loc0000>", "<loc0001>", "<seg000>", "<start_of_turn>"]


def corpus(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 14)
        words = []
        for _ in range(n):
            r = rng.random()
            if r < 0.80:
                words.append(rng.choice(WORDS))
            elif r < 0.92:
                words.append(str(rng.randint(0, 2000)))
            elif r < 0.97:
                words.append(rng.choice(",.;:!?-()"))
            else:
                words.append(rng.choice(RARE))
        sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
        lines.append(sep.join(words))
    # The discrete-state prompt openpi's pi0.5 feeds the model.
    for _ in range(300):
        bins = " ".join(str(rng.randint(-1, 255)) for _ in range(rng.randint(1, 14)))
        lines.append(f"Task: {rng.choice(WORDS)} {rng.choice(WORDS)}, State: {bins};\nAction: ")
    return lines


def train(out: str, name: str, lines: list[str], **options) -> spm.SentencePieceProcessor:
    prefix = os.path.join(out, name)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=options.pop("vocab_size", 700),
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def texts(rng: random.Random) -> list[str]:
    """The strings every model is checked on: whitespace of every kind, ▁ itself, digits,
    unknown characters (byte fallback), emoji, CJK, the user-defined symbols, control-piece
    names written as text, and random mixes of them."""
    fixed = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\t",
        "pick up the cup", " pick up the cup", "pick up the cup ", "  pick  up   the cup  ",
        "pick\tup\tthe\tcup", "pick\nup\nthe\ncup", "pick \n up", "a  b   c    d     e",
        "▁", "▁▁", "▁pick", "pick▁up", "▁ ▁", "  ▁  ",
        "0", "7", "42", "2024", "3.14159", "-1", "1,000,000", "x1y2z3", "007 bond",
        "é", "café", "naïve", "Ångström", "e\u0301", "ﬁ", "Ｆｕｌｌ", "½", "①", "™", "ℌ",
        "日本語", "机器人抓取杯子", "ロボットアーム", "한국어", "Привет мир", "مرحبا", "שלום",
        "🤖", "👍🏽", "🍎🥤", "❤️", "👩‍🔬", "🇫🇷", "robot 🤖 arm",
        "\x00", "a\x00b", "\x7f", "\u200b", "\u00a0", "a\u00a0b", "\u3000", "\u2028", "\ufeff",
        "\ufffd", "\U0010ffff", "\x1f", "\x0b\x0c",
        "<bos>", "<eos>", "<pad>", "<unk>", "<s>", "</s>", "<0x41>", "<loc0000>", "<loc0000><loc0001>",
        "<seg000> cup", "<start_of_turn>user\npick", "\t<loc0001>\n",
        "PICK UP THE RED CUP", "Pick Up The Red Cup", "pIcK uP",
        "put_the_bowl_on_the_plate", "open the top drawer and put the bowl inside",
        "Task: pick up the cup, State: 128 0 255 -1;\nAction: ",
        "Task: , State: ;\nAction: ",
        "!!!", "...", "?!", "(x)", "[1, 2, 3]", "{'a': 1}", "a-b-c", "don't", "\"quoted\"",
        "https://example.com/a?b=c", "e-mail@example.com", "C:\\path\\file", "#hashtag", "$100",
        "\\n", "\\t", "a\\nb",
    ]
    out = list(fixed)
    pieces = WORDS + RARE + EMOJI + USER_DEFINED + [" ", "  ", "\t", "\n", "▁", "0", "12", "345",
                                                    ",", ".", "_", "\u00a0", "\x00", "\r"]
    for _ in range(260):
        n = rng.randint(1, 12)
        s = ""
        for _ in range(n):
            s += rng.choice(pieces)
            r = rng.random()
            if r < 0.5:
                s += " "
            elif r < 0.6:
                s += rng.choice(["  ", "\t", "\n", ""])
        out.append(s)
    # Long prompts (cut at max_token_len by the prompt tokenizer).
    out.append(" ".join(rng.choice(WORDS) for _ in range(400)))
    out.append("🤖" * 100 + "日本語" * 50)
    return out


# openpi's PaligemmaTokenizer.tokenize (src/openpi/models/tokenizer.py), over `sp`.
def openpi_tokenize(sp: spm.SentencePieceProcessor, max_len: int, prompt: str, state):
    cleaned_text = prompt.strip().replace("_", " ").replace("\n", " ")
    if state is not None:
        discretized_state = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
        state_str = " ".join(map(str, discretized_state))
        full_prompt = f"Task: {cleaned_text}, State: {state_str};\nAction: "
        tokens = sp.encode(full_prompt, add_bos=True)
    else:
        tokens = sp.encode(cleaned_text, add_bos=True) + sp.encode("\n")
    tokens_len = len(tokens)
    if tokens_len < max_len:
        padding = [False] * (max_len - tokens_len)
        mask = [True] * tokens_len + padding
        tokens = tokens + padding
    else:
        tokens = tokens[:max_len]
        mask = [True] * max_len
    return [int(t) for t in np.asarray(tokens)], [bool(m) for m in np.asarray(mask)]


def prompts(sp: spm.SentencePieceProcessor, rng: random.Random, strings: list[str]) -> list[dict]:
    cases = []
    for i, s in enumerate(strings):
        max_len = [48, 200, 8, 1][i % 4]
        state = None
        if i % 3 == 0:
            n = rng.randint(1, 32)
            state = [rng.uniform(-1.3, 1.3) for _ in range(n)]
            if i % 9 == 0:
                state[0] = -1.0 + rng.randint(0, 256) / 128.0  # on a bin edge
        cases.append({"prompt": s, "state": state, "max_len": max_len})
    for c in cases:
        st = None if c["state"] is None else np.asarray(c["state"], dtype=np.float64)
        c["ids"], c["mask"] = openpi_tokenize(sp, c["max_len"], c["prompt"], st)
    return cases


def tokenizer_json(model: str, out: str) -> None:
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import GemmaConverter

    slow = GemmaTokenizer(vocab_file=model)
    GemmaConverter(slow).converted().save(out)


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(15)
    lines = corpus(rng)
    models = {
        "paligemma": train(
            out, "paligemma", lines,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=USER_DEFINED,
            character_coverage=0.995,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            self_test_sample_size=20,
        ),
        "nfkc": train(out, "nfkc", lines, byte_fallback=True, character_coverage=0.995),
        "unk": train(
            out, "unk", lines,
            normalization_rule_name="identity",
            character_coverage=0.98,
            treat_whitespace_as_suffix=True,
            user_defined_symbols=["<loc0000>", "\n"],
        ),
    }
    strings = texts(rng)
    cases = {
        name: [{"text": s, "ids": sp.encode(s), "pieces": sp.encode(s, out_type=str)} for s in strings]
        for name, sp in models.items()
    }
    tokenizer_json(os.path.join(out, "paligemma.model"), os.path.join(out, "paligemma.tokenizer.json"))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(
            {
                "sentencepiece": spm.__version__,
                "bos": {name: sp.bos_id() for name, sp in models.items()},
                "encode": cases,
                "openpi": prompts(models["paligemma"], rng, strings),
            },
            f,
            ensure_ascii=False,
        )
    print(f"wrote {len(strings)} strings x {len(models)} models to {out}")


if __name__ == "__main__":
    main()
