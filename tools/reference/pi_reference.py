#!/usr/bin/env python3
"""Independent float32 reference implementation of pi0 / pi0.5 inference.

Plain functions over a dict of float32 CPU tensors, following the "Numerics"
section of docs/checkpoint.md. Everything runs with batch size 1 and no batch
dimension: token sequences are [seq, width], attention tensors [heads, seq, dim].

The prefix (images + prompt) is processed over the FULL sequence, including
invisible tokens (missing cameras, prompt padding), with an additive attention
mask, exactly as openpi does. `drop_invisible=True` instead removes those tokens
before the language model; both must give the same actions, which is what
allows an implementation to drop them.

CLI:
    python tools/reference/pi_reference.py --checkpoint DIR --observation DIR \
        --steps N [--seed S] [--noise-file FILE.npy] --out FILE.npy

The noise comes from the observation's noise.npy, or from --noise-file. The
reference does not reproduce the seeded noise generator of the Rust
implementation, so without either of these it stops with an error; --seed is
accepted for command-line compatibility only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file

V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
L = "paligemma_with_expert.paligemma.model.language_model"
E = "paligemma_with_expert.gemma_expert.model"
PROJ = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear"
EMBED = "paligemma_with_expert.paligemma.lm_head.weight"
EMBED_ALIAS = L + ".embed_tokens.weight"

# Additive mask value for invisible keys (openpi's constant, representable in f32).
MASK_VALUE = -2.3819763e38

CONFIG_FIELDS = {
    "pi05": bool,
    "action_dim": int,
    "action_horizon": int,
    "max_token_len": int,
    "num_images": int,
    "image_size": int,
    "patch_size": int,
    "vision_width": int,
    "vision_depth": int,
    "vision_heads": int,
    "vision_mlp_dim": int,
    "vlm_width": int,
    "vlm_depth": int,
    "vlm_mlp_dim": int,
    "expert_width": int,
    "expert_depth": int,
    "expert_mlp_dim": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "vocab_size": int,
    "rms_norm_eps": float,
    "layer_norm_eps": float,
    "rope_theta": float,
}


# --------------------------------------------------------------------------- loading


def check_config(cfg: dict) -> dict:
    out = {}
    for name, kind in CONFIG_FIELDS.items():
        if name not in cfg:
            raise ValueError(f"config.json: missing field {name!r}")
        value = cfg[name]
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"config.json: {name} must be a bool")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"config.json: {name} must be an int")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config.json: {name} must be a number")
            value = float(value)
        out[name] = value
    for name in cfg:
        if name not in CONFIG_FIELDS:
            print(f"warning: config.json: unknown field {name!r} ignored", file=sys.stderr)
    if out["vlm_depth"] != out["expert_depth"]:
        raise ValueError("vlm_depth must equal expert_depth")
    if out["num_heads"] % out["num_kv_heads"] != 0:
        raise ValueError("num_kv_heads must divide num_heads")
    if out["image_size"] % out["patch_size"] != 0:
        raise ValueError("patch_size must divide image_size")
    if out["vision_width"] % out["vision_heads"] != 0:
        raise ValueError("vision_heads must divide vision_width")
    if out["expert_width"] % 2 != 0:
        raise ValueError("expert_width must be even (time embedding)")
    return out


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """Returns (config, weights) with every tensor converted to float32."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = check_config(json.load(f))
    raw = load_file(os.path.join(path, "model.safetensors"), device="cpu")
    weights = {}
    for key, tensor in raw.items():
        if tensor.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{key}: unsupported dtype {tensor.dtype}")
        weights[key] = tensor.to(torch.float32).contiguous()
    if EMBED not in weights:
        if EMBED_ALIAS not in weights:
            raise KeyError(f"missing {EMBED} (or its alias {EMBED_ALIAS})")
        weights[EMBED] = weights[EMBED_ALIAS]
    check_shapes(weights, cfg)
    return cfg, weights


