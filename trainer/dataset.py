"""DATA as the trainer sees it: a shardtool manifest plus where its shards live.

DATA is a shardtool output folder, a URL of one (`https://host/shards/`, `s3://bucket/prefix/`, any
fsspec URL; read through trainer/remote.py), or a brace pattern of shards (`out/train-{000000..000009}.tar`) whose folder holds the
dataset.json; a pattern keeps only the shards it names. Every count the loaders rely on (samples
per split and per shard, classes, normalisation) comes from the manifest, never from reading shards.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from shardtool.errors import ConfigError
from shardtool.manifest import NAME, parse_manifest
from shardtool.publish import is_url
from trainer.remote import Remote, RemoteError, fetch

SPLIT_ALIASES = {"val": ("val", "validation", "valid"), "validation": ("validation", "val", "valid"),
                 "valid": ("valid", "val", "validation")}


@dataclass(frozen=True)
class Shard:
    url: str  # a local path or a URL (trainer/remote.py reads it)
    index_url: str  # its DALI .idx
    num_samples: int
    sha256: str = ""  # the manifest's, checked by --cache
    bytes: int = 0
    class_counts: tuple[tuple[int, int], ...] | None = None  # (class, samples) pairs; None: an old manifest's
    source: int = 0  # which of fit's DATA it belongs to (mixing)


@dataclass(frozen=True)
class Dataset:
    root: str
    manifest: dict[str, Any]
    selected: frozenset[str] | None = None  # shard names a brace pattern chose, else every shard

    @property
    def classes(self) -> list[dict[str, Any]]:
        return self.manifest["classes"]

    @property
    def class_names(self) -> list[str]:
        return [entry["name"] for entry in self.classes]

    @property
    def normalization(self) -> dict[str, Any]:
        return self.manifest["normalization"]

    def split_name(self, split: str) -> str:
        """The manifest's name for SPLIT (`val` finds `validation` and back), or a one-line error."""
        for name in SPLIT_ALIASES.get(split, (split,)):
            if name in self.manifest["splits"] and self.shards(name, check=False):
                return name
        have = ", ".join(self.manifest["splits"]) or "none"
        raise ConfigError(f"{self.root} has no split {split!r} (it has: {have}); pick one with --split")

    def has_split(self, split: str) -> bool:
        try:
            self.split_name(split)
        except ConfigError:
            return False
        return True

    def shards(self, split: str, check: bool = True) -> list[Shard]:
        name = self.split_name(split) if check else split
        return [Shard(_join(self.root, s["name"]), _join(self.root, s["index"]), s["num_samples"], s.get("sha256", ""),
                      s.get("bytes", 0), _counts(s.get("class_counts")))
                for s in self.manifest["splits"][name]["shards"]
                if self.selected is None or s["name"] in self.selected]

    def num_samples(self, split: str) -> int:
        return sum(shard.num_samples for shard in self.shards(split))

    def labelled(self, split: str) -> bool:
        return bool(self.classes) and self.split_name(split) != "unlabelled"

    def fingerprint(self) -> list[str]:
        """What a checkpoint must agree with to be used on this dataset: the class names in order."""
        return self.class_names


def open_dataset(data: str, remote: Remote = Remote()) -> Dataset:
    """Read DATA's manifest (a URL's through REMOTE's timeouts and retries); a folder without one, or a wrong
    file, is a one-line ConfigError."""
    selected = None
    root = data
    if "{" in data or data.endswith(".tar"):
        names = [posixpath.basename(p) for p in braceexpand(data)]
        selected = frozenset(names)
        root = posixpath.dirname(data) or "."
    raw = _read_bytes(_join(root, NAME), data, remote)
    manifest = parse_manifest(raw, _join(root, NAME), "trainer", None if is_url(root) else Path(root))
    dataset = Dataset(root, manifest, selected)
    if selected is not None:
        known = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
        if missing := sorted(selected - known):
            raise ConfigError(f"{data} names shards the manifest does not list: {', '.join(missing[:3])}")
    return dataset


def _counts(counts: dict[str, int] | None) -> tuple[tuple[int, int], ...] | None:
    return None if counts is None else tuple(sorted((int(k), v) for k, v in counts.items() if v))


def _join(root: str, name: str) -> str:
    if is_url(root):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def _read_bytes(path: str, data: str, remote: Remote) -> bytes:
    if is_url(path):
        try:
            return fetch(path, remote)
        except (OSError, ValueError) as error:
            raise ConfigError(str(error) if isinstance(error, RemoteError) else f"cannot read {path}: {error}") from None
    if not Path(data).exists() and "{" not in data:
        raise ConfigError(f"{data} does not exist")
    if not Path(path).is_file():
        folder = Path(path).parent
        if any(folder.glob("*.tar")) or any(folder.glob("*/*.tar")):
            raise ConfigError(f"{folder} holds tars but no {NAME}: run `shardtool index {folder}` once to index "
                              "them (shards written by another tool)")
        raise ConfigError(f"{data} is not a shardtool output (no {NAME}); run shardtool pack first")
    return Path(path).read_bytes()


@dataclass(frozen=True)
class Mixture:
    """Several DATA with one class list, trained on as one (fit's `DATA... OUT`, `--mix`): every split is the
    union of the parts' (validation and test unweighted, each sample once); a shard knows its part (source)."""

    parts: tuple[Dataset, ...]

    @property
    def root(self) -> str:
        return " + ".join(part.root for part in self.parts)

    @property
    def manifest(self) -> dict[str, Any]:  # classes and hierarchy: the parts share them
        return self.parts[0].manifest

    @property
    def classes(self) -> list[dict[str, Any]]:
        return self.parts[0].classes

    @property
    def class_names(self) -> list[str]:
        return self.parts[0].class_names

    @property
    def normalization(self) -> dict[str, Any]:
        raise ConfigError("--norm dataset: several DATA have no one mean/std between them; use --norm model")

    def has_split(self, split: str) -> bool:
        return any(part.has_split(split) for part in self.parts)

    def shards(self, split: str) -> list[Shard]:
        if not self.has_split(split):
            self.parts[0].split_name(split)  # the one-line error that names the splits there are
        return [replace(shard, source=i) for i, part in enumerate(self.parts) if part.has_split(split)
                for shard in part.shards(split)]

    def num_samples(self, split: str) -> int:
        return sum(shard.num_samples for shard in self.shards(split))

    def labelled(self, split: str) -> bool:
        return all(part.labelled(split) for part in self.parts if part.has_split(split))

    def fingerprint(self) -> list[str]:
        return self.class_names


def open_sources(sources: list[str], remote: Remote = Remote()) -> Dataset | Mixture:
    """One DATA as open_dataset reads it, several as a Mixture; their class lists must be the same."""
    parts = tuple(open_dataset(source, remote) for source in sources)
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        if part.class_names != first.class_names:
            theirs, ours = part.class_names, first.class_names
            at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise ConfigError(f"{part.root} has other classes than {first.root} ({len(theirs)} vs {len(ours)}, first "
                              f"difference at index {at}): mixed DATA must share one class list")
    return Mixture(parts)
