"""CSV manifests: one row per image, the label in a column of this CSV or of a joined one.

    Images.csv --images images/ --image-col id --image-suffix .jpg
               --join Products.csv --join-on product_id=id --label-col category --label-level 1
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardtool.config import CsvOptions
from shardtool.errors import ConfigError
from shardtool.readers.common import has_control, make_key
from shardtool.readers.table import need_column, read_rows, unique_columns
from shardtool.sample import Item, Sample, Skip

IMAGE_COLS = ("image", "image_path", "path", "file", "filename", "filepath", "image_id")
LABEL_COLS = ("label", "class", "category", "category_id", "target")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def clean_number(text: str) -> float | None:
    """'£1,250.00' -> 1250.0; text with no number in it -> None."""
    match = _NUMBER.search(text.replace(",", "").replace(" ", ""))
    return float(match.group()) if match else None


def cut_path(label: str, level: int | None) -> str:
    """'Home & Garden / Dining / Cups' cut to `level` parts ('Home & Garden' at level 1)."""
    parts = [part.strip() for part in label.split("/")]
    return " / ".join(parts[:level] if level else parts)


def _control(column: str, value: str) -> str:
    return f"{column!r} holds a control character: {value!r}"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _unnamed(column: str) -> bool:
    return not column or column.startswith("Unnamed:")


class CsvReader:
    """Yields one Sample per row; rows with no label or no image reference become Skips."""

    given_splits = False
    labelled = True
    ignored: list[dict[str, str]] = []
    label_sep = " / "

    def __init__(self, source: str, options: CsvOptions) -> None:
        self.source, self.options = Path(source), options
        self.header, _ = read_rows(self.source, options.encoding)
        unique_columns(self.header, self.source)
        self.joined: dict[str, dict[str, str]] = {}
        join_header: list[str] = []
        if options.join and options.join_on:
            left, right = options.join_on
            need_column(left, self.header, "--join-on", self.source)
            join_header, rows = read_rows(options.join, options.encoding)
            unique_columns(join_header, options.join)
            on = need_column(right, join_header, "--join-on", options.join)
            self.joined = {fields[on]: dict(zip(join_header, fields)) for _, fields in rows if len(fields) > on}
        self.columns = self.header + [c for c in join_header if c not in self.header]
        self.image_col = self._pick(options.image_col, IMAGE_COLS, "--image-col", self.header)
        self.label_col = self._pick(options.label_col, LABEL_COLS, "--label-col", self.columns)
        self.group_col = options.group_col or (options.join_on[0] if options.join_on else self.image_col)
        for name, flag in ((options.group_col, "--group-col"), (options.split_col, "--split-col")):
            if name:
                need_column(name, self.columns, flag, self.source)
        self.image_dir = Path(options.images) if options.images else self.source.parent
        self._root_lexical = os.path.abspath(self.image_dir)
        self._root_real = os.path.realpath(self.image_dir)

    def _pick(self, given: str | None, defaults: tuple[str, ...], flag: str, columns: list[str]) -> str:
        if given:
            need_column(given, columns, flag, self.source)
            return given
        for name in defaults:
            if name in columns:
                return name
        existing = ", ".join(repr(c) for c in columns if c)
        raise ConfigError(f"{self.source.name} has no obvious {flag[2:]} column: pass {flag}; its columns are {existing}")

    def __iter__(self) -> Iterator[Item]:
        header, rows = read_rows(self.source, self.options.encoding)
        seen: set[str] = set()
        for line, fields in rows:
            yield self._item(line, dict(zip(header, fields)), seen)

    def _item(self, line: int, row: dict[str, str], seen: set[str]) -> Item:
        where = f"{self.source.name}:{line}"
        image = row.get(self.image_col, "").strip()
        if self.options.join_on:
            extra = self.joined.get(row.get(self.options.join_on[0], "").strip())
            if extra is None:
                return Skip("join_missing", make_key(image or where), where,
                            f"{self.options.join_on[0]}={row.get(self.options.join_on[0], '')!r} "
                            f"not in {Path(self.options.join or '').name}", group=image or where)
            row = {**extra, **row}
        group = row.get(self.group_col, "").strip() or image or where
        split = row.get(self.options.split_col, "").strip() or None if self.options.split_col else None
        if not image:
            return Skip("missing_image_ref", make_key(where), where, f"empty {self.image_col!r}", group, split)
        if has_control(image):
            return Skip("bad_image_ref", make_key(where), where, _control(self.image_col, image), group, split)
        key = make_key(image)
        label = row.get(self.label_col, "").strip()
        if not label:
            return Skip("missing_label", key, where, f"empty {self.label_col!r}", group, split)
        if has_control(label):
            return Skip("bad_label", key, where, _control(self.label_col, label), group, split)
        if key in seen:
            return Skip("duplicate_key", key, where, f"{image!r} appears earlier in the CSV", group, split)
        path, outside = self._locate(image + self.options.image_suffix)
        if outside:
            return Skip("outside_images", key, where, outside, group, split)
        seen.add(key)
        label = label if self.options.label_level is None else cut_path(label, self.options.label_level)
        return Sample(key=key, label=label, group=group, source=where, path=path, split=split, meta=self._meta(row))

    def _locate(self, name: str) -> tuple[str, str]:
        """(path, "") for an image inside --images, or ("", why not): a row may not name a file elsewhere on
        the machine, by an absolute path, '..' or (without --follow-links) a symlink leading out."""
        path = self.image_dir / name
        lexical = os.path.abspath(path)  # absolute and normalised: '..' resolved lexically
        if not _within(lexical, self._root_lexical):
            return "", f"{name!r} is outside --images {self.image_dir}"
        if not self.options.follow_links and not _within(os.path.realpath(path), self._root_real):
            return "", f"{name!r} leads outside --images {self.image_dir} through a symlink (--follow-links allows it)"
        return str(path), ""

    def _meta(self, row: dict[str, str]) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for column, value in row.items():
            if _unnamed(column):
                continue
            meta[column] = clean_number(value) if column in self.options.numeric_cols else value
        return meta
