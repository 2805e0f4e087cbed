"""The GPU paths, run: skipped without CUDA (and without DALI where DALI is used). `make gpu-check` runs
these with -s (they print what they measured) plus the GPU benchmark rows; see docs/gpu.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shardtool.config import parse_resize
from shardtool.process import dali, pil
from shardtool.process.pil import OutputSpec
from shardtool.sample import Sample, Skip
from shardtool.synth import make_shapes
from tests.conftest import run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 shapes: 16 train samples (2 batches of 8), val and test, packed with --backend auto."""
    source = make_shapes(tmp_path_factory.mktemp("src") / "shapes", per_class=8, size=64)
    out = tmp_path_factory.mktemp("shards") / "shapes"
    result = run_cli("pack", source, out, "--split", "val=0.25,test=0.25", "--stratify", "--backend", "auto")
    assert result.exit_code == 0, result.output
    return out


@needs_dali
def test_dali_gpu_packs_64_jpegs_with_one_corrupt_as_exactly_one_skip(monkeypatch) -> None:
    """The 63 good JPEGs reach nvJPEG (PNGs would take the PIL path) and come out as the PIL path's pixels."""
    decoded = []
    run = dali._run
    monkeypatch.setattr(dali, "_run", lambda pipe, jobs, backend: decoded.extend(jobs) or run(pipe, jobs, backend))
    items = []
    for i in range(64):
        data = io.BytesIO()
        ramp = np.linspace(0, 255, 48 * 40 * 3).reshape(48, 40, 3) + np.random.default_rng(i).normal(0, 8, (48, 40, 3))
        Image.fromarray(ramp.clip(0, 255).astype(np.uint8)).save(data, "JPEG", quality=90)
        items.append(Sample(key=f"k{i}", label="x", group=f"g{i}", source=f"s{i}.jpg", data=data.getvalue()))
    whole = items[21].data
    items[21] = items[21].with_(data=whole[: len(whole) // 2])
    spec = OutputSpec(resize=parse_resize("shorter:20"), encode="png", quality=90, max_pixels=10**8, backend="dali-gpu")
    results = dali.process_batch(items, spec)
    assert [r.key for r in results if isinstance(r, Skip)] == ["k21"]
    assert len(decoded) == 63  # every good JPEG went through the GPU pipeline
    by_pil = pil.process_batch(items, dataclasses.replace(spec, backend="pil"))
    worst = max(np.abs(np.asarray(Image.open(io.BytesIO(a.data)), np.float32)
                       - np.asarray(Image.open(io.BytesIO(b.data)), np.float32)).mean()
                for a, b in zip(results, by_pil) if isinstance(a, Sample))
    print(f"dali-gpu vs pil on 63 JPEGs resized to 20 px: worst mean difference {worst:.2f}/255")
    assert worst <= 3.0  # tests/test_dali_backend.py's GPU_TOLERANCE


@needs_dali
def test_pack_backend_auto_is_dali_gpu_with_no_skips(shards: Path) -> None:
    manifest = json.loads((shards / "dataset.json").read_text())
    assert manifest["options"]["backend"] == "dali-gpu", manifest["options"]
    assert manifest["report"]["skipped"] == 0


@needs_dali
def test_dali_loader_batches_on_cuda_match_the_cpu_pipeline(shards: Path) -> None:
    from trainer.data import LoaderSpec, make_loader
    from trainer.dataset import open_dataset

    dataset = open_dataset(str(shards))
    common = {"batch_size": 8, "image_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    train = make_loader(LoaderSpec(shards=tuple(dataset.shards("train")), train=True, device="cuda", **common), "dali")
    batch = next(iter(train.epoch(0)))
    assert batch.images.is_cuda and batch.images.dtype == torch.float32 and batch.images.shape == (8, 3, 32, 32)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    evals = {device: next(iter(make_loader(LoaderSpec(shards=tuple(dataset.shards("val")), train=False,
                                                      device=device, **common), "dali").epoch(0)))
             for device in ("cuda", "cpu")}
    difference = (evals["cuda"].images.cpu() - evals["cpu"].images).abs().max().item() * 0.25  # back to 0-1
    print(f"DALI eval batch, GPU vs CPU decode: max difference {difference * 255:.2f}/255")
    assert difference <= 2 / 255


@pytest.mark.parametrize("flags", [
    pytest.param(["--loader", "dali", "--amp", "auto"], marks=needs_dali),
    pytest.param(["--loader", "dali", "--amp", "fp16"], marks=needs_dali),
    ["--loader", "torch", "--workers", "2", "--compile", "--channels-last"],
    ["--loader", "auto", "--freeze-epochs", "1"],
], ids=["dali-bf16", "dali-fp16", "torch-compile", "freeze"])
def test_fit_runs_on_the_gpu(shards: Path, tmp_path: Path, flags: list[str]) -> None:
    from tests.models import trainer

    done = trainer("fit", shards, tmp_path / "run", "--model", "tiny_cnn", "--weights", "none", "--epochs", "2",
                   "--batch-size", "8", "--image-size", "32", "--device", "cuda", *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(f"fit {' '.join(flags)}: {summary['epochs']} epochs, {summary['steps']} steps")
    assert summary["epochs"] == 2 and summary["steps"] == 4
