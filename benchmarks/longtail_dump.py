"""The long-tail benchmark's synthetic Cdiscount-like dump: Zipf-sized categories whose pictures carry their class.

benchmarks/pack_bson.py's dump draws category ids at random relative to picture content, which is right for
packing speed and useless for accuracy. Here every category is a fixed look, one of 8 x 8 x 6 x 4 x 3 = 4,608
combinations (background hue, foreground hue, shape, stripe angle, stripe period), so two categories often
differ in one attribute only (confusable neighbours); a product jitters its look (hue, brightness, shape size,
stripe period), and each of its 1-4 pictures is a new view (position, rotation, mirror, pixel noise), so
the pictures of one product resemble each other more than those of another product of the same category.
Products per category follow rank^-EXPONENT (rounded, at least 1): the head holds thousands of pictures, the
tail a handful. Documents are pack_bson's shape ({_id, imgs: [{picture}], category_id}), pictures SIDE px
JPEGs at QUALITY, rendered in a spawned process pool and cached in --work by size and seed (cached_dump).
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO
from itertools import product
from pathlib import Path
from typing import Any

import bson  # pymongo's
import numpy as np
from PIL import Image, ImageDraw

from benchmarks.common import PICTURES_PER_PRODUCT, read_categories

SIDE, QUALITY, EXPONENT, CHUNK = 112, 80, 1.0, 1000  # CHUNK: products rendered per task
HUES = [i / 8 for i in range(8)]
ANGLES, PERIODS = (0.0, 45.0, 90.0, 135.0), (7.0, 12.0, 20.0)  # stripe angle (degrees) and period (px)


def polygon(points: int, inner: float = 1.0) -> list[tuple[float, float]]:
    """A unit polygon around 0 of POINTS corners, every other one at radius INNER (a star when below 1)."""
    return [((1 if i % 2 == 0 else inner) * math.cos(2 * math.pi * i / points),
             (1 if i % 2 == 0 else inner) * math.sin(2 * math.pi * i / points)) for i in range(points)]


CROSS = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3),
         (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
SHAPES = {"circle": (polygon(32), 0.0), "ring": (polygon(32), 0.55), "triangle": (polygon(3), 0.0),
          "square": (polygon(4), 0.0), "cross": (CROSS, 0.0), "star": (polygon(10, 0.45), 0.0)}  # (outline, hole)
LOOKS = list(product(range(len(HUES)), range(len(HUES)), sorted(SHAPES), ANGLES, PERIODS))


def colour(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, min(value, 1.0)), dtype=np.float32) * 255


def product_view(look: tuple[int, int, str, float, float], rng: random.Random) -> dict[str, Any]:
    """What one product fixes of its category's look: its colours, shape size and stripe period."""
    bg, fg, shape, angle, period = look
    return {"bg": colour(HUES[bg] + rng.uniform(-0.045, 0.045), 0.35, 0.9 * rng.uniform(0.85, 1.1)),
            "fg": colour(HUES[fg] + rng.uniform(-0.045, 0.045), 0.85, 0.75 * rng.uniform(0.85, 1.2)),
            "shape": shape, "angle": angle, "period": period * rng.uniform(0.85, 1.15), "size": rng.uniform(0.3, 0.55)}


