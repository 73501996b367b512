#!/usr/bin/env python3
"""Self-consistency checks of the reference implementation and the golden vectors.

Usage (from the repository root):
    python3 tools/reference/check_reference.py [--golden tests/golden]

Checks, per golden case:
  * the stored actions are reproduced from the files on disk (in-process and via the CLI);
  * dropping invisible prefix tokens before the VLM gives the same actions;
  * the content of invisible tokens (pixels of masked cameras, ids of padded tokens) has
    no influence on the actions, while visible pixels and tokens (and pi0's state) do;
  * every float32-stored tensor holds a bfloat16-representable value, both dtypes occur,
    and the stored weights equal the generator's (bf16-rounded) values exactly;
  * the actions are finite, differ from the noise, and differ between 1 and 10 steps;
  * evaluating everything in float64 changes the actions by less than 5e-6;
and globally:
  * openpi's loop condition `while t >= -dt/2` runs exactly `steps` times (f32) for 1..1000 steps;
  * the image resize matches an independent numpy bilinear (align_corners=False) resampler;
  * RoPE and the time embedding match independent float64 numpy formulas.
Exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_golden  # noqa: E402
import pi_reference as ref  # noqa: E402

FAILURES = []


def check(cond, msg):
    print(("ok    " if cond else "FAIL  ") + msg)
    if not cond:
        FAILURES.append(msg)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_case(golden, name):
    print(f"== {name}")
    case = os.path.join(golden, name)
    ckpt, obs_dir = os.path.join(case, "checkpoint"), os.path.join(case, "observation")
    cfg, weights = ref.load_checkpoint(ckpt)
    obs = ref.load_observation(obs_dir, cfg)
    noise = obs["noise"]

    results = {}
    for steps in make_golden.STEPS:
        stored = np.load(os.path.join(case, f"actions_steps{steps}.npy"))
        got = ref.sample_actions(weights, cfg, obs, noise, steps).numpy()
        results[steps] = got
        d = max_diff(got, stored)
        check(d <= 1e-6, f"steps={steps}: reproduces stored actions (max |diff| {d:.3g})")
        check(bool(np.all(np.isfinite(stored))), f"steps={steps}: finite")

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "a.npy")
        subprocess.run([sys.executable, os.path.join(HERE, "pi_reference.py"), "--checkpoint", ckpt,
                        "--observation", obs_dir, "--steps", "10", "--out", out], check=True)
        d = max_diff(np.load(out), results[10])
        check(d <= 1e-6, f"CLI steps=10 matches (max |diff| {d:.3g})")

    # Dropping invisible tokens.
    real = torch.cat([obs["image_masks"].repeat_interleave((cfg["image_size"] // cfg["patch_size"]) ** 2),
                      obs["token_mask"]])
    n_invisible = int((~real).sum())
    for steps in (10, 1):
        dropped = ref.sample_actions(weights, cfg, obs, noise, steps, drop_invisible=True).numpy()
        d = max_diff(dropped, results[steps])
        check(d <= 2e-6, f"steps={steps}: dropping {n_invisible} invisible tokens, max |diff| {d:.3g}")

    # Invisible content has no influence.
    if n_invisible:
        obs2 = dict(obs)
        images = obs["images"].clone()
        images[~obs["image_masks"]] = 255 - images[~obs["image_masks"]]
        tokens = obs["tokens"].clone()
        tokens[~obs["token_mask"]] = cfg["vocab_size"] - 1
        obs2["images"], obs2["tokens"] = images, tokens
        other = ref.sample_actions(weights, cfg, obs2, noise, 10).numpy()
        d = max_diff(other, results[10])
        check(d <= 1e-6, f"changed invisible pixels/tokens: max |diff| {d:.3g}")

    # Visible content matters: the first camera and the first prompt token.
    obs4 = dict(obs)
    images = obs["images"].clone()
    images[0] = 255 - images[0]
    obs4["images"] = images
    d_img = max_diff(ref.sample_actions(weights, cfg, obs4, noise, 3).numpy(), results[3])
    obs4 = dict(obs)
    tokens = obs["tokens"].clone()
    tokens[0] = (tokens[0] + 1) % cfg["vocab_size"]
    obs4["tokens"] = tokens
    d_tok = max_diff(ref.sample_actions(weights, cfg, obs4, noise, 3).numpy(), results[3])
    check(d_img > 1e-3 and d_tok > 1e-3,
          f"visible image / token content matters (max |diff| {d_img:.3g} / {d_tok:.3g})")

    # pi0.5 ignores the state.
    if cfg["pi05"]:
        obs3 = dict(obs)
        obs3["state"] = None
        d = max_diff(ref.sample_actions(weights, cfg, obs3, noise, 3).numpy(), results[3])
        check(d == 0.0, f"pi0.5: state has no influence (max |diff| {d:.3g})")
    else:
        obs3 = dict(obs)
        obs3["state"] = obs["state"] + 1.0
        d = max_diff(ref.sample_actions(weights, cfg, obs3, noise, 3).numpy(), results[3])
        check(d > 1e-3, f"pi0: state matters (max |diff| {d:.3g})")

    # Conditioning: the same computation in float64 (RoPE angles and time embedding as specified).
    d = max_diff(float64_actions(weights, cfg, obs, 10), results[10])
    check(d <= 5e-6, f"float64 evaluation agrees with float32 (max |diff| {d:.3g})")

    # Storage dtypes and exact bf16 values.
    seed, overrides, recipe = make_golden.CASES[name]
    gen = make_golden.make_weights(dict(make_golden.BASE, **overrides), np.random.default_rng(seed))
    dtypes = {}
    exact = True
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
            if t.dtype == torch.float32 and not torch.equal(t.to(torch.bfloat16).to(torch.float32), t):
                exact = False
            gkey = ref.EMBED if key == ref.EMBED_ALIAS else key
            if not torch.equal(t.to(torch.float32), gen[gkey]):
                exact = False
    check(exact and len(dtypes) == 2,
          f"weights bf16-exact and mixed ({', '.join(f'{k}: {v}' for k, v in dtypes.items())})")

    # The velocity matters.
    n = noise.numpy()
    rel = [np.linalg.norm(results[s] - n) / np.linalg.norm(n) for s in (10, 1)]
    d110 = max_diff(results[1], results[10])
    check(min(rel) > 0.05 and d110 > 1e-3,
          f"actions move away from noise (|a10-n|/|n| {rel[0]:.3f}, |a1-n|/|n| {rel[1]:.3f}), "
          f"steps 1 vs 10 max |diff| {d110:.3f}")
    print(f"      actions_steps10 range [{results[10].min():.3f}, {results[10].max():.3f}], "
          f"std {results[10].std():.3f}")


def float64_actions(weights, cfg, obs, steps):
    pre, temb = ref.preprocess_images, ref.time_embedding
    ref.preprocess_images = lambda *a: pre(*a).double()
    ref.time_embedding = lambda *a: temb(*a).double()
    try:
        w64 = {k: v.double() for k, v in weights.items()}
        state = None if obs["state"] is None else obs["state"].double()
        cache, real = ref.build_prefix(w64, cfg, obs)
        x = obs["noise"].double()
        t = torch.tensor(1.0, dtype=torch.float32)
        dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
        for _ in range(steps):
            x = x + dt.double() * ref.denoise_step(w64, cfg, cache, real, state, x, t)
            t = t + dt
        return x.numpy()
    finally:
        ref.preprocess_images, ref.time_embedding = pre, temb


def check_loop_count():
    bad = []
    for steps in range(1, 1001):
        dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
        t = torch.tensor(1.0, dtype=torch.float32)
        n = 0
        while t >= -dt / 2:
            n += 1
            t = t + dt
        if n != steps:
            bad.append((steps, n))
    check(not bad, f"openpi's `while t >= -dt/2` runs exactly `steps` times for 1..1000 {bad[:5]}")


def numpy_bilinear(img, out_h, out_w, coord_dtype):
    """img [C, H, W] float32; PyTorch's bilinear, align_corners=False, no antialias, size given.

    PyTorch computes scale = in / out and src = scale * (dst + 0.5) - 0.5 in float32; with
    coord_dtype=np.float64 the coordinates are exact instead, which differs by up to ~1e-4 on
    large images.
    """
    c, h, w = img.shape
    f = coord_dtype

    def coords(n_in, n_out):
        scale = f(n_in) / f(n_out)
        src = scale * (np.arange(n_out).astype(f) + f(0.5)) - f(0.5)
        src = np.maximum(src, f(0.0)).astype(f)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = np.clip(src - i0.astype(f), 0, 1).astype(np.float32)
        return i0, i1, lam

    y0, y1, fy = coords(h, out_h)
    x0, x1, fx = coords(w, out_w)
    one = np.float32(1.0)
    top = img[:, y0][:, :, x0] * (one - fx) + img[:, y0][:, :, x1] * fx
    bot = img[:, y1][:, :, x0] * (one - fx) + img[:, y1][:, :, x1] * fx
    return (top * (one - fy[:, None]) + bot * fy[:, None]).astype(np.float32)


def check_resize():
    rng = np.random.default_rng(7)
    worst = {np.float32: 0.0, np.float64: 0.0}
    for h, w in ((40, 24), (20, 28), (224, 300), (480, 640), (720, 1280), (31, 32), (33, 7)):
        size = 32 if max(h, w) < 100 else 224
        img = rng.integers(0, 256, size=(1, h, w, 3), dtype=np.uint8)
        got = ref.preprocess_images(torch.from_numpy(img), size)[0].numpy()
        x = img[0].astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
        ratio = max(w / size, h / size)
        rh, rw = int(h / ratio), int(w / ratio)
        for coord_dtype in worst:
            r = np.clip(numpy_bilinear(x.transpose(2, 0, 1), rh, rw, coord_dtype), -1, 1)
            want = np.full((3, size, size), -1.0, dtype=np.float32)
            top, left = (size - rh) // 2, (size - rw) // 2
            want[:, top:top + rh, left:left + rw] = r
            worst[coord_dtype] = max(worst[coord_dtype], max_diff(got, want))
    # PyTorch's CPU kernel itself varies by up to ~6e-5 on large downscales depending on the
    # thread count (a different code path for some output columns), hence the loose bound.
    check(worst[np.float32] < 1e-4,
          f"resize-with-pad matches numpy bilinear with f32 coordinates (max |diff| {worst[np.float32]:.3g}; "
          f"with exact f64 coordinates it would be {worst[np.float64]:.3g})")


def check_rope_and_time():
    hd, theta = 16, 10000.0
    pos = torch.arange(0, 300)
    cos, sin = ref.rope_cos_sin(pos, hd, theta)
    x = torch.randn(2, 300, hd, generator=torch.Generator().manual_seed(0))
    got = ref.apply_rope(x, cos, sin).numpy()
    xn = x.numpy().astype(np.float64)
    ang = pos.numpy()[:, None] * (1.0 / theta ** (np.arange(0, hd, 2) / hd))[None, :]
    z = (xn[..., : hd // 2] + 1j * xn[..., hd // 2:]) * np.exp(1j * ang)[None]
    want = np.concatenate([z.real, z.imag], axis=-1)
    d = max_diff(got, want)
    check(d < 1e-4, f"RoPE matches complex rotation (max |diff| {d:.3g})")

    worst = 0.0
    for tv in (1.0, 0.9, 0.33333334, 1e-3):
        t = torch.tensor(tv, dtype=torch.float32)
        got = ref.time_embedding(t, 32).numpy()
        frac = np.linspace(0.0, 1.0, 16)
        arg = float(t) * 2 * math.pi / (4e-3 * (4.0 / 4e-3) ** frac)
        want = np.concatenate([np.sin(arg), np.cos(arg)]).astype(np.float32)
        worst = max(worst, max_diff(got, want))
    check(worst <= 1.2e-7, f"time embedding matches numpy float64 (max |diff| {worst:.3g})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(HERE))
    ap.add_argument("--golden", default=os.path.join(root, "tests", "golden"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    for name in make_golden.CASES:
        check_case(args.golden, name)
    print("== global")
    check_loop_count()
    check_resize()
    check_rope_and_time()
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
