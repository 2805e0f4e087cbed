"""`shardtool verify`: every shard the manifest lists is there, unchanged, indexed right, and decodes."""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from shardtool.errors import ConfigError
from shardtool.manifest import NAME, load_manifest
from shardtool.publish import Publisher, is_url
from shardtool.process.checks import open_header
from shardtool.tario import IDX_VERSION


def _fetch(remote: Publisher, shard: dict[str, Any], folder: Path) -> list[str]:
    """A shard and its .idx from the URL into FOLDER; a missing one is check_shard's "missing"."""
    for name in (shard["name"], shard["index"]):
        try:
            remote.fetch(name, folder / name)
        except FileNotFoundError:
            pass
        except Exception as error:  # noqa: BLE001 - every fsspec backend fails in its own way
            return [f"{name}: cannot fetch ({type(error).__name__}: {error})"]
    return []


def read_index(text: str) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI .idx: per sample, its (ext, offset, size, name) members."""
    lines = text.splitlines()
    version, count = lines[0].split()
    if version != IDX_VERSION or int(count) != len(lines) - 1:
        raise ValueError(f"header {lines[0]!r} does not match {len(lines) - 1} sample lines")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        samples.append([(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)])
    return samples


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(folder: Path, shard: dict[str, Any], decode: bool, classes: Counter[str]) -> list[str]:
    """Problems with one shard; its labels are counted into `classes`."""
    path, problems = folder / shard["name"], []
    if not path.is_file():
        return [f"{shard['name']}: missing"]
    if _sha256(path) != shard["sha256"]:
        problems.append(f"{shard['name']}: sha256 differs from the manifest (changed or corrupt)")
    try:
        index = read_index((folder / shard["index"]).read_text())
    except (OSError, ValueError, IndexError) as error:
        return problems + [f"{shard['index']}: unreadable ({error})"]
    try:
        problems += _check_members(path, shard, index, decode, classes)
    except tarfile.TarError as error:  # a damaged header or a cut-off shard
        return problems + [f"{shard['name']}: not a readable tar ({error})"]
    if len(index) != shard["num_samples"]:
        problems.append(f"{shard['name']}: {len(index)} samples, manifest says {shard['num_samples']}")
    return problems


def _check_members(path: Path, shard: dict[str, Any], index: list[list[tuple[str, int, int, str]]], decode: bool,
                   classes: Counter[str]) -> list[str]:
    """Members against the .idx, images decoded (with `decode`), labels counted into `classes`."""
    problems = []
    with tarfile.open(path, "r:") as tar:  # shards are never compressed
        members = [m for m in tar if m.isfile()]
        indexed = [entry for sample in index for entry in sample]
        if [(m.offset_data, m.size, m.name) for m in members] != [(o, s, n) for _, o, s, n in indexed]:
            problems.append(f"{shard['index']}: offsets or names do not match {shard['name']}")
        for member in members:
            name, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if ext == "cls":
                classes[data.decode(errors="replace").strip()] += 1
            elif decode and ext in ("jpg", "png") and (problem := _decode(data)):
                problems.append(f"{shard['name']}: {member.name} does not decode ({problem})")
    return problems


def _decode(data: bytes) -> str | None:
    """Our own images, limited by --max-pixels when packed: checked for integrity, not as bombs."""
    try:
        with open_header(data) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return str(error)
    return None


def verify_dataset(out: str, decode: bool = False) -> tuple[list[str], dict[str, int]]:
    """(problems found, what was checked). No problems means the dataset is whole. OUT may be a URL: each
    shard is then fetched into a temporary folder, checked and deleted, one at a time."""
    remote = Publisher(out) if is_url(out) else None
    with tempfile.TemporaryDirectory(prefix="shardtool-verify-") as fetched:
        if remote is not None:
            if not remote.exists(NAME):
                raise ConfigError(f"{out} is not a finished shardtool output (no {NAME}); run shardtool pack first")
            Path(fetched, NAME).write_text(remote.read_text(NAME), encoding="utf-8")
        folder = Path(fetched) if remote is not None else Path(out)
        manifest = load_manifest(folder)
        problems, shards, samples = [], 0, 0
        for split, entry in manifest.splits.items():
            classes: Counter[str] = Counter()
            for shard in manifest.shards(split):
                if remote is not None:
                    problems += _fetch(remote, shard, folder)
                problems += check_shard(folder, shard, decode, classes)
                if remote is not None:
                    for name in (shard["name"], shard["index"]):
                        (folder / name).unlink(missing_ok=True)
                shards += 1
                samples += shard["num_samples"]
            expected = {str(index): n for index, n in enumerate(entry["class_counts"]) if n}
            if dict(classes) != expected:
                problems.append(f"split {split}: class counts in the shards differ from the manifest")
    return problems, {"shards": shards, "samples": samples}
