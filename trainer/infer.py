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
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from shardtool.config import MAX_PIXELS
from shardtool.process import guard
from shardtool.process.guard import Limits, Reject
from shardtool.process.pil import orientation, upright_rgb
from shardtool.readers.common import IMAGE_EXTS
from trainer.errors import ConfigError

ImageInput = Union[bytes, str, os.PathLike, Image.Image]
T = TypeVar("T")


class BadImage(ValueError):
    """An input that is not a usable image; `reason` is stable (empty, or one of the guard's: not_an_image,
    unsupported_format, corrupt_image, too_many_pixels, resize_too_large, file_too_large, missing_file,
    not_a_regular_file, unreadable_file), the message says what was wrong in one line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Preprocessing:
    """What the model sees at evaluation: shorter side resized, a centre crop, mean/std on a 0-1 scale."""

    image_size: int
    resize_shorter: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_checkpoint(cls, pre: dict[str, Any]) -> Preprocessing:
        size = int(pre["image_size"])
        return cls(size, int(pre.get("resize_shorter") or eval_resize(size)), tuple(pre["mean"]), tuple(pre["std"]))

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        return eval_crop(image, self.image_size, self.resize_shorter)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S -> float32 (x/255 - mean) / std, channels_last, as the torch loader does."""
        shape = (1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape) * 255
        inverse_std = 1 / (torch.tensor(self.std, device=images.device).view(shape) * 255)
        return normalize(images, mean, inverse_std)

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {"input": "float32 N x 3 x image_size x image_size, RGB",
                               "rule": "decode as upright RGB (EXIF orientation applied; alpha on white; 16-bit "
                                       "scaled to 8), resize the shorter side to resize_shorter (bilinear, "
                                       "antialiased), centre crop image_size, then (x / 255 - mean) / std"}


def eval_resize(image_size: int) -> int:
    """The shorter side before the centre crop: size / 0.875, as torchvision's and timm's eval presets."""
    return round(image_size / 0.875)


def eval_crop(image: torch.Tensor, size: int, resize_shorter: int) -> torch.Tensor:
    """uint8 3 x H x W -> uint8 3 x size x size: the one evaluation transform."""
    image = F.resize(image, [resize_shorter], antialias=True)
    return F.center_crop(image, [size, size])


def normalize(images: torch.Tensor, mean: torch.Tensor, inverse_std: torch.Tensor) -> torch.Tensor:
    """In place after one float conversion: (x - 255 mean) * 1 / (255 std), channels_last."""
    return images.contiguous(memory_format=torch.channels_last).float().sub_(mean).mul_(inverse_std)


def read_image(image: ImageInput, max_pixels: int = MAX_PIXELS,
               preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Any input -> uint8 3 x H x W, upright RGB, exactly as `shardtool pack` reads a source image, through
    the same guard (shardtool/process/guard.py). With PREPROCESSING, its eval resize is checked against
    MAX_PIXELS from the header, before the image is decoded."""
    limits = Limits(max_pixels, "the limit of")
    if isinstance(image, Image.Image):
        _check_eval_resize(image.size, preprocessing, limits)
        return _tensor(image)
    data = image if isinstance(image, bytes) else _accepted(guard.read_file(os.fspath(image), limits))
    if not data:
        raise BadImage("empty", "empty file (0 bytes)")
    opened = _accepted(guard.open_image(data, limits))
    _check_eval_resize(opened.size, preprocessing, limits)
    return _tensor(_accepted(guard.decode(opened)))


def eval_resized(size: tuple[int, int], resize_shorter: int) -> tuple[int, int]:
    """The size eval_crop's resize makes of a width x height image, by torchvision's rule (before the crop)."""
    width, height = size
    short, long = min(width, height), max(width, height)
    new_long = int(resize_shorter * long / short)
    return (resize_shorter, new_long) if width <= height else (new_long, resize_shorter)


def _check_eval_resize(size: tuple[int, int], pre: Preprocessing | None, limits: Limits) -> None:
    if pre is None:
        return
    what = f"the eval resize (shorter side to {pre.resize_shorter}) of this {size[0]}x{size[1]} image"
    if rejected := guard.check_planned([(what, eval_resized(size, pre.resize_shorter))], limits):
        _accepted(rejected)


def _accepted(value: T | Reject) -> T:
    """VALUE, or the guard's Reject raised as BadImage: the message is the reason in words, then the detail."""
    if isinstance(value, Reject):
        raise BadImage(value.reason, f"{value.reason.replace('_', ' ')}: {value.detail}")
    return value


def _tensor(image: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(_accepted(upright_rgb(image, orientation(image) in (None, 1))))


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
        from trainer.checkpoint import load_checkpoint
        from trainer.fit import resolve_device

        return cls.from_checkpoint(load_checkpoint(path), str(resolve_device(device)), file_sha256(Path(path)))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str = "cpu", sha256: str = "") -> Classifier:
        from trainer.models import create_model

        config, classes = checkpoint["config"], list(checkpoint["classes"])
        model = create_model(config["model"], len(classes), "none")
        model.module.load_state_dict(checkpoint["model"])
        module = model.module.to(device).eval()
        return cls(classes, Preprocessing.from_checkpoint(checkpoint["preprocessing"]), module,
                   model_name=config["model"], sha256=sha256, class_entries=checkpoint.get("class_entries"),
                   device=device)

    @classmethod
    def from_onnx(cls, path: Path) -> Classifier:
        from trainer.export import load_onnx

        sidecar, run = load_onnx(path)
        pre = sidecar["preprocessing"]
        preprocessing = Preprocessing(pre["image_size"], pre["resize_shorter"], tuple(pre["mean"]), tuple(pre["std"]))
        return cls(sidecar["classes"], preprocessing, run, model_name=sidecar["model"],
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
