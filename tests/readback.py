"""What each outside reader read from our shards in this test session; conftest prints it at the end."""

from __future__ import annotations

READBACK: dict[str, dict[str, int]] = {}  # tool -> split -> samples read


def record_readback(tool: str, split: str, samples: int) -> None:
    READBACK.setdefault(tool, {})[split] = samples


FIGURES: dict[str, list[str]] = {}  # section -> lines a test measured (times, counts), printed at the end


def record_figure(section: str, line: str) -> None:
    """A measured figure for the end of the session (CI's log shows it without -s)."""
    FIGURES.setdefault(section, []).append(line)
