"""Peak RSS of `shardtool pack` at growing dataset sizes: memory must not grow with the data.

    python -m benchmarks.memory [--sizes 5000,50000] [--json]

Generates pixel CSVs (28x28 grey rows, random pixels) of each size, packs each with all workers,
and reports the peak RSS of the largest process. Pixel CSVs are used because they are quick to make
at any size; the pipeline after the reader (workers, sink, journal, manifest) is the same for every format.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import timed_run, write


def make_pixel_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as file:
        file.write("label," + ",".join(f"pixel{i}" for i in range(1, 785)) + "\n")
        for start in range(0, rows, 1000):
            block = rng.integers(0, 256, (min(1000, rows - start), 785))
            block[:, 0] %= 10
            np.savetxt(file, block, fmt="%d", delimiter=",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tool = str(Path(sys.executable).with_name("shardtool"))
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    results = []
    for size in map(int, args.sizes.split(",")):
        source = work / f"pixels-{size}.csv"
        make_pixel_csv(source, size)
        seconds, rss = timed_run([tool, "pack", str(source), str(work / f"out-{size}"), "--workers",
                                  str(os.cpu_count() or 1)])
        results.append({"name": f"shardtool pack {size:,} samples", "samples": size, "img_s": size / seconds,
                        "peak_rss_mb": rss})
        shutil.rmtree(work / f"out-{size}")
        source.unlink()
    base = results[0]["peak_rss_mb"]
    for row in results:
        row["rss_vs_smallest"] = row["peak_rss_mb"] / base
    shutil.rmtree(work, ignore_errors=True)
    table = write("memory", {"sizes": args.sizes}, results, ["name", "img_s", "peak_rss_mb", "rss_vs_smallest"])
    print(json.dumps({"results": results}, indent=1) if args.json else table)


if __name__ == "__main__":
    main()
