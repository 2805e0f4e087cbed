"""The GPU paths' decisions, tested on a CPU: what fails the run instead of becoming skips, which AMP a GPU
gets, and which device each torchrun rank uses. (The GPU runs themselves: `make gpu-check`.)"""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

from shardtool.config import parse_resize
from shardtool.errors import PackError
from shardtool.process import dali, pil
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


def spec(backend: str = "dali-cpu") -> OutputSpec:
    return OutputSpec(resize=parse_resize("shorter:16"), encode="jpg", quality=90, max_pixels=10**8, backend=backend)


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
    monkeypatch.setattr(dali, "_failed", [])
    monkeypatch.setattr(dali, "_build", lambda backend: object())

    def fail(pipe, jobs, backend):
        raise RuntimeError(message)

    monkeypatch.setattr(dali, "_run", fail)
    with pytest.raises(PackError, match=expected):
        dali.process_batch(jpegs(2), spec())


def test_a_dali_failure_on_good_images_packs_them_and_the_rest_with_pil(monkeypatch, capsys) -> None:
    """DALI cannot build a pipeline after one failed (shardtool/process/dali.py): the failed batch and every
    later one go through the PIL path, all of them packed, with one warning line."""
    monkeypatch.setattr(dali, "_pipelines", {})
    monkeypatch.setattr(dali, "_failed", [])
    monkeypatch.setattr(dali, "_build", lambda backend: object())
    runs = []

    def fail(pipe, jobs, backend):
        runs.append(len(jobs))
        raise RuntimeError("Error in thread 0: [/opt/dali/decoder.cc:42] encountered:\nbad huffman table\nmore")

    monkeypatch.setattr(dali, "_run", fail)
    first = dali.process_batch(jpegs(5), spec())
    later = dali.process_batch(jpegs(3), spec())
    assert runs == [5]  # DALI is not asked again in this process
    by_pil = pil.process_batch(jpegs(5), spec("pil"))
    assert [r.data for r in first] == [r.data for r in by_pil] and all(isinstance(r, Sample) for r in later)
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and "bad huffman table" in warning and "PIL path" in warning


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
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # resolve_device refuses a cuda:N the machine lacks
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


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="nvidia-dali not installed")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_loader_s_gpu_decoders_upsample_chroma_as_the_cpu_decoder(monkeypatch, train: bool) -> None:
    """The trainer's mixed (nvJPEG) decoders are built with jpeg_fancy_upsampling, so GPU training sees the RGB
    that pack, the torch loader and predict see (recorded here without a GPU)."""
    from nvidia.dali import fn

    from trainer.data import LoaderSpec
    from trainer.data.dali import decode_augment

    calls = []

    class Recorded(Exception):
        pass

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise Recorded

    monkeypatch.setattr(fn.decoders, "image_random_crop" if train else "image", record)
    spec = LoaderSpec(shards=(), batch_size=4, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, train=train)
    with pytest.raises(Recorded):
        decode_augment(None, spec, "mixed")
    assert calls[0]["device"] == "mixed" and calls[0]["jpeg_fancy_upsampling"] is True


def test_loader_dali_without_dali_installed_is_one_line(shapes, tmp_path, monkeypatch) -> None:
    """A GPU box without DALI: `--loader dali` says what to install in one line (was ModuleNotFoundError)."""
    import sys

    from click.testing import CliRunner

    from tests.conftest import run_cli
    from trainer.cli import main

    packed = run_cli("pack", shapes, tmp_path / "shards", "--split", "val=0.25", "--workers", "0")
    assert packed.exit_code == 0, packed.output
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali raises ImportError
    done = CliRunner().invoke(main, ["fit", str(tmp_path / "shards"), str(tmp_path / "run"), "--model", "tiny_cnn",
                                     "--weights", "none", "--epochs", "1", "--image-size", "32", "--loader", "dali",
                                     "--workers", "0"])
    assert done.exit_code != 0 and isinstance(done.exception, SystemExit), done.output
    assert done.output.strip().count("\n") == 0 and "--loader dali needs NVIDIA DALI" in done.output, done.output
    assert "Traceback" not in done.output
