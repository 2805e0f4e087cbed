"""Long-tailed data: --sampling uniform, balanced and sqrt, their held-out accuracy and the loader's speed.

    python -m benchmarks.longtail [--classes 1000] [--products 60000] [--repeats 3] [--work DIR] [--json]
    python -m benchmarks.longtail --quick       # 200 classes, 6,000 products, 1 round: a smoke run

Data: benchmarks/longtail_dump.py's synthetic Cdiscount-like dump (categories drawn from the real
category_names.csv, rank^-1 products per category, pictures that carry their class), packed once by the
real CLI: `shardtool pack DUMP OUT --categories category_names.csv --split val=0.1,test=0.2 --stratify
--verify header` (a product's pictures share a split; stratified, so the tail reaches val and test too).
Features: EfficientNet-Lite0 (ImageNet weights, frozen) pooled features of every split at --image-size 128,
extracted once into --work as `trainer probe --image-size 128 --out DIR` extracts and caches them
(trainer.probe.extract, without its LBFGS head, which had not finished after 11 minutes on 1,000 classes here;
--probe-row adds that head as a reference row, running the CLI on the cache). Heads: per mode, a linear head
on the standardised train features (Adam, HEAD_EPOCHS epochs of batches of HEAD_BATCH, cosine LR), each
epoch's samples the draws the torch loader makes of the train shards (trainer.data.plan.worker_plan +
trainer.data.draws.drawn with make_sampling(mode), every worker's share), read from the feature rows instead
of the pictures; the LR is chosen on uniform by val top-1 from LRS and kept for every mode. Test split,
unweighted: top-1, balanced accuracy (the mean recall of the classes present in test) and top-1 on the test
pictures of head (> 100 train pictures), medium (20-100) and tail (< 20) classes; tail_draws_pct is the share
of an epoch's draws from tail classes.
Loader: trainer.data.make_loader(spec, "torch") with the train spec `trainer fit --sampling MODE
--image-size 128 --batch-size 64` builds (trainer.run.loader_spec: fit's default workers, crop scale and
shuffle buffer), its uint8 host batches of RandomResizedCrop + flip images (as benchmarks.loader's
shardtool-torch row takes them), one warm-up and one timed
epoch per process, modes alternated round by round, --repeats rounds; img_s is the median, vs_uniform the
ratio of medians. No memory figure: a child's peak RSS counts its parent's at exec time (as
benchmarks/pack_bson.py notes), and the parent holds every split's features.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, emit, real_data, rel, row, timed_run
from benchmarks.longtail_dump import cached_dump

MODES = ("uniform", "balanced", "sqrt")
SPLIT, IMAGE_SIZE, BATCH = "val=0.1,test=0.2", 128, 64  # BATCH: the loader's (benchmarks.loader's)
PROBE_BATCH = 64  # trainer probe --batch-size: with its workers, the order of the cached rows
HEAD_EPOCHS, HEAD_BATCH, LRS = 10, 256, (3e-4, 1e-3, 3e-3)
GROUPS = (("head", 101, math.inf), ("medium", 20, 100), ("tail", 0, 19))  # train pictures of the class


# ---- the pack and its features, through the CLIs -------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[float, str]:
    """(seconds, stdout) of `python -m ARGV` on this checkout's code; a failure exits with its stderr."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    if done.returncode:
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start, done.stdout


def packed(work: Path, dump: Path, categories: Path) -> tuple[Path, float | None]:
    """DUMP packed with a product-grouped, stratified val and test split (once: None seconds when cached)."""
    out = work / f"{dump.stem}-pack"
    if (out / "dataset.json").is_file():
        return out, None
    seconds, _ = run_cli(["shardtool", "pack", str(dump), str(out), "--categories", str(categories), "--split", SPLIT,
                          "--stratify", "--verify", "header", "--overwrite"])
    return out, seconds


def features(pack: Path, work: Path, args: argparse.Namespace) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's (features, labels) from `trainer probe`'s feature cache, extracted the way the probe does
    (trainer.probe.extract, with its cache key) but without its LBFGS head, which had not finished after
    11 minutes on 1,000 classes here: the CLI's cache is reused and left reusable by it."""
    from trainer.probe import ProbeConfig, extract

    config = ProbeConfig(data=str(pack), out=str(probe_folder(pack, work, args)), model=args.model,
                         weights=args.weights, image_size=args.image_size, batch_size=PROBE_BATCH,
                         workers=args.probe_workers).validate()
    found = extract(config).features
    return {role: (np.asarray(split.features), np.asarray(split.labels)) for role, split in found.items()}


