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


def _channel_stats(records: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    pixels = sum(r["stats"]["pixels"] for r in records)
    if not pixels:
        return None
    total = [sum(r["stats"]["sum"][c] for r in records) for c in range(3)]
    squares = [sum(r["stats"]["sum2"][c] for r in records) for c in range(3)]
    mean = [t / pixels for t in total]
    std = [math.sqrt(max(s / pixels - m * m, 0.0)) for s, m in zip(squares, mean)]
    return {"mean": [round(m / 255, 6) for m in mean], "std": [round(s / 255, 6) for s in std]}


def _split_entry(records: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    shards = [r for r in records if "shard" in r]
    counts = Counter()
    for r in shards:
        counts.update({int(k): v for k, v in r["class_counts"].items()})
    return {
        "num_samples": sum(r["num_samples"] for r in shards),
        "bytes": sum(r["bytes"] for r in shards),
        "class_counts": [counts.get(i, 0) for i in range(num_classes)],
        "stats": _channel_stats(shards),
        "shards": [{"name": r["shard"] + ".tar", "index": r["shard"] + ".idx", "num_samples": r["num_samples"],
                    "bytes": r["bytes"], "sha256": r["sha256"], "class_counts": r["class_counts"]} for r in shards],
    }


def skip_report(skips: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    report: dict[str, dict[str, Any]] = {}
    for skip in skips:
        entry = report.setdefault(skip["reason"], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({k: skip[k] for k in ("source", "detail")})
    return dict(sorted(report.items()))


def build_manifest(records: list[dict[str, Any]], classes: list[dict[str, Any]], source: dict[str, Any],
                   options: dict[str, Any], ignored: list[dict[str, str]], version: str) -> dict[str, Any]:
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    splits = {name: _split_entry(rs, len(classes)) for name, rs in sorted(by_split.items(), key=_split_order)}
    splits = {name: entry for name, entry in splits.items() if entry["num_samples"]}
    written = sum(s["num_samples"] for s in splits.values())
    skipped = sum(len(r["skips"]) for r in records)
    norm_from = ["train"] if "train" in splits else list(by_split)
    return {
        "format": FORMAT, "version": VERSION, "created_by": f"shardtool {version}",
        "source": source,
        "classes": classes,
        "splits": splits,
        "normalization": {"from": norm_from, **(_channel_stats(
            [r for r in records if r["split"] in norm_from and "shard" in r]) or {})},
        "report": {"seen": written + skipped, "written": written, "skipped": skipped,
                   "skips": skip_report(s for r in records for s in r["skips"]),
                   "ignored": {"count": len(ignored), "examples": ignored[:EXAMPLES_PER_REASON]}},
        "options": options,
    }


def _split_order(item: tuple[str, Any]) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
    return order.get(item[0], 3), item[0]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
