"""--backend dali against --backend pil on every real image here: the worst pixel difference after packing.

    python -m benchmarks.dali_parity [--backend dali-cpu|dali-gpu] [--json]

Both backends process the same files with the same options, in batches of 32 (as pack's workers do).
For each image: the same kind of result (sample or skip), the same skip reason, the same size, and the
mean absolute difference per channel (0-255) between the two outputs decoded, worst channel. The table
gives, per dataset, how many images, how many differ in kind/reason/size (must be 0), the median and
worst difference and which image is worst. tests/test_dali_backend.py holds the tolerances (3.0 for
JPEG output, 0.5 for PNG) and checks every third image of the same sets in each test run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

import numpy as np
from PIL import Image

from benchmarks.common import emit, real_data, rel, samples, spec
from shardtool.process import dali, pil
from shardtool.sample import Sample, Skip

BATCH = 32
# name, files under the real data root, --resize, output encoding: what the README's pack examples use
SETS = (("clothing-small", "clothing-small/**/*.jpg", "shorter:256", "jpg"),
        ("fb-marketplace", "fb-marketplace/images/*.jpg", "fit:224", "jpg"))


def pixels(item: Sample) -> np.ndarray | None:
    """The packed image's pixels, None unless it is RGB (both backends must write RGB)."""
    image = Image.open(io.BytesIO(item.data))
    return np.asarray(image, dtype=np.float64) if image.mode == "RGB" else None


def compare(items: list[Sample], resize: str, encode: str, backend: str = "dali-cpu"
            ) -> tuple[list[float], tuple[float, str], list[str]]:
    """Both backends over ITEMS: (every image's difference, (worst, its source), mismatches described)."""
    differences: list[float] = []
    worst, mismatches = (0.0, ""), []
    for start in range(0, len(items), BATCH):
        batch = items[start:start + BATCH]
        for a, b in zip(pil.process_batch(batch, spec(resize, encode, "pil")),
                        dali.process_batch(batch, spec(resize, encode, backend))):
            if type(a) is not type(b) or (isinstance(a, Skip) and a.reason != b.reason):
                mismatches.append(f"{a.source}: pil {a!r} dali {b!r}")
                continue
            if isinstance(a, Skip):
                continue
            pa, pb = pixels(a), pixels(b)
            if pa is None or pb is None or pa.shape != pb.shape:
                shapes = [None if p is None else p.shape for p in (pa, pb)]
                mismatches.append(f"{a.source}: pil {shapes[0]} dali {shapes[1]} (None: not RGB)")
                continue
            differences.append(float(np.abs(pa - pb).mean(axis=(0, 1)).max()))
            worst = max(worst, (differences[-1], a.source))
    return differences, worst, mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="dali-cpu", choices=["dali-cpu", "dali-gpu"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = real_data()
    results, notes = [], []
    for name, pattern, resize, encode in SETS:
        files = sorted(root.glob(pattern))
        if not files:
            notes.append(f"{name}: not measured, no files at {root / pattern}")
            continue
        start = time.perf_counter()
        differences, worst, mismatches = compare(samples(files), resize, encode, args.backend)
        seconds = time.perf_counter() - start
        results.append({"name": f"{name} {resize} {encode}", "images": len(files), "mismatches": len(mismatches),
                        "median_difference": round(statistics.median(differences), 3),
                        "worst_difference": round(worst[0], 3), "worst_image": rel(worst[1]),
                        "img_s": round(len(files) / seconds, 1), "mismatch_examples": mismatches[:5]})
    settings = {"backend": args.backend, "batch": BATCH, "quality": 90,
                "difference": "mean |PIL - DALI| per channel (0-255) of the decoded outputs, worst channel"}
    emit("dali_parity", settings, results, ["name", "images", "mismatches", "median_difference", "worst_difference",
                                            "worst_image"], args.json, notes)
    if any(r["mismatches"] for r in results):
        sys.exit("the backends disagree on some images' kind, skip reason or size: see mismatch_examples")


if __name__ == "__main__":
    main()
