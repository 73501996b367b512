#!/usr/bin/env python3
"""Runs openpi's own PyTorch pi0 / pi0.5 model on a checkpoint and observation in our layout.

This is the cross-check for tools/reference/pi_reference.py: both read the same checkpoint
directory (docs/checkpoint.md) and observation directory and write the sampled actions, so
their outputs can be compared element for element.

openpi is not vendored: its source tree is imported from --openpi-src (the directory that
holds `src/openpi`, or `src` itself). It needs transformers==4.53.2 with openpi's
`src/openpi/models_pytorch/transformers_replace/*` copied over the installed transformers
package, exactly as openpi installs it; see docs/reference.md for the environment.

Usage:
    /opt/openpi-venv/bin/python tools/reference/openpi_crosscheck.py --openpi-src /tmp/openpi \
        --checkpoint DIR --observation DIR --steps N --out FILE.npy [--dump FILE.npz]

What is adapted around openpi (each one is also listed in docs/reference.md):
  1. `openpi.models.gemma` (JAX/flax) is replaced by a stub whose `get_config` returns the
     two Gemma shapes of our config.json; PI0Pytorch reads only width, depth, mlp_dim,
     num_heads, num_kv_heads and head_dim from it.
  2. `openpi.shared.image_tools` (imports JAX) is replaced by a module holding only openpi's
     own `resize_with_pad_torch`, compiled from openpi's source file unchanged.
  3. `PaliGemmaWithExpertModel.__init__` hardcodes the real model's vocab (257152), SigLIP MLP
     width (4304), projector width (2048) and inherits the other SigLIP sizes from
     PaliGemmaConfig's defaults. The two HF constructors it calls
     (PaliGemmaForConditionalGeneration, GemmaForCausalLM) are wrapped so that, after openpi
     has filled in its config, the sizes of our config.json are written into it just before
     the modules are built. For the real pi0 / pi0.5 sizes every override is a no-op.
  4. `preprocess_observation_pytorch` defaults to 224x224 images and exactly the three camera
     keys; its keyword defaults are set to our image_size and the first num_images keys.
  5. Observation.from_dict (openpi/models/model.py, imports JAX) is not imported; its torch
     uint8 branch (`x.to(float32).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0`) is repeated here.
  6. The config passes pytorch_compile_mode=None (no torch.compile) and dtype "float32".
     PI0Pytorch.__init__ calls torch.set_float32_matmul_precision("high"); it is set back to
     "highest" afterwards (on CPU the actions are bit-identical either way; it would allow
     TF32 matmuls on a GPU).
  7. openpi's resize_with_pad_torch returns [H, W, C] for a channels-last [1, H, W, C] input,
     which makes preprocess_observation_pytorch fail for any batch of one that needs resizing;
     the wrapper restores the batch dimension (values untouched).
The joint prefix+suffix path of PaliGemmaWithExpertModel.forward (training only) hardcodes
`1 * 8 * head_dim` heads; sample_actions never takes that path, so it is left alone.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import types

import numpy as np

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
PREFIX = "paligemma_with_expert."
# Keys that may legitimately be missing from a checkpoint in our layout, and why.
UNUSED_WHEN_MISSING = {
    "paligemma_with_expert.gemma_expert.lm_head.weight": "expert LM head, never used by openpi",
    "paligemma_with_expert.paligemma.model.language_model.norm.weight":
        "prefix final norm; sample_actions keeps only the prefix K/V cache",
}


@dataclasses.dataclass(frozen=True)
class GemmaShape:
    """The fields of openpi.models.gemma.Config that PI0Pytorch reads."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of openpi's Pi0Config that PI0Pytorch reads."""

    pi05: bool
    action_dim: int
    action_horizon: int
    max_token_len: int
    paligemma_variant: str = "turbo_pi_vlm"
    action_expert_variant: str = "turbo_pi_expert"
    dtype: str = "float32"
    pytorch_compile_mode: str | None = None


def openpi_src_dir(path: str) -> str:
    for cand in (os.path.join(path, "src"), path):
        if os.path.isfile(os.path.join(cand, "openpi", "models_pytorch", "pi0_pytorch.py")):
            return cand
    raise SystemExit(f"--openpi-src {path}: no openpi/models_pytorch/pi0_pytorch.py under it or its src/")


