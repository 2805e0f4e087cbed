"""Small real checkpoints for the inference, export and serve tests, and a `trainer serve` runner.

    shapes_checkpoint:   EfficientNet-Lite0's frozen features + a probe head on generated shapes (64 px)
    clothing_checkpoint: the same on 12 images per class of clothing-small's train folder (224 px), real
                         photos and class names; its predictions are far from perfect, which is fine:
                         the tests compare answers between paths, and read labels, not accuracy
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from shardtool.synth import make_shapes
from tests.conftest import run_cli


@dataclass(frozen=True)
class Trained:
    ckpt: Path
    data: Path  # its packed shards
    source: Path  # the class folders it was packed from


def trainer(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def probe_checkpoint(source: Path, out: Path, image_size: int) -> Trained:
    data = out / "shards"
    packed = run_cli("pack", source, data, "--split", "val=0.25", "--stratify", "--workers", "0",
                     "--resize", f"shorter:{round(image_size / 0.875)}")
    assert packed.exit_code == 0, packed.output
    ckpt = out / "probe.pt"
    done = trainer("probe", data, "--image-size", image_size, "--out", out / "features", "--save", ckpt,
                   "--workers", "0")
    assert done.returncode == 0, done.stderr
    return Trained(ckpt, data, source)


def shapes_checkpoint(out: Path) -> Trained:
    source = make_shapes(out / "shapes", per_class=30, size=64, seed=1)
    return probe_checkpoint(source, out, 64)


def clothing_checkpoint(real: Path, out: Path, per_class: int = 12) -> Trained:
    source = out / "clothing"
    for folder in sorted((real / "clothing-small" / "train").iterdir()):
        (source / folder.name).mkdir(parents=True)
        for file in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copyfile(file, source / folder.name / file.name)
    return probe_checkpoint(source, out, 224)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: Path, *args: str, wait: float = 180) -> Iterator[str]:
    """`trainer serve MODEL` on a free local port until /health says 200; yields its URL, stops it after."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "trainer", "serve", str(model), "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        while True:
            assert process.poll() is None, f"trainer serve exited: {process.stdout.read()}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "trainer serve did not become healthy"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
