"""Which samples each rank and each decode worker reads in an epoch, as a pure function of the seed.

The epoch order, when training, is every shard cut into blocks of `block` samples (16), the blocks
shuffled by (seed, epoch); each worker reads `streams` (64) of its blocks at once, one sample from
each in turn, into its shuffle buffer (torch.py). So batches are mixed even when the shards are not
(packed class by class: ours from before `--order shuffled`, or anyone else's). Shards read whole (a
URL without a local .idx: no random access yet) keep whole-shard order, block 0. Eval reads the
shards as listed. The
rank's share is a contiguous range of that order with the same size on every rank when training
(up to world-1 samples per epoch are left out then, different ones each epoch). The rank's range is
cut into one contiguous range per worker, sized so that batch i comes from worker i % workers:
that is the order torch's DataLoader collects worker batches in, so "resume at batch k" is "each
worker skips the batches before k that were its own", with no sample repeated or skipped.

With --sampling other than uniform, --mix or --epoch-size (a LoaderSpec.sampling), the epoch is instead a
number of draws: each worker gets Reads of blocks (sampling.py: which blocks, how often, and for how many
draws) whose expected draws fill its size, then reads of its own until it has drawn exactly that many; the
sizes, the batch order and the skip on resume are the ones above.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from trainer.data.sampling import Sampling, epoch_reads, slot_reads, top_up_reads
from trainer.dataset import Shard

TOP_UPS = 64  # reads a worker may add past as many as it planned (it needs a few: what chance left short)


@dataclass(frozen=True)
class Segment:
    shard: Shard
    start: int  # sample index inside the shard
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def epoch_shards(shards: tuple[Shard, ...], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}/{epoch}/shards").shuffle(order)
    return order


def epoch_order(shards: tuple[Shard, ...], seed: int, epoch: int, train: bool, block: int) -> list[Segment]:
    """The epoch's samples as pieces of shards: shuffled blocks when training (block 0: whole shards,
    shuffled), the shards as listed otherwise."""
    if not train:
        return [Segment(shard, 0, shard.num_samples) for shard in shards]
    if not block:
        return [Segment(shard, 0, shard.num_samples) for shard in epoch_shards(shards, seed, epoch, shuffle=True)]
    blocks = [Segment(shard, start, min(start + block, shard.num_samples))
              for shard in shards for start in range(0, shard.num_samples, block)]
    random.Random(f"{seed}/{epoch}/blocks").shuffle(blocks)
    return blocks


def rank_range(total: int, rank: int, world: int, equal: bool) -> tuple[int, int]:
    """[start, stop) of the epoch order for RANK; equal: every rank gets total // world."""
    if equal:
        size = total // world
        return rank * size, (rank + 1) * size
    return rank * total // world, (rank + 1) * total // world


def worker_sizes(num_samples: int, batch_size: int, workers: int) -> list[int]:
    """Samples per worker so that batch i is worker i % workers' batch i // workers."""
    workers = max(workers, 1)
    num_batches = math.ceil(num_samples / batch_size)
    sizes = [len(range(w, num_batches, workers)) * batch_size for w in range(workers)]
    if num_batches:
        sizes[(num_batches - 1) % workers] -= num_batches * batch_size - num_samples  # the short last batch
    return sizes


def batches_before(start_batch: int, worker: int, workers: int) -> int:
    """How many of the first START_BATCH batches worker WORKER produced."""
    return len(range(worker, start_batch, max(workers, 1)))


def segments(order: list[Segment], start: int, stop: int) -> list[Segment]:
    """The pieces of shards covering samples [start, stop) of ORDER."""
    out, offset = [], 0
    for piece in order:
        lo, hi = max(start - offset, 0), min(stop - offset, len(piece))
        if lo < hi:
            out.append(Segment(piece.shard, piece.start + lo, piece.start + hi))
        offset += len(piece)
    return out


@dataclass(frozen=True)
class Read:
    """One read of a block when sampling: each of its samples is drawn rate / rho times (draws.py)."""

    segment: Segment
    draw: str  # unique in the epoch: its place in the epoch's reads, or `rank.worker+n` for a top-up read
    rho: float  # reads of this block per epoch, in expectation


@dataclass(frozen=True)
class WorkerPlan:
    segments: list[Segment]
    skip: int  # samples to drop (after shuffling, before decoding) when resuming mid-epoch
    size: int  # samples this worker yields in the whole epoch, skipped ones included
    reads: Iterator[Read] | None = None  # sampling: its share of the epoch's reads (segments: none) ...
    top_ups: Iterator[Read] | None = None  # ... and its own, for as many draws as those fall short of SIZE


def worker_plan(shards: tuple[Shard, ...], *, seed: int, epoch: int, train: bool, rank: int, world: int,
                batch_size: int, workers: int, worker: int, start_batch: int, block: int,
                sampling: Sampling | None = None) -> WorkerPlan:
    if sampling is not None:
        return drawn_plan(shards, sampling, seed=seed, epoch=epoch, rank=rank, world=world, batch_size=batch_size,
                          workers=workers, worker=worker, start_batch=start_batch, block=block)
    order = epoch_order(shards, seed, epoch, train, block)
    lo, hi = rank_range(sum(s.num_samples for s in shards), rank, world, equal=train)
    sizes = worker_sizes(hi - lo, batch_size, workers)
    begin = lo + sum(sizes[:worker])
    skip = batches_before(start_batch, worker, workers) * batch_size
    return WorkerPlan(segments(order, begin, begin + sizes[worker]), min(skip, sizes[worker]), sizes[worker])


def drawn_plan(shards: tuple[Shard, ...], sampling: Sampling, *, seed: int, epoch: int, rank: int, world: int,
               batch_size: int, workers: int, worker: int, start_batch: int, block: int) -> WorkerPlan:
    """The worker's reads when sampling: its share of the epoch's (by expected draws), then its own top-ups."""
    blocks = [(shard, Segment(shard, start, min(start + (block or shard.num_samples), shard.num_samples)))
              for shard in shards for start in range(0, shard.num_samples, block or max(shard.num_samples, 1))]
    per_shard = {shard: sampling.reads(shard) for shard in shards}
    rhos = [per_shard[shard][0] for shard, _ in blocks]
    draws = [len(piece) * per_shard[shard][1] for shard, piece in blocks]
    lo, hi = rank_range(sampling.epoch_size, rank, world, equal=True)
    sizes = worker_sizes(hi - lo, batch_size, workers)
    begin = lo + sum(sizes[:worker])
    order = epoch_reads(rhos, seed, epoch)
    places = slot_reads(order, draws, begin, begin + sizes[worker])
    planned = (Read(blocks[order[p]][1], str(p), rhos[order[p]]) for p in places)
    extra = (Read(blocks[b][1], f"{rank}.{worker}+{n}", rhos[b])
             for n, b in enumerate(top_up_reads(rhos, seed, epoch, rank, worker)))
    skip = batches_before(start_batch, worker, workers) * batch_size
    return WorkerPlan([], min(skip, sizes[worker]), sizes[worker], planned, islice(extra, len(places) + TOP_UPS))


def rank_samples(shards: tuple[Shard, ...], rank: int, world: int, train: bool,
                 sampling: Sampling | None = None) -> int:
    total = sampling.epoch_size if sampling is not None else sum(s.num_samples for s in shards)
    lo, hi = rank_range(total, rank, world, equal=train)
    return hi - lo
