"""train_one_epoch and evaluate: plain functions over Batches (torchvision-references style).

Both take a Loader epoch iterator, so they never know which backend decoded the images. Training
keeps running sums (loss, correct, seen) in a dict that the checkpoint carries, so a run resumed in
the middle of an epoch reports the same epoch metrics as one that never stopped.

The loss and the top-1 hits of each step stay on the device and are read every READ_EVERY steps (and
whenever a checkpoint is due, through Step.read), one transfer for all of them: reading them each step (`loss.item()`) would make the
host wait for the GPU at every step, with no batch queued behind it. A nan or inf loss still stops the
run at the next read, before anything saves the weights it made (run.check_finite guards each save too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from trainer.data.spec import Batch
from trainer.device import Amp
from trainer.errors import TrainError
from trainer.metrics import EvalMeter


@dataclass
class Step:
    """What the loop tells its caller after every batch (progress, checkpoints)."""

    phase: str  # train | eval
    batch: int  # batches done in this epoch
    num_batches: int
    samples: int
    loss: float
    seconds: float
    data_seconds: float  # of which waiting for the loader
    keys: list[str] = field(default_factory=list)  # the samples of this batch (train)
    read: Callable[[], None] = lambda: None  # train: bring the device's sums into TrainSums now (before a save)


@dataclass
class TrainSums:
    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    data_seconds: float = 0.0
    retries: int = 0  # URL DATA: failed requests retried by the loader (trainer/remote.py)
    resumed: int = 0  # of which transfers resumed from the byte they had reached


READ_EVERY = 20  # training steps between reads of the loss from the device (progress, the nan/inf check)


class Pending:
    """Each step's loss and top-1 hits, kept on the device until the next read (one sync per read). Read, they
    are added to TrainSums step by step as before, so the sums do not depend on when reads happen."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # [loss, hits] per step, on the device
        self.sizes: list[int] = []
        self.batches: list[int] = []  # each step's batch of the epoch, 1-based

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
        self.steps.append(torch.stack([loss.detach().float(), (logits.argmax(1) == labels).sum().float()]))
        self.sizes.append(len(labels))
        self.batches.append(batch)

    def read_into(self, sums: TrainSums) -> None:
        """Adds the steps to SUMS; TrainError naming the first batch whose loss is nan or inf."""
        if not self.steps:
            return
        values = torch.stack(self.steps).tolist()
        for at, (loss, _) in zip(self.batches, values):  # before after_step saves these steps' weights
            if not math.isfinite(loss):
                raise TrainError(f"the training loss is {loss} at batch {at} of the epoch: training stopped and "
                                 "saved nothing of it (best.pt and last.pt keep the last finite weights); lower --lr")
        for (loss, hits), n in zip(values, self.sizes):
            sums.loss, sums.correct, sums.seen = sums.loss + loss * n, sums.correct + round(hits), sums.seen + n
        self.steps, self.sizes, self.batches = [], [], []


def timed(batches: Iterator[Batch], sums: TrainSums) -> Iterator[Batch]:
    """Yields batches and adds the time spent waiting for each to SUMS.data_seconds."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        sums.data_seconds += time.perf_counter() - start
        sums.retries += batch.io.get("retries", 0)
        sums.resumed += batch.io.get("resumed", 0)
        yield batch


def check_skips(batch: Batch, policy: str, sums: TrainSums) -> None:
    if batch.skipped and policy == "fail":
        where, why = batch.skipped[0]
        raise TrainError(f"{where}: {why} (use --on-corrupt skip to count and go on)")
    sums.skipped.extend(batch.skipped)


def train_one_epoch(model: nn.Module, batches: Iterator[Batch], optimizer: torch.optim.Optimizer, *,
                    criterion: nn.Module, amp: Amp, set_lr: Callable[[], None], mix: Callable[..., Any] | None,
                    sums: TrainSums, start_batch: int, num_batches: int, on_corrupt: str,
                    after_step: Callable[[Step], None],
                    skip_step: Callable[[Batch], bool] = lambda batch: not len(batch),
                    read_every: int = READ_EVERY) -> TrainSums:
    """The caller puts MODEL in train mode (run.set_frozen keeps a frozen backbone's BatchNorm in eval).

    A batch whose samples were all corrupt and skipped is no step. Under DDP no rank may step alone (the
    others would wait in backward's all-reduce), so SKIP_STEP is true on every rank when any batch is empty,
    and the samples of the non-empty ones are counted as skipped too.
    """
    pending = Pending()
    for index, batch in enumerate(timed(batches, sums), start=start_batch):
        start = time.perf_counter()
        check_skips(batch, on_corrupt, sums)
        if skip_step(batch):
            sums.skipped.extend((key, "dropped: another process's batch was empty") for key in batch.keys)
            continue
        set_lr()
        images, targets = batch.images, batch.labels
        if mix is not None and len(batch) > 1:
            images, targets = mix(images, targets)
        with amp.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if amp.scaler is not None:
            amp.scaler.scale(loss).backward()
            amp.scaler.step(optimizer)
            amp.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        pending.add(loss, logits, batch.labels, index + 1)
        if (index + 1) % read_every == 0 or index + 1 == num_batches:
            pending.read_into(sums)
        sums.seconds += time.perf_counter() - start
        after_step(Step("train", index + 1, num_batches, sums.seen + pending.samples,
                        sums.loss / max(sums.seen, 1), sums.seconds + sums.data_seconds, sums.data_seconds,
                        batch.keys, read=partial(pending.read_into, sums)))
    pending.read_into(sums)  # after a DDP-skipped last batch: nothing is left unread
    return sums


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch], meter: EvalMeter, *, amp: Amp, num_batches: int,
             on_corrupt: str, after_step: Callable[[Step], None] | None = None,
             on_batch: Callable[[Batch, torch.Tensor], None] | None = None) -> dict[str, Any]:
    """Every sample of the split once; metrics reduced across ranks. ON_BATCH sees (batch, probabilities)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum", ignore_index=-1)  # unlabelled (-1) add nothing
    sums = TrainSums()
    for index, batch in enumerate(timed(batches, sums)):
        start = time.perf_counter()
        check_skips(batch, on_corrupt, sums)
        if not len(batch):
            continue
        with amp.autocast():
            logits = model(batch.images).float()
        meter.update(logits, batch.labels, criterion(logits, batch.labels))  # a 0-d tensor: no sync here
        if on_batch is not None:
            on_batch(batch, logits.softmax(1))
        sums.seen += len(batch)
        sums.seconds += time.perf_counter() - start
        if after_step is not None:
            after_step(Step("eval", index + 1, num_batches, sums.seen, 0.0, sums.seconds + sums.data_seconds,
                            sums.data_seconds))
    meter.reduce()
    return meter.result() | {"skipped": len(sums.skipped), "retries": sums.retries, "resumed": sums.resumed}
