#!/usr/bin/env python3
"""Golden vectors of openpi's server-side image resize (tests/golden/openpi_resize/).

openpi's `ResizeImages` calls `openpi_client.image_tools.resize_with_pad`, i.e. Pillow's
bilinear `Image.resize` on uint8 RGB plus black padding. This writes random images of several
shapes and their resized versions as computed by the installed openpi-client and Pillow, for
the Rust test `operators::openpi::resize` to match byte for byte.

openpi locks Pillow 11.2.1; Pillow up to 12.x resamples horizontally then vertically, while
Pillow 13 picks the order by shape (single pixels may differ by one level). The committed
vectors were made with Pillow 11.2.1.

Usage (from the repository root, with openpi-client and Pillow 11.2.1 importable):
    pip install --target /tmp/pillow11 pillow==11.2.1
    PYTHONPATH=/tmp/pillow11:target/python/openpi-client python3 tools/reference/openpi_resize_golden.py
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import PIL
from openpi_client import image_tools

# (height, width, target size): shrink, enlarge, both at once, odd padding, tall, very tall,
# wide.
CASES = [
    (48, 40, 32),
    (20, 13, 32),
    (96, 17, 32),
    (31, 64, 32),
    (700, 30, 32),
    (480, 4, 128),
    (90, 130, 64),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/openpi_resize")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(7)
    for h, w, size in CASES:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        # Smooth gradients too, where rounding differences would show.
        img[: h // 2] = (np.arange(w)[None, :, None] * 255 // max(w - 1, 1)).astype(np.uint8)
        out = image_tools.resize_with_pad(img, size, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        name = f"{h}x{w}_to_{size}"
        np.save(os.path.join(args.out, f"{name}.in.npy"), img)
        np.save(os.path.join(args.out, f"{name}.out.npy"), out)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(
            "Images and their `openpi_client.image_tools.resize_with_pad` results (Pillow "
            f"{PIL.__version__}), written by tools/reference/openpi_resize_golden.py.\n"
        )
    print(f"wrote {len(CASES)} cases to {args.out}")


if __name__ == "__main__":
    main()
