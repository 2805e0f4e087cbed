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


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
@pytest.mark.parametrize("local_world, expected", [(None, "1"), ("2", "1")])  # 1 CPU / 2 processes: still 1, never 0
def test_trainer_s_default_workers_follow_the_cpus_it_may_use(local_world, expected) -> None:
    """Pinned to one core, fit, probe and --help default to 1 decode worker, not a fixed 2."""
    probe = ("from trainer.config import FitConfig; from trainer.probe import ProbeConfig; "
             "print(FitConfig('d', 'o').workers, ProbeConfig('d').workers)")
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"} | (
        {"LOCAL_WORLD_SIZE": local_world} if local_world else {})
    one = {sorted(os.sched_getaffinity(0))[0]}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env,
                          preexec_fn=lambda: os.sched_setaffinity(0, one))
    assert done.stdout.split() == [expected, expected]
    shown = subprocess.run([sys.executable, "-m", "trainer", "fit", "--help"], capture_output=True, text=True,
                           check=True, env=env, preexec_fn=lambda: os.sched_setaffinity(0, one))
    assert "default: 1" in " ".join(shown.stdout.split()).split("--workers INTEGER", 1)[1].split(" --", 1)[0]


def test_two_torchrun_processes_share_the_cpus(monkeypatch) -> None:
    from trainer import config

    monkeypatch.setattr(config, "usable_cpus", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert config.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert config.default_workers() == config.DEFAULT_WORKERS_CAP  # 32 CPUs, one process: capped at 16
