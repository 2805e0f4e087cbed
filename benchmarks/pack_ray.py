"""What Ray costs pack on one machine, and the per-task figures that decide how it scales to N.

    python -m benchmarks.pack_ray [--source DIR] [--repeats 3] [--size 256] [--json]

Rows, each `shardtool pack SOURCE OUT --resize shorter:SIZE` on the same files (clothing-small: 3,781
JPEGs, mostly 400x533), rows alternating round by round, the page cache warm:

- local-1, local-2: `--workers 1|2`, today's worker processes;
- ray-1, ray-2: `--distributor ray --ray-address` a Ray head started here with `--num-cpus 1|2` (its start
  is not timed; the driver's connection is). Memory: the pack command's process tree plus the Ray
  head's whole tree (raylet, GCS, workers), sampled together.

Every output is checked to be byte-identical to local-2's. Then, on the 2-CPU head, the per-task costs a
cluster pays (`costs` in the JSON):

- task_ms: a no-op task's round trip (submit, schedule, run, get), 400 of them, 2 x CPUs in flight;
- store_mb_s: a task returning 4 MB of bytes through the object store (a Run: encoded images);
- run_mb, images_per_task: what one of pack's tasks returns here (32 images at shorter:SIZE);
- writer_img_s: images/s the driver alone can take: ray-2's images over its driver process's CPU
  seconds (user + system), the single writer's ceiling on one core;
- upload_mb_s: one 64 MB shard put to moto's S3 server on 127.0.0.1 (a stand-in: real S3 differs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_ratio, emit, real_data, rel, row, tree_pss_kb

BIN = Path(sys.executable).parent
ROWS = ("local-1", "local-2", "ray-1", "ray-2")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway head on 127.0.0.1 (Ray 2.60 turns on tokens)


class Head:
    """`ray start --head --block --num-cpus N` on 127.0.0.1, in its own temp folder; close() stops it
    (tests/test_ray.py starts its cluster with it too)."""

    def __init__(self, cpus: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{s.getsockname()[1]}"
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
             self.address.rsplit(":", 1)[1], "--num-cpus", str(cpus), "--include-dashboard", "false",
             "--temp-dir", self.temp, "--disable-usage-stats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=ENV)
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "status", "--address", self.address], capture_output=True,
                             env=ENV, timeout=60).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the Ray head did not start: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.5)

    def close(self) -> None:
        """SIGTERM to its process group (--block: raylet, GCS and workers go with it); SIGKILL after 5 s
        (its graceful stop waits ~30 s for workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def run_pack(argv: list[str], also: int | None) -> tuple[float, float, float]:
    """(wall seconds, peak MB of the command's tree + ALSO's tree, the command's own CPU seconds)."""
    peak, stop = [0], threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_kb(process.pid) + (tree_pss_kb(also) if also else 0))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"pack failed: {' '.join(argv)}\n{process.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
    return seconds, peak[0] / 1024, usage.ru_utime + usage.ru_stime


def digest(out: Path) -> str:
    hashes = hashlib.sha256()
    for path in sorted(p for p in out.iterdir() if p.is_file()):
        hashes.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return hashes.hexdigest()


def task_costs(address: str, size: int) -> dict[str, Any]:
    """Per-task figures on the running head (this process joins it as a driver)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        noop = ray.remote(lambda: None)
        blob = ray.remote(lambda n: b"x" * n)
        ray.get([noop.remote() for _ in range(20)])  # workers started
        start = time.perf_counter()
        pending = []
        for _ in range(400):
            pending.append(noop.remote())
            if len(pending) >= 4:
                ray.get(pending.pop(0))
        ray.get(pending)
        task_ms = (time.perf_counter() - start) / 400 * 1000
        ray.get(blob.remote(4 << 20))
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            ray.get(blob.remote(4 << 20))
            rates.append(4 / (time.perf_counter() - start))
        run = run_size(size)
    finally:
        ray.shutdown()
    return {"task_ms": round(task_ms, 3), "store_mb_s": round(statistics.median(rates), 1),
            "run_mb": round(run[0], 3), "images_per_task": run[1]}


def run_size(size: int) -> tuple[float, int]:
    """MB of tar bytes one pack task returns for 32 clothing-small images at shorter:SIZE (measured)."""
    from shardtool.config import parse_resize
    from shardtool.process import pil
    from shardtool.sample import Sample
    from shardtool.sink import encode_run

    files = sorted((real_data() / "clothing-small").rglob("*.jpg"))[:32]
    items = [Sample(key=f.stem, label=f.parent.name, group=f.stem, source=str(f), path=str(f)) for f in files]
    spec = pil.OutputSpec(parse_resize(f"shorter:{size}"), "jpg", 90, 10**8, "full", "pil")
    run = encode_run(pil.process_batch(items, spec), {f.parent.name: 0 for f in files})
    return len(run.data) / 1e6, len(files)


def upload_rate() -> float | None:
    """MB/s of one 64 MB put to moto's S3 server on 127.0.0.1 (None without moto/s3fs)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="bench")
        data = os.urandom(64 << 20)
        start = time.perf_counter()
        s3.put_object(Bucket="bench", Key="shard.tar", Body=data)
        return round(64 / (time.perf_counter() - start), 1)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="class folders [clothing-small]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    source = args.source or real_data() / "clothing-small"
    if not source.is_dir():
        sys.exit(f"{source} not found: pass --source (a class-folder dataset)")
    images = sum(1 for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    heads = {1: Head(1), 2: Head(2)}
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    memory: dict[str, list[float]] = {name: [] for name in ROWS}
    driver_cpu: list[float] = []
    digests: dict[str, set[str]] = {name: set() for name in ROWS}
    try:
        for path in source.rglob("*"):  # the page cache warm for every row
            if path.is_file():
                path.read_bytes()
        with tempfile.TemporaryDirectory(prefix="bench-pack-ray-") as work:
            for repeat in range(args.repeats):
                for name in ROWS:
                    out = Path(work) / f"{name}-{repeat}"
                    argv = [str(BIN / "shardtool"), "pack", str(source), str(out), "--resize", f"shorter:{args.size}",
                            "--json"]
                    kind, cpus = name.split("-")
                    head = heads[int(cpus)] if kind == "ray" else None
                    argv += ["--distributor", "ray", "--ray-address", head.address] if head else ["--workers", cpus]
                    seconds, peak_mb, cpu_s = run_pack(argv, head.process.pid if head else None)
                    times[name].append(images / seconds)
                    memory[name].append(peak_mb)
                    if name == "ray-2":
                        driver_cpu.append(cpu_s)
                    digests[name].add(digest(out))
        costs = task_costs(heads[2].address, args.size)
    finally:
        for head in heads.values():
            head.close()
    if len(set().union(*digests.values())) != 1:
        sys.exit(f"the rows wrote different bytes: {digests}")
    costs["writer_img_s"] = round(images / statistics.median(driver_cpu), 1)
    costs["upload_mb_s"] = upload_rate()
    results = [row(name, times[name], memory[name]) for name in ROWS]
    add_ratio(results, "vs_local_2", "local-2")
    settings = {"source": rel(source), "images": images, "resize": f"shorter:{args.size}", "repeats": args.repeats,
                "identical_output": True, "costs": costs}
    emit("pack_ray", settings, results, ["name", "img_s", "vs_local_2", "peak_rss_mb"], args.json,
         [f"per-task costs on the 2-CPU head: {costs}"])


if __name__ == "__main__":
    main()
