"""`shardtool index OUT`: the sidecars every reader needs, for an OUT packed before they existed or for plain
WebDataset tars written by another tool (webdataset's ShardWriter, img2dataset, a hand-written tarfile loop).

With a dataset.json in OUT: rewrite the sidecars from it (and any missing .idx from its tar).
Without one: read every tar once, in order, and write what `pack` would have:
- a DALI `.idx` per tar (members grouped into samples exactly as DALI's wds2idx and webdataset group them:
  consecutive members sharing the name up to the first dot of the file name);
- dataset.json: splits from the file names (`train-000000.tar`, `imagenet-validation-0003.tar`, or a
  `train/` / `val/` folder; anything else is `train`), per-shard sample counts, sizes and sha256, class
  counts from the `.cls` members, class names from `--classes FILE`, else from `.txt` members when each
  label always comes with the same text, else the label numbers; no mean/std (the trainer's default
  `--norm model` does not need them);
- the sidecars (shardtool/sidecars.py).
A tar that is compressed, a sample without an image or with a label that is not a whole number, or
labels on some samples but not others are refused in one line naming the shard and the sample.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardtool import __version__
from shardtool.errors import ConfigError
from shardtool.manifest import FORMAT, NAME, VERSION, split_order, write_json_atomic, write_text_atomic
from shardtool.sidecars import write_sidecars
from shardtool.tario import IDX_VERSION

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the trainer's loaders decode (trainer/data)
SPLIT_WORDS = {"train", "training", "val", "valid", "validation", "test", "testing", "unlabelled", "unlabeled"}
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
MAX_TEXT_NAME = 200  # a .txt longer than this is a caption, not a class name


@dataclass
class TarScan:
    """What one read of a tar learned: its .idx text, counts, labels and the text beside each label."""

    name: str
    num_samples: int = 0
    bytes: int = 0
    sha256: str = ""
    index: str = ""
    labels: Counter[int] = field(default_factory=Counter)
    unlabelled: int = 0
    first_unlabelled: str = ""
    members: set[str] = field(default_factory=set)
    texts: dict[int, set[str]] = field(default_factory=dict)


def index(out: str, classes_file: str | None = None) -> dict[str, Any]:
    """Write OUT's sidecars (and dataset.json when there is none); returns the manifest."""
    root = Path(out)
    if not root.is_dir():
        raise ConfigError(f"{out} is not a folder")
    if (root / NAME).is_file():
        if classes_file:
            raise ConfigError(f"{out} already has a {NAME}: its classes stand (--classes is for plain tars)")
        from shardtool.manifest import load_manifest

        manifest = load_manifest(root).data
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if not (root / shard["index"]).is_file():
                    write_text_atomic(root / shard["index"], scan_tar(root, shard["name"]).index)
        write_sidecars(root, manifest)
        return manifest
    tars = find_tars(root)
    scans = [scan_tar(root, name) for name in tars]
    manifest = manifest_from(root, scans, classes_file)
    for scan in scans:
        write_text_atomic(root / _idx_name(scan.name), scan.index)
    write_sidecars(root, manifest)
    write_json_atomic(root / NAME, manifest)  # last: a folder without it is not indexed
    return manifest


def find_tars(root: Path) -> list[str]:
    """The .tar files in ROOT and its immediate sub-folders, as paths relative to ROOT, sorted."""
    tars = sorted(str(p.relative_to(root)) for pattern in ("*.tar", "*/*.tar") for p in root.glob(pattern)
                  if p.is_file())
    if not tars:
        packed = sorted(p.name for p in root.glob("*.tar.*") if p.is_file())
        hint = f" ({packed[0]} is compressed: decompress to .tar first)" if packed else ""
        raise ConfigError(f"{root} has no .tar shards{hint}")
    return tars


