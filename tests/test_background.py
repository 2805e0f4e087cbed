"""The writer's background thread keeps submission order, and after a failure (a full disk) runs nothing
more: a shard whose bytes were not all written must never get its journal line."""

from __future__ import annotations

import pytest

from shardtool.background import Background


def test_tasks_run_in_the_order_they_were_submitted():
    done: list[int] = []
    with Background(pending=2) as background:
        for index in range(100):
            background.submit(done.append, index)
    assert done == list(range(100))


def test_a_failure_is_raised_in_the_writer_and_later_tasks_do_not_run():
    done: list[str] = []

    def write_chunk() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with Background() as background:
            background.submit(done.append, "first chunk")
            background.submit(write_chunk)
            background.submit(done.append, "journal line")
    assert done == ["first chunk"]
