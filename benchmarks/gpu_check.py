"""`python -m benchmarks.gpu_check --out DIR`: a GPU box's first run, offline, in a few minutes.

    python -m benchmarks.gpu_check --out DIR [--wheels gpu-wheels] [--device cuda|cpu] [--images N]

Made for a machine that has only a Python with a CUDA build of torch + torchvision, numpy, pillow,
click, rich and pytest: no venv is built, nothing is installed with pip, nothing is read from
../shared and nothing from the network. The wheels `make gpu-wheels` wrote (WHEELS/core, WHEELS/dali)
are unpacked into DIR/site and put on the steps' PYTHONPATH, as they are: a wheel is a zip of what pip
would copy into site-packages. Then, each step in its own process with its own time limit and one
verdict line (ok, FAILED, TIMEOUT, skipped and why), logs in DIR/logs/:

  data        N class-folder JPEGs of 256 px (shardtool.synth's shapes; no ../shared)
  tests       tests/test_gpu.py and tests/test_gpu_readiness.py only (nothing else is collected, so
              fastapi, Ray or moto need not be importable), with -s: what they measured is in the log
  pack-pil    shardtool pack --backend pil --resize shorter:224 (workers: every usable CPU)
  pack-dali   the same with --backend dali: dali-gpu on a GPU, dali-cpu otherwise (needs DALI)
  loader-*    img/s of trainer's torch and DALI loaders over pack-pil's shards at several worker counts
  ceiling     EfficientNet-Lite0 train steps on tensors already on the device, at fit's default batch
              size: the compute-only img/s, and the GPU memory that batch size takes
  fit         trainer fit, EfficientNet-Lite0, 2 epochs, bf16 and channels_last on a GPU: img/s of the
              second epoch against the ceiling

DIR/summary.json and DIR/summary.md hold every verdict and number. `--device cpu` is the rehearsal of
exactly this on a machine without CUDA: the steps that need CUDA say so and are skipped
(tests/test_gpu_check.py runs it in an environment holding only the packages above plus the wheels).
The whole check keeps to --budget seconds (480): a step never gets more than what is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_gpu.py", "tests/test_gpu_readiness.py"]
OPTIONAL = ("nvidia.dali", "fastapi", "ray", "moto", "onnxruntime")  # reported, never needed by the check


@dataclass
class Verdict:
    step: str
    status: str  # ok | FAILED | TIMEOUT | skipped
    seconds: float = 0.0
    detail: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"[{self.status}] {self.step} ({self.seconds:.0f} s){detail}"


# ---- wheels: unpacked, not installed -------------------------------------------------------------------------


def joined_wheels(folder: Path, scratch: Path) -> list[Path]:
    """FOLDER's wheels, each cut one (NAME.part00, ...) joined in SCRATCH and checked against NAME.sha256."""
    wheels = sorted(folder.glob("*.whl"))
    for digest_file in sorted(folder.glob("*.whl.sha256")):
        name = digest_file.name.removesuffix(".sha256")
        whole, digest = scratch / name, hashlib.sha256()
        scratch.mkdir(parents=True, exist_ok=True)
        with whole.open("wb") as out:
            for part in sorted(folder.glob(f"{name}.part*")):
                data = part.read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != digest_file.read_text().strip():
            raise SystemExit(f"{name}: its parts do not add up to the wheel make gpu-wheels wrote (sha256 differs)")
        wheels.append(whole)
    return wheels


