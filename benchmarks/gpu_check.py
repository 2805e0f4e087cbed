"""`make gpu-check`: everything that needs a GPU, in one short run (under ~5 minutes on one GPU).

    python -m benchmarks.gpu_check

1. the environment: driver (nvidia-smi), GPU, torch / CUDA / DALI versions, native bf16;
2. the GPU tests (tests marked gpu, with -s so each prints what it measured): DALI-vs-PIL parity on the
   GPU decoder, dali-gpu on 64 images with one corrupt (exactly one skip), a pack with --backend auto
   recorded as dali-gpu with no skips, a train and an eval batch of the DALI loader on CUDA (float32,
   N x 3 x S x S, channels_last, eval within 2/255 of the CPU pipeline), and fit for 2 epochs of 2
   batches four ways (DALI + bf16, DALI + fp16 with its scaler, torch loader + compile + channels_last,
   a frozen first epoch);
3. the GPU benchmark rows, written to benchmarks/results/gpu/ (not over the CPU results): the loader
   benchmark's DALI and torch rows for one epoch (DALI's with the nvJPEG "mixed" decoder), and the pack
   benchmark's PIL and DALI rows once each (`--backend dali` is dali-gpu there).
On a machine without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def environment() -> dict[str, str]:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda (torch)": str(torch.version.cuda),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    if torch.cuda.is_available():
        found["native bf16"] = str(torch.cuda.is_bf16_supported(including_emulation=False))
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
        found["nvidia-smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip() or "no answer"
    try:
        import nvidia.dali

        found["dali"] = nvidia.dali.__version__
    except ImportError:
        found["dali"] = "not installed"
    return found


def step(title: str, argv: list[str], env: dict[str, str] | None = None) -> bool:
    print(f"\n== {title}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=None if env is None else os.environ | env)
    print(f"== {title}: {'ok' if done.returncode == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
    return done.returncode == 0


def main() -> int:
    import torch

    for key, value in environment().items():
        print(f"{key}: {value}")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (the GPU tests skip on this machine too)")
        return 0
    results = ROOT / "benchmarks" / "results" / "gpu"
    ok = step("GPU tests", [sys.executable, "-m", "pytest", "-q", "-s", "-m", "gpu", "-p", "no:cacheprovider", "tests"])
    ok &= step("GPU benchmark rows", [sys.executable, "-m", "benchmarks.loader", "--rows", "shardtool-dali,shardtool-torch",
                                      "--epochs", "1", "--repeats", "1"], env={"BENCHMARK_RESULTS": str(results)})
    ok &= step("GPU pack rows", [sys.executable, "-m", "benchmarks.pack", "--rows",
                                 "shardtool-pil-resize,shardtool-dali-resize,shardtool-dali-passthrough", "--repeats", "1"],
               env={"BENCHMARK_RESULTS": str(results)})
    print(f"\ngpu-check {'passed' if ok else 'FAILED'}; benchmark rows in {results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