def expected_shapes(cfg: dict) -> dict:
    vw, w, ew = cfg["vision_width"], cfg["vlm_width"], cfg["expert_width"]
    nh, kv, hd = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    p, ad = cfg["patch_size"], cfg["action_dim"]
    n_patches = (cfg["image_size"] // p) ** 2
    s = {
        f"{V}.embeddings.patch_embedding.weight": [vw, 3, p, p],
        f"{V}.embeddings.patch_embedding.bias": [vw],
        f"{V}.embeddings.position_embedding.weight": [n_patches, vw],
        f"{V}.post_layernorm.weight": [vw],
        f"{V}.post_layernorm.bias": [vw],
        f"{PROJ}.weight": [w, vw],
        f"{PROJ}.bias": [w],
        EMBED: [cfg["vocab_size"], w],
        "action_in_proj.weight": [ew, ad],
        "action_in_proj.bias": [ew],
        "action_out_proj.weight": [ad, ew],
        "action_out_proj.bias": [ad],
    }
    for i in range(cfg["vision_depth"]):
        b = f"{V}.encoder.layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            s[f"{b}.{n}.weight"] = [vw]
            s[f"{b}.{n}.bias"] = [vw]
        for n in ("q", "k", "v", "out"):
            s[f"{b}.self_attn.{n}_proj.weight"] = [vw, vw]
            s[f"{b}.self_attn.{n}_proj.bias"] = [vw]
        s[f"{b}.mlp.fc1.weight"] = [cfg["vision_mlp_dim"], vw]
        s[f"{b}.mlp.fc1.bias"] = [cfg["vision_mlp_dim"]]
        s[f"{b}.mlp.fc2.weight"] = [vw, cfg["vision_mlp_dim"]]
        s[f"{b}.mlp.fc2.bias"] = [vw]
    for prefix, width, mlp, depth in ((L, w, cfg["vlm_mlp_dim"], cfg["vlm_depth"]),
                                      (E, ew, cfg["expert_mlp_dim"], cfg["expert_depth"])):
        for i in range(depth):
            b = f"{prefix}.layers.{i}"
            s[f"{b}.self_attn.q_proj.weight"] = [nh * hd, width]
            s[f"{b}.self_attn.k_proj.weight"] = [kv * hd, width]
            s[f"{b}.self_attn.v_proj.weight"] = [kv * hd, width]
            s[f"{b}.self_attn.o_proj.weight"] = [width, nh * hd]
            s[f"{b}.mlp.gate_proj.weight"] = [mlp, width]
            s[f"{b}.mlp.up_proj.weight"] = [mlp, width]
            s[f"{b}.mlp.down_proj.weight"] = [width, mlp]
            norms = ("input_layernorm", "post_attention_layernorm")
            if prefix == E and cfg["pi05"]:
                for n in norms:
                    s[f"{b}.{n}.dense.weight"] = [3 * ew, ew]
                    s[f"{b}.{n}.dense.bias"] = [3 * ew]
            else:
                for n in norms:
                    s[f"{b}.{n}.weight"] = [width]
    if cfg["pi05"]:
        s[f"{E}.norm.dense.weight"] = [3 * ew, ew]
        s[f"{E}.norm.dense.bias"] = [3 * ew]
        for n in ("time_mlp_in", "time_mlp_out"):
            s[f"{n}.weight"] = [ew, ew]
            s[f"{n}.bias"] = [ew]
    else:
        s[f"{E}.norm.weight"] = [ew]
        s["state_proj.weight"] = [ew, ad]
        s["state_proj.bias"] = [ew]
        s["action_time_mlp_in.weight"] = [ew, 2 * ew]
        s["action_time_mlp_in.bias"] = [ew]
        s["action_time_mlp_out.weight"] = [ew, ew]
        s["action_time_mlp_out.bias"] = [ew]
    return s


def check_shapes(weights: dict, cfg: dict) -> None:
    for key, shape in expected_shapes(cfg).items():
        if key not in weights:
            raise KeyError(f"checkpoint is missing {key}")
        if list(weights[key].shape) != shape:
            raise ValueError(f"{key}: shape {list(weights[key].shape)}, expected {shape}")


def load_observation(path: str, cfg: dict) -> dict:
    def npy(name, required=True):
        f = os.path.join(path, name)
        if not os.path.exists(f):
            if required:
                raise FileNotFoundError(f"observation: missing {name}")
            return None
        return np.load(f, allow_pickle=False)

    images = npy("images.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images.npy: want u8 [num_images, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[0] != cfg["num_images"]:
        raise ValueError(f"images.npy: {images.shape[0]} images, config says {cfg['num_images']}")
    image_masks = npy("image_masks.npy")
    if image_masks.dtype != np.bool_ or image_masks.shape != (cfg["num_images"],):
        raise ValueError(f"image_masks.npy: want bool [{cfg['num_images']}], got {image_masks.dtype} {image_masks.shape}")
    tokens = npy("tokens.npy")
    if tokens.dtype != np.int32 or tokens.ndim != 1 or tokens.shape[0] > cfg["max_token_len"]:
        raise ValueError(f"tokens.npy: want i32 [L<= {cfg['max_token_len']}], got {tokens.dtype} {tokens.shape}")
    if np.any(tokens < 0) or np.any(tokens >= cfg["vocab_size"]):
        raise ValueError("tokens.npy: token id out of range")
    token_mask = npy("token_mask.npy")
    if token_mask.dtype != np.bool_ or token_mask.shape != tokens.shape:
        raise ValueError(f"token_mask.npy: want bool {tokens.shape}, got {token_mask.dtype} {token_mask.shape}")
    state = npy("state.npy", required=not cfg["pi05"])
    if state is not None and (state.dtype != np.float32 or state.shape != (cfg["action_dim"],)):
        raise ValueError(f"state.npy: want f32 [{cfg['action_dim']}], got {state.dtype} {state.shape}")
    noise = npy("noise.npy", required=False)
    want = (cfg["action_horizon"], cfg["action_dim"])
    if noise is not None and (noise.dtype != np.float32 or noise.shape != want):
        raise ValueError(f"noise.npy: want f32 {list(want)}, got {noise.dtype} {noise.shape}")
    return {
        "images": torch.from_numpy(images.copy()),
        "image_masks": torch.from_numpy(image_masks.copy()),
        "tokens": torch.from_numpy(tokens.astype(np.int64)),
        "token_mask": torch.from_numpy(token_mask.copy()),
        "state": None if state is None else torch.from_numpy(state.copy()),
        "noise": None if noise is None else torch.from_numpy(noise.copy()),
    }


# --------------------------------------------------------------------------- images


def preprocess_images(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """u8 [N, H, W, 3] -> f32 [N, 3, size, size] in [-1, 1]."""
    x = images_u8.to(torch.float32) / 255.0 * 2.0 - 1.0
    x = x.permute(0, 3, 1, 2).contiguous()
    h, w = x.shape[2], x.shape[3]
    if (h, w) == (size, size):
        return x
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=False)
    x = x.clamp(-1.0, 1.0)
    top, left = (size - rh) // 2, (size - rw) // 2
    return F.pad(x, (left, size - rw - left, top, size - rh - top), mode="constant", value=-1.0)


# --------------------------------------------------------------------------- building blocks


def linear(x, weights, name, bias=True):
    return F.linear(x, weights[name + ".weight"], weights[name + ".bias"] if bias else None)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def rms_normalize(x, eps):
    var = torch.mean(x * x, dim=-1, keepdim=True)
    return x * torch.rsqrt(var + eps)


def rms_norm(x, w, eps):
    return rms_normalize(x, eps) * (1.0 + w)


def attention(q, k, v, visible):
    """q [nh, S, hd], k/v [kv, T, hd], visible bool [S, T] -> [S, nh*hd].

    GQA: query head h reads kv head h // (nh / kv).
    """
    nh, s, hd = q.shape
    rep = nh // k.shape[0]
    k = k.repeat_interleave(rep, dim=0)
    v = v.repeat_interleave(rep, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * (hd ** -0.5)
    bias = torch.where(visible, torch.tensor(0.0), torch.tensor(MASK_VALUE, dtype=torch.float32))
    probs = torch.softmax(scores + bias[None], dim=-1)
    out = torch.matmul(probs, v)  # [nh, S, hd]
    return out.transpose(0, 1).reshape(s, nh * hd)


def rope_cos_sin(positions, head_dim, theta):
    """positions int [S] -> cos, sin f32 [S, head_dim] (half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angle = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """x [heads, S, hd]; (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None] + rotated * sin[None]


def split_heads(x, n, hd):
    """[S, n*hd] -> [n, S, hd]."""
    return x.reshape(x.shape[0], n, hd).transpose(0, 1)


# --------------------------------------------------------------------------- SigLIP + prefix


def siglip(weights, cfg, images):
    """images f32 [N, 3, size, size] in [-1, 1] -> projected image tokens [N, n_patches, vlm_width]."""
    vw, heads, eps = cfg["vision_width"], cfg["vision_heads"], cfg["layer_norm_eps"]
    hd = vw // heads
    x = F.conv2d(images, weights[f"{V}.embeddings.patch_embedding.weight"],
                 weights[f"{V}.embeddings.patch_embedding.bias"], stride=cfg["patch_size"])
    x = x.flatten(2).transpose(1, 2)  # [N, n_patches, vw], row-major patches
    x = x + weights[f"{V}.embeddings.position_embedding.weight"][None]
    n, t, _ = x.shape
    for i in range(cfg["vision_depth"]):
        b = f"{V}.encoder.layers.{i}"
        h = F.layer_norm(x, (vw,), weights[f"{b}.layer_norm1.weight"], weights[f"{b}.layer_norm1.bias"], eps)
        q = linear(h, weights, f"{b}.self_attn.q_proj").reshape(n, t, heads, hd).transpose(1, 2)
        k = linear(h, weights, f"{b}.self_attn.k_proj").reshape(n, t, heads, hd).transpose(1, 2)
        v = linear(h, weights, f"{b}.self_attn.v_proj").reshape(n, t, heads, hd).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5)
        a = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(n, t, vw)
        x = x + linear(a, weights, f"{b}.self_attn.out_proj")
        h = F.layer_norm(x, (vw,), weights[f"{b}.layer_norm2.weight"], weights[f"{b}.layer_norm2.bias"], eps)
        x = x + linear(gelu_tanh(linear(h, weights, f"{b}.mlp.fc1")), weights, f"{b}.mlp.fc2")
    x = F.layer_norm(x, (vw,), weights[f"{V}.post_layernorm.weight"], weights[f"{V}.post_layernorm.bias"], eps)
    return linear(x, weights, PROJ)


def embed_prefix(weights, cfg, obs):
    """-> (tokens f32 [P, vlm_width], real bool [P]) over the full prefix."""
    images = preprocess_images(obs["images"], cfg["image_size"])
    img_tokens = siglip(weights, cfg, images)  # [N, n_patches, w]
    n, t, w = img_tokens.shape
    lang = weights[EMBED][obs["tokens"]] * math.sqrt(cfg["vlm_width"])
    embs = torch.cat([img_tokens.reshape(n * t, w), lang], dim=0)
    real = torch.cat([obs["image_masks"].repeat_interleave(t), obs["token_mask"]], dim=0)
    return embs, real


def gemma_mlp(x, weights, b):
    gate = F.linear(x, weights[f"{b}.mlp.gate_proj.weight"])
    up = F.linear(x, weights[f"{b}.mlp.up_proj.weight"])
    return F.linear(gelu_tanh(gate) * up, weights[f"{b}.mlp.down_proj.weight"])


def prefix_kv_cache(weights, cfg, embs, real):
    """Runs the VLM over the prefix; returns per-layer (K after RoPE, V), each [kv, P, hd].

    Attention is bidirectional among real tokens; invisible tokens are masked as keys.
    Positions are cumsum(real) - 1.
    """
    nh, kv, hd, eps = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    positions = torch.cumsum(real.to(torch.int64), dim=0) - 1
    cos, sin = rope_cos_sin(positions, hd, cfg["rope_theta"])
    visible = real[None, :] & real[:, None]
    x = embs
    cache = []
    for i in range(cfg["vlm_depth"]):
        b = f"{L}.layers.{i}"
        h = rms_norm(x, weights[f"{b}.input_layernorm.weight"], eps)
        q = apply_rope(split_heads(F.linear(h, weights[f"{b}.self_attn.q_proj.weight"]), nh, hd), cos, sin)
        k = apply_rope(split_heads(F.linear(h, weights[f"{b}.self_attn.k_proj.weight"]), kv, hd), cos, sin)
        v = split_heads(F.linear(h, weights[f"{b}.self_attn.v_proj.weight"]), kv, hd)
        cache.append((k, v))
        x = x + F.linear(attention(q, k, v, visible), weights[f"{b}.self_attn.o_proj.weight"])
        h = rms_norm(x, weights[f"{b}.post_attention_layernorm.weight"], eps)
        x = x + gemma_mlp(h, weights, b)
    return cache


# --------------------------------------------------------------------------- expert / suffix


def time_embedding(t, width):
    """t: f32 scalar tensor -> f32 [width]; computed in float64 and cast to float32."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    arg = (1.0 / period * 2 * math.pi) * t.to(torch.float64)
    return torch.cat([torch.sin(arg), torch.cos(arg)]).to(torch.float32)


def embed_suffix(weights, cfg, state, x_t, t):
    """-> (tokens [S, ew], block_starts list[bool] length S, cond [ew] or None)."""
    ew, horizon = cfg["expert_width"], cfg["action_horizon"]
    temb = time_embedding(t, ew)
    act = linear(x_t, weights, "action_in_proj")  # [H, ew]
    if cfg["pi05"]:
        cond = F.silu(linear(F.silu(linear(temb, weights, "time_mlp_in")), weights, "time_mlp_out"))
        return act, [True] + [False] * (horizon - 1), cond
    st = linear(state, weights, "state_proj")[None]  # [1, ew]
    at = torch.cat([act, temb[None].expand(horizon, ew)], dim=-1)
    at = linear(F.silu(linear(at, weights, "action_time_mlp_in")), weights, "action_time_mlp_out")
    return torch.cat([st, at], dim=0), [True, True] + [False] * (horizon - 1), None


def expert_norm(x, weights, name, cond, eps):
    """-> (normed, gate or None). `name` is the norm's key prefix."""
    if cond is None:
        return rms_norm(x, weights[name + ".weight"], eps), None
    mod = linear(cond, weights, name + ".dense")
    scale, shift, gate = torch.chunk(mod, 3, dim=-1)
    return rms_normalize(x, eps) * (1.0 + scale) + shift, gate


def expert_forward(weights, cfg, tokens, block_starts, cond, cache, prefix_real):
    """Runs the action expert on the suffix; returns the final-normed hidden states [S, ew]."""
    nh, kv, hd, eps = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    s = tokens.shape[0]
    n_real = int(prefix_real.sum())
    positions = n_real + torch.arange(s, dtype=torch.int64)
    cos, sin = rope_cos_sin(positions, hd, cfg["rope_theta"])
    block = torch.cumsum(torch.tensor(block_starts, dtype=torch.int64), dim=0)
    suffix_visible = block[None, :] <= block[:, None]  # block-causal
    visible = torch.cat([prefix_real[None, :].expand(s, -1), suffix_visible], dim=1)
    x = tokens
    for i in range(cfg["expert_depth"]):
        b = f"{E}.layers.{i}"
        h, gate = expert_norm(x, weights, f"{b}.input_layernorm", cond, eps)
        q = apply_rope(split_heads(F.linear(h, weights[f"{b}.self_attn.q_proj.weight"]), nh, hd), cos, sin)
        k = apply_rope(split_heads(F.linear(h, weights[f"{b}.self_attn.k_proj.weight"]), kv, hd), cos, sin)
        v = split_heads(F.linear(h, weights[f"{b}.self_attn.v_proj.weight"]), kv, hd)
        pk, pv = cache[i]
        a = attention(q, torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1), visible)
        y = F.linear(a, weights[f"{b}.self_attn.o_proj.weight"])
        x = x + (y if gate is None else y * gate)
        h, gate = expert_norm(x, weights, f"{b}.post_attention_layernorm", cond, eps)
        y = gemma_mlp(h, weights, b)
        x = x + (y if gate is None else y * gate)
    out, _ = expert_norm(x, weights, f"{E}.norm", cond, eps)
    return out


def denoise_step(weights, cfg, cache, prefix_real, state, x_t, t):
    """Velocity v(x_t, t), f32 [H, action_dim]."""
    tokens, block_starts, cond = embed_suffix(weights, cfg, state, x_t, t)
    out = expert_forward(weights, cfg, tokens, block_starts, cond, cache, prefix_real)
    return linear(out[-cfg["action_horizon"]:], weights, "action_out_proj")


def build_prefix(weights, cfg, obs, drop_invisible=False):
    """-> (cache, prefix_real). With drop_invisible, invisible tokens are removed first."""
    embs, real = embed_prefix(weights, cfg, obs)
    if drop_invisible:
        embs, real = embs[real], real[real]
    return prefix_kv_cache(weights, cfg, embs, real), real


@torch.no_grad()
def sample_actions(weights, cfg, obs, noise, steps, drop_invisible=False):
    """Euler integration from t=1 to t=0 in exactly `steps` steps -> f32 [H, action_dim]."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    state = obs.get("state")
    if not cfg["pi05"] and state is None:
        raise ValueError("pi0 needs state.npy")
    cache, real = build_prefix(weights, cfg, obs, drop_invisible)
    x = noise.to(torch.float32).clone()
    t = torch.tensor(1.0, dtype=torch.float32)
    dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
    for _ in range(steps):
        v = denoise_step(weights, cfg, cache, real, state, x, t)
        x = x + dt * v
        t = t + dt
    return x


# --------------------------------------------------------------------------- CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--observation", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None,
                    help="accepted for compatibility; seeded noise is not reproduced (use noise.npy or --noise-file)")
    ap.add_argument("--noise-file", default=None, help="f32 [action_horizon, action_dim] .npy, overrides noise.npy")
    ap.add_argument("--drop-invisible", action="store_true", help="remove invisible prefix tokens before the VLM")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    torch.set_grad_enabled(False)
    cfg, weights = load_checkpoint(args.checkpoint)
    obs = load_observation(args.observation, cfg)
    noise = obs["noise"]
    if args.noise_file is not None:
        arr = np.load(args.noise_file, allow_pickle=False)
        want = (cfg["action_horizon"], cfg["action_dim"])
        if arr.dtype != np.float32 or arr.shape != want:
            raise SystemExit(f"--noise-file: want f32 {list(want)}, got {arr.dtype} {arr.shape}")
        noise = torch.from_numpy(arr.copy())
    if noise is None:
        raise SystemExit("no noise: the observation has no noise.npy and no --noise-file was given "
                         "(the reference does not reproduce the Rust seeded noise generator)")
    actions = sample_actions(weights, cfg, obs, noise, args.steps, drop_invisible=args.drop_invisible)
    out = actions.numpy().astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise SystemExit("non-finite actions")
    np.save(args.out, out)


if __name__ == "__main__":
    main()
