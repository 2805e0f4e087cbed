"""How many CPUs this process may use: what worker counts and thread pools are sized from.

`os.cpu_count()` counts the host's CPUs. In a container, under `taskset`, Slurm or a Kubernetes CPU
limit, a process may run on far fewer, and sizing pools from the host's count oversubscribes them
(64 decode processes fighting over 8 allowed cores). Two limits apply: the affinity mask (cpusets,
taskset) and a CFS quota (`docker --cpus 4`, Kubernetes limits), read from cgroup v2's cpu.max or v1's
cpu.cfs_quota_us. Written here because the library that does this (loky's cpu_count, behind joblib) is
not a dependency, and this is 20 lines. Python 3.13's os.process_cpu_count() covers the mask only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a CFS quota; at least 1."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: the host's count is all there is
        allowed = os.cpu_count() or 1
    quota = cfs_quota()
    return max(1, min(allowed, quota) if quota else allowed)


def cfs_quota(root: Path = CGROUP) -> int | None:
    """CPUs the cgroup's CFS quota allows, rounded up (2.5 -> 3), or None where there is no quota."""
    for path, parse in ((root / "cpu.max", _v2), (root / "cpu" / "cpu.cfs_quota_us", _v1)):
        try:
            quota, period = parse(path)
        except (OSError, ValueError):
            continue
        return math.ceil(quota / period) if quota > 0 and period > 0 else None
    return None


def _v2(path: Path) -> tuple[int, int]:
    quota, period = path.read_text().split()
    return (-1 if quota == "max" else int(quota)), int(period)


def _v1(path: Path) -> tuple[int, int]:
    return int(path.read_text()), int((path.parent / "cpu.cfs_period_us").read_text())
