"""Pack throughput on clothing-small: `shardtool pack` (PIL and DALI backends) against img2dataset and a hand loop.

    python -m benchmarks.pack [--source DIR] [--repeats 3] [--size 256] [--json]

SOURCE is a class-folder dataset (default: $SHARDTOOL_REAL_DATA/clothing-small, else
../shared/data/clothing-small; 3,781 JPEGs, mostly 400x533). Rows, each on the same files:

- shardtool-{pil,dali}-resize: `--backend pil|dali --resize shorter:SIZE`, default --workers (auto);
- shardtool-{pil,dali}-passthrough: no --resize: every JPEG is decoded in full (--verify full, the default)
  and its bytes copied;
- img2dataset: the same files as file:// URLs (a CSV with a label column), `resize_mode=keep_ratio`
  (shorter side to SIZE, its default `area` interpolation where we use bilinear), webdataset output,
  1000 samples per shard, one process per core; run from benchmarks/.cache/venv-others
  (common.other_venv, made on first use: it pins webdataset 0.2, which our loader must not get);
- hand-loop: one process that opens, converts to RGB, resizes the shorter side to SIZE and saves a JPEG
  per file, as people write it (no validation, no shards, no statistics);
- hand-loop-pool: the same function over a multiprocessing Pool, one process per core, as people
  parallelise it: the baseline with as many cores as ours (vs_hand_loop_pool).

Warm page cache (one untimed read first). Rows alternate round by round. images/s is the median of
--repeats; peak memory is the whole process tree's (common.timed_run: workers included); out_mb is
everything the run wrote; vs_hand_loop(_pool) is the ratio of medians.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    add_ratio,
    Argv,
    emit,
    measure_rounds,
    other_venv,
    real_data,
    rel,
    source_jpegs,
    timed_run,
    tool,
)
from shardtool.cpus import usable_cpus

CONVERT = """
import sys
from pathlib import Path
from PIL import Image
src, dst, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def convert(path):
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    target = dst / path.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, quality=90)
"""
HAND_LOOP = CONVERT + """
for path in sorted(src.rglob("*.jpg")):
    convert(path)
"""
HAND_POOL = CONVERT + """
if __name__ == "__main__":
    from multiprocessing import Pool

    with Pool() as pool:  # one process per core
        pool.map(convert, sorted(src.rglob("*.jpg")), chunksize=16)
"""
I2D_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}  # offline: no update check, no wandb

def url_list(photos: list[Path], source: Path, work: Path) -> Path:
    """img2dataset's input: a CSV of file:// URLs with the class folder as label."""
    path = work / "urls.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["url", "label"])
        writer.writerows([p.absolute().as_uri(), p.parent.name] for p in photos)
    return path


def img2dataset_argv(command: str, urls: Path, size: int, cores: int) -> Argv:
    return lambda out: [command, "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                        "--save_additional_columns", '["label"]', "--output_folder", str(out),
                        "--output_format", "webdataset", "--image_size", str(size), "--resize_mode", "keep_ratio",
                        "--encode_quality", "90", "--number_sample_per_shard", "1000",
                        "--processes_count", str(cores), "--thread_count", "4", "--enable_wandb", "False"]


def runs(source: Path, size: int, urls: Path, cores: int, wanted: set[str] | None = None
         ) -> tuple[list[tuple[str, Argv, dict[str, str] | None]], list[str]]:
    """(row name, argv for an OUT, env) per measured configuration, and notes on rows left out. The other
    virtualenv (built and pip-installed on first use) only when WANTED (None: every row) has img2dataset."""
    def shardtool(backend: str, *extra: str) -> Argv:
        return lambda out: [tool("shardtool"), "pack", str(source), str(out), "--backend", backend, *extra]

    resize = ("--resize", f"shorter:{size}")
    rows: list[tuple[str, Argv, dict[str, str] | None]] = [
        ("shardtool-pil-resize", shardtool("pil", *resize), None),
        ("shardtool-pil-passthrough", shardtool("pil"), None)]
    notes = []
    if importlib.util.find_spec("nvidia.dali"):
        rows += [("shardtool-dali-resize", shardtool("dali", *resize), None),
                 ("shardtool-dali-passthrough", shardtool("dali"), None)]
    else:
        notes.append("shardtool-dali-*: not measured, nvidia-dali is not installed (pip install -e '.[dali]')")
    bin_dir, why_not = other_venv() if wanted is None or "img2dataset" in wanted else (None, "not asked for")
    if bin_dir:
        rows.append(("img2dataset", img2dataset_argv(str(bin_dir / "img2dataset"), urls, size, cores), I2D_ENV))
    else:
        notes.append(f"img2dataset: not measured, {why_not}")
    hand = [sys.executable, "-c", HAND_LOOP, str(source)]
    rows.append(("hand-loop", lambda out: [*hand, str(out), str(size)], None))
    pool = [sys.executable, "-c", HAND_POOL, str(source)]
    rows.append(("hand-loop-pool", lambda out: [*pool, str(out), str(size)], None))
    return rows, notes


def dali_version() -> str | None:
    """"dali-cpu 1.x" (dali-gpu on a CUDA machine: what --backend dali picks), None without DALI.

    Asked in a subprocess: a child's peak RSS starts at its parent's (Linux carries the parent's
    high-water mark across fork + exec), so this process must not import DALI (70 MB) or torch.
    """
    if importlib.util.find_spec("nvidia.dali") is None:
        return None
    code = "from shardtool.process import dali; print(dali.choose_backend('dali'), dali.version())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = real_data()
    parser.add_argument("--source", type=Path, default=default / "clothing-small", help="a class-folder dataset")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row")
    parser.add_argument("--size", type=int, default=256, help="shorter side after resizing")
    parser.add_argument("--rows", help="comma-separated subset of the rows [all that can run here]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    photos = source_jpegs(args.source)
    if not photos:
        return
    cores = usable_cpus()  # what the pool rows may use (affinity, CFS quota), not the host's count
    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    try:
        wanted = args.rows.split(",") if args.rows else None
        rows, notes = runs(args.source, args.size, url_list(photos, args.source, work), cores,
                           None if wanted is None else set(wanted))
        if wanted:
            if unknown := set(wanted) - {name for name, _, _ in rows}:
                sys.exit(f"unknown or unavailable rows: {', '.join(sorted(unknown))} "
                         f"(here: {', '.join(name for name, _, _ in rows)})")
            rows = [row for row in rows if row[0] in wanted]
        timed_run(["cat", *map(str, photos)])  # warm the page cache
        # rows alternate round by round; img2dataset's offline settings are harmless to the others
        results = measure_rounds([(name, argv) for name, argv, _ in rows], work / "out", len(photos), args.repeats,
                                 I2D_ENV)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    add_ratio(results, "vs_hand_loop_pool", "hand-loop-pool")
    add_ratio(results, "vs_hand_loop", "hand-loop")
    settings = {"source": rel(args.source), "images": len(photos), "repeats": args.repeats, "size": args.size,
                "cores": cores, "dali": dali_version()}
    emit("pack", settings, results, ["name", "img_s", "vs_hand_loop_pool", "vs_hand_loop", "peak_rss_mb", "out_mb"],
         args.json, notes)


if __name__ == "__main__":
    main()
