"""An order-keeping parallel map over worker processes with a bounded number of batches in flight.

Not multiprocessing.Pool.imap: its feeder thread drains the whole input at once, so memory would
grow with the dataset. Here at most `2 * workers + 1` batches exist at any time, results come back
in input order (so shards are byte-identical however the work was scheduled), and a worker that
dies (OOM killer, segfault in a decoder) fails the run with a clear PackError.

One pack shares one `Workers` pool between its passes (a BSON dump's scan, then the encoding), so
the processes start once, and they fork from a forkserver that has imported shardtool already
(each used to spend ~0.25 s of CPU importing PIL, numpy and pymongo). A function reaches each
worker once, through a file, not with every batch: the encoding function carries the category
table and class list, and pickling Cdiscount's 5,270 categories for every batch cost the parent
6 ms a batch, 2.3 s over a 100k-product dump.

`Workers(None)` (auto) runs the first batches of a pass in this process and starts workers only when
the work per result beats HANDOFF_SECONDS, so a small dataset never pays for starting them.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from shardtool.cpus import usable_cpus
from shardtool.errors import PackError

A = TypeVar("A")
B = TypeVar("B")


def batched(items: Iterable[A], size: int) -> Iterator[list[A]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


HANDOFF_SECONDS = 2e-3  # parent-side cost of one result through the pool: ~1.6 ms for a 4 MB BSON Run here
PROBE_BATCHES = 8
SWITCH_SECONDS = 1e-4


class Workers:
    """Worker processes (`count`; 0: none, everything runs in this process; None: auto, all cores
    when the work pays for them), started on first use, shut down by close() or the with block."""

    def __init__(self, count: int | None) -> None:
        self.auto = count is None
        self.count = usable_cpus() if count is None else count
        self._pool: ProcessPoolExecutor | None = None
        self._folder: str | None = None
        self._shipped = 0

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            try:
                self._pool.shutdown(wait=True, cancel_futures=True)
            except OSError:  # the wake-up pipe of a pool that broke meanwhile (see _submit): nothing left to stop
                pass
            self._pool = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def map(self, fn: Callable[[list[A]], list[B]], items: Iterable[A], batch: int) -> Iterator[B]:
        """fn over batches of items in the worker processes; yields the results in input order."""
        path, pool = self._ship(fn), self._start()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_SECONDS)  # let the pool's reader thread take results while we write
        pending: deque[Future[list[B]]] = deque()
        try:
            for chunk in batched(items, batch):
                pending.append(_submit(pool, path, chunk))
                if len(pending) > 2 * self.count:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise PackError(_died_message()) from None
        finally:
            for future in pending:
                future.cancel()
            sys.setswitchinterval(switch)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["__main__", "shardtool.pack"])  # (takes effect if the server is not running yet)
            self._pool = ProcessPoolExecutor(self.count, mp_context=context)
        return self._pool

    def _ship(self, fn: Callable[[list[A]], list[B]]) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="shardtool-functions-")
        self._shipped += 1
        path = os.path.join(self._folder, f"{self._shipped}.pickle")
        with open(path, "wb") as file:
            pickle.dump(fn, file, protocol=pickle.HIGHEST_PROTOCOL)
        return path


def _submit(pool: ProcessPoolExecutor, path: str, chunk: list[A]) -> Future[list[B]]:
    """pool.submit, where a pool that breaks while we submit is a BrokenProcessPool: CPython 3.11's submit checks
    for a broken pool, then writes to a wake-up pipe that the pool's manager thread may have closed since
    (OSError "handle is closed", seen once in a run of the test suite; nothing else in submit does I/O)."""
    try:
        return pool.submit(_call, path, chunk)
    except OSError as error:
        raise BrokenProcessPool(str(error)) from error


def ordered_map(fn: Callable[[list[A]], list[B]], items: Iterable[A], workers: Workers,
                batch: int = 32) -> Iterator[B]:
    """fn over batches of items, in `workers` or in this process; yields the results in input order."""
    if workers.count == 0 or (workers.auto and workers.count == 1):
        for chunk in batched(items, batch):
            yield from fn(chunk)
    elif workers.auto:
        yield from _auto_map(fn, iter(items), workers, batch)
    else:
        yield from workers.map(fn, items, batch)


_loaded: tuple[str, Callable[[list[Any]], list[Any]]] | None = None


def _call(path: str, chunk: list[A]) -> list[B]:
    """In a worker: the function shipped to `path` (loaded on its first batch) over one batch."""
    global _loaded
    if _loaded is None or _loaded[0] != path:
        with open(path, "rb") as file:
            _loaded = (path, pickle.load(file))
    return _loaded[1](chunk)


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


def _auto_map(fn: Callable[[list[A]], list[B]], items: Iterator[A], workers: Workers, batch: int) -> Iterator[B]:
    """Run the first batches here; go parallel only if the work per result beats the hand-off cost.

    Per result, not per input: one input can be a byte range of a BSON dump that yields 400 samples.
    """
    seconds, count = 0.0, 0
    for chunk in islice(batched(items, batch), PROBE_BATCHES):
        start = time.perf_counter()
        results = fn(chunk)
        seconds, count = seconds + time.perf_counter() - start, count + len(results)
        yield from results
    if count and seconds / count * (1 - 1 / workers.count) > HANDOFF_SECONDS:
        yield from workers.map(fn, items, batch)
    else:
        for chunk in batched(items, batch):
            yield from fn(chunk)
