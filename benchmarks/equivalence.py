"""Same inputs through the trainer of two checkouts: after a refactor every output must be equal.

    python -m benchmarks.equivalence --before DIR [--after DIR] [--work DIR]

DIR: a checkout of the project (e.g. `git worktree add --detach /tmp/before COMMIT`); --after defaults
to this one. Fashion-MNIST's pixel CSV (from SHARDTOOL_REAL_DATA / ../shared/data) is packed once, with
--before's shardtool, then each checkout's CLI runs, in its own processes and on the same pack:
`trainer probe` (64 px), `trainer fit` (2 epochs at 64 px, seed 3, random head, --log-keys),
`trainer evaluate` and `trainer predict` of its best.pt on the test split, `trainer export` to ONNX, and
Classifier.load of the checkpoint and of the ONNX file on one generated picture. Compared, with timings
and paths left out: the probe's JSON, the evaluation's JSON, the predictions CSV, the key log (which
sample every step trained on), summary.json, metrics.csv and both classifications. results/equivalence.json
records each comparison and the two commits.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, commit, emit, real_data, rel

TIMING = {"seconds", "img_s", "data_wait", "folder", "cache", "path"}
CLASSIFY = """
import json, sys
import numpy as np
from PIL import Image
from trainer.infer import Classifier
image = Image.fromarray((np.arange(64 * 64 * 3) % 251).astype("uint8").reshape(64, 64, 3))
top = {name: [vars(label) for label in Classifier.load(path, "cpu").classify(image)]
       for name, path in (("torch", sys.argv[1]), ("onnx", sys.argv[2]))}
print(json.dumps(top))
"""


def trainer(tree: Path, *args: str, out: Path | None = None) -> None:
    """`python -m trainer ARGS` with TREE's code (run from a temporary folder, so the cwd's is never
    imported); stdout to OUT."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(out or os.devnull, "w") as sink:
        subprocess.run([sys.executable, "-m", "trainer", *args], check=True, env=env, stdout=sink,
                       stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())


def run_tree(tree: Path, data: Path, work: Path) -> Path:
    """Every command on DATA with TREE's trainer; their outputs in WORK."""
    work.mkdir(parents=True)
    run = work / "run"
    trainer(tree, "probe", str(data), "--out", str(work / "probe"), "--image-size", "64", "--json",
            out=work / "probe.json")
    trainer(tree, "fit", str(data), str(run), "--epochs", "2", "--image-size", "64", "--log-keys", "--seed", "3",
            "--head-init", "random")
    trainer(tree, "evaluate", str(run / "best.pt"), str(data), "--split", "test", "--json", out=work / "eval.json")
    trainer(tree, "predict", str(run / "best.pt"), str(data), "--split", "test", "--out", str(work / "preds.csv"))
    trainer(tree, "export", str(run / "best.pt"), str(work / "model.onnx"), "--check-data", str(data),
            "--split", "test")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CLASSIFY, str(run / "best.pt"), str(work / "model.onnx")],
                          check=True, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    (work / "classify.json").write_text(done.stdout)
    return work


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def read(path: Path) -> Any:
    if path.suffix == ".json":
        return without_timings(json.loads(path.read_text()))
    if path.name == "metrics.csv":
        with open(path, newline="") as file:
            return [without_timings(row) for row in csv.DictReader(file)]
    return path.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the commit to compare against")
    parser.add_argument("--after", type=Path, default=REPO)
    parser.add_argument("--data", type=Path, default=real_data())
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trainer-equivalence")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    source = args.data / "fashion-mnist" / "fashion-mnist_test.csv"
    if not source.is_file():
        sys.exit(f"{source} not found: pass --data (the folder holding fashion-mnist/)")
    shutil.rmtree(args.work, ignore_errors=True)
    pack = args.work / "fm"
    subprocess.run([sys.executable, "-m", "shardtool", "pack", str(source), str(pack), "--split", "val=0.15,test=0.15",
                    "--stratify"], check=True, env={**os.environ, "PYTHONPATH": str(args.before)},
                   stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    before = run_tree(args.before.resolve(), pack, args.work / "before")
    after = run_tree(args.after.resolve(), pack, args.work / "after")
    names = ["probe.json", "eval.json", "preds.csv", "run/keys/rank-0.tsv", "run/summary.json", "run/metrics.csv",
             "classify.json"]
    results = [{"name": name, "same": read(before / name) == read(after / name)} for name in names]
    settings = {"before": commit(args.before), "after": commit(args.after), "data": rel(source),
                "all_same": all(r["same"] for r in results)}
    emit("equivalence", settings, results, ["name", "same"], args.json)
    if not settings["all_same"]:
        sys.exit("some outputs differ")


if __name__ == "__main__":
    main()
