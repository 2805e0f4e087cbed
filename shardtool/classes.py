"""The class list of a dataset: a contiguous index over the labels present, and their category tree.

Labels are names (folders, CSV values) or ids (Cdiscount's category_id). A category CSV
(`--categories`, e.g. Cdiscount's category_names.csv: category_id,category_level1,...) names each id
and its path in a tree; every class then records its level names and, for each level above its own,
the index of its ancestor there, so a trainer can score accuracy at every level.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardtool.errors import ConfigError
from shardtool.readers.table import read_rows
from shardtool.sample import Item, Sample, Skip


@dataclass(frozen=True)
class Categories:
    level_names: list[str]  # the CSV's level columns, top first
    paths: dict[str, list[str]]  # id -> level names, stripped of surrounding whitespace only


def read_categories(path: str | Path, encoding: str = "utf-8-sig") -> Categories:
    """id column `category_id` (or the first), every other column a level; names kept exactly."""
    path = Path(path)
    header, rows = read_rows(path, encoding)
    id_column = header.index("category_id") if "category_id" in header else 0
    level_columns = [i for i, name in enumerate(header) if i != id_column]
    if not level_columns:
        raise ConfigError(f"--categories {path.name} has one column; it needs an id and at least one level name")
    paths: dict[str, list[str]] = {}
    for line, fields in rows:
        if len(fields) != len(header):
            raise ConfigError(f"--categories {path.name} line {line} has {len(fields)} fields, expected {len(header)}")
        category = fields[id_column].strip()
        if category in paths:
            raise ConfigError(f"--categories {path.name} line {line} repeats category {category}")
        paths[category] = [fields[i].strip() for i in level_columns]
    return Categories([header[i] for i in level_columns], paths)


def known_categories(items: Iterable[Item], categories: Categories | None) -> Iterator[Item]:
    """Labels missing from the category CSV become counted skips (`unknown_category`)."""
    for item in items:
        if categories and isinstance(item, Sample) and item.label is not None and item.label not in categories.paths:
            item = Skip("unknown_category", item.key, item.source, f"category {item.label} is not in the "
                        "--categories CSV", item.group, item.split)
        yield item


def class_entries(labels: set[str], label_sep: str | None, categories: Categories | None) -> list[dict[str, Any]]:
    """Class index = sorted names (numerically when every name is an integer), stable across runs."""
    numeric = all(label.isdigit() for label in labels)
    names = sorted(labels, key=lambda name: (int(name), name) if numeric else (0, name))
    entries = []
    for index, name in enumerate(names):
        entry: dict[str, Any] = {"index": index, "name": name}
        if categories:
            entry["category_id"] = int(name) if name.isdigit() else name
            entry["levels"] = categories.paths[name]
        elif label_sep and label_sep in name:
            entry["levels"] = name.split(label_sep)
        entries.append(entry)
    return entries


def hierarchy(entries: list[dict[str, Any]], categories: Categories | None) -> dict[str, Any] | None:
    """Index every ancestor level of the classes; adds `level_indexes` to each entry that has levels.

    Returns {"names": level names, "levels": [names of level 1 by index, of level 2, ...]}; a level's
    index runs over the distinct paths down to it, so equal names under different parents stay apart.
    """
    depth = max((len(e.get("levels", [])) for e in entries), default=0)
    if depth < 2:
        return None
    levels = []
    for level in range(depth - 1):
        paths = sorted({tuple(e["levels"][:level + 1]) for e in entries if len(e.get("levels", [])) > level + 1})
        position = {path: i for i, path in enumerate(paths)}
        for entry in entries:
            if len(entry.get("levels", [])) > level + 1:
                entry.setdefault("level_indexes", []).append(position[tuple(entry["levels"][:level + 1])])
        levels.append([path[-1] for path in paths])
    names = categories.level_names[:depth] if categories else [f"level{i + 1}" for i in range(depth)]
    return {"names": names, "levels": levels}
