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
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shardtool.atomic import replacing
from shardtool.options import check_output_file
from trainer.errors import ConfigError
from trainer.infer import Classifier

SIDECAR_FORMAT = "trainer-export/1"
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


def sidecar_path(model: Path) -> Path:
    return model.with_name(model.name + ".json")


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


def onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime on the CPU: normalised batch -> probabilities."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ort.InvalidProtobuf, ort.InvalidGraph, ort.Fail, ort.NoSuchFile, ort.InvalidArgument):
        raise ConfigError(f"{path} is not an ONNX model onnxruntime can load: export the checkpoint again") from None

    def run(images: torch.Tensor) -> torch.Tensor:
        probs = session.run(["probabilities"], {"input": np.ascontiguousarray(images.float().numpy())})[0]
        return torch.from_numpy(probs)
    return run


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded(images.contiguous())[1]
    return run


def load_onnx(path: Path) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
    """An exported ONNX file and its sidecar -> (sidecar, normalised batch -> logits) for Classifier."""
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise ConfigError(f"{path}: needs the file and its sidecar {side.name} (written by trainer export)")
    sidecar = read_sidecar(side)
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ort.InvalidProtobuf, ort.InvalidGraph, ort.Fail, ort.NoSuchFile, ort.InvalidArgument):
        raise ConfigError(f"{path} is not an ONNX model onnxruntime can load: export the checkpoint again") from None

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"input": np.ascontiguousarray(images.numpy())})[0])
    return sidecar, logits


# What Classifier.from_onnx reads from a sidecar, and the JSON type each must have
SIDECAR_FIELDS = {"format": str, "model": str, "classes": list, "class_entries": list, "checkpoint_sha256": str,
                  "preprocessing": dict}
PREPROCESSING_FIELDS = {"image_size": int, "resize_shorter": int, "mean": list, "std": list}


def read_sidecar(side: Path) -> dict[str, Any]:
    """The sidecar's JSON with every field Classifier.from_onnx reads, of its type; else one line naming it."""
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{side} is not a trainer export sidecar (not JSON): export the checkpoint again") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ConfigError(f"{side} is not a trainer export sidecar")
    for name, kind in SIDECAR_FIELDS.items():
        _need(side, name, isinstance(sidecar.get(name), kind))
    pre = sidecar["preprocessing"]
    for name, kind in PREPROCESSING_FIELDS.items():
        _need(side, f"preprocessing.{name}", isinstance(pre.get(name), kind) and not isinstance(pre[name], bool))
    _need(side, "classes", all(isinstance(name, str) for name in sidecar["classes"]))
    for name in ("mean", "std"):
        values = pre[name]
        numbers = len(values) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        _need(side, f"preprocessing.{name}", numbers and (name == "mean" or min(values) > 0))
    return sidecar


def _need(side: Path, name: str, ok: bool) -> None:
    if not ok:
        raise ConfigError(f"{side} lacks a valid {name!r}: export the checkpoint again (trainer export)")


def batches(classifier: Classifier, data: str, split: str, batch_size: int,
            progress: Callable[[int, int], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Normalised float batches to compare on: random ones (batch sizes 1 and 3), then DATA's split."""
    size = classifier.preprocessing.image_size
    generator = torch.Generator().manual_seed(0)
    for n in (1, 3):
        yield "random", torch.randn(n, 3, size, size, generator=generator)
    if not data:
        return
    from trainer.data import eval_spec
    from trainer.data.torch import TorchLoader
    from trainer.dataset import open_dataset

    pre = classifier.preprocessing
    loader = TorchLoader(eval_spec(tuple(open_dataset(data).shards(split)), pre, batch_size, labelled=False, workers=1))
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
