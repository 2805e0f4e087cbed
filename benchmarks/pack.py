"""Pack throughput: `shardtool pack` (PIL backend) against a hand-written loop, on the same files.

    python -m benchmarks.pack [--source ../shared/data/clothing-small] [--repeats 3] [--json]

Rows: shardtool with --resize shorter:256 at 1 and all workers, shardtool passthrough (--resize
none: JPEGs copied after a full decode), and `hand-loop`: one process that opens, converts to RGB,
resizes the shorter side to 256 and saves a JPEG per file, as people write it. Warm page cache
(one untimed pass first). Figures are images/s (median of repeats) and the peak RSS of the
largest process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import summary, timed_run, write

HAND_LOOP = """
import sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(src.rglob("*.jpg")):
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    target = dst / path.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, quality=90)
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(name: str, argv_for, out: Path, images: int, repeats: int) -> dict:
    seconds, rss = [], []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = timed_run(argv_for(out))
        seconds.append(wall)
        rss.append(peak)
    rates = [images / s for s in seconds]
    return {"name": name, "img_s": summary(rates)["median"], "img_s_range": summary(rates),
            "peak_rss_mb": max(rss), "out_mb": folder_bytes(out) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("SHARDTOOL_REAL_DATA", Path(__file__).parents[2] / "shared" / "data"))
    parser.add_argument("--source", type=Path, default=default / "clothing-small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"{args.source} not found: pass --source (a class-folder dataset)")
    images = sum(1 for p in args.source.rglob("*.jpg"))
    tool = str(Path(sys.executable).with_name("shardtool"))
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    timed_run(["cat", *map(str, args.source.rglob("*.jpg"))])  # warm the page cache
    runs = [
        (f"shardtool-pil shorter:256 w{cores}", lambda o: [tool, "pack", str(args.source), str(o), "--resize",
                                                       "shorter:256", "--workers", str(cores)]),
        ("shardtool-pil shorter:256 w1", lambda o: [tool, "pack", str(args.source), str(o), "--resize",
                                                   "shorter:256", "--workers", "1"]),
        (f"shardtool-pil passthrough w{cores}", lambda o: [tool, "pack", str(args.source), str(o),
                                                          "--workers", str(cores)]),
        ("hand-loop shorter:256", lambda o: [sys.executable, "-c", HAND_LOOP, str(args.source), str(o)]),
    ]
    results = [measure(name, argv, work / "out", images, args.repeats) for name, argv in runs]
    shutil.rmtree(work, ignore_errors=True)
    settings = {"source": str(args.source), "images": images, "repeats": args.repeats}
    table = write("pack", settings, results, ["name", "img_s", "peak_rss_mb", "out_mb"])
    print(json.dumps({"settings": settings, "results": results}, indent=1) if args.json else table)


if __name__ == "__main__":
    main()