def probe_folder(pack: Path, work: Path, args: argparse.Namespace) -> Path:
    return work / f"{pack.name}-{args.model}-{args.image_size}"


def probe_row(pack: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """--probe-row: `trainer probe` itself (its LBFGS head, L2 by val top-1, every sample once) on the cache."""
    seconds, stdout = run_cli(["trainer", "probe", str(pack), "--model", args.model, "--weights", args.weights,
                               "--image-size", str(args.image_size), "--out", str(probe_folder(pack, work, args)),
                               "--json", "--batch-size", str(PROBE_BATCH), "--workers", str(args.probe_workers)])
    found = json.loads(stdout)
    return {"name": "probe (LBFGS, uniform)", "top1": round(100 * found["test"]["top1"], 2),
            "balanced_acc": round(100 * found["test"]["balanced_acc"], 2),
            "val_top1": round(100 * found["val"]["top1"], 2),
            "l2": found["l2"], "probe_s": round(seconds, 1)}


# ---- the project's draws, read from feature rows ------------------------------------------------------------


def train_spec(pack: Path, mode: str, args: argparse.Namespace) -> Any:
    """The training LoaderSpec `trainer fit PACK --sampling MODE --image-size SIDE --batch-size 64` builds
    (trainer.run.loader_spec, with the other settings at fit's defaults)."""
    import torch

    from trainer.config import FitConfig
    from trainer.dataset import open_dataset
    from trainer.distributed import Dist
    from trainer.models import create_model
    from trainer.run import loader_spec

    dataset = open_dataset(str(pack))
    config = FitConfig(data=str(pack), out=str(args.work / "fit"), model=args.model, sampling=mode,
                       image_size=args.image_size, batch_size=BATCH)
    model = create_model(args.model, len(dataset.classes), "none")  # its mean/std, as fit's spec has them
    return loader_spec(config, dataset, model, Dist(), torch.device("cpu"), "train", True)


def feature_rows(shards: tuple, labels: np.ndarray, workers: int) -> dict[str, np.ndarray]:
    """Each train shard's samples as rows of the probe's cache, by shard URL. The probe reads a split as eval
    does (plan.py): each worker a contiguous range, batch i from worker i % workers, so rows are in batch
    order, not shard order; replayed here and checked label by label against the shards."""
    from trainer.data.plan import worker_plan
    from trainer.data.sampling import read_labels

    offsets = dict(zip(shards, np.cumsum([0] + [s.num_samples for s in shards])))
    batches = []
    for worker in range(workers):
        plan = worker_plan(shards, seed=0, epoch=0, train=False, rank=0, world=1, batch_size=PROBE_BATCH,
                           workers=workers, worker=worker, start_batch=0, block=0)
        order = np.concatenate([offsets[p.shard] + np.arange(p.start, p.stop) for p in plan.segments])
        batches.append([order[i:i + PROBE_BATCH] for i in range(0, len(order), PROBE_BATCH)])
    order = np.concatenate([b[i] for i in range(max(map(len, batches))) for b in batches if i < len(b)])
    truth = np.array([label for shard in shards for label in read_labels(shard)])
    if len(order) != len(labels) or not np.array_equal(truth[order], labels):
        sys.exit("the probe's train features are not in the order its loader reads them (trainer/data/plan.py "
                 "changed?): cannot tie them to samples")
    row_of = np.empty(len(order), dtype=np.int64)
    row_of[order] = np.arange(len(order))
    return {shard.url: row_of[offsets[shard]:offsets[shard] + shard.num_samples] for shard in shards}


def epoch_draws(spec: Any, rows_of: dict[str, np.ndarray], labels: np.ndarray, epoch: int) -> np.ndarray:
    """The feature rows the torch loader draws in EPOCH of SPEC, repeats included (all its workers' shares)."""
    from trainer.data.draws import drawn
    from trainer.data.plan import Segment, worker_plan

    if spec.sampling is None:  # uniform: every sample once
        return np.arange(len(labels))

    def read(segment: Segment) -> Iterator[dict[str, Any]]:
        for at in rows_of[segment.shard.url][segment.start:segment.stop]:
            yield {"__key__": str(at), "cls": str(labels[at]).encode()}

    rows: list[int] = []
    for worker in range(spec.workers):
        plan = worker_plan(spec.shards, seed=spec.seed, epoch=epoch, train=True, rank=0, world=1,
                           batch_size=spec.batch_size, workers=spec.workers, worker=worker, start_batch=0,
                           block=spec.block, sampling=spec.sampling)
        rows += [int(sample["__key__"]) for sample in islice(drawn(plan, read, spec, epoch, spec.streams), plan.size)]
    return np.array(rows)


# ---- heads ---------------------------------------------------------------------------------------------------


def train_head(x: Any, y: Any, epochs: list[np.ndarray], num_classes: int, lr: float, seed: int = 0) -> Any:
    """A linear head trained with Adam on rows X[EPOCHS[e]] (each epoch shuffled), cosine LR from LR to 0."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    steps, step, rng = sum(math.ceil(len(rows) / HEAD_BATCH) for rows in epochs), 0, np.random.default_rng(seed)
    for rows in epochs:
        rows = torch.from_numpy(rows[rng.permutation(len(rows))])
        for start in range(0, len(rows), HEAD_BATCH):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            batch = rows[start:start + HEAD_BATCH]
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return head


def scores(head: Any, x: Any, y: Any, train_counts: np.ndarray) -> dict[str, Any]:
    """Top-1, balanced accuracy (mean recall of the classes present) and top-1 per class group, in percent."""
    import torch

    with torch.no_grad():
        right = (head(x).argmax(1) == y).numpy()
    labels = y.numpy()
    present = np.unique(labels)
    out = {"top1": 100 * right.mean(), "balanced_acc": 100 * np.mean([right[labels == c].mean() for c in present])}
    for name, lo, hi in GROUPS:
        members = (train_counts[labels] >= lo) & (train_counts[labels] <= hi)
        out[f"{name}_acc"] = 100 * right[members].mean() if members.any() else None
    return {k: None if v is None else round(float(v), 2) for k, v in out.items()}


def head_rows(pack: Path, splits: dict[str, tuple], args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict]:
    """One row per mode (test scores, tail share of the draws) and the facts: chosen LR, val top-1 per LR."""
    import torch

    torch.set_num_threads(1)  # small matrices: on 2 shared cores a second OpenMP thread spins (trainer/linear.py)
    (xt, yt), num_classes = splits["train"], len(json.loads((pack / "dataset.json").read_text())["classes"])
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    tensors = {role: (torch.from_numpy((x - mean) / std).float(), torch.from_numpy(y.astype(np.int64)))
               for role, (x, y) in splits.items()}
    counts = np.bincount(yt, minlength=num_classes)
    tail = counts < GROUPS[2][2] + 1
    specs = {mode: train_spec(pack, mode, args) for mode in MODES}
    rows_of = feature_rows(specs["uniform"].shards, yt, args.probe_workers)  # the same shards under every mode
    draws = {}
    for mode, spec in specs.items():
        draws[mode] = [epoch_draws(spec, rows_of, yt, epoch) for epoch in range(args.head_epochs)]
    grid = {lr: scores(train_head(*tensors["train"], draws["uniform"], num_classes, lr), *tensors["val"], counts)
            for lr in args.lrs}
    lr = max(grid, key=lambda value: grid[value]["top1"])
    rows = []
    for mode in MODES:
        head = train_head(*tensors["train"], draws[mode], num_classes, lr)
        drawn_tail = np.mean([tail[yt[rows_]].mean() for rows_ in draws[mode]])
        rows.append({"name": mode, **scores(head, *tensors["test"], counts), "val_top1": scores(
            head, *tensors["val"], counts)["top1"], "tail_draws_pct": round(100 * float(drawn_tail), 2)})
    facts = {"lr": lr, "val_top1_by_lr": {str(k): v["top1"] for k, v in grid.items()},
             "class_groups": {name: int(((counts >= lo) & (counts <= hi)).sum()) for name, lo, hi in GROUPS},
             "test_classes": int(len(np.unique(splits["test"][1]))), "train_pictures": int(len(yt)),
             "tail_train_pct": round(100 * float(tail[yt].mean()), 2)}
    return rows, facts


# ---- the loader's speed, one process per epoch ---------------------------------------------------------------


def loader_epoch(pack: Path, mode: str, args: argparse.Namespace) -> float:
    """images/s of one timed epoch (after a warm-up) of the torch loader drawing by MODE (in this process)."""
    from benchmarks.common import time_epochs
    from trainer.data import make_loader

    loader = make_loader(train_spec(pack, mode, args), "torch")
    host_batches: Callable[[int], Iterator[dict[str, Any]]] = loader.host_batches  # type: ignore[attr-defined]
    return time_epochs(lambda e: (raw["images"] for raw in host_batches(e)), 1, loader.num_samples)[0]


def speed_rows(pack: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each mode's img_s (min/median/max over --repeats processes, modes in turn)."""
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            out = Path(tempfile.mkstemp(prefix="bench-longtail-", suffix=".json")[1])
            timed_run([sys.executable, "-m", "benchmarks.longtail", "--child", mode, "--pack", str(pack),
                       "--image-size", str(args.image_size), "--model", args.model, "--work", str(args.work),
                       "--child-out", str(out)], env={"PYTHONPATH": str(REPO)})
            runs[mode].append(json.loads(out.read_text()))
            out.unlink()
    speeds = {mode: row(mode, done) for mode, done in runs.items()}
    for found in speeds.values():
        found["vs_uniform"] = round(found["img_s"] / speeds["uniform"]["img_s"], 3)
    return speeds


# ---- the run -------------------------------------------------------------------------------------------------


def parse() -> argparse.Namespace:
    from trainer.config import default_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=real_data(), help="holds cdiscount/category_names.csv")
    parser.add_argument("--classes", type=int, help="categories [1000; --quick 200]")
    parser.add_argument("--products", type=int, help="products, 1-4 pictures each [60000; --quick 6000]")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 classes, 6,000 products, 1 round")
    parser.add_argument("--repeats", type=int, help="loader rounds [3; --quick 1]")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic dump")
    parser.add_argument("--model", default="efficientnet_lite0", help="the probe's backbone")
    parser.add_argument("--weights", default="imagenet", help="the probe's --weights")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="the probe's and the loader's side")
    parser.add_argument("--head-epochs", type=int, default=HEAD_EPOCHS)
    parser.add_argument("--lrs", type=lambda text: [float(v) for v in text.split(",")], default=list(LRS),
                        help="Adam LRs tried on uniform, chosen by val top-1")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "shardtool-bench-longtail",
                        help="where the dump, the pack and the features are cached")
    parser.add_argument("--probe-row", action="store_true", help="also `trainer probe`'s own LBFGS head (minutes "
                                                                     "per 100 classes on 2 cores)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pack", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.classes = args.classes or (200 if args.quick else 1000)
    args.products = args.products or (6000 if args.quick else 60_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.probe_workers = default_workers()  # as the probe's own default
    return args


def main() -> None:
    args = parse()
    if args.child:
        args.child_out.write_text(json.dumps(loader_epoch(args.pack, args.child, args)))
        return
    categories = args.data / "cdiscount" / "category_names.csv"
    if not categories.is_file():
        sys.exit(f"{categories} not found: pass --data (the folder holding cdiscount/category_names.csv)")
    start = time.perf_counter()
    dump, facts = cached_dump(args.work, args.classes, args.products, args.seed, categories)
    pack, pack_s = packed(args.work, dump, categories)
    extract_start = time.perf_counter()
    splits = features(pack, args.work, args)
    features_s = time.perf_counter() - extract_start
    results, head_facts = head_rows(pack, splits, args)
    speeds = speed_rows(pack, args)
    results = [found | speeds[found["name"]] for found in results]
    if args.probe_row:
        results.append(probe_row(pack, args.work, args))
    settings = {**facts, "categories": rel(categories), "split": SPLIT, "stratify": True, "model": args.model,
                "weights": args.weights, "image_size": args.image_size, "pack_s": pack_s and round(pack_s, 1),
                "feature_dim": int(splits["train"][0].shape[1]), "features_s": round(features_s, 1),
                "head": {"optimizer": "Adam", "epochs": args.head_epochs, "batch_size": HEAD_BATCH,
                         "schedule": "cosine to 0", "lr_grid": args.lrs, "lr_chosen_on": "uniform, val top-1",
                         **head_facts},
                "loader": {"batch_size": BATCH, "workers": args.probe_workers,
                           "repeats": args.repeats, "timed_epochs_per_process": 1, "warmup_epochs": 1},
                "groups_by_train_pictures": {name: [lo, None if hi == math.inf else hi] for name, lo, hi in GROUPS},
                "total_s": round(time.perf_counter() - start, 1)}
    emit("longtail", settings, results, ["name", "top1", "balanced_acc", "head_acc", "medium_acc", "tail_acc",
                                         "tail_draws_pct", "img_s", "vs_uniform"], args.json)


if __name__ == "__main__":
    main()
