"""The measurements of benchmarks/gpu_check.py, each run there in a process of its own (`--child NAME`).

Each takes gpu_check's parsed arguments and returns a small dict of numbers, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

BATCH, SIZE = 64, 224  # the loader rows: benchmarks/loader.py's batches of RandomResizedCrop(224)


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    """ARGS.images JPEGs of 256 px in 4 class folders (shardtool.synth's shapes)."""
    from shardtool.synth import CLASSES, make_shapes

    make_shapes(args.data, per_class=-(-args.images // len(CLASSES)), size=256)
    return {"images": sum(1 for _ in Path(args.data).rglob("*.jpg"))}


def pack(args: argparse.Namespace) -> dict[str, Any]:
    """shardtool pack's img/s for --backend ARGS.backend (the CLI, timed whole; workers: its default)."""
    argv = [sys.executable, "-m", "shardtool", "pack", args.data, args.shards, "--resize", "shorter:224", "--split",
            "val=0.1", "--backend", args.backend, "--overwrite"]
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    manifest = json.loads((Path(args.shards) / "dataset.json").read_text())
    written = manifest["report"]["written"]
    return {"img/s": round(written / seconds, 1), "written": written, "skipped": manifest["report"]["skipped"],
            "backend": manifest["options"]["backend"]}


def loader(args: argparse.Namespace) -> dict[str, Any]:
    """img/s of trainer's ARGS.backend loader, train batches on ARGS.device: one warm-up epoch, two timed."""
    from trainer.data import LoaderSpec, make_loader
    from trainer.dataset import open_dataset

    dataset = open_dataset(args.shards)
    spec = LoaderSpec(shards=tuple(dataset.shards("train")), batch_size=BATCH, image_size=SIZE,
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), train=True, workers=int(args.workers),
                      device=args.device)
    batches = make_loader(spec, args.backend)
    rates = []
    for epoch in range(3):
        start, seen = time.perf_counter(), 0
        for batch in batches.epoch(epoch):
            seen += len(batch)
        sync(args.device)
        rates.append(seen / (time.perf_counter() - start))
    return {"img/s": round(max(rates[1:]), 1), "warm-up img/s": round(rates[0], 1)}


def ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """EfficientNet-Lite0 train steps (forward, backward, AdamW) on one batch kept on the device, at the batch
    size trainer fit takes by default there: what the model alone allows, and the memory it needs."""
    import torch

    from trainer.device import default_batch_size, make_amp
    from trainer.models.registry import create_model

    device, size = torch.device(args.device), int(args.size)
    batch = default_batch_size(device, size)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # as gpu_check's fit
    model = create_model("efficientnet_lite0", 4, "imagenet").module.to(device).to(memory_format=layout)
    amp = make_amp("bf16" if device.type == "cuda" else "none", device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 4, (batch,), device=device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps, warmup = (30, 5) if device.type == "cuda" else (3, 1)
    for index in range(steps + warmup):
        if index == warmup:
            sync(args.device)
            start = time.perf_counter()
        with amp.autocast():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(args.device)
    found = {"img/s": round(steps * batch / (time.perf_counter() - start), 1), "batch": batch, "size": size}
    if device.type == "cuda":
        found["peak GPU memory GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return found


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


CHILDREN = {"data": make_data, "pack": pack, "loader": loader, "ceiling": ceiling}
