"""An exported model file read back: its JSON sidecar checked field by field, and runners for the file.

`trainer export` writes MODEL (ONNX or TorchScript) and MODEL.json; Classifier.from_onnx and the export's
own parity check read them through this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import ConfigError

SIDECAR_FORMAT = "trainer-export/1"


def sidecar_path(model: Path) -> Path:
    return model.with_name(model.name + ".json")


def onnx_session(path: Path) -> Any:
    """An ONNX Runtime session on the CPU, or one line saying the file is not a model it can load."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except (ort.InvalidProtobuf, ort.InvalidGraph, ort.Fail, ort.NoSuchFile, ort.InvalidArgument):
        raise ConfigError(f"{path} is not an ONNX model onnxruntime can load: export the checkpoint again") from None


def onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX Runtime on the CPU: normalised batch -> probabilities."""
    session = onnx_session(path)

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
    session = onnx_session(path)

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
