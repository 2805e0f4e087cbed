"""trainer export: checkpoint -> ONNX or TorchScript file + JSON sidecar, checked against PyTorch first.

    checkpoint -> Classifier (float32) -> Exported (logits, probabilities) -> OUT.tmp
        -> parity: the same normalised batches through PyTorch and the file (random ones with batch sizes
           1 and 3, and every image of a split of DATA when given): top-1 equal, probabilities within 1e-4
        -> OUT and OUT's .json sidecar (classes, preprocessing, checkpoint sha256, parity), else an error

The exported graph takes float32 N x 3 x S x S already preprocessed (`Preprocessing.describe()` in the
sidecar says how) and has a dynamic batch axis. ONNX uses torch's dynamo exporter (torch.export); the
model is one file, weights inside.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardtool.atomic import replacing
from shardtool.options import check_output_file
from trainer.data import eval_spec
from trainer.data.torch import TorchLoader
from trainer.dataset import open_dataset
from trainer.errors import ConfigError
from trainer.exported import SIDECAR_FORMAT, onnx_runner, sidecar_path, torchscript_runner
from trainer.infer import Classifier

TOLERANCE = 1e-4
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class Exported(nn.Module):
    """The classifier as deployed: normalised images -> (logits, probabilities)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(images).float()
        return logits, logits.softmax(1)


def export(ckpt: str, out: Path, fmt: str, *, data: str = "", split: str = "test", batch_size: int = 32,
           progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if str(ckpt).endswith(".onnx"):
        raise ConfigError(f"{ckpt} is already an export: export from the trainer checkpoint it came from")
    check_outputs(Path(ckpt), out)
    classifier = Classifier.load(ckpt, "cpu")
    module = Exported(classifier.logits).eval()
    size = classifier.preprocessing.image_size
    example = torch.randn(2, 3, size, size)
    with replacing(out, out.with_name(out.name + ".tmp" + FORMATS[fmt])) as tmp:  # removed if anything fails
        (write_onnx if fmt == "onnx" else write_torchscript)(module, example, tmp)
        run = (onnx_runner if fmt == "onnx" else torchscript_runner)(tmp)
        parity = check_parity(module, run, batches(classifier, data, split, batch_size, progress))
        if parity["top1_equal"] != parity["images"] or parity["max_prob_diff"] > TOLERANCE:
            raise ConfigError(f"the exported model differs from the checkpoint: top-1 equal for "
                              f"{parity['top1_equal']} of {parity['images']} images, max probability difference "
                              f"{parity['max_prob_diff']:.2e}")
    sidecar = describe(classifier, out, fmt, parity | {"data": data, "split": split if data else ""})
    sidecar_path(out).write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
    return sidecar | {"path": str(out), "sidecar": str(sidecar_path(out))}


def check_outputs(ckpt: Path, out: Path) -> None:
    """OUT and its sidecar must be writable and neither may be CKPT (by resolved path or the same file)."""
    for flag, path in (("OUT", out), ("OUT's sidecar", sidecar_path(out))):
        check_output_file(flag, str(path))
        same = path.resolve() == ckpt.resolve() or (path.exists() and ckpt.exists() and os.path.samefile(path, ckpt))
        if same:
            raise ConfigError(f"{flag} {path} is the checkpoint CKPT itself: write the export to another file")


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()  # the exporter prints its steps; a failure is raised, not printed
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["input"],
                          output_names=["logits", "probabilities"], dynamic_shapes=({0: batch},), dynamo=True,
                          external_data=False)


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(module, example)
    traced.save(str(path))


def batches(classifier: Classifier, data: str, split: str, batch_size: int,
            progress: Callable[[int, int], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Normalised float batches to compare on: random ones (batch sizes 1 and 3), then DATA's split."""
    size = classifier.preprocessing.image_size
    generator = torch.Generator().manual_seed(0)
    for n in (1, 3):
        yield "random", torch.randn(n, 3, size, size, generator=generator)
    if not data:
        return
    pre = classifier.preprocessing
    loader = TorchLoader(eval_spec(open_dataset(data), split, pre, batch_size, labelled=False, workers=1))
    for index, raw in enumerate(loader.host_batches(0)):
        yield split, pre.normalize(raw["images"])
        if progress:
            progress(index + 1, loader.num_batches)


def check_parity(module: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
                 inputs: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Per source of inputs (random, the split): images, top-1 equal, max probability difference."""
    found: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for source, batch in inputs:
            expected, got = module(batch)[1], run(batch)
            entry = found.setdefault(source, {"images": 0, "top1_equal": 0, "max_prob_diff": 0.0})
            entry["images"] += len(batch)
            entry["top1_equal"] += int((expected.argmax(1) == got.argmax(1)).sum())
            entry["max_prob_diff"] = max(entry["max_prob_diff"], float((expected - got).abs().max()))
    every = list(found.values())
    return {"images": sum(e["images"] for e in every), "top1_equal": sum(e["top1_equal"] for e in every),
            "max_prob_diff": max(e["max_prob_diff"] for e in every), "tolerance": TOLERANCE, "by_input": found}


def describe(classifier: Classifier, out: Path, fmt: str, parity: dict[str, Any]) -> dict[str, Any]:
    size = classifier.preprocessing.image_size
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    if fmt == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return {"format": SIDECAR_FORMAT, "model_format": fmt, "file": out.name, "model": classifier.model_name,
            "classes": classifier.classes, "class_entries": classifier.class_entries,
            "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "outputs": {"logits": ["batch", len(classifier.classes)], "probabilities": ["batch", len(classifier.classes)]},
            "preprocessing": classifier.preprocessing.describe(), "checkpoint_sha256": classifier.sha256,
            "parity": parity, "versions": versions}
