"""How much choosing the probe's L2 on val flatters its val figure (the start every fine-tune is judged by).

    python -m benchmarks.probe_grid [--datasets clothing-small,fb-marketplace,fashion-mnist] [--json]

`trainer probe` trains one softmax head per L2 in trainer.linear.L2_GRID and keeps the best on val, so
its val top-1 is the highest of several draws, and `trainer fit` starts from that head and counts its
epochs against that figure. This reads the frozen features benchmarks.accuracy cached (run it first),
trains the same heads the same way (strong to weak L2, each warm-started from the last) and writes, per
L2, the val and test images each head gets right: the chosen head's val against the others' says how
far val favours the start, and test (not used for the choice) says what the choice is worth.

And what a choice that never sees val would keep: FOLDS-fold cross-validation on train (contiguous folds
in pack order, the same heads trained on the other folds; cv_right counts train images right in their
held-out fold, cv_chosen marks the most, then the lowest held-out loss). Its head's val figure carries no
selection, so the chosen head's val against it is how much choosing on val lifted the start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import CACHE, emit

COLUMNS = ["name", "l2", "chosen", "val_right", "val_images", "test_right", "test_images", "cv_chosen", "cv_right",
           "train_images"]
FOLDS = 5


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
    cross = cross_validated(splits["train"], num_classes)
    for row, (right, _) in zip(out, cross):
        row |= {"cv_chosen": False, "cv_right": right, "train_images": len(splits["train"])}
    out[max(range(len(out)), key=lambda i: (cross[i][0], -cross[i][1]))]["cv_chosen"] = True
    return out


def cross_validated(train: Any, num_classes: int) -> list[tuple[int, float]]:
    """Per L2 of linear.L2_GRID: train images right and summed loss in their held-out fold, over FOLDS
    contiguous folds (the features standardised with the other folds' moments, as the probe does)."""
    from trainer import linear
    from trainer.features import SplitFeatures
    from trainer.metrics import EvalMeter

    features, labels = np.asarray(train.features), np.asarray(train.labels)
    bounds = np.linspace(0, len(labels), FOLDS + 1).astype(int)
    totals = [[0, 0.0] for _ in linear.L2_GRID]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rest = np.r_[0:lo, hi:len(labels)]
        fitted, held = SplitFeatures(features[rest], labels[rest]), SplitFeatures(features[lo:hi], labels[lo:hi])
        mean, std = linear.moments(fitted)
        held_rows = linear.Rows(held, mean, std)
        for total, (_, head) in zip(totals, linear.grid_heads(linear.Rows(fitted, mean, std), num_classes)):
            result = linear.score(head, held_rows, EvalMeter(num_classes))
            total[0] += round(result["top1"] * (hi - lo))
            total[1] += result["loss"] * (hi - lo)
    return [(right, loss) for right, loss in totals]


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
