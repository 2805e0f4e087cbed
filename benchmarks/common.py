"""What every benchmark shares: run a command and time it, record the machine, write JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import PIL

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "pillow": PIL.__version__, "processor": platform.processor() or platform.machine()}


def timed_run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest process it started) for one subprocess run."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{process.stderr.read().decode()}")  # type: ignore[union-attr]
    return seconds, usage.ru_maxrss / 1024  # Linux: max over the child and its reaped descendants


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def write(name: str, settings: dict[str, Any], results: list[dict[str, Any]], columns: list[str]) -> str:
    """Write results/<name>.json and .md; returns the markdown table."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "settings": settings, "results": results}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in results:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    table = "\n".join(lines)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return "" if value is None else str(value)
