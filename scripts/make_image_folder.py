#!/usr/bin/env python3
"""Write an image folder for `--data DIR`: N coloured, noisy PNG digits in the layout
DIR/train/<class>/*.png and DIR/test/<class>/*.png (10 classes "0".."9", 80/20 split in every
class), made from the bundled digits: each 8x8 digit upsampled (bilinear), drawn in a random
colour on a random dark background, with Gaussian noise. The same seed gives the same files.

    .venv/bin/python scripts/make_image_folder.py --out images --count 2000 --size 32
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np

CLASSES = 10
TEST_FRACTION = 0.2
NOISE = 12.0  # standard deviation of the pixel noise, in 0..255 levels


def make_image_folder(out: str | Path, count: int, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write `count` RGB PNGs of `size` x `size` pixels under `out` (which must not exist, or be
    empty); returns the number of images in each split. Image k shows a digit of class k % 10."""
    from PIL import Image

    out = Path(out)
    if count < 2 * CLASSES:
        raise ValueError(f"--count must be at least {2 * CLASSES} (a training and a test image per class)")
    if not 2 <= size <= 2048:
        raise ValueError("--size must be from 2 to 2048")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose another --out")
    with resources.files("deepsigns_cli.datasets").joinpath("digits.npz").open("rb") as fh:
        arrays = np.load(fh)
        digits = (arrays["x"].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
        labels = arrays["y"].astype(np.int64)
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in range(CLASSES)]
    per_class = [len(range(c, count, CLASSES)) for c in range(CLASSES)]
    written = {"train": 0, "test": 0}
    for c in range(CLASSES):
        for split in ("train", "test"):
            (out / split / str(c)).mkdir(parents=True, exist_ok=True)
    for k in range(count):
        c, j = k % CLASSES, k // CLASSES  # the j-th image of class c
        n_test = max(1, round(TEST_FRACTION * per_class[c]))
        split = "test" if j >= per_class[c] - n_test else "train"
        digit = digits[members[c][j % len(members[c])]]
        mask = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR),
                          np.float32)[..., None] / 255.0
        ink, paper = rng.uniform(120, 255, 3), rng.uniform(0, 90, 3)
        pixels = paper + (ink - paper) * mask + rng.normal(0.0, NOISE, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        image.save(out / split / str(c) / f"{k:06d}.png", compress_level=1)
        written[split] += 1
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    ap.add_argument("--count", type=int, required=True, help="images in all (train and test)")
    ap.add_argument("--size", type=int, default=32, help="pixels per side (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        written = make_image_folder(args.out, args.count, args.size, args.seed)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.out}: {written['train']} training and {written['test']} test images, "
          f"{args.size}x{args.size} RGB, {CLASSES} classes")


if __name__ == "__main__":
    main()
