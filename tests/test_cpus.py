"""Worker counts come from the CPUs this process may use, not the host's count (issue 34)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardtool.cpus import cfs_quota

PROBE = ("from shardtool.cpus import usable_cpus; from shardtool.parallel import Workers; "
         "print(usable_cpus(), Workers(None).count)")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_process_pinned_to_one_core_sizes_its_pools_for_one() -> None:
    one = {sorted(os.sched_getaffinity(0))[0]}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, one))
    assert done.stdout.split() == ["1", "1"]


def test_a_cfs_quota_caps_the_count(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5
    assert cfs_quota(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cfs_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cfs_quota(tmp_path) == 4