def unpack(wheel: Path, site: Path) -> None:
    """What pip puts in site-packages: the archive, with NAME.data/purelib and platlib moved to the top."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def install_wheels(wheels: Path | None, site: Path) -> list[str]:
    if wheels is None:
        return []
    names = []
    for sub in ("core", "dali"):
        for wheel in joined_wheels(wheels / sub, site.parent / "joined") if (wheels / sub).is_dir() else []:
            unpack(wheel, site)
            names.append(wheel.name)
    shutil.rmtree(site.parent / "joined", ignore_errors=True)
    return names


# ---- steps: a process each, a time limit each ----------------------------------------------------------------


class Check:
    def __init__(self, out: Path, env: dict[str, str], budget: float) -> None:
        self.out, self.env, self.deadline = out, env, time.monotonic() + budget
        self.verdicts: list[Verdict] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def skip(self, step: str, why: str) -> Verdict:
        return self.record(Verdict(step, "skipped", detail=why))

    def record(self, verdict: Verdict) -> Verdict:
        self.verdicts.append(verdict)
        print(verdict.line(), flush=True)
        return verdict

    def run(self, step: str, argv: list[str], limit: float) -> Verdict:
        """ARGV in its own process group, stopped at LIMIT (or what is left of the budget); log in logs/."""
        limit = min(limit, self.deadline - time.monotonic())
        if limit < 5:
            return self.skip(step, "the check's --budget is spent")
        log = self.out / "logs" / f"{len(self.verdicts):02d}-{step}.log"
        start = time.monotonic()
        with log.open("w") as sink:
            sink.write(f"$ {' '.join(argv)}\n")
            sink.flush()
            process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return self.record(Verdict(step, "TIMEOUT", time.monotonic() - start, f"stopped after {limit:.0f} s"))
        seconds = time.monotonic() - start
        if code != 0:
            return self.record(Verdict(step, "FAILED", seconds, f"exit {code}: {last_line(log)} (log: {log.name})"))
        return self.record(Verdict(step, "ok", seconds, last_line(log) if step == "tests" else ""))

    def child(self, step: str, args: list[str], limit: float) -> Verdict:
        """A measurement of this module (--child ...) whose JSON answer becomes the verdict's numbers."""
        answer = self.out / "logs" / f"{step}.json"
        verdict = self.run(step, [sys.executable, "-m", "benchmarks.gpu_check", "--child-out", str(answer), *args], limit)
        if verdict.status == "ok":
            verdict.measured = json.loads(answer.read_text())
            verdict.detail = ", ".join(f"{k} {v}" for k, v in verdict.measured.items())
            print(f"    {verdict.detail}", flush=True)
        return verdict


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def environment(env: dict[str, str]) -> dict[str, Any]:
    """Versions and what can be imported, as the steps see it (their PYTHONPATH), from a child process."""
    probe = ("import importlib.util, json, torch, numpy, PIL\n"
             "found = {'torch': torch.__version__, 'cuda (torch)': str(torch.version.cuda), 'numpy': numpy.__version__,"
             " 'pillow': PIL.__version__, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none',"
             " 'gpus': torch.cuda.device_count()}\n"
             "if torch.cuda.is_available():\n"
             "    found['native bf16'] = torch.cuda.is_bf16_supported(including_emulation=False)\n"
             "    found['gpu memory GB'] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)\n"
             f"found['importable'] = {{m: importlib.util.find_spec(m) is not None for m in {OPTIONAL!r}}}\n"
             "print(json.dumps(found))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    found = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip().splitlines()[-1:]}
    found |= {"python": platform.python_version(), "cpus (affinity)": len(os.sched_getaffinity(0))}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
        found["nvidia-smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip() or "no answer"
    return found


def worker_counts(cpus: int) -> list[int]:
    """A quarter, half and all of the usable CPUs (at most 16, trainer's default cap), distinct."""
    return sorted({max(1, min(16, cpus) // 4), max(1, min(16, cpus) // 2), min(16, cpus)})


def steps(check: Check, args: argparse.Namespace, found: dict[str, Any]) -> None:
    cuda = args.device == "cuda"
    dali = found.get("importable", {}).get("nvidia.dali", False)
    py, data, out = sys.executable, args.out / "data", args.out
    if check.child("data", ["--child", "data", "--data", str(data), "--images", str(args.images)], 180).status != "ok":
        return
    check.run("tests", [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist", *GPU_TESTS], 300)
    for backend in ("pil", "dali"):
        if backend == "dali" and not dali:
            check.skip("pack-dali", "DALI is not importable (make gpu-wheels writes it to gpu-wheels/dali)")
            continue
        check.child(f"pack-{backend}", ["--child", "pack", "--data", str(data), "--shards", str(out / f"pack-{backend}"),
                                        "--backend", backend], 240)
    shards = out / "pack-pil"
    if not (shards / "dataset.json").exists():
        check.skip("loaders, ceiling, fit", "no shards: pack-pil did not finish")
        return
    device = "cuda" if cuda else "cpu"
    for backend in ("torch", "dali"):
        for workers in worker_counts(found["cpus (affinity)"]):
            step = f"loader-{backend}-{workers}"
            if backend == "dali" and not dali:
                check.skip(step, "DALI is not importable")
                continue
            check.child(step, ["--child", "loader", "--shards", str(shards), "--backend", backend, "--workers",
                               str(workers), "--device", device], 120)
    size = "224" if cuda else "64"  # the CPU rehearsal: the same steps, small
    check.child("ceiling", ["--child", "ceiling", "--device", device, "--size", size], 120)
    fit = [py, "-m", "trainer", "fit", str(shards), str(out / "fit"), "--model", "efficientnet_lite0", "--epochs",
           "2" if cuda else "1", "--image-size", size, "--head-init", "random", "--device", device, "--overwrite"]
    fit += ["--amp", "bf16", "--channels-last"] if cuda else ["--amp", "none"]
    verdict = check.run("fit", fit, 300)
    if verdict.status == "ok":
        verdict.measured = fit_numbers(out / "fit")
        verdict.detail = ", ".join(f"{k} {v}" for k, v in verdict.measured.items())
        print(f"    {verdict.detail}", flush=True)


def fit_numbers(run: Path) -> dict[str, Any]:
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return {"img/s (last epoch)": round(float(rows[-1]["img_s"]), 1), "epochs": len(rows)}


def summarise(check: Check, args: argparse.Namespace, found: dict[str, Any], wheels: list[str]) -> bool:
    ok = all(v.status in ("ok", "skipped") for v in check.verdicts)
    by_step = {v.step: v for v in check.verdicts}
    ceiling = by_step.get("ceiling")
    fit = by_step.get("fit")
    if ceiling and fit and ceiling.measured and fit.measured:
        fit.measured["of the ceiling"] = round(fit.measured["img/s (last epoch)"] / ceiling.measured["img/s"], 2)
    summary = {"device": args.device, "environment": found, "wheels unpacked": wheels, "passed": ok,
               "verdicts": [asdict(v) for v in check.verdicts], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# gpu_check --device {args.device}: {'passed' if ok else 'FAILED'}", "",
             *(f"- {key}: {value}" for key, value in found.items()), "", "| step | verdict | seconds | detail |",
             "|---|---|---|---|", *(f"| {v.step} | {v.status} | {v.seconds:.0f} | {v.detail} |" for v in check.verdicts)]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for logs, data and the summary (required)")
    parser.add_argument("--wheels", type=Path, help="what make gpu-wheels wrote [gpu-wheels, when it is there]")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the check [cuda]; cpu: its rehearsal, skipping what needs CUDA")
    parser.add_argument("--images", type=int, help="generated JPEGs [3000 with cuda, 240 with cpu]")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check [480]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    for name in ("--data", "--shards", "--backend", "--workers", "--size"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from benchmarks import gpu_measure

        args.child_out.write_text(json.dumps(gpu_measure.CHILDREN[args.child](args)))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    args.out = args.out.resolve()
    args.images = args.images or (3000 if args.device == "cuda" else 240)
    wheels = args.wheels or (ROOT / "gpu-wheels" if (ROOT / "gpu-wheels").is_dir() else None)
    site = args.out / "site"
    unpacked = install_wheels(wheels, site)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    found = environment(env)
    for key, value in found.items():
        print(f"{key}: {value}")
    check = Check(args.out, env, args.budget)
    if args.device == "cuda" and not found.get("gpus"):
        check.skip("everything", "no CUDA GPU here: run --device cpu for the rehearsal")
    else:
        steps(check, args, found)
    ok = summarise(check, args, found, unpacked)
    print(f"\ngpu_check --device {args.device} {'passed' if ok else 'FAILED'}: {args.out / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
