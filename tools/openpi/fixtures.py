#!/usr/bin/env python3
"""Assets that make a random-weight checkpoint servable to openpi clients.

Writes, next to a checkpoint made by `turbopi checkpoint random`:
  * CHECKPOINT/tokenizer.json: a SentencePiece-style BPE tokenizer in the Hugging Face format
    (PaliGemma's special tokens <pad>=0, <eos>=1, <bos>=2, spaces as "▁", letters, digits,
    punctuation and a few merges), small enough for the small presets' 256-id vocabulary;
  * CHECKPOINT/assets/<asset_id>/norm_stats.json for openpi's LIBERO, DROID and ALOHA asset
    ids, with mean/std/q01/q99 of plausible magnitudes.

A real checkpoint uses PaliGemma's tokenizer.json and openpi's norm stats instead.

Usage: python3 tools/openpi/fixtures.py CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import os
import sys


def tokenizer() -> dict:
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "▁"]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab += [str(d) for d in range(10)]
    vocab += [":", ",", ";", "-", "."]
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("a", "s"), ("k", ":"), ("▁", "1")]
    vocab += [a + b for a, b in merges]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(vocab)},
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def stats(n: int, scale: float, offset: float) -> dict:
    mean = [offset + 0.1 * i for i in range(n)]
    std = [scale * (1.0 + 0.25 * (i % 3)) for i in range(n)]
    return {
        "mean": mean,
        "std": std,
        "q01": [m - 2.0 * s for m, s in zip(mean, std)],
        "q99": [m + 2.0 * s for m, s in zip(mean, std)],
    }


# asset id -> (state dims, action dims), as openpi's robots store them.
ASSETS = {
    "physical-intelligence/libero": (8, 7),
    "droid": (8, 8),
    "trossen": (14, 14),
}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ckpt = sys.argv[1]
    with open(os.path.join(ckpt, "tokenizer.json"), "w") as f:
        json.dump(tokenizer(), f, ensure_ascii=False)
    for asset_id, (state, actions) in ASSETS.items():
        d = os.path.join(ckpt, "assets", asset_id)
        os.makedirs(d, exist_ok=True)
        doc = {"norm_stats": {"state": stats(state, 0.5, 0.05), "actions": stats(actions, 0.2, -0.1)}}
        with open(os.path.join(d, "norm_stats.json"), "w") as f:
            json.dump(doc, f, indent=2)
    print(f"wrote {ckpt}/tokenizer.json and norm stats for {', '.join(ASSETS)}")


if __name__ == "__main__":
    main()
