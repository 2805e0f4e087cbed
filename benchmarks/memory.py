"""Peak RSS of `shardtool pack` and of one torch-loader epoch at growing dataset sizes: memory must not grow with the data.

    python -m benchmarks.memory [--sizes 10000,100000] [--repeats 3] [--json]      # the must-show: --sizes 10000,100000,1000000

At each size, on generated data:
- `pack N`: `shardtool pack dump.bson OUT --verify header` (default --workers auto), passthrough;
- `loader-epoch N`: one training epoch of the trainer's torch loader over OUT's train split
  (trainer.data.make_loader(LoaderSpec(...), "torch") as trainer/run.py builds it, with the trainer's
  defaults: batch 32, 2 DataLoader workers, shuffle buffer 1000, RandomResizedCrop + flip) at
  image_size 32; it checks that the epoch yielded every sample.
Each measurement runs in its own subprocess; peak memory is of its whole process tree (common.timed_run).
rss_vs_smallest is each row's peak RSS over the smallest size's, per kind.

The data is a synthetic BSON dump in Cdiscount's layout ({_id, imgs: [{picture}], category_id}, one
picture per product, 100 categories) whose pictures are drawn from a pool of 500 distinct 40x40
JPEGs (~1 KB). Why this: one million samples are written in seconds (no image is encoded per sample)
and packed at ~20k images/s with --verify header (a pixel CSV needs a PNG encode per row: ~1.5k/s,
over ten minutes at 1M, most of it not memory-relevant work), and tiny pictures make a 1M loader
epoch take minutes. The pipeline after the reader (workers, sink, journal, manifest) is the same for
every format; what is BSON-specific is the reader (an mmap whose walked pages are dropped). The
folder reader lists its files up front, so its memory does grow with the file count (not measured here).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import emit, row, timed_run, tool

POOL, SIDE, CATEGORIES = 500, 40, 100
IMAGE_SIZE = 32
LOADER_EPOCH = """
import sys
from trainer.data import LoaderSpec, make_loader
from trainer.dataset import open_dataset
dataset = open_dataset(sys.argv[1])
spec = LoaderSpec(shards=tuple(dataset.shards("train")), batch_size=32, image_size=int(sys.argv[2]),
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), train=True,
                  labelled=dataset.labelled("train"), workers=2, shuffle_buffer=1000)
loader = make_loader(spec, "torch")
seen = sum(len(batch) for batch in loader.epoch(0))
if seen != loader.num_samples:
    sys.exit(f"the epoch yielded {seen} samples, not {loader.num_samples}")
"""


def write_dump(path: Path, products: int, seed: int = 0) -> None:
    """PRODUCTS documents, one pooled JPEG each, streamed into path (via a tmp file)."""
    import io
    import random

    import bson  # pymongo's
    import numpy as np
    from PIL import Image

    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        ramp = np.linspace(0, 1, SIDE)[None, :, None] * pixels.uniform(0, 255, 3)
        noise = pixels.normal(0, 24, (SIDE, SIDE, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(ramp + noise + pixels.uniform(0, 96), 0, 255).astype(np.uint8)).save(
            buffer, "JPEG", quality=85)
        pool.append(buffer.getvalue())
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as file:
        for product in range(products):
            file.write(bson.encode({"_id": product, "imgs": [{"picture": pool[rng.randrange(POOL)]}],
                                    "category_id": 1000000000 + rng.randrange(CATEGORIES)}))
    os.replace(tmp, path)


def make_dump(path: Path, products: int) -> None:
    """In a spawned process: a child's peak RSS starts at its parent's (Linux carries the high-water
    mark across fork + exec), so this process never imports numpy, PIL, torch or shardtool."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(write_dump, path, products).result()


def measure_size(work: Path, size: int, repeats: int) -> list[dict[str, Any]]:
    """Pack then one loader epoch at SIZE samples, REPEATS times each (the pack rewritten from scratch);
    the dump and the shards are deleted after."""
    dump, out = work / f"dump-{size}.bson", work / f"out-{size}"
    make_dump(dump, size)
    timed_run(["cat", str(dump)])  # warm the page cache
    packs, epochs = [], []
    for _ in range(repeats):
        packs.append(timed_run([tool("shardtool"), "pack", str(dump), str(out), "--verify", "header", "--overwrite"]))
        epochs.append(timed_run([sys.executable, "-c", LOADER_EPOCH, str(out), str(IMAGE_SIZE)]))
    dump.unlink()
    shutil.rmtree(out)
    return [row(f"{kind} {size:,}", [size / seconds for seconds, _ in runs], [rss for _, rss in runs], kind=kind,
                samples=size, seconds=round(statistics.median(seconds for seconds, _ in runs), 1))
            for kind, runs in (("pack", packs), ("loader-epoch", epochs))]


def add_growth(results: list[dict[str, Any]]) -> None:
    """rss_vs_smallest: peak RSS over that of the same kind's smallest size; growth_mb: their difference."""
    for kind in {r["kind"] for r in results}:
        rows = [r for r in results if r["kind"] == kind]
        base = min(rows, key=lambda r: r["samples"])["peak_rss_mb"]
        for r in rows:
            r["rss_vs_smallest"] = round(r["peak_rss_mb"] / base, 3)
            r["growth_mb"] = round(r["peak_rss_mb"] - base, 1)


def import_floor() -> float:
    """Peak RSS of a process that only imports the torch loader: the part of loader-epoch no data can change."""
    return timed_run([sys.executable, "-c", "import trainer.data.torch"])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="samples, comma-separated")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                        help="where dumps and shards are written (and deleted); 1M samples need ~5 GB")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement per size")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.work))
    try:
        results = [r for size in sizes for r in measure_size(work, size, args.repeats)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.sort(key=lambda r: (r["kind"] != "pack", r["samples"]))
    add_growth(results)
    notes = [f"loader-epoch: {import_floor():.0f} MB of its peak RSS is importing torch and torchvision "
             "(a process that only imports trainer.data.torch); growth_mb is the change from the smallest size"]
    settings = {"sizes": sizes, "repeats": args.repeats, "data": f"synthetic BSON, 1 picture/product, pool of {POOL} {SIDE}x{SIDE} JPEGs",
                "pack": "--verify header, --workers auto", "loader": f"torch, image_size {IMAGE_SIZE}, batch 32, "
                "2 workers, shuffle buffer 1000, train=True"}
    emit("memory", settings, results, ["name", "img_s", "seconds", "peak_rss_mb", "rss_vs_smallest", "growth_mb"],
         args.json, notes)


if __name__ == "__main__":
    main()
