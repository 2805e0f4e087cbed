"""What each outside reader read from our shards in this test session; conftest prints it at the end."""

from __future__ import annotations

READBACK: dict[str, dict[str, int]] = {}  # tool -> split -> samples read


def record_readback(tool: str, split: str, samples: int) -> None:
    READBACK.setdefault(tool, {})[split] = samples
