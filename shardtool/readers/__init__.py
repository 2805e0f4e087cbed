"""Readers turn a SOURCE into Samples (and Skips for inputs that cannot become one). None decodes.

Each reader has: `given_splits` (whether samples carry their own split), `ignored` (files that are
not part of the dataset, reported but not counted), `label_sep` (the separator of hierarchical
labels, or None), `labelled` (False for data without labels, e.g. a test dump) and `__iter__`
yielding Sample | Skip in a stable order. A reader of one big file may also offer `partitions()`
(byte ranges), `read(span)` and `scan(span)` ((label, group, items) per document): pack then hands
whole ranges to the workers, which read and encode them (BsonReader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from shardtool.config import PackConfig
from shardtool.errors import ConfigError
from shardtool.readers.bsondump import BsonReader, looks_like_bson
from shardtool.readers.csv import CsvReader
from shardtool.readers.folder import FolderReader
from shardtool.readers.pixels import PixelReader, looks_like_pixels
from shardtool.readers.table import read_rows
from shardtool.sample import Item


class Reader(Protocol, Iterable[Item]):
    given_splits: bool
    labelled: bool
    ignored: list[dict[str, str]]
    label_sep: str | None


READERS: dict[str, Callable[[PackConfig], Any]] = {
    "folder": lambda config: FolderReader(config.source, exclude=config.out),
    "csv": lambda config: CsvReader(config.source, config.csv),
    "pixels": lambda config: PixelReader(config.source, config.csv),
    "bson": lambda config: BsonReader(config.source),
}


def detect_format(source: str, encoding: str = "utf-8-sig") -> str:
    path = Path(source)
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        header, _ = read_rows(path, encoding)
        return "pixels" if looks_like_pixels(header) else "csv"
    if path.suffix.lower() == ".bson" or looks_like_bson(path):
        return "bson"
    raise ConfigError(f"cannot tell what {path.name} is: pass --format ({', '.join(READERS)})")


def open_reader(config: PackConfig) -> tuple[str, Reader]:
    """(the format, resolved from --format or detected, and its reader)."""
    fmt = detect_format(config.source, config.csv.encoding) if config.format == "auto" else config.format
    if (fmt == "folder") != Path(config.source).is_dir():
        raise ConfigError(f"--format {fmt} does not fit {config.source}: folders are read as folder, files as csv/pixels/bson")
    return fmt, READERS[fmt](config)