def import_openpi(src: str, cfg: dict):
    """Imports openpi's PI0Pytorch with the stubs and constructor wrappers of the module docstring."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    sys.path.insert(0, src)
    import openpi  # noqa: F401  (empty package __init__)
    import openpi.models  # noqa: F401  (empty package __init__)
    import openpi.shared  # noqa: F401  (empty package __init__)

    # (1) openpi.models.gemma stub.
    shapes = {
        "turbo_pi_vlm": GemmaShape(cfg["vlm_width"], cfg["vlm_depth"], cfg["vlm_mlp_dim"],
                                   cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]),
        "turbo_pi_expert": GemmaShape(cfg["expert_width"], cfg["expert_depth"], cfg["expert_mlp_dim"],
                                      cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]),
    }
    gemma_stub = types.ModuleType("openpi.models.gemma")
    gemma_stub.get_config = lambda variant: shapes[variant]
    sys.modules["openpi.models.gemma"] = gemma_stub
    openpi.models.gemma = gemma_stub

    # (2) openpi.shared.image_tools: only resize_with_pad_torch, from openpi's own source.
    tools_path = os.path.join(src, "openpi", "shared", "image_tools.py")
    with open(tools_path) as f:
        tree = ast.parse(f.read(), tools_path)
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "resize_with_pad_torch"]
    if len(fn) != 1:
        raise SystemExit(f"{tools_path}: resize_with_pad_torch not found")
    tools_stub = types.ModuleType("openpi.shared.image_tools")
    tools_stub.__dict__.update(torch=torch, F=F)
    exec(compile(ast.Module(body=fn, type_ignores=[]), tools_path, "exec"), tools_stub.__dict__)  # noqa: S102
    # (7) openpi's resize_with_pad_torch squeezes the batch dimension of a channels-last batch
    # of one (it cannot tell it from an unbatched image), and preprocess_observation_pytorch
    # then fails to permute the 3-D result back to channels-first. Put the dimension back.
    openpi_resize = tools_stub.resize_with_pad_torch

    def resize_with_pad_torch(images, height, width, mode="bilinear"):
        out = openpi_resize(images, height, width, mode)
        if images.dim() == 4 and out.dim() == 3:
            out = out[None]
        return out

    tools_stub.resize_with_pad_torch = resize_with_pad_torch
    sys.modules["openpi.shared.image_tools"] = tools_stub
    openpi.shared.image_tools = tools_stub

    import transformers
    from transformers.models.siglip import check

    if not check.check_whether_transformers_replace_is_installed_correctly():
        raise SystemExit(f"transformers {transformers.__version__}: openpi needs 4.53.2 with transformers_replace")

    from openpi.models_pytorch import gemma_pytorch
    from openpi.models_pytorch import pi0_pytorch
    from openpi.models_pytorch import preprocessing_pytorch

    # (3) our sizes into the HF configs, after openpi set its own values.
    real_paligemma = gemma_pytorch.PaliGemmaForConditionalGeneration
    real_gemma = gemma_pytorch.GemmaForCausalLM

    def paligemma_ctor(config):
        vc, tc = config.vision_config, config.text_config
        vc.hidden_size = cfg["vision_width"]
        vc.intermediate_size = cfg["vision_mlp_dim"]
        vc.num_hidden_layers = cfg["vision_depth"]
        vc.num_attention_heads = cfg["vision_heads"]
        vc.patch_size = cfg["patch_size"]
        vc.image_size = cfg["image_size"]
        vc.layer_norm_eps = cfg["layer_norm_eps"]
        vc.projection_dim = cfg["vlm_width"]
        tc.vocab_size = cfg["vocab_size"]
        tc.rms_norm_eps = cfg["rms_norm_eps"]
        tc.rope_theta = cfg["rope_theta"]
        tc.num_image_tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2
        config._vocab_size = cfg["vocab_size"]  # noqa: SLF001
        return real_paligemma(config=config)

    def gemma_ctor(config):
        config.vocab_size = cfg["vocab_size"]
        config.rms_norm_eps = cfg["rms_norm_eps"]
        config.rope_theta = cfg["rope_theta"]
        return real_gemma(config=config)

    gemma_pytorch.PaliGemmaForConditionalGeneration = paligemma_ctor
    gemma_pytorch.GemmaForCausalLM = gemma_ctor

    # (4) preprocessing defaults: our resolution and camera count.
    n = cfg["num_images"]
    keys = IMAGE_KEYS[:n] + tuple(f"extra_{i}_rgb" for i in range(max(0, n - len(IMAGE_KEYS))))
    kw = preprocessing_pytorch.preprocess_observation_pytorch.__kwdefaults__
    kw["image_resolution"] = (cfg["image_size"], cfg["image_size"])
    kw["image_keys"] = keys
    return pi0_pytorch, keys


def load_weights(model, path: str):
    """load_state_dict(strict=False) with our model.safetensors; returns a report dict."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(path)
    alias = PREFIX + "paligemma.model.language_model.embed_tokens.weight"
    own = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    # Fill every parameter with NaN first: a parameter the checkpoint does not set and the
    # forward does use then makes the actions NaN.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # Keys whose parameter is the same tensor as one that was loaded (tied embedding).
    loaded_ptrs = {params[k].data_ptr() for k in sd if k in params}
    tied = [k for k in missing if k in params and params[k].data_ptr() in loaded_ptrs]
    report = {
        "checkpoint_dtypes": dtypes,
        "num_checkpoint_keys": len(sd),
        "num_model_keys": len(own),
        "missing": sorted(missing),
        "missing_tied_to_loaded": sorted(tied),
        "missing_known_unused": sorted(k for k in missing if k in UNUSED_WHEN_MISSING),
        "unexpected": sorted(unexpected),
        "embed_alias_used": alias in sd,
    }
    report["missing_unexplained"] = sorted(
        set(missing) - set(tied) - set(report["missing_known_unused"]))
    return report


