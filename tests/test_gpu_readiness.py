"""The GPU paths' decisions, tested on a CPU: what fails the run instead of becoming skips, which AMP a GPU
gets, and which device each torchrun rank uses. (The GPU runs themselves: `make gpu-check`.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shardtool.config import parse_resize
from shardtool.errors import PackError
from shardtool.process import dali
from shardtool.process.pil import OutputSpec
from shardtool.sample import Sample
from trainer import distributed
from trainer.distributed import Dist
from trainer.fit import make_amp, resolve_device


def jpegs(n: int) -> list[Sample]:
    items = []
    for i in range(n):
        data = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), i * 7 % 255, np.uint8)).save(data, "JPEG")
        items.append(Sample(key=f"k{i}", label="x", group=f"g{i}", source=f"s{i}.jpg", data=data.getvalue()))
    return items


def spec() -> OutputSpec:
    return OutputSpec(resize=parse_resize("shorter:16"), encode="jpg", quality=90, max_pixels=10**8, backend="dali-cpu")


def test_a_pipeline_that_cannot_be_built_stops_the_pack_instead_of_skipping_every_image(monkeypatch) -> None:
    def broken(backend: str):
        raise RuntimeError("CUDA error: no CUDA-capable device is detected\nmore lines")

    monkeypatch.setattr(dali, "_build", broken)
    monkeypatch.setattr(dali, "_pipelines", {})
    with pytest.raises(PackError) as caught:
        dali.process_batch(jpegs(4), spec())
    assert "could not set up its dali-cpu pipeline" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("message", "expected"), [
    ("Error in thread 0: CUDA error: out of memory", "failed: Error in thread 0: CUDA error: out of memory"),
    ("nvjpeg error: NVJPEG_STATUS_EXECUTION_FAILED", "failed"),
])
def test_a_device_failure_while_decoding_stops_the_pack(monkeypatch, message: str, expected: str) -> None:
    monkeypatch.setattr(dali, "_pipelines", {"dali-cpu": object()})
    monkeypatch.setattr(dali, "_discard", lambda backend: dali._pipelines.pop(backend, None))
    monkeypatch.setattr(dali, "_build", lambda backend: object())

    def fail(pipe, jobs, backend):
        raise RuntimeError(message)

    monkeypatch.setattr(dali, "_run", fail)
    with pytest.raises(PackError, match=expected):
        dali.process_batch(jpegs(2), spec())


def test_every_image_of_a_batch_failing_is_dalis_problem_not_the_images(monkeypatch) -> None:
    monkeypatch.setattr(dali, "_pipelines", {})
    monkeypatch.setattr(dali, "_discard", lambda backend: dali._pipelines.pop(backend, None))
    monkeypatch.setattr(dali, "_build", lambda backend: object())

    def fail(pipe, jobs, backend):
        raise RuntimeError("Assert on \"ok\" failed: decode failed")

    monkeypatch.setattr(dali, "_run", fail)
    with pytest.raises(PackError, match="failed on every image of a batch of 8"):
        dali.process_batch(jpegs(8), spec())
    results = dali.process_batch(jpegs(3), spec())  # a small batch of bad images stays skips
    assert [r.reason for r in results] == ["corrupt_image"] * 3


def test_auto_amp_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch) -> None:
    asked = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # a V100/T4: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    amp = make_amp("auto", torch.device("cuda"))
    assert asked == [False] and amp.dtype == torch.float16 and amp.scaler is not None


def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rank1 = Dist(rank=1, world=2, local_rank=1)
    for asked in ("auto", "cuda", "cuda:0"):
        assert resolve_device(asked, rank1) == torch.device("cuda", 1), asked
    assert resolve_device("cuda:0", Dist()) == torch.device("cuda", 0)  # one process: as asked
    assert resolve_device("cpu", rank1) == torch.device("cpu")

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kwargs: calls.setdefault("init", kwargs))
    assert distributed.setup("cuda") == rank1
    assert calls == {"set_device": 1, "init": {"backend": "nccl", "device_id": torch.device("cuda", 1)}}


def test_dali_gpu_packs_in_one_worker_process() -> None:
    from shardtool.pack import worker_count

    assert [worker_count(n, "dali-gpu") for n in (None, 0, 1, 8)] == [1, 0, 1, 1]
    assert [worker_count(n, "pil") for n in (None, 0, 8)] == [None, 0, 8]
