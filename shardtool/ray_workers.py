"""--distributor ray: pack's ordered map run as Ray tasks; the plan, the writer and the bytes stay the same.

    driver (shardtool pack)                             Ray tasks, on any node of the cluster
    the plan: items (paths) or byte ranges (BSON)  ->   encode_batch / read_and_encode / scan_partitions:
      in batches, as the local workers get them           the local workers' functions, unchanged
    at most 2 x the cluster's CPUs in flight       <-   Runs (encoded tar members) through the object store
    results taken oldest first -> the shard writer, journal and manifest of a local pack (sink.py)

Why this shape: one writer keeps the shard cut, keys, order, statistics and manifest independent of the
distributor and of the number of Ray workers, so a Ray pack is byte-identical to a local one and resumes
from the same journal. Tasks get paths and byte offsets, never image bytes (a pixel CSV's rows are the
images: those travel). The writer's own bandwidth is what bounds it (benchmarks/pack_ray.py).

Failures: a task whose worker process dies is run again by Ray (`max_retries`), and so is one that raises
an OSError (`retry_exceptions`: a file system or network hiccup); anything else, or retries used up,
stops the pack with one line naming the task's partition, after the finished shards were journaled, so
the same command resumes. Every node needs shardtool installed (the same version as the driver).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from shardtool.errors import ConfigError, PackError
from shardtool.parallel import batched

A = TypeVar("A")
B = TypeVar("B")

MAX_RETRIES = 3
TEST_FAULT = "SHARDTOOL_TEST_FAULT"  # tests only: "kill:N:MARKER" (task N's process SIGKILLed once), "raise:N"


class RayWorkers:
    """Workers' interface (count, auto, map, close) over a Ray cluster: ADDRESS, or a local one started here."""

    auto = False

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--distributor ray needs Ray: pip install 'shardtool[ray]'") from None
        self._started = not ray.is_initialized()
        env = {TEST_FAULT: os.environ[TEST_FAULT]} if TEST_FAULT in os.environ else {}
        try:
            if self._started:
                ray.init(address=address or None, runtime_env={"env_vars": env} if env else None,
                         include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = address or "a new local cluster"
            raise ConfigError(f"cannot start or reach Ray ({where}): {str(error).splitlines()[0]}") from None
        self.count = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[OSError])(_task)
        self.tasks = 0  # tasks submitted: the next task's index (its number in the tests' fault hook)

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()

    def map(self, fn: Callable[[list[A]], list[B]], items: Iterable[A], batch: int) -> Iterator[B]:
        """fn over batches of items as Ray tasks; results in input order, at most 2 x count in flight."""
        import ray
        from ray.exceptions import RayError

        shipped = ray.put(fn)  # once per pass, not with every task
        pending: deque[tuple[Any, str]] = deque()
        try:
            for chunk in batched(items, batch):
                pending.append((self._task.remote(shipped, chunk, self.tasks), describe(chunk)))
                self.tasks += 1
                if len(pending) > 2 * self.count:
                    yield from _result(*pending.popleft())
            while pending:
                yield from _result(*pending.popleft())
        except RayError as error:  # not a task's own failure (those are PackError): the cluster's
            raise PackError(f"Ray failed: {str(error).splitlines()[0]}; re-run the same command to resume") from None
        finally:
            for ref, _ in pending:
                ray.cancel(ref, force=True)


def _result(ref: Any, what: str) -> list[Any]:
    import ray
    from ray.exceptions import RayTaskError, TaskCancelledError, WorkerCrashedError

    try:
        return ray.get(ref)
    except RayTaskError as error:
        cause = error.cause if getattr(error, "cause", None) is not None else error
        why = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise PackError(f"Ray task for {what} failed: {type(cause).__name__}: {why} (OSErrors and dead workers "
                        f"are retried {MAX_RETRIES} times); re-run the same command to resume") from None
    except (WorkerCrashedError, TaskCancelledError) as error:
        raise PackError(f"Ray task for {what} failed: {str(error).splitlines()[0]}; re-run the same command "
                        "to resume") from None


def describe(chunk: list[Any]) -> str:
    """A task's partition in words: byte ranges of the source, or its first and last input."""
    first, last = chunk[0], chunk[-1]
    if isinstance(first, tuple) and len(first) == 2 and all(isinstance(x, int) for x in first):
        return f"bytes {first[0]:,}-{last[1]:,} of the source ({len(chunk)} ranges)"
    name = getattr(first, "source", None) or getattr(first, "key", None)
    if name is not None:
        return f"{len(chunk)} inputs from {name} to {getattr(last, 'source', None) or getattr(last, 'key', '')}"
    return f"{len(chunk)} inputs"


def _task(fn: Callable[[list[A]], list[B]], chunk: list[A], index: int) -> list[B]:
    """In a Ray worker: one batch (with the tests' fault injection, when they ask for it)."""
    fault = os.environ.get(TEST_FAULT, "")
    if fault:
        kind, _, rest = fault.partition(":")
        number, _, marker = rest.partition(":")
        if int(number) == index and kind == "raise":
            raise ValueError(f"injected failure in task {index}")
        if int(number) == index and kind == "kill" and not Path(marker).exists():
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return fn(chunk)
