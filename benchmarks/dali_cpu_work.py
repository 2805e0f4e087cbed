"""The DALI path's CPU work: per image before and after issue 34 item 7, and pack's process layout.

    python -m benchmarks.dali_cpu_work [--source DIR] [--every 10] [--repeats 3] [--size 256] [--before DIR] [--json]

SOURCE is a class-folder dataset (default: $SHARDTOOL_REAL_DATA/clothing-small, 3,781 JPEGs, mostly 400x533).
One run, two parts, each with its rows alternated round by round (A B, A B, ...) so that a slow spell of a
shared machine falls on every row alike; min/median/max over --repeats:

(a) per image, everything the DALI path does in Python around the pipeline run (dali._screen + dali._finish:
    file read, header parse, strict libjpeg-turbo pass, PIL encode, the decode and the statistics), on every
    --every-th image, in this process: CPU time of this thread (min/median/max; other work on the machine
    inflates it least), and the median wall time. The pipeline runs once before the timing (dali-cpu) and its
    pixels are reused, so the rows time the same inputs. "before" is dali._finish as of commit cbf105d, kept
    below verbatim (_stats' int64 squares of every pixel; the decode for them into an RGB array); "after" is
    today's. Two settings: --resize
    shorter:SIZE (every image resized and re-encoded) and none (passthrough: each JPEG copied, its statistics
    from DALI's full-size decode). Both must give the same bytes and statistics: the script stops otherwise.
(b) `shardtool pack SOURCE --backend dali --resize shorter:SIZE` (dali-cpu here) in images/s with the new layout,
    one worker process per usable CPU with 1 DALI thread each (--workers N, N the usable CPUs), against the one
    dali-gpu used to have: one worker process whose DALI has every usable CPU as threads (--workers 1, which
    now gives that process usable CPUs // 1 threads), and `--backend pil` with as many processes for scale.
    With --before DIR, a checkout of commit cbf105d (`git archive cbf105d | tar -x -C DIR`), one more row packs
    with that code in the new layout's process count (its dali-cpu workers took 1 thread each): the per-image
    change seen in pack's images/s. Each row's code comes from PYTHONPATH (this checkout, or --before), run from
    a temporary folder (see layouts). Run first, before this process imports DALI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from benchmarks.common import (
    REPO,
    emit,
    measure_rounds,
    real_data,
    rel,
    samples,
    source_jpegs,
    spec,
    summary,
    timed_run,
    tool,
)
from shardtool.cpus import usable_cpus
from shardtool.process import dali, pil
from shardtool.sample import Item, Sample


# --- before: shardtool/process/dali.py's _finish, _encode and _stats as of commit cbf105d --------------------


def finish_before(job: Any, pixels: np.ndarray, spec: pil.OutputSpec) -> Item:
    item = job.item
    encoded, written = (job.data, pixels) if job.keep else encode_before(pixels, spec)
    meta = {**item.meta, "width": written.shape[1], "height": written.shape[0]}
    return item.with_(data=encoded, path=None, raw_shape=None, ext=spec.encode, meta=meta, stats=stats_before(written))


def encode_before(pixels: np.ndarray, spec: pil.OutputSpec) -> tuple[bytes, np.ndarray]:
    data = pil.encode(Image.fromarray(pixels), spec)
    return data, simplejpeg.decode_jpeg(data) if spec.encode == "jpg" else pixels


def stats_before(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    flat = pixels.reshape(-1, 3).astype(np.int64)
    return tuple(map(float, flat.sum(0))), tuple(map(float, (flat * flat).sum(0))), len(flat)


FINISH = {"before": finish_before, "after": dali._finish}


# --- (a) per image -------------------------------------------------------------------------------------------


def decoded(items: list[Sample], output: pil.OutputSpec) -> list[np.ndarray]:
    """DALI's pixels for each item (all of them must be DALI jobs: clothing-small's JPEGs are)."""
    jobs = [dali._screen(item, output) for item in items]
    if not all(isinstance(job, dali._Job) for job in jobs):
        sys.exit("benchmark: some images did not reach DALI (not plain JPEGs?); pick another --source")
    pixels: list[np.ndarray] = []
    for start in range(0, len(jobs), dali.MAX_BATCH):
        pixels += dali._decode(jobs[start:start + dali.MAX_BATCH], output.backend, output.threads) or []
    return pixels


def time_work(items: list[Sample], pixels: list[np.ndarray], output: pil.OutputSpec, finish: Any
              ) -> tuple[dict[str, float], list[Item]]:
    """Microseconds per image over ITEMS: the screen's and the finish's CPU time on this thread (what other work
    on the machine inflates least), and both together in wall time; and the finished items."""
    cpu = {"screen": 0.0, "finish": 0.0}
    done = []
    began = time.perf_counter()
    for item, image in zip(items, pixels):
        start = time.thread_time()
        job = dali._screen(item, output)
        screened = time.thread_time()
        done.append(finish(job, image, output))
        cpu["screen"] += screened - start
        cpu["finish"] += time.thread_time() - screened
    seconds = {**cpu, "cpu": cpu["screen"] + cpu["finish"], "wall": time.perf_counter() - began}
    return {key: value / len(items) * 1e6 for key, value in seconds.items()}, done


def per_image(items: list[Sample], size: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for setting, resize in (("resize", f"shorter:{size}"), ("passthrough", "none")):
        output = replace(spec(resize, "jpg"), threads=dali.threads_per_process(0))  # this process: every CPU
        pixels = decoded(items, output)
        seen: dict[str, list[dict[str, float]]] = {name: [] for name in FINISH}
        outputs: dict[str, list[Item]] = {}
        for _ in range(repeats):
            for name, finish in FINISH.items():
                times, outputs[name] = time_work(items, pixels, output, finish)
                seen[name].append(times)
        same = [(a.data, a.stats, a.meta) for a in outputs["before"]] == [(b.data, b.stats, b.meta)
                                                                          for b in outputs["after"]]
        if not same:
            sys.exit(f"benchmark: before and after differ in bytes, statistics or sizes ({setting})")
        for name in FINISH:
            figures = {key: summary([times[key] for times in seen[name]])
                       for key in ("cpu", "wall", "screen", "finish")}
            rows.append({"name": f"per-image {setting} {name}", "part": "a", "unit": "CPU us/image", **figures["cpu"],
                         "wall_us": figures["wall"]["median"], "screen_us": figures["screen"]["median"],
                         "finish_us": figures["finish"]["median"], "stats": figures, "images": len(items),
                         "identical_output": same})
        rows[-1]["before_over_after"] = round(rows[-2]["median"] / rows[-1]["median"], 2)
    return rows


# --- (b) pack's process layout -------------------------------------------------------------------------------


def layouts(source: Path, images: int, size: int, repeats: int, work: Path, before: Path | None
            ) -> list[dict[str, Any]]:
    cores = usable_cpus()

    def pack(workers: int, code: Path = REPO, backend: str = "dali") -> Callable[[Path], list[str]]:
        return lambda out: ["env", f"PYTHONPATH={code}", tool("shardtool"), "pack", str(source), str(out), "--backend",
                            backend, "--resize", f"shorter:{size}", "--workers", str(workers)]

    runs = [(f"pack {cores} processes x 1 DALI thread", pack(cores)),
            (f"pack 1 process x {cores} DALI threads", pack(1)),
            (f"pack --backend pil, {cores} processes", pack(cores, backend="pil"))]
    if before is not None:
        runs.append((f"pack {cores} processes x 1 DALI thread, before (cbf105d)", pack(cores, before)))
    # From WORK: Python 3.11's forkserver imports with the working folder first on its path (it ignores the
    # sys.path it is given), so run from this checkout, every row's workers would run this checkout's code.
    with contextlib.chdir(work):
        rows = measure_rounds(runs, work / "out", images, repeats)
    for result in rows:
        result |= {"part": "b", "unit": "images/s", **result["img_s_stats"]}
    rows[0]["new_over_old"] = round(rows[0]["img_s"] / rows[1]["img_s"], 2)
    if before is not None:
        rows[0]["after_over_before"] = round(rows[0]["img_s"] / rows[3]["img_s"], 2)
    rows[0]["dali_over_pil"] = round(rows[0]["img_s"] / rows[2]["img_s"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=real_data() / "clothing-small", help="a class-folder dataset")
    parser.add_argument("--every", type=int, default=10, help="(a): every N-th image, in name order")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row")
    parser.add_argument("--size", type=int, default=256, help="shorter side after resizing")
    parser.add_argument("--before", type=Path, help="(b): a checkout of commit cbf105d, for a row of pack before")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = source_jpegs(args.source)
    if not files:
        return
    if args.before and not (args.before / "shardtool" / "process" / "dali.py").exists():
        sys.exit(f"--before {args.before}: no shardtool checkout there")
    timed_run(["cat", *map(str, files)])  # warm the page cache: the images, and DALI's libraries (untimed)
    timed_run([sys.executable, "-c", "from nvidia.dali import fn, pipeline_def"])
    with tempfile.TemporaryDirectory(prefix="bench-dali-cpu-") as work:  # (b) first: DALI is not imported here yet
        results = layouts(args.source.resolve(), len(files), args.size, args.repeats, Path(work),
                          args.before and args.before.resolve())
    results = per_image(samples(files[::args.every]), args.size, args.repeats) + results
    settings = {"source": rel(args.source), "images": len(files), "per_image_images": len(files[::args.every]),
                "every": args.every, "repeats": args.repeats, "size": args.size, "usable_cpus": usable_cpus(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "dali": dali.version(),
                "before": "shardtool/process/dali.py _finish as of cbf105d (kept in this script)"}
    notes = ["a shared machine: other work ran beside these rows; the rows alternate so that it falls on all alike"]
    columns = ["name", "unit", "min", "median", "max", "wall_us", "screen_us", "finish_us", "before_over_after",
               "new_over_old", "dali_over_pil", "peak_rss_mb"]
    emit("dali_cpu_work", settings, results, columns + ["after_over_before"] * bool(args.before), args.json, notes)


if __name__ == "__main__":
    main()
