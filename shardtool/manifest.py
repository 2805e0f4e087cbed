"""dataset.json: the one description of a packed dataset that shardtool and trainer both read.

Written last (tmp -> os.replace), so a folder without it is never mistaken for a whole dataset.
The schema is documented in docs/FORMAT.md; bump VERSION when it changes incompatibly.
"""

from __future__ import annotations

import json
import math
import os
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a shardtool manifest")
    if data.get("version") != VERSION:
        raise ConfigError(f"{path} has manifest version {data.get('version')}; this shardtool reads {VERSION}")
    return Manifest(path, data)


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
                            "sha256": record["sha256"]})
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
