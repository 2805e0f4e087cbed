"""How well batches are mixed: distinct classes per batch, against a uniformly shuffled epoch.

A loader that reads class-ordered shards in order feeds the model batches of one or two classes;
BatchNorm statistics and the gradient of such a batch describe those classes only. The figure here
is what `benchmarks/loader.py` reports and `tests/test_mixing.py` holds within 10% of the reference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean


@dataclass(frozen=True)
class Mixing:
    per_batch: float  # mean distinct classes per batch over the epochs
    first_batches: float  # the same over the first FIRST batches of every epoch

    def ratio_to(self, reference: Mixing) -> tuple[float, float]:
        return self.per_batch / reference.per_batch, self.first_batches / reference.first_batches


def mixing(epochs: Sequence[Sequence[int]], batch_size: int, first: int = 5) -> Mixing:
    """EPOCHS: each epoch's labels in the order the batches came (full batches only are counted)."""
    counts = [[len(set(labels[i:i + batch_size])) for i in range(0, len(labels) - batch_size + 1, batch_size)]
              for labels in epochs]
    return Mixing(fmean(c for epoch in counts for c in epoch), fmean(c for epoch in counts for c in epoch[:first]))


def uniform_mixing(labels: Sequence[int], batch_size: int, first: int = 5, epochs: int = 200,
                   seed: int = 0) -> Mixing:
    """The reference: the same labels in uniformly random orders (EPOCHS of them)."""
    rng = random.Random(seed)
    shuffled = []
    for _ in range(epochs):
        order = list(labels)
        rng.shuffle(order)
        shuffled.append(order)
    return mixing(shuffled, batch_size, first)
