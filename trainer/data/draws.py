"""The read side of sampling (sampling.py, plan.py's Reads): blocks read -> each sample drawn as often as its
label says -> the draws spread over the stream.

    planned reads (Segment, draw id, rho) -> raw samples of the block, read whole (the loader's own reader)
                                          -> each drawn rate / rho times, in a shuffled order (seeded by
                                             seed, epoch and the draw id)
                                          -> spread: a read's draws come out evenly over the next `width` reads
    then top-up reads, the same way, one after another (only while the planned ones fell short)
    then, in the loader:                  -> the first `size` draws -> shuffle buffer -> skip (resume) -> batches

A read's draws are known only once its labels are, so a block is read whole before any of it comes out (a
remote block is anyway: one range request). Spreading each read's draws over a fixed number of reads, not
one per read in turn, keeps a block drawn many times from bunching up or from coming last: where the slot's
size cuts the stream, each open read loses a fraction of its draws that does not depend on its classes.
What bias is left comes from reads that are lumps (a class of a few images, each drawn dozens of times, in
a small epoch): a slot holding more of them than expected is cut, one holding fewer is topped up, and such a
class comes out a little short. Simulated on shuffled 100:10:1 shards (40 epochs, 4 slots): the 1% class
was drawn 1.9% less than its third with 555 draws a slot, 0.7% less with 2,220; the larger the loader
workers' shares, the smaller. Each draw carries `__draw__` (draw id.copy), which seeds its augmentation.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, repeat
from typing import Any, TypeVar

from trainer.data.spec import LoaderSpec, check_label
from trainer.data.plan import Read, Segment, WorkerPlan
from trainer.data.sampling import Sampling, systematic

T = TypeVar("T")
MISMATCH = ("the shards' labels do not match the class counts of their manifest (its reads drew too few "
            "samples); check DATA with `shardtool verify`")


def drawn(plan: WorkerPlan, read: Callable[[Segment], Iterable[dict[str, Any]]], spec: LoaderSpec, epoch: int,
          width: int) -> Iterator[dict[str, Any]]:
    """Every draw of PLAN's reads, read with READ, spread over WIDTH reads, then of its top-ups; endless (the
    caller takes its size), with a bad sample for each draw past those (a manifest lying about its labels)."""
    sampling = spec.sampling
    if sampling is None or plan.reads is None or plan.top_ups is None or not spec.num_classes:
        raise ValueError("drawn() reads the plan of a LoaderSpec with a sampling and its num_classes")

    def draws(reads: Iterable[Read]) -> Iterator[list[dict[str, Any]]]:
        return (copies(list(read(r.segment)), r, sampling, spec.num_classes, f"{spec.seed}/{epoch}") for r in reads)

    yield from spread(draws(plan.reads), width)
    yield from chain.from_iterable(draws(plan.top_ups))
    yield from repeat({"__key__": "sampling", "__error__": MISMATCH})


def copies(samples: list[dict[str, Any]], read: Read, sampling: Sampling, num_classes: int,
           seed: str) -> list[dict[str, Any]]:
    """The draws of one read, shuffled: each sample rate / rho times in expectation, rounded systematically
    by class (the read draws each class its expected number of times to within one). A bad sample (unreadable,
    no class of the manifest) is drawn once: its skip is counted by the loader."""
    rng = random.Random(f"{seed}/{read.draw}/copies")
    source = read.segment.shard.source
    labels = [label_of(sample, num_classes) for sample in samples]
    draws = [1.0 if label is None else sampling.rate(source, label) / read.rho for label in labels]
    times = systematic(draws, rng.random(), labels)
    out = [{**sample, "__draw__": f"{read.draw}.{copy}"} for sample, n in zip(samples, times) for copy in range(n)]
    rng.shuffle(out)
    return out


def label_of(sample: dict[str, Any], num_classes: int) -> int | None:
    """The sample's class; None for a bad sample (the loader reports it)."""
    if "__error__" in sample:
        return None
    try:
        return check_label(sample.get("cls"), num_classes)
    except ValueError:
        return None


def spread(lists: Iterable[list[T]], width: int) -> Iterator[T]:
    """The items of LISTS, one list opening per tick and its items coming out evenly over the WIDTH ticks
    from then, in time order (ties: in the order they came)."""
    heap: list[tuple[float, int, T]] = []
    count = 0
    for tick, items in enumerate(lists):
        for k, item in enumerate(items):
            heapq.heappush(heap, (tick + width * (k + 0.5) / len(items), count, item))
            count += 1
        while heap and heap[0][0] < tick + 1:
            yield heapq.heappop(heap)[2]
    while heap:
        yield heapq.heappop(heap)[2]
