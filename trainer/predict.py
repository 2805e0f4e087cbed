"""evaluate and predict with a checkpoint: CKPT + DATA split -> metrics, or -> a predictions CSV.

    checkpoint (config, classes, preprocessing) -> model -> eval loader over the split -> probabilities
    per sample: key, group, true label, predicted label, probability
    --group:    one row per group (product) from the mean of its images' probabilities: `_id,category_id`

Grouping streams: a group's images are consecutive in the shards (pack writes a product's pictures
together), so a group is written as soon as the worker reading it has moved past it; memory holds the
open groups only, never the split.

On image files (`trainer predict CKPT photo.jpg folder/ ...`) the work is trainer/infer.py's Classifier;
this module only writes its results (`write_results`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardtool.atomic import replacing
from trainer.checkpoint import check_classes, load_checkpoint
from trainer.config import default_workers
from trainer.data import Batch, LoaderSpec, eval_spec, make_loader
from trainer.dataset import Dataset, is_url, open_dataset
from trainer.remote import Remote
from trainer.data.transforms import Preprocessing
from trainer.device import make_amp, resolve_device
from trainer.infer import Result
from trainer.loop import evaluate
from trainer.metrics import EvalMeter, new_meter_for
from trainer.models import model_from_checkpoint


def is_shards(data: str) -> bool:
    """DATA names shards (a shardtool output folder, a URL, a brace pattern or .tar), not image files."""
    return is_url(data) or "{" in data or data.endswith(".tar") or (Path(data) / "dataset.json").is_file()


def write_results(results: Iterable[Result], out: Path) -> list[Result]:
    """Per-file predictions to OUT: .json (a list of `Result.to_dict()`) or CSV, one row per label:
    file,rank,label,index,prob,error (a file that failed: one row with its error)."""
    done: list[Result] = []
    with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if out.suffix.lower() == ".json":
            done = list(results)
            json.dump([r.to_dict() for r in done], f, indent=1)
        else:
            writer = csv.writer(f)
            writer.writerow(["file", "rank", "label", "index", "prob", "error"])
            for result in results:
                done.append(result)
                for rank, label in enumerate(result.top, 1):
                    writer.writerow([result.source, rank, label.label, label.index, f"{label.prob:.6f}", ""])
                if not result.ok:
                    writer.writerow([result.source, "", "", "", "", result.error])
    return done


@dataclass
class Predictor:
    model: torch.nn.Module
    dataset: Dataset
    checkpoint: dict[str, Any]
    device: torch.device
    amp: str  # the checkpoint's amp unless overridden: bf16 is ~4x faster on a CPU, none matches files exactly
    remote: Remote = Remote()  # how URL DATA is read


def load_predictor(ckpt: str, data: str, device: str = "auto", amp: str = "", remote: Remote = Remote()) -> Predictor:
    checkpoint = load_checkpoint(ckpt)
    dataset = open_dataset(data, remote)
    if dataset.classes:
        check_classes(checkpoint, dataset.class_names, data)
    target = resolve_device(device)
    module = model_from_checkpoint(checkpoint).module.to(target).to(memory_format=torch.channels_last).eval()
    return Predictor(module, dataset, checkpoint, target, amp or checkpoint["config"]["amp"], remote)


def split_spec(p: Predictor, split: str, batch_size: int, workers: int | None) -> LoaderSpec:
    """WORKERS None: from the CPUs this process may use (config.default_workers)."""
    workers = default_workers() if workers is None else workers
    pre = Preprocessing.from_checkpoint(p.checkpoint["preprocessing"])
    return eval_spec(p.dataset, split, pre, batch_size, workers=workers, device=str(p.device),
                     on_corrupt=p.checkpoint["config"]["on_corrupt"], remote=p.remote)


def evaluate_checkpoint(p: Predictor, split: str, *, batch_size: int = 64, workers: int | None = None,
                        loader: str = "auto") -> tuple[dict[str, Any], EvalMeter]:
    spec = split_spec(p, split, batch_size, workers)
    batches = make_loader(spec, loader)
    meter = new_meter_for(p.dataset, p.device)
    amp = make_amp(p.amp, p.device)
    result = evaluate(p.model, batches.epoch(0), meter, amp=amp, num_batches=batches.num_batches,
                      on_corrupt=spec.on_corrupt)
    return result, meter


@dataclass
class GroupMeans:
    """Mean probabilities per group over a stream where batch i comes from worker i % workers.

    A group is complete once its worker has yielded a later batch without it; groups met in a worker's
    first batch may have started in the previous worker's range, so they wait for the end.
    """

    workers: int
    open: dict[str, list[Any]] = field(default_factory=dict)  # group -> [prob sum, count, last batch, held]

    def add(self, index: int, groups: list[str], probs: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for group, row in zip(groups, probs.float().cpu()):
            entry = self.open.setdefault(group, [torch.zeros_like(row), 0, index, index < self.workers])
            entry[0] += row
            entry[1] += 1
            entry[2] = index
        done = [g for g, e in self.open.items() if not e[3] and e[2] <= index - self.workers]
        for group in done:
            total, count, _, _ = self.open.pop(group)
            yield group, total / count

    def rest(self) -> Iterator[tuple[str, torch.Tensor]]:
        for group, (total, count, _, _) in self.open.items():
            yield group, total / count
        self.open.clear()


def predict_csv(p: Predictor, split: str, out: Path, *, group: bool, batch_size: int = 64, workers: int | None = None,
                loader: str = "auto") -> int:
    """Writes OUT; returns the number of rows."""
    spec = split_spec(p, split, batch_size, workers)
    batches = make_loader(spec, loader)
    entries = p.checkpoint["class_entries"]
    names = [str(e.get("category_id", e["name"])) for e in entries]
    amp = make_amp(p.amp, p.device)
    bson = p.dataset.manifest["source"].get("format") == "bson"
    rows = 0
    with replacing(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f, torch.no_grad():
        writer = csv.writer(f)
        if group:
            writer.writerow(["_id" if bson else "group", "category_id" if "category_id" in entries[0] else "label"])
        else:
            writer.writerow(["key", "group", "label", "prediction", "probability"])
        means = GroupMeans(max(spec.workers, 1))
        for index, batch in enumerate(batches.epoch(0)):
            probs = _probabilities(p.model, batch, amp)
            if group:
                for g, mean in means.add(index, batch.groups, probs):
                    writer.writerow([g, names[int(mean.argmax())]])
                    rows += 1
            else:
                rows += _write_samples(writer, batch, probs, names)
        for g, mean in means.rest():
            writer.writerow([g, names[int(mean.argmax())]])
            rows += 1
    return rows


def _probabilities(model: torch.nn.Module, batch: Batch, amp: Any) -> torch.Tensor:
    with amp.autocast():
        return model(batch.images).float().softmax(1)


def _write_samples(writer: Any, batch: Batch, probs: torch.Tensor, names: list[str]) -> int:
    top, index = probs.max(1)
    for key, g, label, pred, prob in zip(batch.keys, batch.groups, batch.labels.tolist(), index.tolist(),
                                         top.tolist()):
        writer.writerow([key, g, names[label] if label >= 0 else "", names[pred], f"{prob:.4f}"])
    return len(batch)
