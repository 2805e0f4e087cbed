"""A softmax head (multinomial logistic regression) on cached features, its L2 chosen by val top-1.

    train features (memmap) -> per-dimension mean/std, one streamed pass
    for each L2 in L2_GRID, strong to weak, each warm-started from the last:
        full-batch L-BFGS on mean cross-entropy + L2/2 |W|^2 over the standardised rows -> val top-1
    the best -> folded into one Linear on the raw features (W/std, b - W mean/std): the model's new head

Rows are read in chunks of CHUNK_ROWS (gradients summed over them), so a split larger than memory
still trains; a split of one chunk (clothing-small's 3,068 x 1,280) is read once and kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainer.features import SplitFeatures
from trainer.metrics import EvalMeter

CHUNK_ROWS = 65536
L2_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3)  # on standardised features, loss = mean CE
DEFAULT_L2 = 0.1  # without a val split to choose by (clothing-small's choice)
MAX_ITER = 300  # L-BFGS iterations per grid value


def chunks(split: SplitFeatures) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features float32, labels int64) of CHUNK_ROWS rows at a time, read from the memory map."""
    for start in range(0, len(split), CHUNK_ROWS):
        yield (torch.from_numpy(np.array(split.features[start:start + CHUNK_ROWS], dtype=np.float32)),
               torch.from_numpy(np.array(split.labels[start:start + CHUNK_ROWS], dtype=np.int64)))


class Rows:
    """A split's chunks, optionally standardised; kept in memory when the split is one chunk."""

    def __init__(self, split: SplitFeatures, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        self.split, self.mean, self.std = split, mean, std
        self.held = list(self._read()) if len(split) <= CHUNK_ROWS else None

    def __len__(self) -> int:
        return len(self.split)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.held) if self.held is not None else self._read()

    def _read(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in chunks(self.split):
            yield ((x - self.mean) / self.std if self.mean is not None else x), y


def moments(split: SplitFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the features (float64 sums); a constant dimension gets std 1."""
    total = squares = torch.zeros(split.features.shape[1], dtype=torch.float64)
    for x, _ in chunks(split):
        x = x.double()
        total, squares = total + x.sum(0), squares + (x * x).sum(0)
    mean = total / len(split)
    std = (squares / len(split) - mean * mean).clamp_min(0).sqrt()
    std[std < 1e-6] = 1.0
    return mean.float(), std.float()


def train_head(rows: Rows, num_classes: int, l2: float, start: nn.Linear | None = None) -> nn.Linear:
    """Minimise mean cross-entropy + L2/2 |W|^2 (bias free) with full-batch L-BFGS from START (else zeros)."""
    dim = rows.split.features.shape[1]
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(start.weight if start is not None else torch.zeros(num_classes, dim))
        head.bias.copy_(start.bias if start is not None else torch.zeros(num_classes))
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=MAX_ITER, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros(())
        for x, y in rows:
            loss = F.cross_entropy(head(x), y, reduction="sum") / len(rows)
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * l2 * head.weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(closure)
    return head


@torch.no_grad()
def score(head: nn.Linear, rows: Rows, meter: EvalMeter) -> dict:
    """EvalMeter's result (loss, top1, top5, num_samples, level_acc) of HEAD on ROWS."""
    for x, y in rows:
        logits = head(x)
        labelled = y >= 0
        loss = F.cross_entropy(logits[labelled], y[labelled], reduction="sum") if labelled.any() else 0.0
        meter.update(logits, y, loss)
    return meter.result()


@dataclass
class Choice:
    head: nn.Linear  # on raw features (standardisation folded in)
    l2: float
    grid: list[dict]  # per L2: val top-1 and loss


def choose_head(train: SplitFeatures, val: SplitFeatures | None, num_classes: int,
                new_meter: Callable[[], EvalMeter]) -> Choice:
    """Train one head per L2, keep the best by val top-1 (then val loss); without VAL, DEFAULT_L2."""
    mean, std = moments(train)
    rows = Rows(train, mean, std)
    with _threads(1 if rows.held is not None else torch.get_num_threads()):
        return _choose(rows, Rows(val, mean, std) if val is not None else None, num_classes, new_meter, mean, std)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """One thread for a head that fits in memory: its matrices are small, and on a shared 2-core machine
    OpenMP's threads spin against the other processes (20 s instead of 3 s for clothing-small here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _choose(rows: Rows, val_rows: Rows | None, num_classes: int, new_meter: Callable[[], EvalMeter],
            mean: torch.Tensor, std: torch.Tensor) -> Choice:
    if val_rows is None:
        return Choice(fold(train_head(rows, num_classes, DEFAULT_L2), mean, std), DEFAULT_L2, [])
    grid, best = [], None
    for l2, head in grid_heads(rows, num_classes):
        result = score(head, val_rows, new_meter())
        grid.append({"l2": l2, "val_top1": result["top1"], "val_loss": result["loss"]})
        if best is None or rank(result) > best[0]:
            best = (rank(result), l2, fold(head, mean, std))
    return Choice(best[2], best[1], grid)


def grid_heads(rows: Rows, num_classes: int) -> Iterator[tuple[float, nn.Linear]]:
    """(L2, head) for each L2 in L2_GRID, strong to weak, each head warm-started from the last."""
    head = None
    for l2 in L2_GRID:
        head = train_head(rows, num_classes, l2, head)
        yield l2, head


def rank(result: dict) -> tuple[float, float]:
    """How heads compare on val: top-1, then loss."""
    return result["top1"], -result["loss"]


def fold(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """W((x - mean)/std) + b as one Linear on raw x: W/std and b - (W/std) mean."""
    folded = nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - folded.weight @ mean)
    return folded
