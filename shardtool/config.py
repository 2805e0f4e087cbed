"""Pack options as frozen dataclasses. `validate()` raises ConfigError with a one-line fix."""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardtool.errors import ConfigError
from shardtool.options import MAX_WORKERS, Range

RESIZE_MODES = ("none", "shorter", "longer", "fit", "pad", "squash")
FORMATS = ("auto", "folder", "csv", "pixels", "bson")
VERIFY_MODES = ("full", "header")
ENCODINGS = ("auto", "jpg", "png")
BACKENDS = ("auto", "dali", "pil")
ORDERS = ("shuffled", "source")  # see order.py
DEDUP_MODES = ("keep", "drop-within", "drop-leaks", "drop-both")  # see dedup.py


MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit: pack's --max-pixels and trainer's default
MAX_SIDE = 65_500  # JPEG's largest side: --resize N above it cannot be written
MAX_SEED = 2**63 - 1

# What each numeric option of `shardtool pack` may be: its click type and PackConfig.validate() read this
RANGES = {
    "quality": Range(int, 1, 100), "max_pixels": Range(int, 1), "seed": Range(int, 0, MAX_SEED),
    "shard_size": Range(int, 1), "shard_bytes": Range(int, 1), "workers": Range(int, 0, MAX_WORKERS),
    "max_skip_fraction": Range(float, 0, 1), "label_level": Range(int, 1),
}


@dataclass(frozen=True)
class Resize:
    """How images are resized: `none`, or a mode with a target size N (see parse_resize)."""

    mode: str = "none"
    size: int = 0

    def __str__(self) -> str:
        return self.mode if self.mode == "none" else f"{self.mode}:{self.size}"

    @property
    def fewest_pixels(self) -> int:
        """The fewest pixels any output has: N x N for shorter, fit, pad and squash (longer:N may be N x 1)."""
        return self.size * self.size if self.mode in ("shorter", "fit", "pad", "squash") else 0


def parse_resize(text: str) -> Resize:
    mode, _, size = text.strip().lower().partition(":")
    if mode == "none" and not size:
        return Resize()
    if mode not in RESIZE_MODES or mode == "none" or not size.isdigit() or not 1 <= int(size) <= MAX_SIDE:
        raise ConfigError(
            f"--resize {text!r} is not valid: use none or MODE:N with MODE one of "
            f"{', '.join(RESIZE_MODES[1:])} and N from 1 to {MAX_SIDE} (e.g. shorter:256)"
        )
    return Resize(mode, int(size))


def parse_split(text: str) -> dict[str, float]:
    """'val=0.1,test=0.1' -> {'val': 0.1, 'test': 0.1}; train gets the rest."""
    fractions: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "train" or not 0 < fraction < 1:
            raise ConfigError(f"--split {text!r} is not valid: use NAME=FRACTION pairs like val=0.1,test=0.1")
        fractions[name] = fraction
    if sum(fractions.values()) >= 1:
        raise ConfigError(f"--split {text!r} leaves nothing for train: the fractions must sum to less than 1")
    return fractions


def parse_shape(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)(?:x([134]))?", text.strip().lower())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ConfigError(f"--shape {text!r} is not valid: use HxWxC, e.g. 28x28x1 or 32x32x3")
    h, w, c = match.groups()
    return int(h), int(w), int(c or 1)


def check_encoding(name: str) -> None:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ConfigError(f"--encoding {name!r} is not a text encoding Python knows (e.g. utf-8, latin-1)") from None


@dataclass(frozen=True)
class CsvOptions:
    """How a CSV manifest or pixel CSV is read."""

    image_col: str | None = None
    label_col: str | None = None
    images: str | None = None
    image_suffix: str = ""
    join: str | None = None
    join_on: tuple[str, str] | None = None
    label_level: int | None = None
    group_col: str | None = None
    split_col: str | None = None
    numeric_cols: tuple[str, ...] = ("price",)
    encoding: str = "utf-8-sig"
    shape: tuple[int, int, int] | None = None
    channel_order: str = "interleaved"
    follow_links: bool = False  # CSV: image paths may lead outside --images through symlinks