def render(view: dict[str, Any], rng: random.Random) -> bytes:
    """One picture of a product: striped background, the shape placed, turned and sized anew, pixel noise."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    angle = math.radians(view["angle"] + rng.uniform(-8, 8))
    waves = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / view["period"] + rng.uniform(0, 6.3))
    canvas = np.where((waves > 0)[..., None], view["bg"] * 0.72, view["bg"])
    outline, hole = SHAPES[view["shape"]]
    radius, turn = view["size"] * rng.uniform(0.85, 1.15) * SIDE / 2, rng.uniform(0, 2 * math.pi)
    cx, cy = (SIDE / 2 + rng.uniform(-0.18, 0.18) * SIDE for _ in range(2))
    mask = Image.new("L", (SIDE, SIDE))
    draw = ImageDraw.Draw(mask)
    for scale, fill in ((1.0, 255), (hole, 0)) if hole else ((1.0, 255),):
        draw.polygon([(cx + scale * radius * (x * math.cos(turn) - y * math.sin(turn)),
                       cy + scale * radius * (x * math.sin(turn) + y * math.cos(turn))) for x, y in outline], fill=fill)
    canvas = np.where((np.asarray(mask) > 127)[..., None], view["fg"], canvas)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 8, canvas.shape)
    image = Image.fromarray(np.clip(canvas + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def render_chunk(task: tuple[str, list[tuple[int, int, int]]]) -> tuple[bytes, int, int]:
    """(BSON documents, pictures, picture bytes) of a chunk of (product _id, category id, look index)."""
    seed, products = task
    rng, out, pictures, size = random.Random(seed), BytesIO(), 0, 0
    for _id, category, look in products:
        view = product_view(LOOKS[look], rng)
        imgs = [render(view, rng) for _ in range(rng.choices(*PICTURES_PER_PRODUCT)[0])]
        out.write(bson.encode({"_id": _id, "imgs": [{"picture": p} for p in imgs], "category_id": category}))
        pictures, size = pictures + len(imgs), size + sum(map(len, imgs))
    return out.getvalue(), pictures, size


def product_counts(classes: int, products: int, exponent: float) -> list[int]:
    """Products of the category of each rank: PRODUCTS * rank^-EXPONENT / sum, rounded, at least 1."""
    weights = [rank ** -exponent for rank in range(1, classes + 1)]
    return [max(1, round(products * w / sum(weights))) for w in weights]


def synthesise(path: Path, classes: int, products: int, seed: int, categories_csv: Path) -> dict[str, Any]:
    """Write the dump to PATH (via a tmp file), rendering CHUNKs in a spawned pool; returns the sidecar facts."""
    start, rng = time.perf_counter(), random.Random(seed)
    categories = rng.sample(read_categories(categories_csv), classes)
    looks = rng.sample(range(len(LOOKS)), classes)
    counts = product_counts(classes, products, EXPONENT)
    ranks = [rank for rank, count in enumerate(counts) for _ in range(count)]
    rng.shuffle(ranks)
    rows = [(_id, categories[rank], looks[rank]) for _id, rank in enumerate(ranks)]
    tasks = [(f"{seed}/{i}", rows[i:i + CHUNK]) for i in range(0, len(rows), CHUNK)]
    pictures = picture_bytes = 0
    tmp = path.with_suffix(".tmp")
    context = multiprocessing.get_context("spawn")
    with open(tmp, "wb") as file, ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        for data, count, size in pool.map(render_chunk, tasks):  # in order: the dump is the same every time
            file.write(data)
            pictures, picture_bytes = pictures + count, picture_bytes + size
    os.replace(tmp, path)
    return {"classes": classes, "products": len(rows), "pictures": pictures, "seed": seed, "zipf_exponent": EXPONENT,
            "products_per_class": {"max": counts[0], "min": counts[-1]}, "side": SIDE, "jpeg_quality": QUALITY,
            "looks": len(LOOKS), "file_bytes": path.stat().st_size,
            "mean_picture_bytes": round(picture_bytes / pictures),
            "generation_s": round(time.perf_counter() - start, 1)}


def cached_dump(work: Path, classes: int, products: int, seed: int,
                categories_csv: Path) -> tuple[Path, dict[str, Any]]:
    """The dump for (classes, products, seed), made once; its sidecar json is written last."""
    stem = f"longtail-{classes}c-{products}p-seed{seed}"
    path, sidecar = work / f"{stem}.bson", work / f"{stem}.json"
    if not (sidecar.is_file() and path.is_file()):
        work.mkdir(parents=True, exist_ok=True)
        facts = synthesise(path, classes, products, seed, categories_csv)
        sidecar.write_text(json.dumps(facts, indent=1))
        print(f"generated {path}: {facts}", file=sys.stderr)
    return path, json.loads(sidecar.read_text())
