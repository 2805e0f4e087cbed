"""What every benchmark shares: run a command and time it, record the machine, write JSON + markdown.

Every script writes results/<name>.json:

    {"benchmark": name, "machine": {...versions...}, "settings": {...},
     "results": [{"name": ..., "img_s": median, "peak_rss_mb": max, "img_s_stats": {min, median, max},
                  "peak_rss_mb_stats": {...}, ...extra columns}], "memory_measure": MEMORY_MEASURE}

peak_rss_mb is the whole process tree's peak (timed_run: workers, forkservers and all), since 2026-12-02;
results without "memory_measure" measured the largest single process only (wait4), and say so in the README.

and results/<name>.md (the markdown table); benchmarks/report.py renders them all into RESULTS.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the other virtualenv runs this module, without shardtool
    from shardtool.process.pil import OutputSpec
    from shardtool.sample import Sample

# Where results/*.json go; tests point it elsewhere so a smoke run never overwrites the measured ones.
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS") or Path(__file__).parent / "results")
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).parent / ".cache"  # data, converted copies and the other virtualenv (gitignored)
OTHER_VENV = CACHE / "venv-others"
# What the alternatives need that must not enter our environment: mosaicml-streaming pins numpy < 2.2,
# img2dataset pins webdataset 0.2 and albumentations; all pull in cloud SDKs.
OTHER_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "mosaicml-streaming>=0.13,<0.14", "litdata>=0.2.70,<0.3",
                  "img2dataset>=1.45,<2"]
PACKAGES = ("shardtool", "torch", "torchvision", "torchcodec", "nvidia-dali-cuda130", "pillow", "simplejpeg", "pymongo",
            "webdataset", "mosaicml-streaming", "litdata", "img2dataset", "numpy")


def real_data() -> Path:
    """The shared real datasets: $SHARDTOOL_REAL_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("SHARDTOOL_REAL_DATA", REPO.parent / "shared" / "data"))


def source_jpegs(source: Path) -> list[Path]:
    """The JPEGs of a class-folder dataset (--source), sorted; none after saying why the benchmark is skipped."""
    found = sorted(source.rglob("*.jpg")) if source.is_dir() else []
    if not found:
        print(f"skipped: {source} holds no JPEGs (pass --source, a class-folder dataset)")
    return found


def machine() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    found = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
             "processor": platform.processor() or platform.machine(), **cpu(), "gpu": gpu_name(), "commit": commit(),
             "versions": versions}
    if (OTHER_VENV / "bin" / ".complete").exists():  # the alternatives' rows ran there: its versions too
        found["other_venv_versions"] = other_venv_versions()
    return found


def other_venv_versions() -> dict[str, str]:
    """PACKAGES' versions as the alternatives' virtualenv has them (asked through its own interpreter)."""
    code = ("import json, sys\nfrom importlib import metadata\nfound = {}\nfor p in sys.argv[1:]:\n"
            "    try:\n        found[p] = metadata.version(p)\n    except metadata.PackageNotFoundError:\n"
            "        pass\nprint(json.dumps(found))")
    done = subprocess.run([str(OTHER_VENV / "bin" / "python"), "-c", code, *PACKAGES], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-200:]}


def cpu() -> dict[str, Any]:
    """The CPU's model name and whether it has native bf16 (AVX512-BF16 or AMX): CPU training speed differs
    2-3x between the two, so every result names it."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return {"cpu_model": model, "cpu_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})}


def gpu_name() -> str | None:
    """The first CUDA device's name, or None (no torch, or no GPU): scripts add GPU rows when set."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def commit(where: Path = REPO) -> str | None:
    """HEAD's short hash (of the checkout holding WHERE), with "-dirty" when the code a benchmark runs
    (shardtool/, trainer/, benchmarks/ but its results, pyproject.toml) differs from it, so a figure
    measured on uncommitted code says so."""
    code = [f":(top){path}" for path in ("shardtool", "trainer", "benchmarks", "pyproject.toml")]
    aside = [":(top,exclude)benchmarks/results", ":(top,exclude,glob)**/*.md", ":(top,exclude)benchmarks/RESULTS.png"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=where,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *code, *aside], cwd=where).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if head and changed else head or None


