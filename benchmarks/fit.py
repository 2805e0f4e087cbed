"""Trainer throughput on real shards vs on synthetic in-memory tensors: how long the model waits for data.

    python -m benchmarks.fit [--data SHARDS] [--model efficientnet_lite0] [--steps 15] [--repeats 3] [--json]

Both rows run the trainer's own `train_one_epoch` (same model, optimizer, AMP and batch size): `real`
takes its batches from the torch loader over the shards (decode + RandomResizedCrop + flip in 2
workers, normalised on the device); `synthetic` repeats one batch of random tensors of the same shape
already on the device, so its images/s is the compute-only ceiling. Two phases: `frozen` (head only,
what the first --freeze-epochs train) and `finetune` (everything learns). data_wait is the fraction of
the step time spent blocked on the loader, as the trainer logs it in metrics.csv.

With no --data, clothing-small is packed at shorter:256 into benchmarks/.cache (once). Each
measurement runs in its own process, after 3 untimed warm-up steps (worker start, first allocations).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from itertools import islice, repeat
from pathlib import Path
from typing import Any

from benchmarks.common import add_ratio, default_data, emit, gpu_name, rel, row, timed_run
from trainer.host import ENV, keep_freed_memory

CACHE = Path(__file__).parent / ".cache"
WARMUP = 3


def measure(data: str, model: str, image_size: int, batch_size: int, steps: int, phase: str, source: str,
            device: str) -> dict[str, float]:
    """One measurement (in this process): images/s and data-wait fraction over STEPS timed steps."""
    import torch

    from trainer.config import FitConfig
    from trainer.data import Batch
    from trainer.distributed import Dist
    from trainer.run import build_run, set_frozen
    from trainer.loop import TrainSums, train_one_epoch

    with tempfile.TemporaryDirectory(prefix="bench-fit-") as out:  # the run folder: nothing is written there
        config = FitConfig(data=data, out=out, model=model, image_size=image_size, batch_size=batch_size,
                           device=device, loader="torch").validate()
        run = build_run(config, Dist(), None)
    set_frozen(run.model, phase == "frozen", config.freeze_bn)
    batches = iter(run.train.epoch(0))
    if source == "synthetic":
        first = next(batches)
        images = torch.randn(first.images.shape, device=first.images.device)
        batches = repeat(Batch(images.contiguous(memory_format=torch.channels_last), first.labels, first.keys,
                               first.groups))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def epoch(count: int) -> TrainSums:
        return train_one_epoch(run.model.module, islice(batches, count), run.optimizer, criterion=criterion,
                               amp=run.amp, set_lr=lambda: None, mix=None, sums=TrainSums(), start_batch=0,
                               num_batches=count, on_corrupt="fail", after_step=lambda step: None)

    epoch(WARMUP)
    before, threads_before = resource.getrusage(resource.RUSAGE_SELF), thread_times()
    sums = epoch(steps)
    after, threads_after = resource.getrusage(resource.RUSAGE_SELF), thread_times()
    total = sums.seconds + sums.data_seconds
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    threads = {tid: [round(u - threads_before.get(tid, (0, 0))[0], 2), round(k - threads_before.get(tid, (0, 0))[1], 2)]
               for tid, (u, k) in threads_after.items()}
    return {"img_s": sums.seen / total, "data_wait": sums.data_seconds / total, "seen": sums.seen,
            "kernel_share": system / max(user + system, 1e-9), "cpu_s_per_step": (user + system) / steps,
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "switches_per_step": (after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw) / steps,
            "threads_user_sys_s": {t: v for t, v in threads.items() if sum(v) >= 0.05}}


def thread_times() -> dict[str, tuple[float, float]]:
    """Per thread of this process: (user, system) CPU seconds, from /proc/self/task/*/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        times[f"{name}/{task.name}"] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return times


def child_argv(args: argparse.Namespace, phase: str, source: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.fit", "--child", phase, source, "--data", str(args.data),
            "--model", args.model, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--device", args.device]


def run_child(argv: list[str], malloc: str) -> tuple[dict[str, float], float]:
    """The figures the child wrote to --child-out, and its peak RSS (workers included)."""
    out = Path(tempfile.mkstemp(prefix="bench-fit-", suffix=".json")[1])
    _, rss = timed_run(argv + ["--child-out", str(out)], env={ENV: malloc})
    figures = json.loads(out.read_text())
    out.unlink()
    return figures, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="packed shards [clothing-small at shorter:256, packed once]")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phases", default="frozen,finetune")
    parser.add_argument("--device", default="cuda" if gpu_name() else "cpu")
    parser.add_argument("--malloc", default="system,keep",
                        help="glibc settings to compare: system (its defaults) and/or keep (trainer/host.py)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "SOURCE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        applied = keep_freed_memory()  # as the trainer's CLI does at start (TRAINER_MALLOC=system: glibc's defaults)
        figures = measure(str(args.data), args.model, args.image_size, args.batch_size, args.steps, *args.child,
                          device=args.device) | {"malloc_applied": applied}
        args.child_out.write_text(json.dumps(figures))
        return
    args.data = args.data or default_data()
    results = []
    mallocs = args.malloc.split(",")
    for phase in args.phases.split(","):
        rows = [(source, malloc) for source in ("synthetic", "real") for malloc in mallocs]
        runs: dict[tuple[str, str], list[tuple[dict[str, Any], float]]] = {r: [] for r in rows}
        for _ in range(args.repeats):  # rows alternate, so a slow spell of the machine hits them alike
            for source, malloc in rows:
                runs[source, malloc].append(run_child(child_argv(args, phase, source), malloc))
        for (source, malloc), done in runs.items():
            median = {k: statistics.median(f[k] for f, _ in done)
                      for k in ("data_wait", "kernel_share", "faults_per_step", "switches_per_step", "cpu_s_per_step")}
            results.append(row(f"{phase}-{source}-malloc-{malloc}", [f["img_s"] for f, _ in done],
                               [rss for _, rss in done], phase=phase, source=source, malloc=malloc,
                               malloc_applied=all(f["malloc_applied"] for f, _ in done), **median,
                               threads_user_sys_s=[f["threads_user_sys_s"] for f, _ in done]))
        add_ratio([r for r in results if r["phase"] == phase], "vs_compute_only",
                  f"{phase}-synthetic-malloc-{mallocs[-1]}")
        add_ratio([r for r in results if r["phase"] == phase], "vs_first_row", results[-len(rows)]["name"])
    settings = {"data": rel(args.data), "model": args.model, "image_size": args.image_size,
                "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": WARMUP, "repeats": args.repeats,
                "device": args.device, "loader": "torch", "workers": 2, "malloc": mallocs,
                "torch_threads": _torch_threads()}
    emit("fit", settings, results, ["name", "img_s", "vs_compute_only", "data_wait", "kernel_share",
                                    "faults_per_step", "switches_per_step", "peak_rss_mb"], args.json)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
