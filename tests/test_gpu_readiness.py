"""The GPU paths' decisions, tested on a CPU: what fails the run instead of becoming skips, which AMP a GPU
gets, and which device each torchrun rank uses. (The GPU runs themselves: `make gpu-check`.)"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import replace

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
from trainer.device import make_amp, resolve_device


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
    def broken(backend: str, threads: int):
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
    monkeypatch.setattr(dali, "_pipelines", {("dali-cpu", 1): object()})
    monkeypatch.setattr(dali, "_failed", [])
    monkeypatch.setattr(dali, "_build", lambda backend, threads: object())

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
    monkeypatch.setattr(dali, "_build", lambda backend, threads: object())
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


def test_dali_gpu_packs_in_as_many_worker_processes_as_pil_with_the_cores_shared_among_their_dali_threads(
        monkeypatch) -> None:
    """On a 16-core GPU box `pack --backend auto` (dali-gpu) runs 16 worker processes, each with a 1-thread DALI
    pipeline of its own (was one process with 16 DALI threads, the Python work serial: shardtool/process/dali.py)."""
    from shardtool import parallel
    from shardtool.config import PackConfig
    from shardtool.pack import executor

    monkeypatch.setattr(parallel, "usable_cpus", lambda: 16)
    monkeypatch.setattr(dali, "usable_cpus", lambda: 16)
    for workers, processes, threads in ((None, 16, 1), (0, 0, 16), (1, 1, 16), (4, 4, 4), (5, 5, 3), (32, 32, 1)):
        with executor(PackConfig("src", "out", backend="dali", workers=workers)) as pool:
            assert (pool.count, dali.threads_per_process(pool.count)) == (processes, threads), workers

    built = []
    monkeypatch.setattr(dali, "_pipelines", {})
    monkeypatch.setattr(dali, "_failed", [])
    monkeypatch.setattr(dali, "_build", lambda backend, threads: built.append((backend, threads)) or object())
    monkeypatch.setattr(dali, "_run", lambda pipe, jobs, backend: [np.zeros((*job.geometry.canvas[::-1], 3), np.uint8)
                                                                   for job in jobs])
    assert all(isinstance(r, Sample) for r in dali.process_batch(jpegs(3), replace(spec("dali-gpu"), threads=3)))
    assert built == [("dali-gpu", 3)]  # the spec's count, not a guess in the worker


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
    assert calls[0]["device_memory_padding"] > 0 and calls[0]["host_memory_padding"] > 0


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


def test_training_reads_its_loss_from_the_device_once_per_interval_and_still_stops_on_nan(monkeypatch) -> None:
    """A GPU step does not wait for the host: loss and top-1 stay on the device for READ_EVERY steps (here 20),
    the epoch's sums are what reading each step gave, and a nan loss at batch 27 stops the run at the read
    after it (batch 40), naming batch 27, before after_step saw batch 40."""
    from trainer.data import Batch
    from trainer.errors import TrainError
    from trainer.device import Amp
    from trainer.loop import TrainSums, train_one_epoch

    generator = torch.Generator().manual_seed(0)
    batches = [Batch(torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator),
                     [f"k{i}"] * 4, [""] * 4) for i in range(45)]

    def run(batches: list[Batch], read_every: int, seen: list[int]) -> TrainSums:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        sums = train_one_epoch(model, iter(batches), torch.optim.SGD(model.parameters(), lr=0.1),
                               criterion=torch.nn.CrossEntropyLoss(), amp=Amp(None, "cpu"), set_lr=lambda: None,
                               mix=None, sums=TrainSums(), start_batch=0, num_batches=len(batches),
                               on_corrupt="fail", after_step=lambda step: seen.append(step.batch),
                               read_every=read_every)
        return sums

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a per-step .item()"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(len(self)) or tolist(self))
    sums = run(batches, 20, seen := [])
    assert reads == [20, 20, 5] and seen == list(range(1, 46))
    each = run(batches, 1, [])
    assert (sums.loss, sums.correct, sums.seen) == (each.loss, each.correct, each.seen) and sums.seen == 180

    batches[26] = Batch(torch.full((4, 6), float("nan")), batches[26].labels, ["bad"] * 4, [""] * 4)
    with pytest.raises(TrainError, match="the training loss is nan at batch 27 of the epoch") as caught:
        run(batches, 20, seen := [])
    assert "\n" not in str(caught.value) and seen == list(range(1, 40))


@pytest.mark.parametrize(("gigabytes", "side", "expected"), [(80, 224, 512), (80, 448, 128), (24, 224, 128),
                                                              (8, 224, 64), (8, 512, 32)])
def test_the_default_batch_size_follows_the_gpu_s_memory(monkeypatch, gigabytes: int, side: int, expected: int) -> None:
    from types import SimpleNamespace

    from trainer.device import default_batch_size

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gigabytes * 2**30))
    assert default_batch_size(torch.device("cuda", 0), side) == expected
    assert default_batch_size(torch.device("cpu"), side) == 32


def _wait_for_rank_0(rank: int, port: int, fail: bool, results) -> None:  # a process of the test below
    import time
    from datetime import timedelta

    import torch.distributed as torch_dist

    from trainer.distributed import from_main

    # a 3 s training group stands in for NCCL's 10 minutes: a barrier there would time out while rank 0 works
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                  timeout=timedelta(seconds=3))

    def probe() -> dict[str, float]:
        time.sleep(6)
        if fail:
            raise ValueError("no labelled samples in val\nsecond line")
        return {"val": 0.75, "l2": 1e-4}

    try:
        results.put((rank, "ok", from_main(probe)))
    except Exception as error:  # what each rank ended with, for the test to read
        results.put((rank, type(error).__name__, str(error)))
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True], ids=["result", "failure"])
def test_under_ddp_the_probe_s_result_reaches_every_rank_past_the_training_group_s_timeout(fail: bool) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_wait_for_rank_0, args=(rank, port, fail, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    got = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
    if not fail:
        assert got == [(0, "ok", {"val": 0.75, "l2": 1e-4}), (1, "ok", {"val": 0.75, "l2": 1e-4})]
    else:
        assert got == [(0, "ValueError", "no labelled samples in val\nsecond line"),
                       (1, "TrainError", "rank 0 failed before training started: no labelled samples in val")]