def tool(name: str) -> str:
    """The console script NAME installed beside this interpreter (shardtool, trainer)."""
    return str(Path(sys.executable).with_name(name))


def other_venv() -> tuple[Path | None, str]:
    """The bin/ of the alternatives' virtualenv (made on first use, a few minutes), or None and why not."""
    bin_dir = OTHER_VENV / "bin"
    if not (bin_dir / ".complete").exists():
        CACHE.mkdir(exist_ok=True)
        log = CACHE / "venv-others.log"
        print(f"making {OTHER_VENV} for the alternatives (once; log: {log})", file=sys.stderr)
        with log.open("w") as out:
            steps = ([sys.executable, "-m", "venv", str(OTHER_VENV)], [str(bin_dir / "pip"), "install", *OTHER_PACKAGES])
            made = all(subprocess.run(step, stdout=out, stderr=out).returncode == 0 for step in steps)
        if not made:
            last = (log.read_text().strip().splitlines() or ["no output"])[-1]
            return None, f"could not install {', '.join(OTHER_PACKAGES[2:])} into {OTHER_VENV}: {last}"
        (bin_dir / ".complete").touch()
    return bin_dir, ""


def timed_run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak memory in MB of the whole process tree) for one subprocess run.

    Memory is the larger of two figures: the tree's proportional set size (PSS: each shared page split
    between the processes sharing it, so forked workers' copy-on-write pages count once), summed over the
    command and every process it started (forkservers and DataLoader workers included) and sampled every
    at most every SAMPLE_S (less often when a sample is slow: the sampling stays under 5% of one core,
    not to slow what it measures); and the peak RSS of its largest single process (wait4, which catches a peak between samples)."""
    start = time.perf_counter()
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command never blocks on a full pipe
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors,
                               env=None if env is None else os.environ | env)
    with TreePeak(process.pid) as peak:  # wait4, not Popen.wait, which would reap the child and lose its rusage
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        errors.seek(0)
        sys.exit(f"benchmark command failed: {' '.join(argv)}\n{errors.read().decode(errors='replace')[-4000:]}")
    process.returncode = os.waitstatus_to_exitcode(status)
    errors.close()
    return seconds, max(peak.tree_kb, usage.ru_maxrss) / 1024  # ru_maxrss: kB on Linux


SAMPLE_S = 0.1
MEMORY_MEASURE = (f"peak_rss_mb: the whole process tree, the larger of its summed PSS sampled every {SAMPLE_S} s "
                  "or less often (the sampler stays under 5% of a core) "
                  "and its largest process's peak RSS (wait4)")


class TreePeak:
    """The peak memory (MB) of an already running process and its descendants (a server), sampled in a thread
    while the block runs, as timed_run samples: the larger of the summed PSS and the root's own peak RSS."""

    def __init__(self, pid: int) -> None:
        self.pid, self.tree_kb, self.peak_mb = pid, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            self.tree_kb = max(self.tree_kb, tree_pss_kb(self.pid))
            # reading smaps_rollup walks page tables (~10 ms for a 3 GB process): sampling stays under 5% of a core
            self._stop.wait(max(SAMPLE_S, 20 * (time.perf_counter() - began)))

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm_kb = 0
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm_kb = int(line.split()[1])
        except OSError:
            pass
        self.peak_mb = max(self.tree_kb, hwm_kb) / 1024


