"""dataset.json: the one description of a packed dataset that shardtool and trainer both read.

Written last (tmp -> os.replace), so a folder without it is never mistaken for a whole dataset.
The schema is documented in docs/FORMAT.md; bump VERSION when it changes incompatibly.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardtool.atomic import replacing
from shardtool.errors import ConfigError

NAME = "dataset.json"
FORMAT = "shardtool-dataset"
VERSION = 1
EXAMPLES_PER_REASON = 5


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict[str, Any]

    @property
    def classes(self) -> list[dict[str, Any]]:
        return self.data["classes"]

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        return self.data["splits"]

    def shards(self, split: str) -> list[dict[str, Any]]:
        if split not in self.splits:
            raise ConfigError(f"{self.path.parent} has no split {split!r}; it has {', '.join(self.splits)}")
        return self.splits[split]["shards"]


def load_manifest(out: str | os.PathLike[str]) -> Manifest:
    path = Path(out) / NAME
    if not path.is_file():
        raise ConfigError(f"{out} is not a finished shardtool output (no {NAME}); run shardtool pack first")
    return Manifest(path, parse_manifest(path.read_bytes(), str(path), "shardtool", Path(out)))


def parse_manifest(raw: bytes, where: str, reader: str, root: Path | None = None) -> dict[str, Any]:
    """dataset.json's bytes -> its dict, checked as far as every reader relies on it (format, version, class
    list, shard names inside the dataset folder); anything else is a one-line ConfigError that names WHERE
    and never quotes the file's bytes. Both shardtool (load_manifest) and trainer (open_dataset) read here."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where} is not valid JSON: not UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:  # its message names line and column, never the text
        raise ConfigError(f"{where} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a shardtool manifest")
    if data.get("version") != VERSION:
        raise ConfigError(f"{where} has manifest version {data.get('version')}; this {reader} reads {VERSION}")
    check_structure(data, where)
    if root is not None:  # a local folder: no symlink inside it may lead out either
        for split in data["splits"].values():
            for shard in split["shards"]:
                confined(root, shard["name"]), confined(root, shard["index"])
    return data


def check_structure(data: dict[str, Any], where: str) -> None:
    """The parts readers index into: a class list that covers every split's labels, and shard entries whose
    names stay inside the dataset folder (or under its base URL)."""
    classes, splits = data.get("classes"), data.get("splits")
    if not isinstance(classes, list) or not isinstance(splits, dict):
        raise ConfigError(f"{where} has no class list or no splits: not a whole shardtool manifest")
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise ConfigError(f"{where}: split {name!r} has no shard list")
        counts = split.get("class_counts") or []
        if name != "unlabelled" and not classes:
            raise ConfigError(f"{where} lists no classes, but split {name!r} is labelled; "
                              "repack, or run `shardtool index` on the tars")
        if len(counts) > len(classes):
            raise ConfigError(f"{where} lists {len(classes)} classes, but split {name!r} counts labels up to "
                              f"{len(counts) - 1}; repack, or run `shardtool index` on the tars")
        for shard in split["shards"]:
            check_shard_entry(shard, where, len(classes))


def check_shard_entry(shard: Any, where: str, num_classes: int) -> None:
    if not isinstance(shard, dict) or not isinstance(shard.get("num_samples"), int):
        raise ConfigError(f"{where} has a shard entry without a name, index and sample count")
    for field in ("name", "index"):
        check_relative(shard.get(field), where)
    if not counts_fit(shard.get("class_counts", {}), num_classes, shard["num_samples"]):
        raise ConfigError(f"{where}: a shard's class_counts are not counts of its samples by class index "
                          f"(0-{num_classes - 1}); repack, or run `shardtool index` on the tars")


def counts_fit(counts: Any, num_classes: int, num_samples: int) -> bool:
    """A shard's class_counts ({"class index": samples}, absent in manifests from before them) name known
    classes and count no more samples than the shard holds."""
    if not isinstance(counts, dict):
        return False
    for key, value in counts.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < num_classes):
            return False
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return False
    return sum(counts.values()) <= num_samples


def check_relative(name: Any, where: str) -> None:
    """NAME must be a relative path that stays inside the dataset folder: no '..', no absolute path, no
    URL or drive (a manifest that names ../../etc/passwd is refused when it is read, not followed)."""
    ok = isinstance(name, str) and name and "\\" not in name and ":" not in name and "\0" not in name
    normal = posixpath.normpath(name) if ok else ""
    if not ok or name.startswith("/") or normal == ".." or normal.startswith("../") or ".." in name.split("/"):
        shown = repr(name)[:80]
        raise ConfigError(f"{where} names a shard file {shown} outside its dataset folder; "
                          "shard names must be paths relative to the folder")


def confined(root: Path, name: str) -> Path:
    """ROOT / NAME, refused (ConfigError) when a symlink on the way leads outside ROOT."""
    path = root / name
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise ConfigError(f"{root}: {name!r} leads outside the dataset folder through a symlink")
    return path


