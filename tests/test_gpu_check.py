"""The GPU check's CPU rehearsal, in the environment a GPU box has: a Python holding torch, torchvision, numpy,
pillow, click, rich and pytest (with what they require) and nothing else, plus the wheels `make gpu-wheels`
writes for this Python. No fastapi, DALI, Ray or moto: the check must collect, run and judge without them.

The environment is a fresh venv (no pip) whose one .pth names a folder of links to exactly those
distributions' files in this test run's own site-packages; the wheels are downloaded once (PyPI) into
benchmarks/.cache and unpacked by the check itself, as on the GPU box.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_BOX = ("torch", "torchvision", "numpy", "pillow", "click", "rich", "pytest")


def closure(names: tuple[str, ...]) -> set[str]:
    """NAMES and every distribution they require (markers evaluated here), as installed."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            requirement, _, marker = requirement.partition(";")
            if marker and not marker_holds(marker):
                continue
            todo.append(re.split(r"[<>=!~\[ (]", requirement.strip(), maxsplit=1)[0])
    return seen


def marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def gpu_box_python(folder: Path) -> Path:
    """A venv without pip whose site-packages sees only the GPU box's distributions (links to ours)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    base = folder / "gpu-box-packages"
    base.mkdir()
    for name in closure(GPU_BOX):
        dist = metadata.distribution(name)
        for parts in {entry(Path(str(file)).parts) for file in dist.files or []}:
            source, target = Path(str(dist.locate_file(Path(*parts)))), base.joinpath(*parts)
            if source.exists() and not target.exists() and parts[0] not in ("..", "__pycache__"):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
    site = next((folder / "lib").glob("python*/site-packages"))
    (site / "gpu-box.pth").write_text(f"{base}\n")
    return folder / "bin" / "python"


def entry(parts: tuple[str, ...]) -> tuple[str, ...]:
    """What to link for a file: its top-level entry, or below nvidia/, which torch's CUDA libraries and DALI
    share, the entry under it."""
    return parts[:2] if parts[0] == "nvidia" and len(parts) > 2 else parts[:1]


@pytest.fixture(scope="module")
def wheels() -> Path:
    version = ".".join(platform.python_version_tuple()[:2])
    out = ROOT / "benchmarks" / ".cache" / f"gpu-wheels-py{version}"
    if not (out / "core" / ".complete").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_wheels", "--python-version", version, "--out", str(out),
                        "--dali", "none"], check=True, cwd=ROOT, timeout=600)
        (out / "core" / ".complete").touch()
    return out


def test_the_gpu_check_rehearses_on_a_cpu_with_only_the_gpu_box_s_packages(wheels: Path, tmp_path: Path) -> None:
    python = gpu_box_python(tmp_path / "venv")
    missing = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('fastapi', "
                              "'nvidia.dali', 'ray', 'moto', 'webdataset', 'torch') if u.find_spec(m)])"],
                             capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert missing.stdout.strip() == "['torch']"  # the box's Python: torch, none of the others
    out = tmp_path / "check"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no PYTHONPATH, no SHARDTOOL_REAL_DATA
    done = subprocess.run([str(python), "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out),
                           "--wheels", str(wheels), "--budget", "420"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {v["step"]: v for v in summary["verdicts"]}
    assert summary["passed"] and summary["environment"]["importable"]["fastapi"] is False
    ran = {"data", "tests", "pack-pil", "ceiling", "fit"} | {s for s in verdicts if s.startswith("loader-torch-")}
    assert {s for s, v in verdicts.items() if v["status"] == "ok"} == ran, done.stdout[-3000:]
    assert verdicts["pack-dali"]["status"] == "skipped" and "DALI is not importable" in verdicts["pack-dali"]["detail"]
    assert verdicts["pack-pil"]["measured"]["written"] == 240 and verdicts["pack-pil"]["measured"]["skipped"] == 0
    assert verdicts["fit"]["measured"]["epochs"] == 1 and verdicts["ceiling"]["measured"]["img/s"] > 0
    tests_log = next((out / "logs").glob("*-tests.log")).read_text()
    assert re.search(r"\d+ passed, \d+ skipped", tests_log) and " failed" not in tests_log, tests_log[-2000:]
    assert "[skipped] pack-dali" in done.stdout and "gpu_check --device cpu passed" in done.stdout
