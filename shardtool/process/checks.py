"""Cheap checks before decoding, for pack: guard.py's checks with a Sample in and a Skip out.

The bytes exist (within the byte cap), are an image type we pack, are not a bomb, and the planned resize
fits under --max-pixels; the checks themselves live in guard.py, shared with `trainer predict` and `serve`.
"""

from __future__ import annotations

from typing import TypeVar

from PIL import Image

from shardtool.config import Resize
from shardtool.process.geometry import Plan, plan
from shardtool.process import guard
from shardtool.process.guard import FORMATS, Limits, Reject, open_header
from shardtool.sample import Sample, Skip

T = TypeVar("T")

__all__ = ["FORMATS", "decode", "load_bytes", "open_header", "open_image", "or_skip", "planned", "read_file"]


def load_bytes(sample: Sample, max_pixels: int) -> bytes | Skip:
    """The sample's encoded bytes, reading its file if the reader gave a path (within the byte cap)."""
    data = sample.data if sample.data is not None else read_file(sample, max_pixels)
    if isinstance(data, Skip):
        return data
    if not data:
        return _skip(sample, "empty_file", "0 bytes")
    return or_skip(sample, guard.check_size(len(data), Limits(max_pixels)) or data)


def read_file(sample: Sample, max_pixels: int) -> bytes | Skip:
    """The bytes of the sample's file if it is a regular file within the byte cap (guard.read_file)."""
    return or_skip(sample, guard.read_file(sample.path or "", Limits(max_pixels)))


def open_image(sample: Sample, data: bytes, max_pixels: int) -> Image.Image | Skip:
    """Parse the header only: the format is one we pack and the pixel count is under the limit."""
    return or_skip(sample, guard.open_image(data, Limits(max_pixels)))


def planned(sample: Sample, size: tuple[int, int], resize: Resize, max_pixels: int) -> Plan | Skip:
    """--resize's plan for an image of SIZE, or a Skip when its resized or canvas size is over --max-pixels:
    checked before anything is allocated (either orientation gives the same pixel counts)."""
    geometry = plan(*size, resize)
    what = f"--resize {resize} of this {size[0]}x{size[1]} image"
    rejected = guard.check_planned([(what, geometry.scaled), (f"the canvas of {what}", geometry.canvas)],
                                   Limits(max_pixels))
    return geometry if rejected is None else or_skip(sample, rejected)


def decode(sample: Sample, image: Image.Image) -> Image.Image | Skip:
    """The image with its pixels loaded, or a corrupt_image Skip (whatever the decoder raised)."""
    return or_skip(sample, guard.decode(image))


def or_skip(sample: Sample, value: T | Reject) -> T | Skip:
    """VALUE, or the guard's Reject as this sample's Skip."""
    return _skip(sample, value.reason, value.detail) if isinstance(value, Reject) else value


def _skip(sample: Sample, reason: str, detail: str) -> Skip:
    return Skip(reason, sample.key, sample.source, detail, sample.group, sample.split)
