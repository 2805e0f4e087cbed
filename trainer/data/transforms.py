"""The evaluation transform, written once: resize the shorter side, centre crop, normalise.

The torch loader's eval path, `evaluate`/`predict` on shards, the probe's features, `trainer predict` on
files, `trainer export`'s parity check and `trainer serve` all go through these functions, so a model sees
the same pixels wherever it runs. Preprocessing is what a checkpoint (and an export's sidecar) records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as F


@dataclass(frozen=True)
class Preprocessing:
    """What the model sees at evaluation: shorter side resized, a centre crop, mean/std on a 0-1 scale."""

    image_size: int
    resize_shorter: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def at(cls, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Preprocessing:
        """IMAGE_SIZE's centre crop after the usual eval resize (eval_resize)."""
        return cls(image_size, eval_resize(image_size), tuple(mean), tuple(std))  # type: ignore[arg-type]

    @classmethod
    def from_checkpoint(cls, pre: dict[str, Any]) -> Preprocessing:
        """What `saved` wrote (a checkpoint's "preprocessing", an export sidecar's); resize_shorter may be absent."""
        size = int(pre["image_size"])
        return cls(size, int(pre.get("resize_shorter") or eval_resize(size)), tuple(pre["mean"]), tuple(pre["std"]))

    def saved(self, train_image_size: int = 0) -> dict[str, Any]:
        """The checkpoint's "preprocessing": this, and the side training crops to [image_size]."""
        return {"image_size": self.image_size, "train_image_size": train_image_size or self.image_size,
                "resize_shorter": self.resize_shorter, "mean": list(self.mean), "std": list(self.std)}

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