def tree_pss_kb(root: int) -> int:
    """Sum of PSS (kB) over ROOT and all its descendants now (RSS where smaps_rollup is unreadable)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    todo += [int(c) for c in children.read().split()]
        except OSError:
            continue
    return total


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return 0


def rel(path: str | os.PathLike[str]) -> str:
    """PATH as results record it: relative to the repository (../shared/... for the shared data), never this
    machine's absolute path."""
    return os.path.relpath(Path(path).resolve(), REPO)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def row(name: str, img_s: list[float], peak_rss_mb: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    """One result row: the median images/s and the largest peak RSS, each with its min/median/max."""
    out: dict[str, Any] = {"name": name, "img_s": statistics.median(img_s), "img_s_stats": summary(img_s)}
    if peak_rss_mb:
        out |= {"peak_rss_mb": max(peak_rss_mb), "peak_rss_mb_stats": summary(peak_rss_mb)}
    return out | extra


def add_ratio(results: list[dict[str, Any]], column: str, base: str, figure: str = "img_s") -> None:
    """results[i][COLUMN] = results[i][FIGURE] / the FIGURE of the row named BASE (rows without it: left out)."""
    reference = next((r[figure] for r in results if r["name"] == base and r.get(figure)), None)
    for result in results:
        if reference and result.get(figure) is not None:
            result[column] = round(result[figure] / reference, 3)


def command() -> str:
    """The command line that is writing these results: `python -m benchmarks.NAME ARGS`, absolute paths
    made relative to the repository."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None and spec.name.startswith("benchmarks.") else Path(sys.argv[0]).name
    args = [rel(a) if os.path.isabs(a) else a for a in sys.argv[1:]]  # no path of this machine
    return shlex.join(["python", "-m", module, *args])


def write(name: str, settings: dict[str, Any], results: list[dict[str, Any]], columns: list[str],
          notes: list[str] | None = None) -> str:
    """Write results/<name>.json and .md; returns the markdown table. NOTES: rows not measured and why."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "command": command(), "machine": machine(), "settings": settings,
               "results": results, "notes": notes or [], "memory_measure": MEMORY_MEASURE}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        lines.append("| " + " | ".join(_cell(result.get(c)) for c in columns) + " |")
    table = "\n".join(lines + [f"\n{n}" for n in notes or []])
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return table


def emit(name: str, settings: dict[str, Any], results: list[dict[str, Any]], columns: list[str], as_json: bool,
         notes: list[str] | None = None) -> None:
    """write() then print the JSON object (--json) or the markdown table."""
    table = write(name, settings, results, columns, notes)
    if as_json:
        print(json.dumps({"benchmark": name, "settings": settings, "results": results, "notes": notes or []},
                         indent=1))
    else:
        print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return "" if value is None else str(value)


# ---- data every benchmark may start from ----------------------------------------------------------------------


