"""Loaders: shards -> Batch on the device. Two backends, one contract.

Every backend takes a LoaderSpec and yields `Batch` objects whose images are already on the device,
float, normalised with the spec's mean/std and channels_last, so the loop never knows which one ran:

    shards (manifest) -> plan (which samples, in which order, on this rank) -> backend -> Batch
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer.data.sampling import Sampling
from trainer.dataset import Shard
from trainer.remote import Remote
from trainer.errors import ConfigError
from trainer.infer import Preprocessing, eval_resize


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


def eval_spec(shards: tuple[Shard, ...], pre: Preprocessing, batch_size: int, **options: Any) -> LoaderSpec:
    """The spec that reads SHARDS once, in order, through PRE's resize and centre crop (evaluate, predict,
    export's parity check)."""
    return LoaderSpec(shards=shards, batch_size=batch_size, image_size=pre.image_size, resize_size=pre.resize_shorter,
                      mean=pre.mean, std=pre.std, train=False, **options)


def make_loader(spec: LoaderSpec, backend: str) -> Loader:
    """backend: torch | dali | auto (dali when it is installed and a GPU is there, else torch)."""
    if spec_backend(spec, backend) == "dali":
        if not dali_available():  # only --loader dali gets here without DALI: auto chose torch
            raise ConfigError("--loader dali needs NVIDIA DALI, which is not installed here: pip install "
                              "'shardtool[dali]' (or the DALI wheel for this machine's CUDA), or use --loader torch")
        from trainer.data.dali import DaliLoader

        if not has_json_members(spec.shards):  # tars written by another tool, indexed by `shardtool index`
            if backend == "dali":
                raise ConfigError("--loader dali reads each sample's key from its .json member, and these shards "
                                  "have none (written by another tool): use --loader torch")
        else:
            return DaliLoader(spec)
    from trainer.data.torch import TorchLoader

    return TorchLoader(spec)


def resolve_backend(backend: str, device: str, torch_only: bool = False) -> str:
    """The backend make_loader runs for BACKEND (auto: dali on a GPU when installed, else torch; torch where
    only it can: URL shards without --cache, sampling)."""
    if backend == "auto":
        return "dali" if device.startswith("cuda") and dali_available() and not torch_only else "torch"
    return backend


def spec_backend(spec: LoaderSpec, backend: str) -> str:
    """The backend make_loader runs for SPEC: resolve_backend with what SPEC's shards and sampling allow."""
    return resolve_backend(backend, spec.device, uncached_urls(spec) or spec.sampling is not None)


def uncached_urls(spec: LoaderSpec) -> bool:
    """SPEC reads URL shards directly (no --cache): only the torch loader can."""
    from trainer.dataset import is_url

    return not spec.remote.cache and any(is_url(shard.url) for shard in spec.shards)


def has_json_members(shards: tuple[Shard, ...]) -> bool:
    """Whether samples carry a .json member, from the first line of the first local .idx (shards packed by
    shardtool always do; a URL's are assumed to)."""
    if not shards or not Path(shards[0].index_url).is_file():
        return True
    with open(shards[0].index_url, encoding="utf-8") as index:
        index.readline()
        return " json " in f" {index.readline()}"


def dali_available() -> bool:
    """Whether DALI can be imported (find_spec alone would not see a broken install)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True
