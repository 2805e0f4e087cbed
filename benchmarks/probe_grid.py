"""How much choosing the probe's L2 on val flatters its val figure (the start every fine-tune is judged by).

    python -m benchmarks.probe_grid [--datasets clothing-small,fb-marketplace,fashion-mnist] [--json]

`trainer probe` trains one softmax head per L2 in trainer.linear.L2_GRID and keeps the best on val, so
its val top-1 is the highest of several draws, and `trainer fit` starts from that head and counts its
epochs against that figure. This reads the frozen features benchmarks.accuracy cached (run it first),
trains the same heads the same way (strong to weak L2, each warm-started from the last) and writes, per
L2, the val and test images each head gets right: the chosen head's val against the others' says how
far val favours the start, and test (not used for the choice) says what the choice is worth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import CACHE, emit

COLUMNS = ["name", "l2", "chosen", "val_right", "val_images", "test_right", "test_images"]


def grid_rows(name: str, folder: Path, num_classes: int) -> list[dict[str, Any]]:
    from trainer import linear
    from trainer.features import SplitFeatures
    from trainer.metrics import EvalMeter

    splits = {role: SplitFeatures(np.load(folder / f"{role}.features.npy", mmap_mode="r"),
                                  np.load(folder / f"{role}.labels.npy", mmap_mode="r")) for role in ("train", "val", "test")}
    mean, std = linear.moments(splits["train"])
    rows = {role: linear.Rows(split, mean, std) for role, split in splits.items()}
    out, best = [], None  # the head `trainer probe` keeps: linear.rank's best on val, as linear._choose picks
    for l2, head in linear.grid_heads(rows["train"], num_classes):
        results = {role: linear.score(head, rows[role], EvalMeter(num_classes)) for role in ("val", "test")}
        if best is None or linear.rank(results["val"]) > best[0]:
            best = (linear.rank(results["val"]), len(out))
        out.append({"name": name, "l2": f"{l2:g}", "chosen": False,
                    "val_right": round(results["val"]["top1"] * len(splits["val"])), "val_images": len(splits["val"]),
                    "test_right": round(results["test"]["top1"] * len(splits["test"])),
                    "test_images": len(splits["test"])})
    out[best[1]]["chosen"] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="clothing-small,fb-marketplace,fashion-mnist")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as trainer.linear fits a head that fits in memory
    results = []
    for name in (n for n in args.datasets.split(",") if n):
        folder = CACHE / "accuracy-runs" / f"{name}-probe"
        classes = CACHE / "accuracy" / name / "classes.txt"
        if not (folder / "train.features.npy").exists() or not classes.exists():
            sys.exit(f"no cached features for {name} in {folder}: run python -m benchmarks.accuracy first")
        results += grid_rows(name, folder, len(classes.read_text().splitlines()))
    emit("probe-grid", {"features": "benchmarks/.cache/accuracy-runs/<name>-probe (trainer probe's cache)"},
         results, COLUMNS, args.json)


if __name__ == "__main__":
    main()