def split_of(name: str) -> str:
    """The split a shard belongs to, from its folder or file name; `train` when neither names one."""
    parts = name.split("/")
    if len(parts) > 1 and parts[-2].lower() in SPLIT_WORDS:
        return parts[-2].lower()
    stem = re.sub(r"[-_.]?\d+$", "", parts[-1][: -len(".tar")])
    words = [w.lower() for w in re.split(r"[-_.]", stem) if w]
    return words[-1] if words and words[-1] in SPLIT_WORDS else "train"


def scan_tar(root: Path, name: str) -> TarScan:
    """One pass over a tar: its DALI index, sample count, labels, sha256 (hashed as it is read)."""
    path = root / name
    with open(path, "rb") as raw:
        magic = raw.read(6)
        for prefix, kind in COMPRESSED.items():
            if magic.startswith(prefix):
                raise ConfigError(f"{name} is compressed ({kind}): DALI's index and random access need plain "
                                  "tars; decompress it first")
        raw.seek(0)
        hashing = _Hashing(raw)
        scan = TarScan(name)
        try:
            samples = list(_samples(tarfile.open(fileobj=hashing, mode="r|"), name))  # type: ignore[call-overload]
        except tarfile.TarError as error:
            raise ConfigError(f"{name} is not a readable tar ({error})") from None
        while hashing.read(1 << 20):  # the end-of-archive padding tarfile does not read
            pass
    scan.sha256, scan.bytes = hashing.digest.hexdigest(), hashing.size
    lines = []
    for key, members in samples:
        exts = {m[0] for m in members}
        if not exts & set(IMAGE_EXTS):
            raise ConfigError(f"{name}: sample {key} has no image member (has: {', '.join(sorted(exts))}; "
                              f"the trainer reads {', '.join(IMAGE_EXTS)})")
        scan.members |= exts
        for _, _, _, member, _ in members:
            if any(c.isspace() for c in member):
                raise ConfigError(f"{name}: member {member!r} has whitespace in its name, which DALI's .idx "
                                  "cannot hold")
        label = next((data for ext, _, _, _, data in members if ext == "cls"), None)
        if label is None:
            scan.unlabelled += 1
            scan.first_unlabelled = scan.first_unlabelled or key
        else:
            value = label.decode("utf-8", "replace").strip()
            if not re.fullmatch(r"\d+", value):
                raise ConfigError(f"{name}: sample {key} has .cls {value[:40]!r}, not a class number")
            scan.labels[int(value)] += 1
            text = next((data for ext, _, _, _, data in members
                         if ext == "txt" and data is not None and len(data) <= MAX_TEXT_NAME), None)
            if text is not None:
                scan.texts.setdefault(int(value), set()).add(text.decode("utf-8", "replace").strip())
        lines.append(" ".join(f"{ext} {offset} {size} {member}" for ext, offset, size, member, _ in members) + "\n")
    if not lines:
        raise ConfigError(f"{name} holds no samples")
    scan.num_samples = len(lines)
    scan.index = f"{IDX_VERSION} {len(lines)}\n" + "".join(lines)
    return scan


Member = tuple[str, int, int, str, bytes | None]  # (ext, data offset, size, name, data of .cls/.txt)


def _samples(tar: tarfile.TarFile, shard: str) -> Iterator[tuple[str, list[Member]]]:
    """(key, members) in file order, grouped as DALI's wds2idx groups them: a new sample starts when the
    name up to the first dot of the file name changes; hidden files and non-files are passed over."""
    key, members = None, []
    names: set[str] = set()
    keys: set[str] = set()
    for info in tar:
        if not info.isreg():
            continue
        cut = info.name.find(".", info.name.rfind("/") + 1)
        base, ext = (info.name[:cut], info.name[cut + 1:]) if cut >= 0 else (info.name, "")
        if not base or base.endswith("/"):
            continue
        _check_member(shard, info.name, ext, names, keys if base != key else set())
        if base != key:
            keys.add(base)
        data = tar.extractfile(info).read() if ext in ("cls", "txt") else None  # type: ignore[union-attr]
        if base != key and members:
            yield key, members  # type: ignore[misc]
            members = []
        key = base
        members.append((ext, info.offset_data, info.size, info.name, data))
    if members:
        yield key, members  # type: ignore[misc]


