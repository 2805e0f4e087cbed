"""A small labelled image dataset generated deterministically: the demo's and the tests' default.

    python -m shardtool.synth OUT [--per-class N] [--size PX] [--seed S]

Four classes of shapes (circle, square, triangle, cross) drawn at random positions, sizes and
colours on noisy backgrounds, saved as JPEG class folders. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "square", "triangle")


def draw_shape(kind: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(256) for _ in range(3))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 18, (size, size, 3))
    pixels = np.clip(np.asarray(background, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.18, 0.38) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    colour = tuple((c + rng.randrange(96, 160)) % 256 for c in background)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=colour)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=colour)
    return image


def make_shapes(root: str | Path, per_class: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Write root/<class>/<class>_<i>.jpg for every class; returns root."""
    root = Path(root)
    rng = random.Random(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, size, rng).save(root / kind / f"{kind}_{i:04d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = make_shapes(args.out, args.per_class, args.size, args.seed)
    print(f"wrote {args.per_class * len(CLASSES)} images in {len(CLASSES)} classes to {root}")


if __name__ == "__main__":
    main()
