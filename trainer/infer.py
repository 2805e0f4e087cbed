"""Inference, written once: checkpoint -> preprocessing -> model -> top-k.

    image file / bytes / PIL image -> read_image (upright RGB, as pack makes it) -> uint8 3 x H x W
        -> Preprocessing.crop (resize the shorter side, centre crop: also the torch loader's eval transform)
        -> Preprocessing.normalize (the loader's arithmetic) -> model (float32) -> softmax -> top-k

`trainer predict` on files, `trainer export` (its parity check) and `trainer serve` all call this module;
`evaluate` and `predict` on shards reach the same `crop` through the torch loader. Use it from Python:

    clf = Classifier.load("run/best.pt")
    clf.classify("photo.jpg")          # [Label(label='shoes', index=6, prob=0.93), ...]
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shardtool.config import MAX_PIXELS
from shardtool.hashing import file_sha256
from shardtool.readers.common import IMAGE_EXTS
from trainer.checkpoint import load_checkpoint
from trainer.data.images import BadImage, ImageInput, read_image
from trainer.data.transforms import Preprocessing
from trainer.device import resolve_device
from trainer.errors import ConfigError
from trainer.exported import load_onnx
from trainer.models import model_from_checkpoint

__all__ = ["BadImage", "Classifier", "Label", "Preprocessing", "Result", "expand_inputs", "read_image"]


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    prob: float


@dataclass(frozen=True)
class Result:
    """One input's answer: top-k labels, or the reason it could not be read."""

    source: str
    top: tuple[Label, ...] = ()
    error: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def to_dict(self) -> dict[str, Any]:
        if not self.ok:
            return {"file": self.source, "error": self.error, "reason": self.reason}
        return {"file": self.source, "top": [asdict(label) for label in self.top]}


class Classifier:
    """A model ready to classify: load once, then `classify` paths, bytes or PIL images.

    `Classifier.load` takes a trainer checkpoint (PyTorch, float32) or a `trainer export` ONNX file (ONNX
    Runtime, reading the JSON sidecar beside it); both answer through the same preprocessing.
    """

    def __init__(self, classes: list[str], preprocessing: Preprocessing, logits: Callable[[torch.Tensor], torch.Tensor],
                 *, model_name: str, sha256: str = "", runtime: str = "torch",
                 class_entries: list[dict[str, Any]] | None = None, device: str = "cpu") -> None:
        self.classes = classes
        self.preprocessing = preprocessing
        self.logits = logits  # float32 N x 3 x S x S (normalised) -> N x classes
        self.model_name = model_name
        self.sha256 = sha256
        self.runtime = runtime
        self.class_entries = class_entries or [{"name": name} for name in classes]
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> Classifier:
        if str(path).endswith(".onnx"):
            return cls.from_onnx(Path(path))
        return cls.from_checkpoint(load_checkpoint(path), str(resolve_device(device)), file_sha256(Path(path)))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu", sha256: str = "") -> Classifier:
        config, classes = checkpoint["config"], list(checkpoint["classes"])
        module = model_from_checkpoint(checkpoint).module.to(device).eval()
        return cls(classes, Preprocessing.from_checkpoint(checkpoint["preprocessing"]), module,
                   model_name=config["model"], sha256=sha256, class_entries=checkpoint.get("class_entries"),
                   device=device)

    @classmethod
    def from_onnx(cls, path: Path) -> Classifier:
        sidecar, run = load_onnx(path)
        return cls(sidecar["classes"], Preprocessing.from_checkpoint(sidecar["preprocessing"]), run, model_name=sidecar["model"],
                   sha256=sidecar["checkpoint_sha256"], runtime="onnxruntime", class_entries=sidecar["class_entries"])

    def prepare(self, image: ImageInput, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        """uint8 3 x S x S, ready to stack into a batch; raises BadImage."""
        return self.preprocessing.crop(read_image(image, max_pixels, self.preprocessing))

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S (from `prepare`) -> float32 N x classes on the CPU; float32 throughout, so
        the answer does not depend on the batch it came in and matches the exported model."""
        batch = self.preprocessing.normalize(images.to(self.device))
        return self.logits(batch).float().softmax(1).cpu()

    def top(self, probs: torch.Tensor, k: int) -> tuple[Label, ...]:
        values, indices = probs.topk(max(1, min(k, len(self.classes))))
        return tuple(Label(self.classes[i], i, float(v)) for v, i in zip(values.tolist(), indices.tolist()))

    def classify(self, image: ImageInput, k: int = 5) -> list[Label]:
        return list(self.top(self.probabilities(self.prepare(image)[None])[0], k))

    def classify_many(self, sources: Iterable[str], k: int = 5, batch_size: int = 32) -> Iterator[Result]:
        """Files in the order given; a file that is not a readable image is a Result with its error."""
        pending: list[tuple[str, torch.Tensor]] = []
        for source in sources:
            try:
                pending.append((source, self.prepare(source)))
            except BadImage as error:
                yield from self._flush(pending, k)
                pending = []
                yield Result(source, error=str(error), reason=error.reason)
                continue
            if len(pending) == batch_size:
                yield from self._flush(pending, k)
                pending = []
        yield from self._flush(pending, k)

    def _flush(self, pending: list[tuple[str, torch.Tensor]], k: int) -> Iterator[Result]:
        if not pending:
            return
        probs = self.probabilities(torch.stack([image for _, image in pending]))
        for (source, _), row in zip(pending, probs):
            yield Result(source, self.top(row, k))

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "runtime": self.runtime, "classes": self.classes,
                "checkpoint_sha256": self.sha256, "preprocessing": self.preprocessing.describe()}


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Files, folders (walked, images only, sorted) and globs -> files, in the order given."""
    found: list[str] = []
    for given in paths:
        matches = sorted(glob.glob(given, recursive=True)) if glob.has_magic(given) else [given]
        if not matches:
            raise ConfigError(f"{given}: no file matches")
        for match in matches:
            found.extend(_walk(match) if os.path.isdir(match) else [match])
    return found


def _walk(folder: str) -> list[str]:
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if Path(name).suffix.lower() in IMAGE_EXTS and not name.startswith(".")]
    return sorted(files)