def default_data() -> Path:
    """clothing-small packed at shorter:256 (what the README's training recipe uses), made once."""
    real = real_data()
    source, out = real / "clothing-small", CACHE / "clothing-small-256"
    if not (out / "dataset.json").exists():
        if not source.is_dir():
            sys.exit(f"{source} not found: pass --data (shards packed by shardtool) or set SHARDTOOL_REAL_DATA")
        subprocess.run([tool("shardtool"), "pack", str(source), str(out), "--resize", "shorter:256",
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return out


def pack_args(name: str, real: Path) -> list[str]:
    """`shardtool pack` arguments for dataset NAME (without OUT)."""
    if name == "clothing-small":
        return [str(real / name), "--resize", "shorter:256"]
    if name == "fb-marketplace":
        fb = real / name
        return [str(fb / "Images.csv"), "--images", str(fb / "images"), "--image-col", "id", "--image-suffix", ".jpg",
                "--join", str(fb / "Products.csv"), "--join-on", "product_id=id", "--label-col", "category",
                "--label-level", "1", "--split", "val=0.15,test=0.15", "--resize", "shorter:256",
                "--max-skip-fraction", "1"]
    if name == "fashion-mnist":
        return [str(real / name / "fashion-mnist_test.csv"), "--split", "val=0.15,test=0.15", "--stratify"]
    raise ValueError(f"unknown dataset {name}")


PICTURES_PER_PRODUCT = ([1, 2, 3, 4], [60, 20, 10, 10])  # synthetic Cdiscount dumps: pictures a product has, weights


def read_categories(path: Path) -> list[int]:
    """The category ids of a Cdiscount category_names.csv, in file order."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = csv.reader(file)
        next(rows)  # header
        return [int(row[0]) for row in rows]


# ---- commands timed round by round (pack, pack_bson, dali_cpu_work) ----------------------------------------------


Argv = Callable[[Path], list[str]]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(name: str, argv_for: Argv, out: Path, images: int, repeats: int,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run argv_for(out) REPEATS times from an empty OUT: a common.row plus out_mb of the last run."""
    return measure_rounds([(name, argv_for)], out, images, repeats, env)[0]


def measure_rounds(runs: list[tuple[str, Argv]], out: Path, images: int, repeats: int,
                   env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """measure() for several commands, alternated round by round (A B C, A B C, ...), so a slow spell of
    a shared machine falls on every row alike instead of on whichever ran then.

    Each run starts after os.sync(), so none pays for writing back the last one's output: a run that
    leaves its output in the page cache (the bare copy does) would otherwise slow down the next one."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in runs}
    rss: dict[str, list[float]] = {name: [] for name, _ in runs}
    out_mb: dict[str, float] = {}
    for _ in range(repeats):
        for name, argv_for in runs:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            wall, peak = timed_run(argv_for(out), env)
            seconds[name].append(wall)
            rss[name].append(peak)
            out_mb[name] = folder_bytes(out) / 1e6
    return [row(name, [images / s for s in seconds[name]], rss[name], out_mb=out_mb[name]) for name, _ in runs]


# ---- the loader rows' shared parts (loader, others: stdlib at the top, the other virtualenv imports this) --------

LOADER_BATCH, LOADER_SIZE, LOADER_WORKERS = 64, 224, 2
LOADER_MEAN, LOADER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, on a 0-1 scale


def train_members(shards: Path) -> Iterator[tuple[str, bytes, int]]:
    """(key, JPEG bytes, class index) of every training sample, in shard order; stdlib only, so the
    other virtualenv can run it."""
    manifest = json.loads((shards / "dataset.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shards / shard["name"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                sample = pending.setdefault(key, {})
                sample[ext] = data
                if "jpg" in sample and "cls" in sample:
                    yield key, sample["jpg"], int(pending.pop(key)["cls"])


def copy_dir(shards: Path, kind: str) -> Path:
    """Where a converted copy of SHARDS lives in the cache: named by the manifest's hash, so another
    dataset in a folder of the same name never reuses a stale copy."""
    digest = hashlib.sha256((shards / "dataset.json").read_bytes()).hexdigest()[:12]
    return CACHE / f"{shards.name}-{digest}-{kind}"


def time_epochs(epoch: Callable[[int], Iterable[Any]], epochs: int, expected: int) -> list[float]:
    """images/s of each timed epoch after one warm-up; every epoch must yield EXPECTED images."""
    rates = []
    for index in range(epochs + 1):
        start, seen = time.perf_counter(), 0
        for images in epoch(index):
            seen += len(images)
        seconds = time.perf_counter() - start
        if abs(seen - expected) >= LOADER_BATCH:  # DALI pads or drops to whole batches; nothing else may differ
            sys.exit(f"an epoch yielded {seen} images, expected {expected}")
        if index:
            rates.append(seen / seconds)
    return rates


def torchvision_transform() -> Any:
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(LOADER_SIZE), transforms.RandomHorizontalFlip(),
                               transforms.PILToTensor()])


def data_loader(dataset: Any, **options: Any) -> Any:
    from torch.utils.data import DataLoader

    options.setdefault("batch_size", LOADER_BATCH)
    return DataLoader(dataset, num_workers=LOADER_WORKERS, persistent_workers=True, prefetch_factor=4, **options)


def images_of(batches: Iterable[Any]) -> Iterator[Any]:
    for batch in batches:
        yield batch[0]


# ---- the DALI and PIL pack backends on the same files (dali_parity, dali_cpu_work, tests) ------------------------


def spec(resize: str, encode: str = "jpg", backend: str = "dali-cpu") -> OutputSpec:
    """Pack's output options for RESIZE and ENCODE on BACKEND."""
    from shardtool.config import parse_resize
    from shardtool.process import pil

    return pil.OutputSpec(parse_resize(resize), encode, 90, 89_478_485, backend=backend)


def samples(files: list[Path]) -> list[Sample]:
    """FILES as the samples a reader would hand to pack's workers."""
    from shardtool.sample import Sample

    return [Sample(key=str(i), label="x", group=str(i), source=str(f), path=str(f)) for i, f in enumerate(files)]
