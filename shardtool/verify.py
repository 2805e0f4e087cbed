"""`shardtool verify`: every shard the manifest lists is there, unchanged, indexed right, and decodes."""

from __future__ import annotations

import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from shardtool.errors import ConfigError
from shardtool.hashing import file_sha256
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
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != IDX_VERSION or header[1] != str(len(lines) - 1):
        raise ValueError(f"its first line is not a {IDX_VERSION} header for {len(lines) - 1} sample lines")
    samples = []
    for number, line in enumerate(lines[1:], 1):  # errors name the line, never quote it (it may not be ours)
        parts = line.split()
        try:
            samples.append([(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                            for i in range(0, len(parts), 4)])
        except (IndexError, ValueError):
            raise ValueError(f"line {number + 1} is not an index line") from None
    return samples


def check_shard(folder: Path, shard: dict[str, Any], decode: bool, classes: Counter[str],
                keys: dict[str, str] | None = None) -> list[str]:
    """Problems with one shard; its labels are counted into `classes`, its sample keys into KEYS (key -> the
    shard it was first seen in: a key in two shards is a problem naming both)."""
    path, problems = folder / shard["name"], []
    if not path.is_file():
        return [f"{shard['name']}: missing"]
    if file_sha256(path) != shard["sha256"]:
        problems.append(f"{shard['name']}: sha256 differs from the manifest (changed or corrupt)")
    try:
        index = read_index((folder / shard["index"]).read_text())
    except (OSError, ValueError, IndexError) as error:
        return problems + [f"{shard['index']}: unreadable ({error})"]
    problems += _repeated_keys(index, shard["name"], {} if keys is None else keys)
    try:
        problems += _check_members(path, shard, index, decode, classes)
    except tarfile.TarError as error:  # a damaged header or a cut-off shard
        return problems + [f"{shard['name']}: not a readable tar ({error})"]
    if len(index) != shard["num_samples"]:
        problems.append(f"{shard['name']}: {len(index)} samples, manifest says {shard['num_samples']}")
    return problems


def _repeated_keys(index: list[list[tuple[str, int, int, str]]], shard: str, keys: dict[str, str]) -> list[str]:
    """A key that names two samples: the trainer's keys, predictions and resume would mix them up."""
    problems = []
    for sample in index:
        if not sample:
            continue
        ext, _, _, name = sample[0]
        key = name[: -len(ext) - 1]
        if key not in keys:
            keys[key] = shard
            continue
        where = f"twice in {shard}" if keys[key] == shard else f"in both {keys[key]} and {shard}"
        problems.append(f"key {key!r} is {where}: every sample needs its own key")
    return problems


def _check_members(path: Path, shard: dict[str, Any], index: list[list[tuple[str, int, int, str]]], decode: bool,
                   classes: Counter[str]) -> list[str]:
    """Members against the .idx, images decoded (with `decode`), labels counted into `classes` and checked
    against the shard's own class_counts (manifests from before them have none)."""
    problems, labels = [], Counter[str]()
    with tarfile.open(path, "r:") as tar:  # shards are never compressed
        members = [m for m in tar if m.isfile()]
        indexed = [entry for sample in index for entry in sample]
        if [(m.offset_data, m.size, m.name) for m in members] != [(o, s, n) for _, o, s, n in indexed]:
            problems.append(f"{shard['index']}: offsets or names do not match {shard['name']}")
        for member in members:
            name, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if ext == "cls":
                labels[data.decode(errors="replace").strip()] += 1
            elif decode and ext in ("jpg", "png") and (problem := _decode(data)):
                problems.append(f"{shard['name']}: {member.name} does not decode ({problem})")
    classes.update(labels)
    if "class_counts" in shard and dict(labels) != shard["class_counts"]:
        problems.append(f"{shard['name']}: class counts in the shard differ from the manifest's for it")
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
            Path(fetched, NAME).write_bytes(remote.read_small(NAME))
        folder = Path(fetched) if remote is not None else Path(out)
        manifest = load_manifest(folder)
        problems, shards, samples = [], 0, 0
        keys: dict[str, str] = {}  # every sample's key, over all splits
        for split, entry in manifest.splits.items():
            classes: Counter[str] = Counter()
            for shard in manifest.shards(split):
                if remote is not None:
                    problems += _fetch(remote, shard, folder)
                problems += check_shard(folder, shard, decode, classes, keys)
                if remote is not None:
                    for name in (shard["name"], shard["index"]):
                        (folder / name).unlink(missing_ok=True)
                shards += 1
                samples += shard["num_samples"]
            expected = {str(index): n for index, n in enumerate(entry["class_counts"]) if n}
            if dict(classes) != expected:
                problems.append(f"split {split}: class counts in the shards differ from the manifest")
    return problems, {"shards": shards, "samples": samples}
