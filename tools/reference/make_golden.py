#!/usr/bin/env python3
"""Generates the golden test vectors under tests/golden/.

For every case: a small random-weight checkpoint in the layout of
docs/checkpoint.md, an observation, and the actions of the reference
implementation (tools/reference/pi_reference.py) for 10, 3 and 1 Euler steps.

All values are drawn from numpy's PCG64 with a fixed seed per case and rounded
to bfloat16 precision, so tensors stored as float32 and tensors stored as
bfloat16 hold exactly the same numbers. Vision tensors, the VLM MLP weights and
the expert attention weights are stored as bfloat16, everything else as float32.

Usage (from the repository root):
    python3 tools/reference/make_golden.py [--out tests/golden]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pi_reference as ref  # noqa: E402

STEPS = (10, 3, 1)

BASE = {
    "pi05": False,
    "action_dim": 8,
    "action_horizon": 6,
    "max_token_len": 12,
    "num_images": 3,
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 32,
    "vision_depth": 2,
    "vision_heads": 4,
    "vision_mlp_dim": 64,
    "vlm_width": 64,
    "vlm_depth": 2,
    "vlm_mlp_dim": 128,
    "expert_width": 32,
    "expert_depth": 2,
    "expert_mlp_dim": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "rms_norm_eps": 1e-6,
    "layer_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

# name -> (seed, config overrides, observation recipe)
CASES = {
    "pi0_small": (
        1001,
        {},
        {
            "image_hw": (32, 32),
            "image_masks": [True, True, False],
            "num_tokens": 12,
            "num_padded": 4,
            "state": True,
        },
    ),
    "pi05_small": (
        1002,
        {"pi05": True},
        {
            "image_hw": (40, 24),  # downscaled to 32x19, padded 6 left / 7 right
            "image_masks": [True, False, True],
            "num_tokens": 12,
            "num_padded": 3,
            "state": True,  # present but unused by pi0.5
        },
    ),
    "pi05_mqa": (
        1003,
        {"pi05": True, "num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "action_horizon": 5},
        {
            "image_hw": (20, 28),  # upscaled to 22x32, padded 5 top / 5 bottom
            "image_masks": [True, True, True],
            "num_tokens": 10,  # shorter than max_token_len, no padding
            "num_padded": 0,
            "state": False,
            "embed_alias": True,  # store the token table under the language model's embed_tokens key
        },
    ),
}


def bf16_round(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).to(torch.float32)


def stored_as_bf16(key: str) -> bool:
    return (
        key.startswith(ref.V + ".")
        or (key.startswith(ref.L + ".layers.") and ".mlp." in key)
        or (key.startswith(ref.E + ".layers.") and ".self_attn." in key)
    )


def make_weights(cfg: dict, rng: np.random.Generator) -> dict:
    """Random weights for every key of expected_shapes(cfg), scaled so activations stay O(1)."""
    weights = {}
    for key, shape in ref.expected_shapes(cfg).items():
        if key.endswith("position_embedding.weight"):
            a = rng.normal(0.0, 0.5, shape)
        elif key == ref.EMBED:
            a = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)  # times sqrt(width) when embedded
        elif key.startswith(ref.V + ".") and "layer" in key and "norm" in key and key.endswith(".weight"):
            a = 1.0 + rng.normal(0.0, 0.1, shape)  # SigLIP LayerNorm: plain multiplier
        elif key.endswith("layernorm.weight") or key.endswith("norm.weight"):
            a = rng.normal(0.0, 0.1, shape)  # Gemma RMSNorm: applied as (1 + w)
        elif key.endswith(".dense.weight"):
            a = rng.normal(0.0, 0.5 / np.sqrt(shape[1]), shape)  # adaptive norm (scale, shift, gate)
        elif key.endswith(".bias"):
            a = rng.normal(0.0, 0.05, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        weights[key] = bf16_round(a)
    # Keys openpi checkpoints carry that the policy does not use.
    ew, w = cfg["expert_width"], cfg["vlm_width"]
    weights["paligemma_with_expert.gemma_expert.lm_head.weight"] = bf16_round(
        rng.normal(0.0, 1.0 / np.sqrt(ew), (cfg["vocab_size"], ew)))
    weights[ref.L + ".norm.weight"] = bf16_round(rng.normal(0.0, 0.1, (w,)))
    return weights


def make_observation(cfg: dict, recipe: dict, rng: np.random.Generator) -> dict:
    h, w = recipe["image_hw"]
    n, n_pad = recipe["num_tokens"], recipe["num_padded"]
    tokens = rng.integers(1, cfg["vocab_size"], size=n).astype(np.int32)
    tokens[n - n_pad:] = 0
    obs = {
        "images": rng.integers(0, 256, size=(cfg["num_images"], h, w, 3), dtype=np.uint8),
        "image_masks": np.array(recipe["image_masks"], dtype=np.bool_),
        "tokens": tokens,
        "token_mask": np.arange(n) < n - n_pad,
        "noise": rng.standard_normal((cfg["action_horizon"], cfg["action_dim"])).astype(np.float32),
    }
    if recipe["state"]:
        obs["state"] = rng.standard_normal(cfg["action_dim"]).astype(np.float32)
    return obs


def write_case(out_root: str, name: str) -> None:
    seed, overrides, recipe = CASES[name]
    cfg = dict(BASE, **overrides)
    rng = np.random.default_rng(seed)
    weights = make_weights(cfg, rng)
    obs = make_observation(cfg, recipe, rng)

    case_dir = os.path.join(out_root, name)
    ckpt_dir = os.path.join(case_dir, "checkpoint")
    obs_dir = os.path.join(case_dir, "observation")
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(ckpt_dir)
    os.makedirs(obs_dir)

    stored = {}
    for key, t in weights.items():
        if recipe.get("embed_alias") and key == ref.EMBED:
            key = ref.EMBED_ALIAS
        stored[key] = t.to(torch.bfloat16) if stored_as_bf16(key) else t.clone()
    save_file(stored, os.path.join(ckpt_dir, "model.safetensors"))
    os.chmod(os.path.join(ckpt_dir, "model.safetensors"), 0o644)
    with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    for key, arr in obs.items():
        np.save(os.path.join(obs_dir, key + ".npy"), arr)

    # Run the reference from the files just written.
    rcfg, rweights = ref.load_checkpoint(ckpt_dir)
    robs = ref.load_observation(obs_dir, rcfg)
    for steps in STEPS:
        actions = ref.sample_actions(rweights, rcfg, robs, robs["noise"], steps).numpy().astype(np.float32)
        if not np.all(np.isfinite(actions)):
            raise RuntimeError(f"{name}: non-finite actions at steps={steps}")
        np.save(os.path.join(case_dir, f"actions_steps{steps}.npy"), actions)
    print(f"{name}: written to {case_dir}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--out", default=os.path.join(root, "tests", "golden"))
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (default: all)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    for name in args.case or CASES:
        write_case(args.out, name)


if __name__ == "__main__":
    main()
