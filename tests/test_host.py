"""trainer/host.py: freed activation memory stays in the process (no page faults for reused buffers), and
the setting changes nothing a run computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from shardtool.synth import make_shapes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# 20 steps that each allocate and free a 64 MB activation-sized tensor, as a training step does, after 12 that
# are not counted: the heap grows for the first few (an aligned request does not fit the block just freed until
# freed blocks coalesce), then every step reuses it
FAULTS = """
import resource, sys, torch
from trainer.host import keep_freed_memory
applied = keep_freed_memory()
for _ in range(12):
    torch.empty(16 << 20).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(malloc: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                         env=os.environ | {"TRAINER_MALLOC": malloc}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    applied, kept = faults("keep")
    skipped, system = faults("system")
    assert applied and not skipped
    pages = 20 * (64 << 20) // 4096  # every page of every step, as glibc's mmap/munmap does
    assert system > pages // 2, system
    assert kept < pages // 20, (kept, system)


def test_the_allocator_setting_leaves_the_trained_weights_unchanged(tmp_path):
    source = make_shapes(tmp_path / "shapes", per_class=12, size=48)
    data = tmp_path / "shards"
    assert run_cli("pack", source, data, "--split", "val=0.25", "--shard-size", "8", "--workers", "0").exit_code == 0
    weights = {}
    for malloc in ("system", "keep"):
        run = tmp_path / malloc
        subprocess.run([sys.executable, "-m", "trainer", "fit", str(data), str(run), "--model", "tiny_cnn",
                        "--weights", "none", "--batch-size", "4", "--workers", "2", "--amp", "none", "--epochs", "2",
                        "--freeze-epochs", "0"], check=True, capture_output=True, env=os.environ | {"TRAINER_MALLOC": malloc})
        weights[malloc] = torch.load(Path(run) / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert weights["system"].keys() == weights["keep"].keys()
    for name, tensor in weights["system"].items():
        assert torch.equal(tensor, weights["keep"][name]), name
