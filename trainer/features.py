"""Pooled features of a frozen backbone, extracted once per split into memory-mapped .npy files, reused.

    shards -> eval loader (resize, centre crop, every sample once, in the order its batches arrive: with
              several workers batch i is worker i % workers', each worker reading its own shards in order)
           -> backbone (eval mode, no_grad, autocast) -> the head's input, caught by a forward pre-hook
           -> rows of FOLDER/<role>.features.npy (float32, N x D) and FOLDER/<role>.labels.npy (int64, N)
    FOLDER/features.json, written last: the cache key and the rows per split

Rows go to disk batch by batch (np.lib.format.open_memmap), so memory holds one batch, never a split.
A folder whose features.json holds the same key is reused without running the backbone; any other
key (model, weights, preprocessing, amp, loader, a shard's sha256) deletes features.json first, so a
half-written cache is never mistaken for a whole one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data import Loader, LoaderSpec, make_loader
from trainer.device import Amp
from trainer.errors import ConfigError, TrainError
from trainer.models import Model

KEY_FILE = "features.json"
CACHE_VERSION = 1

Progress = Callable[[str, int, int], None]  # (split role, samples done, samples in the split)


@dataclass(frozen=True)
class SplitFeatures:
    features: np.ndarray  # N x D float32, memory-mapped
    labels: np.ndarray  # N int64, -1 where unlabelled

    def __len__(self) -> int:
        return len(self.labels)


def load_cached(folder: Path, key: dict[str, Any]) -> dict[str, SplitFeatures] | None:
    """The cached splits when FOLDER holds features for KEY, else None."""
    try:
        stored = json.loads((folder / KEY_FILE).read_text(encoding="utf-8"))
        if stored.get("key") != key:
            return None
        return {role: _open(folder, role, rows) for role, rows in stored["rows"].items()}
    except (OSError, ValueError, KeyError, AttributeError):  # missing, damaged or foreign files: recompute
        return None


def _open(folder: Path, role: str, rows: int) -> SplitFeatures:
    split = SplitFeatures(np.load(folder / f"{role}.features.npy", mmap_mode="r"),
                          np.load(folder / f"{role}.labels.npy", mmap_mode="r"))
    if len(split.features) != rows or len(split.labels) != rows:
        raise ValueError(f"{role}: {len(split.features)} rows cached, {rows} expected")
    return split


def extract_all(model: Model, specs: dict[str, LoaderSpec], backend: str, amp: Amp, folder: Path,
                key: dict[str, Any], progress: Progress) -> dict[str, SplitFeatures]:
    """Run the backbone over each split (role -> loader spec), write the cache, return it memory-mapped."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / KEY_FILE).unlink(missing_ok=True)  # from here on the old cache is invalid
    except OSError as error:
        raise ConfigError(f"cannot write the feature cache in {folder}: {error.strerror}; give --out") from None
    rows = {}
    for role, spec in specs.items():
        loader = make_loader(spec, backend)  # one split's loader (and its workers) alive at a time
        rows[role] = extract_split(model, loader, amp, folder, role, progress)
        del loader
    tmp = folder / f".{KEY_FILE}.tmp"
    tmp.write_text(json.dumps({"key": key, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / KEY_FILE)
    return {role: _open(folder, role, n) for role, n in rows.items()}


@torch.no_grad()
def extract_split(model: Model, loader: Loader, amp: Amp, folder: Path, role: str, progress: Progress) -> int:
    """Write ROLE's features and labels row by row as the batches come; returns the number of rows."""
    captured: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model.module.eval()
    total, row = loader.num_samples, 0
    files: tuple[np.ndarray, np.ndarray] | None = None
    try:
        for batch in loader.epoch(0):
            if batch.skipped:
                where, why = batch.skipped[0]
                raise TrainError(f"{where}: {why}")
            with amp.autocast():
                model.module(batch.images)
            features = captured.pop().float().flatten(1).cpu().numpy()
            if files is None:
                files = _create(folder, role, total, features.shape[1])
            files[0][row:row + len(features)] = features
            files[1][row:row + len(features)] = batch.labels.cpu().numpy()
            row += len(features)
            progress(role, row, total)
        if row != total or files is None:
            raise TrainError(f"{role}: the loader gave {row} samples, the manifest lists {total}")
    except BaseException:  # a corrupt sample, Ctrl-C: no half-written feature files (as large as the split) stay
        for name in ("features", "labels"):
            (folder / f".{role}.{name}.npy.tmp").unlink(missing_ok=True)
        raise
    finally:
        hook.remove()
    for name, array in zip(("features", "labels"), files):
        array.flush()
        os.replace(folder / f".{role}.{name}.npy.tmp", folder / f"{role}.{name}.npy")
    return total


def _create(folder: Path, role: str, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    open_memmap = np.lib.format.open_memmap
    return (open_memmap(folder / f".{role}.features.npy.tmp", mode="w+", dtype=np.float32, shape=(rows, dim)),
            open_memmap(folder / f".{role}.labels.npy.tmp", mode="w+", dtype=np.int64, shape=(rows,)))
