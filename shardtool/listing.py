"""What a pack's plan is made from, as one digest: every input the reader lists, in its order, with the
size and modification time of each file read, and of the source files themselves.

The plan (order, splits, the resume point of each split) is a function of that listing, so a resume
is only sound over the same listing: run.json holds it, and a re-run whose source has gained, lost
or changed an input is refused instead of skipping "done" inputs that are now other ones (which packs
some images twice and others never, and reports OK).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from shardtool.sample import Item, Sample


class Listing:
    def __init__(self, *sources: str | None) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.inputs = 0
        for source in filter(None, sources):  # a CSV, its --join, --categories, a BSON dump
            self._update("file", source, *_stat(source))

    def add_item(self, item: Item) -> None:
        """One input of a reader without byte ranges: its identity, and its file's size and mtime."""
        self.inputs += 1
        if isinstance(item, Sample):
            data = hashlib.blake2b(item.data, digest_size=8).hexdigest() if item.data is not None else ""
            meta = json.dumps(item.meta, sort_keys=True, default=str)
            self._update("sample", item.key, item.label, item.group, item.split, item.source, meta, data,
                         *(_stat(item.path) if item.path else ()))
        else:
            self._update("skip", item.reason, item.key, item.source, item.split)

    def add_entries(self, label: str | None, group: str, count: int) -> None:
        """The documents of a byte range (a BSON dump's scan): the file's own stat covers their bytes."""
        self.inputs += count
        self._update("entries", label, group, count)

    def identity(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "digest": self._hash.hexdigest()}

    def _update(self, *fields: Any) -> None:
        self._hash.update(json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")


def _stat(path: str) -> tuple[int, int]:
    try:
        status = os.stat(path)
    except OSError:  # a missing file is an input too (its Skip says so); its absence is what is recorded
        return (-1, -1)
    return (status.st_size, status.st_mtime_ns)