def _check_member(shard: str, name: str, ext: str, names: set[str], keys: set[str]) -> None:
    """A member every reader can place: it has an extension, its name is new, and its sample's key is not one
    an earlier sample had (readers group consecutive members; a repeated key would be two samples of one name)."""
    if not ext:
        raise ConfigError(f"{shard}: member {name!r} has no extension: readers cannot tell what it holds; rename or remove it")
    if name in names:
        raise ConfigError(f"{shard}: member {name!r} is in the tar twice: readers would keep one of them; remove the other")
    if name[: -len(ext) - 1] in keys:
        raise ConfigError(f"{shard}: member {name!r} belongs to sample {name[: -len(ext) - 1]!r}, which an earlier run of "
                          "members already used: a sample's members must be next to each other")
    names.add(name)


def manifest_from(root: Path, scans: list[TarScan], classes_file: str | None) -> dict[str, Any]:
    labelled = [s for s in scans if s.labels]
    if labelled and (partial := next((s for s in scans if s.unlabelled), None)):
        raise ConfigError(f"{partial.name}: sample {partial.first_unlabelled} has no .cls label while other samples "
                          "have one; label every sample or none")
    labels: Counter[int] = sum((s.labels for s in scans), Counter())
    names = _class_names(labels, scans, classes_file) if labels else []
    splits: dict[str, dict[str, Any]] = {}
    for scan in scans:
        split = splits.setdefault(split_of(scan.name) if labels else "unlabelled",
                                  {"num_samples": 0, "bytes": 0, "class_counts": Counter(), "stats": None,
                                   "shards": []})
        split["num_samples"] += scan.num_samples
        split["bytes"] += scan.bytes
        split["class_counts"].update(scan.labels)
        split["shards"].append({"name": scan.name, "index": _idx_name(scan.name), "num_samples": scan.num_samples,
                                "bytes": scan.bytes, "sha256": scan.sha256,
                                "class_counts": {str(k): v for k, v in sorted(scan.labels.items())}})
    for split in splits.values():
        split["class_counts"] = [split["class_counts"].get(i, 0) for i in range(len(names))]
    total = sum(s.num_samples for s in scans)
    return {
        "format": FORMAT, "version": VERSION, "created_by": f"shardtool {__version__} index",
        "source": {"path": str(root), "format": "webdataset", "members": sorted(set().union(*(s.members for s in scans)))},
        "classes": [{"index": i, "name": name} for i, name in enumerate(names)],
        "splits": dict(sorted(splits.items(), key=split_order)),
        "normalization": {"from": []},
        "report": {"seen": total, "written": total, "skipped": 0, "skips": {}, "ignored": {"count": 0, "examples": []}},
        "options": {"indexed": True, "classes": classes_file},
    }


def _class_names(labels: Counter[int], scans: list[TarScan], classes_file: str | None) -> list[str]:
    count = max(labels) + 1
    if classes_file:
        try:
            names = [line.strip() for line in Path(classes_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"--classes {classes_file}: {error}") from None
        if len(names) < count:
            raise ConfigError(f"--classes {classes_file} names {len(names)} classes, but the shards use label "
                              f"{count - 1}")
        if len(set(names)) < len(names):
            raise ConfigError(f"--classes {classes_file} names a class twice")
        return names
    texts: dict[int, set[str]] = {}
    for scan in scans:
        for label, seen in scan.texts.items():
            texts.setdefault(label, set()).update(seen)
    one_each = {label: next(iter(seen)) for label, seen in texts.items() if len(seen) == 1}
    if len(one_each) == len(labels) and len(set(one_each.values())) == len(one_each):
        return [one_each.get(i, str(i)) for i in range(count)]  # every used label always came with one text
    return [str(i) for i in range(count)]


def _idx_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


class _Hashing:
    """A read-only file that hashes and counts every byte read through it (one pass for tar and sha256)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def summary(manifest: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {s['num_samples']:,} samples in {len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    return f"{splits}; {len(manifest['classes'])} classes"

