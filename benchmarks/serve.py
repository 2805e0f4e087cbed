"""Serving latency and throughput: `trainer serve` on a checkpoint and on its ONNX export, same images.

    python -m benchmarks.serve [--ckpt CKPT --data SHARDS --split S --images DIR] [--onnx FILE] [--requests 100]
                               [--repeats 3] [--json]

Each model is served by its own `trainer serve` process on a free local port (defaults: batches of up to
16, 5 ms wait), warmed up with 10 requests, then measured round by round, the two rows alternating:
- concurrency 1: --requests POSTs of raw image bytes one after another; p50/p95 latency (ms);
- concurrency 8: 8 client threads each with a keep-alive connection, --requests x 2 POSTs in all;
  requests/s over the whole burst, and its p50/p95 latency.
Images: clothing-small's 372 test JPEGs as they are on disk (mostly 400x533, ~40 KB), in turn, so every
request pays a real decode + resize + crop. The client runs on the same machine (its threads take CPU
the server could use), as a local load test does; server_peak_mb is the server's peak memory over the
measured rounds: its whole process tree (common.TreePeak: summed PSS sampled, or its own peak RSS if larger).

CKPT defaults to the accuracy benchmark's clothing-small fit (benchmarks/.cache/accuracy-runs), else a
linear probe on the clothing-small shards it packs (made once here). The ONNX file is `trainer export`ed
from it, parity-checked on the test split (or --onnx: one exported from CKPT before).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import CACHE, emit, pack_args, real_data, rel, tool, TreePeak
from trainer.serve.local import serving

COLUMNS = ["name", "runtime", "c1_p50_ms", "c1_p95_ms", "c8_req_s", "c8_p50_ms", "c8_p95_ms", "server_peak_mb"]
WORK = CACHE / "serve"


def checkpoint(given: str) -> Path:
    if given:
        return Path(given)
    fitted = CACHE / "accuracy-runs" / "clothing-small-fit" / "best.pt"
    if fitted.is_file():
        return fitted
    probe = WORK / "probe.pt"
    if not probe.is_file():
        shards = shards_dir()
        run([tool("trainer"), "probe", str(shards), "--out", str(WORK / "features"), "--save", str(probe)])
    return probe


def shards_dir() -> Path:
    shards = CACHE / "accuracy" / "clothing-small"
    if not (shards / "dataset.json").is_file():
        run([tool("shardtool"), "pack", *pack_args("clothing-small", real_data()), str(shards), "--overwrite"])
    return shards


def export_onnx(ckpt: Path, folder: Path, data: str, split: str) -> Path:
    onnx = folder / "model.onnx"
    run([tool("trainer"), "export", str(ckpt), str(onnx), "--check-data", data or str(shards_dir()), "--split", split])
    return onnx


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stderr}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post(client: httpx.Client, url: str, image: bytes) -> float:
    start = time.perf_counter()
    response = client.post(url, content=image, timeout=120)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        sys.exit(f"{url}: {response.status_code} {response.text}")
    return seconds


def sequential(url: str, images: list[bytes], n: int) -> list[float]:
    with httpx.Client() as client:
        return [post(client, url, images[i % len(images)]) for i in range(n)]


def concurrent(url: str, images: list[bytes], n: int, threads: int = 8) -> tuple[float, list[float]]:
    """(requests/s over the burst, each request's latency) for N requests from THREADS threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    start_line = threading.Barrier(threads + 1)

    def client_thread(index: int) -> None:
        with httpx.Client() as client:
            post(client, url, images[index])  # connect before the clock starts
            start_line.wait()
            mine = [post(client, url, images[i % len(images)]) for i in range(index, n, threads)]
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client_thread, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start_line.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return n / (time.perf_counter() - start), latencies


def server_pid(url: str) -> int:
    """The `trainer serve` process listening on URL's port, found through /proc (serving() keeps its Popen)."""
    port = str(int(url.rsplit(":", 1)[1])).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and port in argv:
            return int(cmdline.parent.name)
    sys.exit(f"no trainer serve process found for {url}")


def measure(url: str, images: list[bytes], requests: int) -> dict[str, float]:
    c1 = sequential(url + "/predict", images, requests)
    rate, c8 = concurrent(url + "/predict", images, requests * 2)
    return {"c1_p50_ms": statistics.median(c1) * 1000, "c1_p95_ms": percentile(c1, 0.95) * 1000,
            "c8_req_s": rate, "c8_p50_ms": statistics.median(c8) * 1000, "c8_p95_ms": percentile(c8, 0.95) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="", help="Checkpoint to serve [the accuracy benchmark's clothing-small fit].")
    parser.add_argument("--data", default="", help="Shards the export's parity is checked on (test split) "
                                                   "[clothing-small, packed once].")
    parser.add_argument("--split", default="test", help="Split of --data for the parity check.")
    parser.add_argument("--images", default="", help="Folder of images to send [clothing-small/test].")
    parser.add_argument("--onnx", default="", help="`trainer export` of --ckpt made before [exported here].")
    parser.add_argument("--requests", type=int, default=100, help="Requests at concurrency 1 (x2 at 8) per round.")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds; each row's figures are their median.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ckpt = checkpoint(args.ckpt)
    folder = Path(args.images) if args.images else real_data() / "clothing-small" / "test"
    images = [p.read_bytes() for p in sorted(folder.glob("**/*.jpg"))]
    rows: dict[str, list[dict[str, float]]] = {"checkpoint": [], "onnx": []}
    with tempfile.TemporaryDirectory() as tmp, serving(ckpt) as torch_url, \
            serving(Path(args.onnx) if args.onnx else export_onnx(ckpt, Path(tmp), args.data, args.split)) as onnx_url:
        urls = {"checkpoint": torch_url, "onnx": onnx_url}
        for url in urls.values():
            sequential(url + "/predict", images, 10)  # warm-up
        peaks = {name: TreePeak(server_pid(url)) for name, url in urls.items()}
        with peaks["checkpoint"], peaks["onnx"]:
            for round_ in range(args.repeats):
                for name in (list(urls) if round_ % 2 == 0 else list(urls)[::-1]):
                    rows[name].append(measure(urls[name], images, args.requests))
    results = [summarise(name, runs, peaks[name].peak_mb) for name, runs in rows.items()]
    settings = {"ckpt": rel(ckpt), "requests": args.requests, "repeats": args.repeats, "images": len(images),
                "server": "trainer serve defaults: --max-batch 16 --max-wait-ms 5", "client": "httpx, same machine"}
    emit("serve", settings, results, COLUMNS, args.json)


def summarise(name: str, runs: list[dict[str, float]], peak_mb: float) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "runtime": "PyTorch (float32)" if name == "checkpoint" else "ONNX Runtime"}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.median(values)
        out[f"{key}_stats"] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out | {"server_peak_mb": peak_mb}


if __name__ == "__main__":
    main()
