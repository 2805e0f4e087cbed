"""Accuracy of the default recipe on every labelled dataset in ../shared/data, against a linear probe.

    python -m benchmarks.accuracy [--datasets clothing-small,fb-marketplace,fashion-mnist] [--json]
                                  [--fit-args "--epochs 9 ..."] [--seeds 0,1,2] [--name accuracy]

For each dataset, packed once into benchmarks/.cache/accuracy/ as a user would pack it:
- clothing-small: its own train/validation/test folders, `--resize shorter:256`;
- fb-marketplace: Images.csv joined to Products.csv, the top level of the category path as the label,
  split val=0.15,test=0.15 by product (`--join` groups a product's images), `--resize shorter:256`;
  rows whose image is not in the folder are counted skips (`--max-skip-fraction 1`);
- fashion-mnist: the pixel CSV (28x28 grey, lossless PNG), `--split val=0.15,test=0.15 --stratify`;
then `trainer probe` (the frozen backbone's features + a softmax head) and `trainer fit` with RECIPE
(the README's command, the same flags for every dataset), EfficientNet-Lite0 with its ImageNet weights.
Each row: val and test top-1 of both (fit_val: its best epoch's; fit_test: best.pt's, which is the
probe's starting point, best_epoch 0, when no epoch beat it on val), the fit's wall time and
training images/s, and the val top-1 before the backbone starts learning (start_val: the head fit
starts from, validated by fit itself like every epoch after it; else the last frozen epoch's) and
after its first epoch of learning (a drop there is the collapse at the unfreeze). The val split is
small (val_images), so gain_images says how many more val images the fine-tune gets right than the probe,
and a paired comparison says whether that is more than chance: best.pt and the probe head fit started
from each predict every val and test image (`trainer predict`), and on the images only one of them
gets right, val_won/val_lost (test_won/test_lost) count those the fine-tune wins and loses; val_p
(test_p) is McNemar's exact two-sided p-value, the chance of a split that uneven if neither were better.
The first epoch of learning gets the same paired comparison with its start (fit runs with --save-epochs;
epoch1_val_won/lost/p, epoch1_test_won/lost/p): on val it says whether a dip there is more than chance,
and on test, which chose nothing, whether that epoch is worse than its start on images nobody selected on.

Accuracy is deterministic for a seed on one machine; wall time and images/s move with the machine.
A seed is one draw of the training noise (the order of the batches, the crops, the flips; `trainer fit
--seed`): with --seeds the fit runs once per seed (the pack, its split and the probe stay the same), one
row each, and a row per dataset with seed "mean" gives the mean of every figure (its min and max beside
it in the JSON as <column>_min/<column>_max; p-values per run only). epoch1_images: val images the first
epoch of learning gains (or, negative, loses) on its start.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import CACHE, emit, pack_args, real_data, tool

RECIPE = ["--image-size", "192", "--eval-image-size", "224", "--epochs", "9"]
COLUMNS = ["name", "seed", "train_images", "val_images", "probe_val", "probe_test", "fit_val", "fit_test", "best_epoch",
           "gain_images", "val_won", "val_lost", "val_p", "test_won", "test_lost", "test_p", "start_val",
           "unfrozen_val", "epoch1_images", "epoch1_val_won", "epoch1_val_lost", "epoch1_val_p", "epoch1_test_won",
           "epoch1_test_lost", "epoch1_test_p", "fit_minutes", "img_s", "probe_seconds"]


def packed(name: str, real: Path) -> Path:
    out = CACHE / "accuracy" / name
    if not (out / "dataset.json").exists():
        source, *options = pack_args(name, real)
        subprocess.run([tool("shardtool"), "pack", source, str(out), *options, "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def run_probe(data: Path, out: Path) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    done = subprocess.run([tool("trainer"), "probe", str(data), "--out", str(out), "--json"], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout), time.perf_counter() - start


def run_fit(data: Path, out: Path, fit_args: list[str]) -> tuple[list[dict[str, str]], dict[str, Any], float]:
    start = time.perf_counter()
    subprocess.run([tool("trainer"), "fit", str(data), str(out), *fit_args, "--save-epochs", "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(out / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return rows, json.loads((out / "summary.json").read_text()), seconds


def right_by_key(ckpt: Path, data: Path, split: str, out: Path) -> dict[str, bool]:
    """Per image of SPLIT: whether CKPT's top-1 is its label (`trainer predict`, the checkpoint's precision)."""
    subprocess.run([tool("trainer"), "predict", str(ckpt), str(data), "--split", split, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out, newline="", encoding="utf-8") as file:
        return {row["key"]: row["label"] == row["prediction"] for row in csv.DictReader(file)}


def mcnemar(fit: dict[str, bool], start: dict[str, bool]) -> tuple[int, int, float]:
    """Images only the fine-tune gets right, images only its start gets right, and McNemar's exact two-sided
    p-value: under "neither is better" each of those images is a fair coin (hand-written: 3 lines of
    binomial sums, not worth a scipy dependency)."""
    won = sum(fit[key] and not start[key] for key in fit)
    lost = sum(start[key] and not fit[key] for key in fit)
    n = won + lost
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2 ** n if n else 0.5
    return won, lost, round(min(1.0, 2 * tail), 4)


def paired(data: Path, run: Path, splits: dict[str, str], frozen: int) -> dict[str, Any]:
    """Per split role (val, test): best.pt, and the first epoch of learning (RUN/epoch-N.pt), each against its
    start: the probe head RUN started from (RUN/probe/probe.pt), else the last frozen epoch's weights. Nothing
    for best.pt when the fit started from no probe (--head-init random in --fit-args)."""
    out: dict[str, Any] = {}
    probe = run / "probe" / "probe.pt"
    before = run / f"epoch-{frozen}.pt" if frozen else probe
    for role, split in splits.items():
        start = right_by_key(before, data, split, run / f"paired-{role}-start.csv") if before.is_file() else None
        if start is not None and (run / f"epoch-{frozen + 1}.pt").is_file():
            first = right_by_key(run / f"epoch-{frozen + 1}.pt", data, split, run / f"paired-{role}-epoch1.csv")
            out[f"epoch1_{role}_won"], out[f"epoch1_{role}_lost"], out[f"epoch1_{role}_p"] = mcnemar(first, start)
        if probe.is_file():
            start = start if before == probe else right_by_key(probe, data, split, run / f"paired-{role}-probe.csv")
            fit = right_by_key(run / "best.pt", data, split, run / f"paired-{role}-fit.csv")
            out[f"{role}_won"], out[f"{role}_lost"], out[f"{role}_p"] = mcnemar(fit, start)
    return out


def measure(name: str, data: Path, probed: tuple[dict[str, Any], float], fit_args: list[str], work: Path,
            seed: int = 0) -> dict[str, Any]:
    """One fit of dataset NAME (packed at DATA, PROBED by run_probe) with SEED: its row."""
    manifest = json.loads((data / "dataset.json").read_text())
    probe, probe_seconds = probed
    run = work / (f"{name}-fit" if seed == 0 else f"{name}-fit-seed{seed}")
    rows, summary, seconds = run_fit(data, run, [*fit_args, "--seed", str(seed)])
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    frozen = config["freeze_epochs"]
    val = [float(row["val_top1"]) for row in rows]
    best = max(val)
    test = summary.get("test", {}).get("top1")
    train_images = manifest["splits"]["train"]["num_samples"]
    val_split = next(n for n in ("val", "validation") if n in manifest["splits"])
    val_images = manifest["splits"][val_split]["num_samples"]
    splits = {"val": val_split} | ({"test": "test"} if "test" in manifest["splits"] else {})
    start = val[frozen - 1] if frozen else summary.get("start", {}).get("val_top1")
    unfrozen = val[frozen] if frozen < len(val) else None
    return {"name": name, "seed": seed, "train_images": train_images, "classes": len(manifest["classes"]),
            "probe_val": probe["val"]["top1"], "probe_test": probe.get("test", {}).get("top1"),
            "fit_val": best, "fit_test": test, "best_epoch": summary["best_epoch"],
            "val_images": val_images, "gain_images": round((best - probe["val"]["top1"]) * val_images),
            "start_val": start, "unfrozen_val": unfrozen,
            "epoch1_images": None if start is None or unfrozen is None else round((unfrozen - start) * val_images),
            **paired(data, run, splits, frozen), "fit_minutes": round(seconds / 60, 2),
            "img_s": round(train_images * len(rows) / seconds, 1), "probe_seconds": round(probe_seconds, 1),
            "val_by_epoch": val, "fit_args": fit_args}


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One dataset's rows (one per seed) summarised: the mean of each numeric column, with its min and max."""
    out: dict[str, Any] = {"name": rows[0]["name"], "seed": "mean"}
    for column in (c for c in COLUMNS[2:] if not c.endswith("_p")):  # a mean of p-values is no test
        values = [row[column] for row in rows if isinstance(row.get(column), (int, float))]
        if len(values) == len(rows):
            out[column] = round(sum(values) / len(values), 4)
            out[f"{column}_min"], out[f"{column}_max"] = min(values), max(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="clothing-small,fb-marketplace,fashion-mnist")
    parser.add_argument("--fit-args", default=shlex.join(RECIPE), help="flags for trainer fit [the README's recipe]")
    parser.add_argument("--seeds", default="0", help="comma-separated `trainer fit --seed`s: a fit per seed [0]")
    parser.add_argument("--name", default="accuracy", help="results/<name>.json (to keep a trial beside the default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    real = real_data()
    names = [n for n in args.datasets.split(",") if n]
    missing = [n for n in names if not (real / n).exists()]
    if missing:
        sys.exit(f"not found under {real}: {', '.join(missing)} (set SHARDTOOL_REAL_DATA)")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    work = CACHE / "accuracy-runs" / ("" if args.name == "accuracy" else args.name)  # a trial keeps its own runs
    results = []
    for name in names:
        data = packed(name, real)
        probed = run_probe(data, work / f"{name}-probe")  # the same for every seed
        rows = [measure(name, data, probed, shlex.split(args.fit_args), work, seed) for seed in seeds]
        results += rows + ([mean_row(rows)] if len(rows) > 1 else [])
    settings = {"model": "efficientnet_lite0", "weights": "imagenet", "fit_args": shlex.split(args.fit_args),
                "seeds": seeds,
                "pack": {name: pack_args(name, Path("$SHARDTOOL_REAL_DATA"))[1:] for name in names}}
    emit(args.name, settings, results, COLUMNS, args.json)


if __name__ == "__main__":
    main()
