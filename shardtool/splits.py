"""Deterministic split assignment by hashing the group key (product id, or the file itself).

Every sample of a group lands in the same split. Stratified: within each class, groups are ranked
by their hash and the first round(n * fraction) go to each named split, so every class gets its share.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np

from shardtool.sample import Item, Sample


def unit_hash(group: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{group}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Splitter:
    """Maps (group, label) to a split name; `fractions` names the held-out splits, train is the rest."""

    def __init__(self, fractions: dict[str, float], seed: int,
                 stratify_groups: Mapping[str, Iterable[float]] | None = None) -> None:
        self.names = [*fractions, "train"]
        self.seed = seed
        bounds, total = [], 0.0
        for fraction in fractions.values():
            total += fraction
            bounds.append(total)
        self.bounds = bounds
        self._last: tuple[str, str] | None = None
        self._last_split = ""
        self.class_bounds = {label: self._ranked_bounds(np.unique(np.asarray(hashes, dtype=np.float64)),
                                                        list(fractions.values()))
                             for label, hashes in (stratify_groups or {}).items()}

    @staticmethod
    def _ranked_bounds(hashes: np.ndarray, fractions: list[float]) -> list[float]:
        """`hashes` sorted and unique: one per group of the class."""
        bounds, taken = [], 0
        for fraction in fractions:
            taken += round(len(hashes) * fraction)
            bounds.append(float(hashes[taken]) if taken < len(hashes) else 1.0)
        return bounds

    def __call__(self, group: str, label: str) -> str:
        if (group, label) == self._last:  # a product's pictures arrive together: hash it once
            return self._last_split
        bounds = self.class_bounds.get(label, self.bounds)
        self._last, self._last_split = (group, label), self.names[bisect.bisect_right(bounds, unit_hash(group, self.seed))]
        return self._last_split


def assign_splits(items: Iterable[Item], splitter: Splitter | None) -> Iterator[Item]:
    """Give every item its split: kept when the source had one, hashed otherwise."""
    for item in items:
        if item.split is None:
            label = getattr(item, "label", "")
            item = _with_split(item, splitter(item.group or item.key, label) if splitter else "train")
        yield item


def _with_split(item: Item, split: str) -> Item:
    return item.with_(split=split) if isinstance(item, Sample) else replace(item, split=split)


class Resumed:
    """What an earlier run of the same pack wrote: the first done[split] items of each split, in order."""

    def __init__(self, done: dict[str, int]) -> None:
        self.left = {split: count for split, count in done.items() if count > 0}

    def keep(self, item: Item) -> bool:
        """False for an item that the earlier run's shards account for (call once per item, in order)."""
        if not self.left:
            return True
        split = item.split or "train"
        if split not in self.left:
            return True
        self.left[split] -= 1
        if not self.left[split]:
            del self.left[split]
        return False


def skip_done(items: Iterable[Item], done: dict[str, int]) -> Iterator[Item]:
    """Drop the first done[split] items of each split: a resumed run has shards for them already."""
    resumed = Resumed(done)
    return (item for item in items if resumed.keep(item))
