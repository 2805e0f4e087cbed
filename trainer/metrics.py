"""Evaluation metrics that add up across batches and ranks, and the files a run leaves behind.

EvalMeter keeps every counter on the logits' device (no sync per batch); `reduce()` sums them over
DDP ranks, `result()` turns them into fractions. RunLog writes OUT/metrics.csv, OUT/tb (TensorBoard)
and OUT/curves.png once per epoch; the caller decides where (rank 0 only). matplotlib and tensorboard
are imported only when a picture or an event is written, so `import trainer.metrics` stays cheap.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.dataset import Dataset, Mixture

CONFUSION_MAX_CLASSES = 50  # more classes: draw the most frequent true classes only
CLASS_COLUMNS = 50  # more classes: per-class accuracy in summary.json and --json only, not as metrics.csv columns
_OTHER_TAGS = {"lr": "lr", "img_s": "speed/img_s", "data_wait": "speed/data_wait", "seconds": "speed/seconds"}


def level_maps_from_manifest(classes: list[dict[str, Any]],
                             hierarchy: dict[str, Any] | None) -> tuple[list[str], list[torch.Tensor]]:
    """Level names and, per level above the classes, a LongTensor class index -> ancestor index there.

    A class's ancestor at level k is the index of its path `levels[:k+1]` in `hierarchy.levels[k]`
    (what shardtool's `level_indexes` record); a class with no such path (no `levels`, or a shallower
    path than the tree) maps to -1, which EvalMeter scores right only when the class itself is right.
    """
    if not any(entry.get("level_indexes") for entry in classes):
        return [], []
    depth = max(len(entry.get("level_indexes", [])) for entry in classes)
    names = list(hierarchy["names"][:depth]) if hierarchy else [f"level{k + 1}" for k in range(depth)]
    paths: dict[tuple[str, ...], int] = {}  # path down to level k -> its index in hierarchy.levels[k]
    for entry in classes:
        for k, index in enumerate(entry.get("level_indexes", [])):
            paths[tuple(entry["levels"][:k + 1])] = index
    maps = []
    for k in range(depth):
        mapping = torch.full((len(classes),), -1, dtype=torch.long)
        for entry in classes:
            levels = entry.get("levels") or []
            if len(levels) > k:
                mapping[entry["index"]] = paths.get(tuple(levels[:k + 1]), -1)
        maps.append(mapping)
    return names, maps


class EvalMeter:
    """Sums of one evaluation pass: loss, top-1, top-5, confusion matrix, accuracy per hierarchy level, and
    from the confusion matrix each class's accuracy (its recall) and their mean (balanced accuracy).

    Labels of -1 (unlabelled) count in `num_unlabelled` and nowhere else. Create one per pass.
    LEVEL_NAMES (from level_maps_from_manifest) name the levels in `result()`; default level1, level2, ...
    CLASS_NAMES name the classes there; default their indexes.
    """

    def __init__(self, num_classes: int, level_maps: list[torch.Tensor] | None = None,
                 level_names: list[str] | None = None, class_names: list[str] | None = None) -> None:
        self.num_classes = num_classes
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])
        self.topk = min(5, num_classes)
        self._maps = list(level_maps or [])
        self.level_names = list(level_names or [f"level{k + 1}" for k in range(len(self._maps))])
        if len(self.level_names) != len(self._maps):
            raise ValueError(f"{len(self.level_names)} level names for {len(self._maps)} level maps")
        self._counts: torch.Tensor | None = None  # float64 [samples, unlabelled, loss, top1, top5, level...]
        self._confusion: torch.Tensor | None = None
        self._reduced = False

    def _ensure(self, device: torch.device) -> None:
        if self._counts is None:
            self._counts = torch.zeros(5 + len(self._maps), dtype=torch.float64, device=device)
            self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=device)
            self._maps = [m.to(device) for m in self._maps]

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: float | torch.Tensor) -> None:
        """LOGITS [N, C], LABELS [N] (-1: unlabelled), LOSS_SUM the summed loss of the labelled ones.

        LOSS_SUM may be a 0-d tensor on the device, which saves a sync per batch.
        """
        if self._reduced:
            raise RuntimeError("EvalMeter.update after reduce(): create a new meter for the next pass")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have shape {tuple(logits.shape)}, expected [N, {self.num_classes}]")
        self._ensure(logits.device)
        labelled = labels >= 0
        logits, truth = logits[labelled], labels[labelled].long()
        top = logits.topk(self.topk, dim=1).indices
        predicted = top[:, 0]
        hit = predicted == truth
        step = [labelled.sum(), (~labelled).sum(), torch.as_tensor(loss_sum, device=logits.device),
                hit.sum(), (top == truth[:, None]).any(dim=1).sum()]
        for mapping in self._maps:
            same = (mapping[predicted] == mapping[truth]) & (mapping[truth] >= 0)
            step.append((hit | same).sum())
        self._counts += torch.stack([s.to(torch.float64) for s in step])
        self._confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)

    def reduce(self) -> None:
        """Sum the counters over all ranks (when torch.distributed is initialised); call once, on every rank."""
        if self._reduced:
            return
        self._reduced = True
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._counts is None:  # this rank saw no batch; its zeros still have to take part
            backend = dist.get_backend()
            self._ensure(torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(self._confusion, op=dist.ReduceOp.SUM)

    @property
    def confusion(self) -> torch.Tensor:
        """C x C int64, rows = true class, columns = predicted class."""
        if self._confusion is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return self._confusion

    def result(self) -> dict[str, Any]:
        """loss (mean), top1, top5 (fractions 0..1, None without labelled samples), num_samples (labelled),
        num_unlabelled, level_acc {level name: fraction}, class_acc {class name: recall, None for a class
        without samples}, balanced_acc (the mean recall of the classes with samples)."""
        counts = [0.0] * (5 + len(self._maps)) if self._counts is None else self._counts.tolist()
        n = int(counts[0])

        def fraction(value: float) -> float | None:
            return value / n if n else None

        recalls = class_recalls(self.confusion.cpu())
        present = [r for r in recalls if r is not None]
        return {"loss": fraction(counts[2]), "top1": fraction(counts[3]), "top5": fraction(counts[4]),
                "num_samples": n, "num_unlabelled": int(counts[1]),
                "level_acc": {name: fraction(c) for name, c in zip(self.level_names, counts[5:])},
                "balanced_acc": sum(present) / len(present) if present else None,
                "class_acc": dict(zip(self.class_names, recalls))}


def class_recalls(confusion: torch.Tensor) -> list[float | None]:
    """Per true class (a row of CONFUSION), the fraction predicted right; None for a class with no sample."""
    totals, right = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
    return [r / t if t else None for r, t in zip(right, totals)]


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def _pyplot_free_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg backend, without pyplot's global figure registry."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save_figure(figure: Any, path: Path) -> None:
    tmp = _atomic_path(path)
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _parse(value: str) -> Any:
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tag(key: str) -> str:
    """train_loss -> loss/train, val_level1 -> level1/val, lr -> lr, img_s -> speed/img_s."""
    for split in ("train", "val"):
        if key.startswith(split + "_"):
            return f"{key[len(split) + 1:]}/{split}"
    return _OTHER_TAGS.get(key, key)


def new_meter_for(dataset: Dataset | Mixture, device: torch.device) -> EvalMeter:
    """A meter for one pass over DATASET's classes, with its hierarchy's levels."""
    names, maps = level_maps_from_manifest(dataset.classes, dataset.manifest.get("hierarchy"))
    return EvalMeter(len(dataset.classes), [m.to(device) for m in maps], names, dataset.class_names)


class RunLog:
    """OUT/metrics.csv, OUT/tb and OUT/curves.png, one row per epoch.

    RESUME_EPOCH E keeps the rows of epochs <= E (later ones came from the run that was killed after
    its last checkpoint) and purges TensorBoard points after E. Without it the log starts over.
    """

    def __init__(self, out: Path, resume_epoch: int | None = None) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.curves_path = self.out / "metrics.csv", self.out / "curves.png"
        keep = resume_epoch or 0
        self._rows = [row for row in self._read_rows() if row["epoch"] <= keep]
        self._columns = ["epoch"] + [k for row in self._rows for k in row if k != "epoch"]
        self._columns = list(dict.fromkeys(self._columns))
        self._rewrite_csv()
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(str(self.out / "tb"), purge_step=keep + 1)

    def _read_rows(self) -> list[dict[str, Any]]:
        if not self.csv_path.exists():
            return []
        with self.csv_path.open(newline="") as f:
            return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def _rewrite_csv(self) -> None:
        if not self._rows:
            self.csv_path.unlink(missing_ok=True)
            return
        tmp = _atomic_path(self.csv_path)
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, self.csv_path)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """ROW has "epoch" (1-based) and any numbers (train_loss, val_top1, lr, ...): CSV, TensorBoard, curves."""
        if not isinstance(row.get("epoch"), int):
            raise ValueError(f"log_epoch needs an integer 'epoch' (1-based), got row keys {sorted(row)}")
        epoch = row["epoch"]
        rewrite = any(r["epoch"] >= epoch for r in self._rows) or any(k not in self._columns for k in row)
        self._rows = [r for r in self._rows if r["epoch"] < epoch] + [dict(row)]
        self._columns = list(dict.fromkeys(self._columns + list(row)))
        if rewrite or not self.csv_path.exists():
            self._rewrite_csv()
        else:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(row)
        for key, value in row.items():
            if key != "epoch" and _is_number(value):
                self._writer.add_scalar(_tag(key), value, global_step=epoch)
        self._writer.flush()
        self.draw_curves()

    def draw_curves(self) -> None:
        """OUT/curves.png: loss (train, val) and accuracy (top1, top5, levels) against epoch."""
        figure = _pyplot_free_figure(11, 4.5)
        loss_ax, acc_ax = figure.subplots(1, 2)
        accuracy_keys = [k for k in self._columns if k.endswith(("_top1", "_top5", "_balanced_acc")) or "_level" in k]
        for ax, keys, title in ((loss_ax, ["train_loss", "val_loss"], "loss"), (acc_ax, accuracy_keys, "accuracy")):
            for key in keys:
                points = [(r["epoch"], r[key]) for r in self._rows if _is_number(r.get(key))]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, label=key)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize="small")
        _save_figure(figure, self.curves_path)

    @staticmethod
    def write_confusion(matrix: torch.Tensor, class_names: list[str], path: Path) -> None:
        """A row-normalised confusion matrix PNG; above 50 classes only the 50 most frequent true classes."""
        matrix = matrix.detach().cpu()
        total = matrix.shape[0]
        if len(class_names) != total:
            raise ValueError(f"{len(class_names)} class names for a {total}x{total} confusion matrix")
        row_sums = matrix.sum(dim=1)
        shown = torch.arange(total)
        title = "confusion matrix (rows: true class, normalised)"
        if total > CONFUSION_MAX_CLASSES:
            shown = row_sums.topk(CONFUSION_MAX_CLASSES).indices.sort().values
            title = f"confusion: the {CONFUSION_MAX_CLASSES} most frequent of {total} true classes (rows normalised)"
        cells = matrix[shown][:, shown].double() / row_sums[shown].clamp(min=1).double()[:, None]
        _draw_confusion(cells, [str(class_names[i])[:28] for i in shown.tolist()], title, Path(path))

    @staticmethod
    def write_summary(summary: dict[str, Any], path: Path) -> None:
        """SUMMARY as indented JSON, written to a temporary file then renamed into place."""
        path = Path(path)
        tmp = _atomic_path(path)
        tmp.write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, path)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)  # Path, dtype, ...


def _draw_confusion(cells: torch.Tensor, names: list[str], title: str, path: Path) -> None:
    k = len(names)
    side = max(6.0, 3.0 + 0.28 * k)
    figure = _pyplot_free_figure(side + 1.5, side)
    ax = figure.subplots()
    image = ax.imshow(cells.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.04)
    font = 9 if k <= 20 else 6
    ax.set_xticks(range(k), names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(cells.tolist() if k <= 20 else []):  # the fractions themselves, when they fit
        for j, value in enumerate(row):
            if value >= 0.005:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
    _save_figure(figure, path)
