"""Shard writing, one SplitSink per split: tmp file -> os.replace, its .idx, then a journal line.

A shard exists for a later run only once its journal line is written; a re-run with the same
command skips the inputs those lines account for and continues with the next shard index, so the
result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardtool.background import Background
from shardtool.journal import Journal
from shardtool.sample import Item, Sample, Skip
from shardtool.tario import Block, TarShard, encode_sample


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sample_members(sample: Sample, index: int | None) -> list[tuple[str, bytes]]:
    """image, class index (absent for unlabelled samples), metadata."""
    info = {"key": sample.key, "label": sample.label, "class": index, "group": sample.group,
            "source": sample.source, **sample.meta}
    label = [("cls", str(index).encode())] if index is not None else []
    return [(sample.ext or "jpg", sample.data or b""), *label,
            ("json", json.dumps(info, ensure_ascii=False, sort_keys=True).encode())]


def with_block(item: Item, classes: Mapping[str | None, int | None]) -> Item:
    """Build a sample's tar members where it was processed (a worker), so the writer only appends bytes."""
    if isinstance(item, Skip):
        return item
    return item.with_(block=encode_sample(item.key, sample_members(item, classes[item.label])), data=None)


class SplitSink:
    """Writes the samples of one split, in arrival order, into shards of bounded count and size."""

    def __init__(self, out: Path, split: str, classes: dict[str | None, int | None], journal: Journal,
                 shard_size: int, shard_bytes: int | None, writes: Background, seals: Background) -> None:
        self.out, self.split, self.classes, self.journal = out, split, classes, journal
        self.writes = writes  # a thread that writes and hashes the shards' bytes, in order
        self.seals = seals  # a thread that fsyncs, renames and journals finished shards, in order
        self.shard_size, self.shard_bytes = shard_size, shard_bytes
        self.next_index, self.consumed = journal.resume_point(split)
        self._shard: TarShard | None = None
        self._file: Any = None
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._skips: list[dict[str, str]] = []
        self._class_counts: dict[int, int] = {}
        self._sum, self._sum2, self._pixels = [0.0] * 3, [0.0] * 3, 0

    def add(self, item: Item) -> None:
        if isinstance(item, Skip):
            self._skips.append(item.as_dict())
            self.consumed += 1
            return
        index = self.classes[item.label]
        block = item.block or encode_sample(item.key, sample_members(item, index))
        if self._shard is not None and self.shard_bytes and self._shard.bytes_written + len(block.data) > self.shard_bytes:
            self._finish()
        self._write(item, index, block)
        self.consumed += 1
        if self._count >= self.shard_size:
            self._finish()

    def _write(self, sample: Sample, index: int | None, block: Block) -> None:
        if self._shard is None:
            self._file = open(self._path(".tar.tmp"), "wb")
            self._shard = TarShard(self._file, self.writes.submit)
        self._shard.add_block(block)
        self._count += 1
        if index is not None:
            self._class_counts[index] = self._class_counts.get(index, 0) + 1
        if sample.stats is not None:
            total, squares, pixels = sample.stats
            self._sum = [a + b for a, b in zip(self._sum, total)]
            self._sum2 = [a + b for a, b in zip(self._sum2, squares)]
            self._pixels += pixels

    def _path(self, suffix: str) -> Path:
        return self.out / (shard_name(self.split, self.next_index) + suffix)

    def _finish(self) -> None:
        """Close the open shard (if any) and journal it with the skips since the last record (in the
        background, after the shard's last bytes are written)."""
        record: dict[str, Any] = {"split": self.split, "consumed": self.consumed, "skips": self._skips}
        if self._shard is not None:
            size = self._shard.end()
            record.update(shard=shard_name(self.split, self.next_index), index=self.next_index,
                          num_samples=self._count, bytes=size, sha256=None,
                          class_counts={str(k): v for k, v in sorted(self._class_counts.items())},
                          stats={"sum": self._sum, "sum2": self._sum2, "pixels": self._pixels})
            self.writes.submit(self._written, self._shard, self._file, self._path(""), record)
            self.next_index += 1
            self._shard = None
        elif self._skips:
            self.writes.submit(self.seals.submit, self.journal.append, record)
        self._reset()

    def _written(self, shard: TarShard, file: Any, stem: Path, record: dict[str, Any]) -> None:
        """In the writing thread, after the shard's last bytes: its hash, then on to the sealing thread."""
        record["sha256"] = shard.digest()
        self.seals.submit(self._seal, file, stem, shard.index_text(), record)

    def _seal(self, file: Any, stem: Path, index_text: str, record: dict[str, Any]) -> None:
        """In the sealing thread (so the disk's pace never stalls the writing): fsync, .idx, rename, journal."""
        file.flush()
        os.fsync(file.fileno())
        file.close()
        index_tmp = stem.with_name(stem.name + ".idx.tmp")
        index_tmp.write_text(index_text)
        os.replace(index_tmp, stem.with_name(stem.name + ".idx"))
        os.replace(stem.with_name(stem.name + ".tar.tmp"), stem.with_name(stem.name + ".tar"))
        self.journal.append(record)

    def close(self) -> None:
        self._finish()
