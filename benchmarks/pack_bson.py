"""Cdiscount BSON packing: `shardtool pack` per verify mode and worker count, against a bare copy.

    python -m benchmarks.pack_bson [--products 100000] [--repeats 3] [--work DIR] [--json]

Synthesises a Cdiscount-like dump (bson.encode'd {_id, imgs: [{picture}], category_id} documents one
after another; 1-4 pictures of 180x180 per product drawn from a pool of baseline JPEGs made by random
crops, scales and flips of ../shared/data/clothing-small, or of train_example.bson when that is absent;
Zipf-like category ids from category_names.csv), cached in --work by size and seed.
Rows: `bare-copy`, a Python loop that iterates the BSON and writes each picture into a tar with
`tarfile` and nothing else; `shardtool verify=MODE workers=N`, passthrough packs (no resize, no split) at
--verify header|full with 0 workers, one per core, and auto (the default); `peak RSS ... products`,
--verify header at N/10 and N products. Warm page cache (one untimed read); every run starts from an
empty OUT after os.sync(), and the speed rows take turns, round by round. images/s is the median of
--repeats over all pictures; vs_bare_copy is the ratio of medians; peak memory (peak_rss_mb) is the
whole process tree's, workers included (common.timed_run).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import bson  # pymongo's
from PIL import Image

from benchmarks.common import (
    PICTURES_PER_PRODUCT,
    commit,
    measure,
    measure_rounds,
    real_data,
    read_categories,
    rel,
    timed_run,
    write,
)

BARE_COPY = """
import io, os, sys, tarfile
import bson
os.makedirs(sys.argv[2])
with open(sys.argv[1], "rb") as source, tarfile.open(os.path.join(sys.argv[2], "bare.tar"), "w") as tar:
    for doc in bson.decode_file_iter(source):
        for i, img in enumerate(doc["imgs"]):
            info = tarfile.TarInfo(f"{doc['_id']}_{i}.jpg")
            info.size = len(img["picture"])
            tar.addfile(info, io.BytesIO(img["picture"]))
