"""An order-keeping parallel map over worker processes with a bounded number of batches in flight.

Not multiprocessing.Pool.imap: its feeder thread drains the whole input at once, so memory would
grow with the dataset. Here at most `2 * workers + 1` batches exist at any time, results come back
in input order (so shards are byte-identical however the work was scheduled), and a worker that
dies (OOM killer, segfault in a decoder) fails the run with a clear PackError.

Handing an encoded sample back from a worker costs the parent tens of microseconds (unpickling, the
pool's reader thread, the GIL): on our 2-core machine, reading and header-checking 170k BSON
pictures took 7.5 s in one process and 8.8 s with two workers. When the work itself is that cheap,
one process is faster than many, so `workers=None` (auto) times the first batches in-process and
only starts workers when the work per result exceeds HANDOFF_SECONDS (an estimate from that run).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from shardtool.errors import PackError

A = TypeVar("A")
B = TypeVar("B")


def batched(items: Iterable[A], size: int) -> Iterator[list[A]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


HANDOFF_SECONDS = 30e-6  # parent-side cost of one item through the pool
PROBE_BATCHES = 8
SWITCH_SECONDS = 1e-4


def ordered_map(fn: Callable[[list[A]], list[B]], items: Iterable[A], workers: int | None,
                batch: int = 32) -> Iterator[B]:
    """fn over batches of items in `workers` processes (0: this process; None: decide by timing);
    yields the results in input order."""
    if workers is None:
        yield from _auto_map(fn, iter(items), os.cpu_count() or 1, batch)
        return
    if workers == 0:
        for chunk in batched(items, batch):
            yield from fn(chunk)
        return
    context = multiprocessing.get_context("forkserver")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_SECONDS)  # let the pool's reader thread take results while we write
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_install, initargs=(fn,)) as pool:
        pending: deque[Future[list[B]]] = deque()
        try:
            for chunk in batched(items, batch):
                pending.append(pool.submit(_call_installed, chunk))
                if len(pending) > 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise PackError(_died_message()) from None
        finally:
            for future in pending:
                future.cancel()
            sys.setswitchinterval(switch)


_installed: Callable[[list[Any]], list[Any]] | None = None


def _install(fn: Callable[[list[A]], list[B]]) -> None:
    """In a worker, once: `fn` with everything it carries (a partial's category table, class list,
    reader), so a task ships only its inputs. Per task, pickling Cdiscount's 5,270-category table
    alone cost the parent 6 ms: 2.3 s over a 100k-product dump."""
    global _installed
    _installed = fn


def _call_installed(chunk: list[A]) -> list[B]:
    assert _installed is not None
    return _installed(chunk)


GUARD = "put that call under `if __name__ == \"__main__\":` (or pass workers=0)"


def check_not_starting_worker() -> None:
    """Refuse to pack inside a worker that is importing the user's script (a call without the __main__ guard):
    it would pack, or delete with overwrite, the very output its parent is writing."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # set by multiprocessing while it does that
        raise PackError(f"pack() ran while a worker process imported the main script: {GUARD}")


def _died_message() -> str:
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        unguarded = script and not re.search(r"__name__\s*==\s*['\"]__main__['\"]", Path(script).read_text())
    except (OSError, UnicodeDecodeError):
        unguarded = False
    if unguarded:  # worker processes import the main script again, and it packs at import time
        return f"worker processes could not start: {script} calls pack() at import time; {GUARD}"
    return "a worker process died (killed, or out of memory); re-run the same command to resume, or use fewer --workers"


def _auto_map(fn: Callable[[list[A]], list[B]], items: Iterator[A], cores: int, batch: int) -> Iterator[B]:
    """Run the first batches here; go parallel only if the work per result beats the hand-off cost.

    Per result, not per input: one input can be a byte range of a BSON dump that yields 400 samples.
    """
    seconds, count = 0.0, 0
    for chunk in islice(batched(items, batch), PROBE_BATCHES):
        start = time.perf_counter()
        results = fn(chunk)
        seconds, count = seconds + time.perf_counter() - start, count + len(results)
        yield from results
    parallel = count and cores > 1 and seconds / count * (1 - 1 / cores) > HANDOFF_SECONDS
    yield from ordered_map(fn, items, cores if parallel else 0, batch)
