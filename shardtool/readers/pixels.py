"""Pixel CSVs: `label,pixel1..pixelN` (or pixel_0.., or no header) rows of 0-255 values.

The reader only reshapes: each row becomes HxWxC uint8 bytes (planar CIFAR rows are transposed
to interleaved) and the processor encodes them losslessly or as JPEG.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shardtool.config import CsvOptions
from shardtool.errors import ConfigError
from shardtool.readers.common import has_control
from shardtool.readers.table import need_column, read_rows, unique_columns
from shardtool.sample import Item, Sample, Skip

_PIXEL_COL = re.compile(r"(pixel|px|p)_?\d+", re.IGNORECASE)


def looks_like_pixels(header: list[str]) -> bool:
    """A header of mostly pixelN columns, or a headerless row of 64+ numbers."""
    pixel_like = sum(bool(_PIXEL_COL.fullmatch(h)) for h in header)
    numeric = sum(h.isdigit() for h in header)
    return pixel_like >= 0.9 * (len(header) - 1) > 0 or numeric >= 64


def infer_shape(n: int) -> tuple[int, int, int]:
    """784 -> 28x28x1, 3072 -> 32x32x3; any square count is grey, three squares are RGB."""
    side = math.isqrt(n)
    if side * side == n:
        return side, side, 1
    side = math.isqrt(n // 3)
    if n % 3 == 0 and side * side * 3 == n:
        return side, side, 3
    raise ConfigError(f"cannot infer an image shape from {n} pixel columns: pass --shape HxWxC")


class PixelReader:
    """Yields one Sample per row with `data` = raw HxWxC uint8 pixels."""

    given_splits = False
    labelled = True
    ignored: list[dict[str, str]] = []
    label_sep = None

    def __init__(self, source: str, options: CsvOptions) -> None:
        self.source, self.options = Path(source), options
        header, _ = read_rows(self.source, options.encoding)
        self.has_header = not all(h.isdigit() for h in header)
        if self.has_header:
            unique_columns(header, self.source)
            self.label_index = need_column(options.label_col or "label", header, "--label-col", self.source)
        else:
            self.label_index = 0
        self.width = len(header) - 1
        self.shape = options.shape or infer_shape(self.width)
        if math.prod(self.shape) != self.width:
            raise ConfigError(f"--shape {'x'.join(map(str, self.shape))} needs {math.prod(self.shape)} "
                              f"pixel columns; {self.source.name} has {self.width}")

    def __iter__(self) -> Iterator[Item]:
        header, rows = read_rows(self.source, self.options.encoding)
        if not self.has_header:
            rows = _chain_first(header, rows)
        for line, fields in rows:
            yield self._item(line, fields)

    def _item(self, line: int, fields: list[str]) -> Item:
        where, key = f"{self.source.name}:{line}", f"{self.source.stem}_{line:07d}"
        key = re.sub(r"[^A-Za-z0-9_-]", "_", key)
        if len(fields) != self.width + 1:
            return Skip("bad_row", key, where, f"{len(fields)} fields, expected {self.width + 1}", key)
        label = fields[self.label_index].strip()
        if not label:
            return Skip("missing_label", key, where, "empty label", key)
        if has_control(label):
            return Skip("bad_label", key, where, f"the label holds a control character: {label!r}", key)
        values = fields[: self.label_index] + fields[self.label_index + 1 :]
        try:
            pixels = np.array([int(v) for v in values], dtype=np.int64)
        except ValueError:
            return Skip("bad_pixels", key, where, "a pixel value is not an integer", key)
        if pixels.min() < 0 or pixels.max() > 255:
            return Skip("bad_pixels", key, where, "a pixel value is outside 0-255", key)
        h, w, c = self.shape
        array = pixels.astype(np.uint8).reshape(h, w, c)
        if c > 1 and self.options.channel_order == "planar":
            array = pixels.astype(np.uint8).reshape(c, h, w).transpose(1, 2, 0)
        label = str(int(label)) if re.fullmatch(r"\d+(\.0+)?", label) else label
        return Sample(key=key, label=label, group=key, source=where, data=np.ascontiguousarray(array).tobytes(),
                      raw_shape=self.shape)


def _chain_first(first: list[str], rest: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, list[str]]]:
    yield 1, first
    yield from rest
