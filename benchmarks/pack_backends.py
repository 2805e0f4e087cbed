"""Decode/resize backends: `shardtool pack --backend pil` against `--backend dali` (CPU here, GPU where present).

    python -m benchmarks.pack_backends [--data ../shared/data] [--pngs 2000] [--repeats 3] [--json]

Two inputs: clothing-small (3,781 JPEGs, mostly 400x533) packed with --resize shorter:256, and --pngs
180x180 PNGs (random square crops of clothing-small, made once in --work) packed to JPEG without resizing,
so no input can be copied and every one is decoded and re-encoded. Each backend runs with the default
--workers auto; `dali workers=0` is DALI in-process with one DALI thread per core. Warm page cache (one
untimed read). images/s is the median of --repeats; peak RSS is of the largest process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image

from benchmarks.common import timed_run, write
from benchmarks.pack import measure
from benchmarks.pack_bson import photo_crop, shardtool_version
from shardtool.process import dali


def make_pngs(work: Path, photos: list[Path], count: int) -> Path:
    """count 180x180 PNG crops in class folders named after their photo's class; made once per count."""
    root = work / f"png180-{count}"
    done = root / ".done"
    if not done.is_file():
        rng = random.Random(0)
        for i in range(count):
            photo = rng.choice(photos)
            folder = root / photo.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            photo_crop(photo, rng).save(folder / f"{i:06d}.png", compress_level=6)
        done.write_text("")
    return root


def runs(tool: str, clothing: Path, pngs: Path, backend: str) -> list[tuple[str, Path, list[str]]]:
    """(row name, source, extra options) per measured configuration."""
    rows = [("clothing-small shorter:256 pil", clothing, ["--resize", "shorter:256", "--backend", "pil"]),
            (f"clothing-small shorter:256 {backend}", clothing, ["--resize", "shorter:256", "--backend", "dali"]),
            (f"clothing-small shorter:256 {backend} workers=0", clothing,
             ["--resize", "shorter:256", "--backend", "dali", "--workers", "0"]),
            ("png 180x180 -> jpg pil", pngs, ["--backend", "pil"]),
            (f"png 180x180 -> jpg {backend}", pngs, ["--backend", "dali"])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("SHARDTOOL_REAL_DATA", Path(__file__).parents[2] / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default, help="holds clothing-small/")
    parser.add_argument("--pngs", type=int, default=2000, help="number of 180x180 PNG inputs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "shardtool-bench-backends",
                        help="where the PNG inputs are cached and packs are written")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    clothing = args.data / "clothing-small"
    photos = sorted(clothing.rglob("*.jpg"))
    if not photos:
        sys.exit(f"{clothing} has no JPEGs: pass --data (the folder holding clothing-small/)")
    Image.MAX_IMAGE_PIXELS = None
    pngs = make_pngs(args.work, photos, args.pngs)
    tool = str(Path(sys.executable).with_name("shardtool"))
    backend = dali.choose_backend("dali")  # dali-cpu here, dali-gpu on a CUDA machine
    version = shardtool_version()
    timed_run(["cat", *map(str, photos), *map(str, pngs.rglob("*.png"))])  # warm the page cache
    results = []
    for name, source, extra in runs(tool, clothing, pngs, backend):
        images = len(photos) if source == clothing else args.pngs
        row = measure(name, lambda out: [tool, "pack", str(source), str(out), "--overwrite", *extra], args.work / "out",
                      images, args.repeats)
        results.append({**row, "images": images})
    settings = {"clothing_images": len(photos), "pngs": args.pngs, "repeats": args.repeats, "shardtool": version,
                "dali": dali.version(), "auto_picks": dali.choose_backend("auto"), "cuda_devices": dali.cuda_devices()}
    table = write("pack_backends", settings, results, ["name", "images", "img_s", "peak_rss_mb", "out_mb"])
    print(json.dumps({"settings": settings, "results": results}, indent=1) if args.json else table)
    print(f"--backend auto picks {settings['auto_picks']} here", file=sys.stderr)


if __name__ == "__main__":
    main()