def build_observation(obs_dir: str, cfg: dict, keys, device):
    import torch

    def npy(name, required=True):
        p = os.path.join(obs_dir, name + ".npy")
        if not os.path.exists(p):
            if required:
                raise SystemExit(f"{p} missing")
            return None
        return np.load(p)

    images = npy("images")
    masks = npy("image_masks").astype(bool)
    tokens = npy("tokens").astype(np.int32)
    token_mask = npy("token_mask").astype(bool)
    state = npy("state", required=not cfg["pi05"])
    if state is None:
        state = np.zeros(cfg["action_dim"], np.float32)  # pi0.5: shape only (batch size)
    if images.shape[0] != cfg["num_images"] or images.dtype != np.uint8:
        raise SystemExit(f"images.npy: {images.dtype} {images.shape}, expected u8 [{cfg['num_images']}, H, W, 3]")

    # openpi's policy: torch.from_numpy(x)[None] per field; Observation.from_dict turns torch
    # uint8 images into float [-1, 1], channels first.
    imgs, img_masks = {}, {}
    for i, key in enumerate(keys):
        u8 = torch.from_numpy(np.ascontiguousarray(images[i]))[None].to(device)
        imgs[key] = u8.to(torch.float32).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0
        img_masks[key] = torch.from_numpy(masks[i:i + 1]).to(device)
    return types.SimpleNamespace(
        images=imgs,
        image_masks=img_masks,
        state=torch.from_numpy(state.astype(np.float32))[None].to(device),
        tokenized_prompt=torch.from_numpy(tokens)[None].to(device),
        tokenized_prompt_mask=torch.from_numpy(token_mask)[None].to(device),
        token_ar_mask=None,
        token_loss_mask=None,
    )


