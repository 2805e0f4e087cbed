"""One background thread for the shard writer's slow, GIL-free work: writing, hashing, fsync, journal.

Tasks run one at a time in the order they were submitted, so a shard's chunks are written and hashed
in order and its journal line is appended only after its fsync and rename, as when the writer did it
all itself. File writes, sha256 of large buffers and fsync release the GIL, so on two cores this work
runs beside the writer instead of after it (for a BSON passthrough, ~25 us of its ~80 us per picture).

At most `pending` tasks wait, so memory stays bounded. The first failure (a full disk) is raised in
the writer at its next submit or at the end, and no later task runs: a shard whose bytes were not all
written is never journaled.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

SWITCH_SECONDS = 5e-4  # how long the thread may wait for the GIL between two writes (Python's default: 5 ms)


class Background:
    def __init__(self, pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: deque[Future[None]] = deque()
        self._limit = pending
        self._failed: BaseException | None = None
        self._switch = sys.getswitchinterval()

    def __enter__(self) -> Background:
        sys.setswitchinterval(min(self._switch, SWITCH_SECONDS))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if error is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)  # on an error, what was submitted still runs (finished shards are journaled)
            sys.setswitchinterval(self._switch)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) after everything submitted before; blocks while `pending` tasks wait."""
        self._pending.append(self._pool.submit(self._run, fn, args))
        while self._pending and (len(self._pending) > self._limit or self._pending[0].done()):
            self._pending.popleft().result()

    def wait(self) -> None:
        """Until every submitted task has run; raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._failed is not None:
            raise RuntimeError("an earlier background write failed") from self._failed
        try:
            fn(*args)
        except BaseException as error:
            self._failed = error
            raise
