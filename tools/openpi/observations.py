"""openpi observations as its example runtimes send them (examples/libero/main.py,
examples/droid/main.py, examples/aloha_real), with variations the server must accept:
camera images of other sizes, CHW layout, float images, numpy scalars, bytes prompts and
pre-tokenized prompts. Deterministic in `i`.
"""

from __future__ import annotations

import numpy as np


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 64, size=(h, w, 3))
    return ((img + noise) % 256).astype(np.uint8)


def libero(i: int) -> dict:
    rng = np.random.default_rng(1000 + i)
    base = _image(rng, 224, 224)
    wrist = _image(rng, 224, 224)
    if i % 4 == 1:
        # LeRobot-style: float CHW in [0, 1].
        wrist = (wrist.astype(np.float32) / 255.0).transpose(2, 0, 1)
    if i % 4 == 2:
        # A camera of another size: the server resizes with padding, as openpi does.
        base = _image(rng, 180, 320)
    obs = {
        "observation/image": base,
        "observation/wrist_image": wrist,
        "observation/state": rng.uniform(-1.0, 1.0, size=8),
        "prompt": ["pick up the black bowl", "open the top drawer", "put the cream cheese in the bowl", "turn on the stove"][i % 4],
    }
    if i % 4 == 3:
        del obs["prompt"]
        obs["tokenized_prompt"] = np.array([2, 20, 9, 27, 11, 4], dtype=np.int32)
        obs["tokenized_prompt_mask"] = np.ones(6, dtype=bool)
    return obs


def droid(i: int) -> dict:
    rng = np.random.default_rng(2000 + i)
    gripper = rng.uniform(0.0, 1.0, size=1)
    obs = {
        "observation/exterior_image_1_left": _image(rng, 224, 224),
        "observation/wrist_image_left": _image(rng, 224, 224),
        "observation/joint_position": rng.uniform(-1.5, 1.5, size=7),
        "observation/gripper_position": gripper,
        "prompt": ["put the marker in the cup", "wipe the table"][i % 2],
    }
    if i % 4 == 1:
        obs["observation/gripper_position"] = np.float64(gripper[0])
        obs["prompt"] = obs["prompt"].encode()
    if i % 4 == 2:
        obs["observation/exterior_image_1_left"] = _image(rng, 720, 1280)
    return obs


ROBOTS = {"libero": (libero, 7), "droid": (droid, 8)}