def install_dump_hooks(model, store: dict):
    """Records intermediate values of openpi's sample_actions into store (copies: openpi updates
    its time tensor in place)."""
    pwe = model.paligemma_with_expert
    orig_embed_prefix = model.embed_prefix
    orig_embed_suffix = model.embed_suffix
    orig_denoise = model.denoise_step
    lm_forward = pwe.paligemma.language_model.forward
    calls = {"denoise": 0}

    def embed_prefix(*a, **k):
        embs, pad, att = orig_embed_prefix(*a, **k)
        store["prefix_embs"] = embs[0].detach().cpu().clone().numpy()
        store["prefix_pad_masks"] = pad[0].cpu().clone().numpy()
        return embs, pad, att

    def lm(*a, **k):
        out = lm_forward(*a, **k)
        cache = out.past_key_values
        for i in range(len(pwe.paligemma.language_model.layers)):
            store[f"prefix_k_{i}"] = cache[i][0][0].detach().cpu().clone().numpy()
            store[f"prefix_v_{i}"] = cache[i][1][0].detach().cpu().clone().numpy()
        return out

    def embed_suffix(state, x_t, t):
        out = orig_embed_suffix(state, x_t, t)
        n = calls["denoise"]
        store[f"suffix_embs_{n}"] = out[0][0].detach().cpu().clone().numpy()
        if out[3] is not None:
            store[f"adarms_cond_{n}"] = out[3][0].detach().cpu().clone().numpy()
        return out

    def denoise(*a, **k):
        v = orig_denoise(*a, **k)
        n = calls["denoise"]
        store[f"x_t_{n}"] = a[3][0].detach().cpu().clone().numpy()
        store[f"t_{n}"] = a[4][0].detach().cpu().clone().numpy()
        store[f"v_{n}"] = v[0].detach().cpu().clone().numpy()
        calls["denoise"] += 1
        return v

    model.embed_prefix = embed_prefix
    model.embed_suffix = embed_suffix
    model.denoise_step = denoise
    pwe.paligemma.language_model.forward = lm
    # Per-camera SigLIP + projector output.
    pwe_embed_image = pwe.embed_image
    cams = {"n": 0}

    def embed_image(img):
        out = pwe_embed_image(img)
        store[f"image_emb_{cams['n']}"] = out[0].detach().cpu().clone().numpy()
        store[f"image_in_{cams['n']}"] = img[0].detach().cpu().clone().numpy()
        cams["n"] += 1
        return out

    pwe.embed_image = embed_image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--openpi-src", required=True, help="openpi checkout (holding src/openpi) or its src/")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--observation", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--noise-file", default=None, help="f32 [action_horizon, action_dim]; default noise.npy")
    ap.add_argument("--out", required=True, help="actions, f32 [action_horizon, action_dim] .npy")
    ap.add_argument("--dump", default=None, help="also write intermediate values to this .npz")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with open(os.path.join(args.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    src = openpi_src_dir(args.openpi_src)
    pi0_pytorch, keys = import_openpi(src, cfg)

    config = ModelConfig(pi05=bool(cfg["pi05"]), action_dim=cfg["action_dim"],
                         action_horizon=cfg["action_horizon"], max_token_len=cfg["max_token_len"])
    model = pi0_pytorch.PI0Pytorch(config)
    torch.set_float32_matmul_precision("highest")
    model.eval()
    report = load_weights(model, os.path.join(args.checkpoint, "model.safetensors"))
    model.to(device)
    if report["missing_unexplained"]:
        raise SystemExit(f"checkpoint lacks keys the model has: {report['missing_unexplained']}")

    obs = build_observation(args.observation, cfg, keys, device)
    noise_path = args.noise_file or os.path.join(args.observation, "noise.npy")
    if not os.path.exists(noise_path):
        raise SystemExit(f"{noise_path} missing: the cross-check needs explicit noise")
    noise = torch.from_numpy(np.load(noise_path).astype(np.float32)).to(device)

    store = {}
    if args.dump:
        install_dump_hooks(model, store)
    actions = model.sample_actions(device, obs, noise=noise[None], num_steps=args.steps)
    actions = actions[0].float().cpu().numpy()
    if not np.all(np.isfinite(actions)):
        raise SystemExit("non-finite actions (a parameter the forward uses was not loaded?)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    np.save(args.out, actions)
    if args.dump:
        np.savez(args.dump, actions=actions, **store)

    if not args.quiet:
        lm_cfg = model.paligemma_with_expert.paligemma.config
        info = {
            "openpi_src": src,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "siglip_attn_implementation": lm_cfg.vision_config._attn_implementation,  # noqa: SLF001
            "steps": args.steps,
            "actions_shape": list(actions.shape),
            "max_abs_action": float(np.abs(actions).max()),
            **{k: v for k, v in report.items() if k != "missing_unexplained"},
        }
        print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
