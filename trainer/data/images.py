"""Reading one image as `shardtool pack` reads a source image: bytes, a path or a PIL image -> uint8 3 x H x W.

    path -> guard.read_file (size, regular file) -> guard.open_image (format, pixels) -> [the eval resize's
    size checked against the pixel limit] -> guard.decode -> upright RGB (EXIF orientation, alpha on white)

A rejected input raises BadImage, whose `reason` is the guard's (shardtool/process/guard.py).
"""

from __future__ import annotations

import os
from typing import TypeVar, Union

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from shardtool.config import MAX_PIXELS
from shardtool.process import guard
from shardtool.process.guard import Limits, Reject
from shardtool.process.pil import orientation, upright_rgb
from trainer.data.transforms import Preprocessing

ImageInput = Union[bytes, str, os.PathLike, Image.Image]
T = TypeVar("T")


class BadImage(ValueError):
    """An input that is not a usable image; `reason` is stable (empty, or one of the guard's: not_an_image,
    unsupported_format, corrupt_image, too_many_pixels, resize_too_large, file_too_large, missing_file,
    not_a_regular_file, unreadable_file), the message says what was wrong in one line."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
