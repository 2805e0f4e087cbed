"""What every loader takes and yields: LoaderSpec in, Batch out (the Loader protocol), and the label check.

A backend (trainer/data/torch.py, trainer/data/dali.py) imports this module and nothing above it; which
backend runs is trainer.data.make_loader's choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trainer.data.sampling import Sampling
from trainer.data.transforms import Preprocessing, eval_resize
from trainer.dataset import Dataset, Mixture, Shard
from trainer.remote import Remote


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs; built once per split by fit/evaluate/predict."""

    shards: tuple[Shard, ...]
    batch_size: int
    image_size: int  # side of the square the model sees
    mean: tuple[float, float, float]  # 0-1 scale, applied on the device
    std: tuple[float, float, float]
    train: bool  # True: shuffle + RandomResizedCrop + flip; False: resize + centre crop, in shard order
    labelled: bool = True
    num_classes: int = 0  # the manifest's classes: a .cls outside 0..num_classes-1 is a bad sample (0: not checked)
    resize_size: int = 0  # eval: shorter side before the centre crop [image_size / 0.875]
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: bool = True
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 2  # decode processes (DataLoader workers / DALI threads)
    shuffle_buffer: int = 1000
    block: int = 16  # training: samples read in sequence from a shard (0: whole shards, the order before blocks)
    streams: int = 64  # training: blocks each worker reads from at once, in turn (plan.py)
    on_corrupt: str = "fail"  # fail: stop with shard and key; skip: count and go on
    device: str = "cpu"
    remote: Remote = Remote()  # how URL shards are read: timeouts, retries, --cache
    sampling: Sampling | None = None  # training: --sampling/--mix/--epoch-size draws (plan.py); None: every sample once

    @property
    def eval_resize(self) -> int:
        return self.resize_size or eval_resize(self.image_size)


@dataclass
class Batch:
    images: torch.Tensor  # N x 3 x H x W float on the device, normalised, channels_last
    labels: torch.Tensor  # N int64 on the device; -1 where unlabelled
    keys: list[str]
    groups: list[str]  # what the split was hashed on (BSON: the product _id)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why) dropped from this batch
    io: dict[str, int] = field(default_factory=dict)  # remote reads since the last batch: retries, resumed, ...

    def __len__(self) -> int:
        return len(self.keys)


class Loader(Protocol):
    num_batches: int  # per epoch on this rank; equal on every rank when training
    num_samples: int  # per epoch on this rank

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of EPOCH from START_BATCH on; the same order for the same seed, whatever the start."""
        ...


def check_label(raw: bytes | None, num_classes: int) -> int:
    """A .cls member's bytes -> its class index; ValueError (one line, the label shown cut short) when it is
    missing, not a whole number >= 0, or not below NUM_CLASSES (0: any)."""
    if raw is None:
        raise ValueError("no .cls label in a labelled split")
    text = bytes(raw).decode("utf-8", "replace").strip()
    if not (text.isascii() and text.isdigit()) or (num_classes and int(text) >= num_classes):
        raise ValueError(f"label {text[:20]!r} is not a class of the manifest's {num_classes} (0-{num_classes - 1})")
    return int(text)


def eval_spec(dataset: Dataset | Mixture, split: str, pre: Preprocessing, batch_size: int,
              **options: Any) -> LoaderSpec:
    """The spec that reads SPLIT of DATASET once, in order, through PRE's resize and centre crop (evaluate,
    predict, the probe's features, export's parity check); OPTIONS: any other LoaderSpec field."""
    fields = {"labelled": dataset.labelled(split), "num_classes": len(dataset.classes)} | options
    return LoaderSpec(shards=tuple(dataset.shards(split)), batch_size=batch_size, image_size=pre.image_size,
                      resize_size=pre.resize_shorter, mean=pre.mean, std=pre.std, train=False, **fields)
