"""An order-keeping parallel map over worker processes with a bounded number of batches in flight.

Not multiprocessing.Pool.imap: its feeder thread drains the whole input at once, so memory would
grow with the dataset. Here at most `2 * workers + 1` batches exist at any time, results come back
in input order (so shards are byte-identical however the work was scheduled), and a worker that
dies (OOM killer, segfault in a decoder) fails the run with a clear PackError.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import TypeVar

from shardtool.errors import PackError

A = TypeVar("A")
B = TypeVar("B")


def batched(items: Iterable[A], size: int) -> Iterator[list[A]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def ordered_map(fn: Callable[[list[A]], list[B]], items: Iterable[A], workers: int, batch: int = 16) -> Iterator[B]:
    """fn over batches of items, in `workers` processes (0: in this process); yields results in order."""
    if workers == 0:
        for chunk in batched(items, batch):
            yield from fn(chunk)
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque[Future[list[B]]] = deque()
        try:
            for chunk in batched(items, batch):
                pending.append(pool.submit(fn, chunk))
                if len(pending) > 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise PackError("a worker process died (killed, or out of memory); re-run the same command "
                            "to resume, or use fewer --workers") from None
        finally:
            for future in pending:
                future.cancel()