"""
POOL, QUALITY, SIDE, CATEGORIES = 4000, 72, 180, 1000


def photo_crop(path: Path, rng: random.Random) -> Image.Image:
    """A random square crop (60-100% of the shorter side), scaled to SIDE, mirrored half the time."""
    image = Image.open(path).convert("RGB")
    side = int(min(image.size) * rng.uniform(0.6, 1.0))
    x, y = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
    image = image.crop((x, y, x + side, y + side)).resize((SIDE, SIDE), Image.BILINEAR)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def make_pool(data: Path, rng: random.Random) -> list[bytes]:
    """Distinct JPEG pictures for products to draw from: photo crops, or the real example pictures."""
    photos = sorted((data / "clothing-small").glob("**/*.jpg"))
    if not photos:
        with open(data / "cdiscount" / "train_example.bson", "rb") as file:
            return [img["picture"] for doc in bson.decode_file_iter(file) for img in doc["imgs"]]
    pool = []
    for _ in range(POOL):
        buffer = io.BytesIO()
        photo_crop(rng.choice(photos), rng).save(buffer, "JPEG", quality=QUALITY)
        pool.append(buffer.getvalue())
    return pool


def synthesise(path: Path, products: int, seed: int, data: Path) -> dict[str, Any]:
    """Stream `products` documents into path (via a tmp file); returns the sidecar facts."""
    start, rng = time.perf_counter(), random.Random(seed)
    pool = make_pool(data, rng)
    categories = rng.sample(read_categories(data / "cdiscount" / "category_names.csv"), CATEGORIES)
    zipf = [1 / rank for rank in range(1, CATEGORIES + 1)]
    images = picture_bytes = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as file:
        for _id in range(products):
            count = rng.choices(*PICTURES_PER_PRODUCT)[0]
            pictures = [pool[rng.randrange(len(pool))] for _ in range(count)]
            category = rng.choices(categories, weights=zipf)[0]
            file.write(bson.encode({"_id": _id, "imgs": [{"picture": p} for p in pictures],
                                    "category_id": category}))
            images += count
            picture_bytes += sum(map(len, pictures))
    os.replace(tmp, path)
    return {"products": products, "seed": seed, "images": images, "file_bytes": path.stat().st_size,
            "mean_picture_bytes": round(picture_bytes / images), "pool": len(pool),
            "pool_mean_bytes": round(sum(map(len, pool)) / len(pool)),
            "generation_s": round(time.perf_counter() - start, 1)}


def cached_bson(work: Path, products: int, seed: int, data: Path) -> tuple[Path, dict[str, Any]]:
    """The synthetic dump for (products, seed), made once; the sidecar json is written last."""
    path, sidecar = work / f"cdiscount-{products}-seed{seed}.bson", work / f"cdiscount-{products}-seed{seed}.json"
    if not (sidecar.is_file() and path.is_file()):
        work.mkdir(parents=True, exist_ok=True)
        # In a spawned process: a child's peak RSS counts its parent's at exec time, so keep this one small.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            facts = pool.submit(synthesise, path, products, seed, data).result()
        sidecar.write_text(json.dumps(facts, indent=1))
        print(f"generated {path}: {facts}", file=sys.stderr)
    facts = json.loads(sidecar.read_text())
    timed_run(["cat", str(path)])  # warm the page cache
    return path, facts


def pack_argv(tool: str, source: Path, categories: Path, verify: str, workers: int | str) -> Callable[[Path], list[str]]:
    return lambda out: [tool, "pack", str(source), str(out), "--categories", str(categories), "--verify", verify,
                        "--workers", str(workers), "--overwrite"]


def speed_rows(args: argparse.Namespace, tool: str, source: Path, categories: Path, images: int) -> list[dict[str, Any]]:
    """bare-copy and shardtool at each verify mode with 0, cpus and auto workers, alternated round by round;
    vs_bare_copy is the ratio of medians."""
    runs: list[tuple[str, Callable[[Path], list[str]]]] = [
        ("bare-copy", lambda o: [sys.executable, "-c", BARE_COPY, str(source), str(o)])]
    for verify in ("header", "full"):
        for workers in (0, os.cpu_count() or 1, "auto"):
            runs.append((f"shardtool verify={verify} workers={workers}",
                         pack_argv(tool, source, categories, verify, workers)))
    rows = measure_rounds(runs, args.work / "out", images, args.repeats)
    for row in rows:
        row["images"] = images
        row["vs_bare_copy"] = round(row["img_s"] / rows[0]["img_s"], 3)
        row["pct_of_bare_copy"] = round(100 * row["img_s"] / rows[0]["img_s"], 1)
    return rows


def memory_rows(args: argparse.Namespace, tool: str, categories: Path) -> list[dict[str, Any]]:
    """--verify header (default --workers auto) at N/10 and N products; rss_vs_smaller is their ratio."""
    rows = []
    for products in (args.products // 10, args.products):
        source, facts = cached_bson(args.work, products, args.seed, args.data)
        row = measure(f"peak RSS verify=header auto, {products:,} products",
                      pack_argv(tool, source, categories, "header", "auto"), args.work / "out", facts["images"],
                      args.repeats)
        rows.append({**row, "products": products, "images": facts["images"]})
    rows[1]["rss_vs_smaller"] = round(rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3)
    rows[1]["rss_pct_of_smaller"] = round(100 * rows[1]["rss_vs_smaller"], 1)
    return rows


def shardtool_version() -> str:
    """The commit of the shardtool the CLI imports (editable installs run whatever is on disk, so say which)."""
    where = subprocess.run([sys.executable, "-c", "import shardtool; print(shardtool.__path__[0])"], check=True,
                           capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.strip()
    return f"{commit(Path(where))} at {rel(where)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = real_data()
    parser.add_argument("--data", type=Path, default=default, help="holds cdiscount/ and clothing-small/")
    parser.add_argument("--products", type=int, default=100_000, help="N; peak RSS is also taken at N/10")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic dump")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "shardtool-bench-bson",
                        help="where dumps are cached by size and seed, and packs are written")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    categories = args.data / "cdiscount" / "category_names.csv"
    if not categories.is_file():
        sys.exit(f"{categories} not found: pass --data (the folder holding cdiscount/)")
    tool = str(Path(sys.executable).with_name("shardtool"))
    source, facts = cached_bson(args.work, args.products, args.seed, args.data)
    version = shardtool_version()
    results = speed_rows(args, tool, source, categories, facts["images"]) + memory_rows(args, tool, categories)
    settings = {**facts, "repeats": args.repeats, "categories": rel(categories), "shardtool": version}
    if shardtool_version() != version:
        settings["shardtool_at_end"] = shardtool_version()
        print(f"shardtool changed during the run: {version} -> {settings['shardtool_at_end']}", file=sys.stderr)
    table = write("pack_bson", settings, results, ["name", "images", "img_s", "pct_of_bare_copy", "peak_rss_mb",
                                                   "rss_pct_of_smaller", "out_mb"])
    print(json.dumps({"settings": settings, "results": results}, indent=1) if args.json else table)


if __name__ == "__main__":
    main()