class _SplitTotals:
    """What the manifest says about one split, summed over its journal records."""

    def __init__(self) -> None:
        self.shards: list[dict[str, Any]] = []
        self.class_counts: Counter[int] = Counter()
        self.sum, self.sum2, self.pixels = [0.0] * 3, [0.0] * 3, 0
        self.measured: int | None = 0  # images the statistics include; None when a record predates counting

    def add(self, record: dict[str, Any]) -> None:
        self.shards.append({"name": record["shard"] + ".tar", "index": record["shard"] + ".idx",
                            "num_samples": record["num_samples"], "bytes": record["bytes"],
                            "sha256": record["sha256"], "class_counts": record["class_counts"]})
        self.class_counts.update({int(k): v for k, v in record["class_counts"].items()})
        stats = record["stats"]
        self.sum = [a + b for a, b in zip(self.sum, stats["sum"])]
        self.sum2 = [a + b for a, b in zip(self.sum2, stats["sum2"])]
        self.pixels += stats["pixels"]
        self.measured = None if self.measured is None or "images" not in stats else self.measured + stats["images"]

    def entry(self, num_classes: int) -> dict[str, Any]:
        return {"num_samples": sum(s["num_samples"] for s in self.shards),
                "bytes": sum(s["bytes"] for s in self.shards),
                "class_counts": [self.class_counts.get(i, 0) for i in range(num_classes)],
                "stats": _channel_stats([self]), "shards": self.shards}


def _channel_stats(totals: list[_SplitTotals]) -> dict[str, Any] | None:
    """Mean/std over the pixels of every decoded image, and how many images that is of how many
    (--verify header copies JPEGs without decoding them: they are not in the statistics)."""
    pixels = sum(t.pixels for t in totals)
    if not pixels:
        return None
    mean = [sum(t.sum[c] for t in totals) / pixels for c in range(3)]
    squares = [sum(t.sum2[c] for t in totals) / pixels for c in range(3)]
    std = [math.sqrt(max(s - m * m, 0.0)) for s, m in zip(squares, mean)]
    measured = [t.measured for t in totals]
    return {"mean": [round(m / 255, 6) for m in mean], "std": [round(s / 255, 6) for s in std],
            "images": None if None in measured else sum(measured),  # type: ignore[arg-type]
            "of": sum(s["num_samples"] for t in totals for s in t.shards)}


def skip_report(skips: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    report: dict[str, dict[str, Any]] = {}
    for skip in skips:
        entry = report.setdefault(skip["reason"], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({k: skip[k] for k in ("source", "detail")})
    return dict(sorted(report.items()))


def build_manifest(records: Iterable[dict[str, Any]], classes: list[dict[str, Any]], source: dict[str, Any],
                   options: dict[str, Any], ignored: list[dict[str, str]], version: str) -> dict[str, Any]:
    """One pass over the journal records; memory grows with the shard count only (a few lines each)."""
    totals: dict[str, _SplitTotals] = {}
    skips: list[dict[str, Any]] = []
    report: dict[str, dict[str, Any]] = {}
    for record in records:
        split = totals.setdefault(record["split"], _SplitTotals())
        if "shard" in record:
            split.add(record)
        skips.extend(record["skips"])
        if len(skips) > 10_000:
            _merge(report, skip_report(skips))
            skips.clear()
    _merge(report, skip_report(skips))
    splits = {name: t.entry(len(classes)) for name, t in sorted(totals.items(), key=split_order)}
    splits = {name: entry for name, entry in splits.items() if entry["num_samples"]}
    written = sum(s["num_samples"] for s in splits.values())
    skipped = sum(entry["count"] for entry in report.values())
    norm_from = ["train"] if "train" in splits else list(splits)
    return {
        "format": FORMAT, "version": VERSION, "created_by": f"shardtool {version}",
        "source": source,
        "classes": classes,
        "splits": splits,
        "normalization": {"from": norm_from, **(_channel_stats([totals[s] for s in norm_from]) or {})},
        "report": {"seen": written + skipped, "written": written, "skipped": skipped,
                   "skips": dict(sorted(report.items())),
                   "ignored": ignored_report(ignored)},
        "options": options,
    }


def ignored_report(ignored: list[dict[str, str]]) -> dict[str, Any]:
    """The count and up to EXAMPLES_PER_REASON entries of each reason: a symlink that was not followed is
    named even beside a thousand hidden files."""
    shown: Counter[str] = Counter()
    examples = []
    for entry in ignored:
        shown[entry["reason"]] += 1
        if shown[entry["reason"]] <= EXAMPLES_PER_REASON:
            examples.append(entry)
    return {"count": len(ignored), "examples": examples}


def _merge(report: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> None:
    for reason, entry in more.items():
        mine = report.setdefault(reason, {"count": 0, "examples": []})
        mine["count"] += entry["count"]
        mine["examples"] = (mine["examples"] + entry["examples"])[:EXAMPLES_PER_REASON]


SPLIT_ORDER = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "test": 2, "testing": 2}


def split_order(item: tuple[str, Any]) -> tuple[int, str]:
    """Sort key of (split name, ...): train, then val, then test, then the rest by name."""
    return SPLIT_ORDER.get(item[0], 3), item[0]


def write_text_atomic(path: Path, text: str) -> None:
    """PATH gets TEXT whole or not at all (tmp file, then os.replace)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