@dataclass(frozen=True)
class PackConfig:
    source: str
    out: str
    format: str = "auto"
    csv: CsvOptions = field(default_factory=CsvOptions)
    resize: Resize = field(default_factory=Resize)
    categories: str | None = None
    encode: str = "auto"
    verify: str = "full"
    backend: str = "auto"  # decode/resize: dali (GPU when present), pil, or auto (see process/dali.py)
    quality: int = 90
    max_pixels: int = MAX_PIXELS
    split: dict[str, float] = field(default_factory=dict)
    stratify: bool = False
    seed: int = 0
    order: str = "shuffled"  # shuffled | source: the order samples are written in (order.py)
    dedup: str = "keep"  # pictures with the same bytes: reported only, or dropped (dedup.py)
    shard_size: int = 1000
    shard_bytes: int | None = None
    workers: int | None = None  # None: decided by timing the first batches (see parallel.py)
    distributor: str = "local"  # local: worker processes here | ray: Ray tasks (ray_workers.py)
    ray_address: str | None = None  # a running Ray cluster; None: RAY_ADDRESS, else a local one
    publish: str | None = None  # OUT given as a URL: `out` is the local staging folder (publish.py)
    max_skip_fraction: float = 0.01
    overwrite: bool = False

    def validate(self) -> PackConfig:
        if not Path(self.source).exists():
            raise ConfigError(f"SOURCE {self.source} does not exist")
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.encode not in ENCODINGS:
            raise ConfigError(f"--encode {self.encode!r} is not one of {', '.join(ENCODINGS)}")
        for name, range_ in RANGES.items():
            value = self.csv.label_level if name == "label_level" else getattr(self, name)
            range_.check("--" + name.replace("_", "-"), value)
        if self.distributor not in ("local", "ray"):
            raise ConfigError(f"--distributor {self.distributor!r} is not one of local, ray")
        check_encoding(self.csv.encoding)
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"--verify {self.verify!r} is not one of {', '.join(VERIFY_MODES)}")
        if self.order not in ORDERS:
            raise ConfigError(f"--order {self.order!r} is not one of {', '.join(ORDERS)}")
        if self.dedup not in DEDUP_MODES:
            raise ConfigError(f"--dedup {self.dedup!r} is not one of {', '.join(DEDUP_MODES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.categories is not None and not Path(self.categories).is_file():
            raise ConfigError(f"--categories {self.categories} does not exist")
        if self.csv.channel_order not in ("interleaved", "planar"):
            raise ConfigError("--channel-order must be interleaved or planar")
        if self.csv.images is not None and not Path(self.csv.images).is_dir():
            raise ConfigError(f"--images {self.csv.images} is not a folder")
        if self.csv.join is not None and not Path(self.csv.join).is_file():
            raise ConfigError(f"--join {self.csv.join} does not exist")
        if (self.csv.join is None) != (self.csv.join_on is None):
            raise ConfigError("--join and --join-on go together, e.g. --join Products.csv --join-on product_id=id")
        self._check_limits()
        return self

    def _check_limits(self) -> None:
        """A --resize whose every output is over --max-pixels is refused here, not image by image."""
        if self.resize.fewest_pixels > self.max_pixels:
            raise ConfigError(f"--resize {self.resize} makes every image at least {self.resize.size}x{self.resize.size} "
                              f"pixels, over --max-pixels {self.max_pixels}: use N up to {math.isqrt(self.max_pixels)} "
                              "or raise --max-pixels")

    def identity(self) -> dict[str, Any]:
        """What decides the shard bytes: a re-run with the same identity resumes, another is refused."""
        options = asdict(self)
        for volatile in ("out", "workers", "distributor", "ray_address", "publish", "max_skip_fraction", "overwrite"):
            options.pop(volatile)
        options["source"] = str(Path(self.source).resolve())
        for name in ("images", "join"):
            if options["csv"][name]:
                options["csv"][name] = str(Path(options["csv"][name]).resolve())
        if self.categories:
            options["categories"] = str(Path(self.categories).resolve())
        options["resize"] = str(self.resize)
        return json.loads(json.dumps(options))  # as run.json holds it (tuples -> lists), so a re-run compares equal
