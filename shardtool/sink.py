"""Shard writing, one SplitSink per split: tmp file -> os.replace, its .idx, then a journal line.

Workers hand the writer Runs: a stretch of the source's items, in order, each sample already in its
final tar bytes, so the writer only cuts shards and appends. A shard exists for a later run only
once its journal line is written; a re-run with the same command skips the inputs those lines
account for and continues with the next shard index, so the result is byte-identical to an
uninterrupted run. A line also lists its pictures with the digests of their input bytes (and those
--dedup dropped), so the duplicate report and a resumed run's drops come from the journal alone.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from shardtool.background import Background
from shardtool.journal import Journal
from shardtool.sample import Item, Picture, Sample, Skip
from shardtool.tario import Members, TarShard, sample_chunks

SPOOL_BYTES = 256 << 10  # a Run with more tar bytes than this leaves its worker through a spool file
_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True)  # json.dumps with options builds one per call


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sample_members(sample: Sample, index: int | None) -> list[tuple[str, bytes]]:
    """image, class index (absent for unlabelled samples), metadata."""
    info = {"key": sample.key, "label": sample.label, "class": index, "group": sample.group,
            "source": sample.source, **sample.meta}
    label = [("cls", str(index).encode())] if index is not None else []
    return [(sample.ext or "jpg", sample.data or b""), *label, ("json", _JSON.encode(info).encode())]


class Encoded(NamedTuple):
    """A sample in a Run: its split, class index, and its tar members at data[start:start + size]."""

    split: str
    index: int | None
    start: int
    size: int
    members: Members
    stats: tuple[tuple[float, ...], tuple[float, ...], int] | None
    picture: Picture | None = None  # the digest of its input bytes and where it came from (dedup.py)


class Run:
    """Encoded samples and Skips of a stretch of the source, in order (every one with its split);
    the samples' tar bytes are back to back in `data`.

    A big Run crosses from a worker to the writer through a file in `spool`, not the pool's pipe:
    on our 2-core machine the pipe cost the writer 2.5 s per GB of BSON pictures (64 KB reads that
    each take the GIL, then two copies), a file the worker writes and the writer maps ~0.3 s.
    """

    def __init__(self, data: bytes | mmap.mmap, entries: list[Encoded | Skip], spool: str | None = None) -> None:
        self.data, self.entries, self.spool = data, entries, spool

    def stretches(self) -> Iterator[tuple[str, list[Encoded] | Skip]]:
        """(split, consecutive samples of that split, contiguous in data) or (split, one Skip), in order.
        (Entries dropped on a resume leave gaps in data: a stretch ends at a gap too.)"""
        samples: list[Encoded] = []
        for entry in self.entries:
            if samples and (isinstance(entry, Skip) or entry.split != samples[0].split
                            or entry.start != samples[-1].start + samples[-1].size):
                yield samples[0].split, samples
                samples = []
            if isinstance(entry, Skip):
                yield entry.split or "train", entry
            else:
                samples.append(entry)
        if samples:
            yield samples[0].split, samples

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.spool is None or len(self.data) <= SPOOL_BYTES:
            return Run, (self.data, self.entries)
        fd, path = tempfile.mkstemp(prefix="run-", dir=self.spool)
        with open(fd, "wb") as file:
            file.write(self.data)
        return _unspool, (path, self.entries)


def _unspool(path: str, entries: list[Encoded | Skip]) -> Run:
    """Mapped, not read: the shard writer hashes and writes straight from the file's pages, which count
    in our memory only from when it reaches them (freed, with the file, once the last piece is written)."""
    with open(path, "rb") as file:
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    os.unlink(path)
    return Run(data, entries)


def encode_run(items: Iterable[Item], classes: Mapping[str | None, int | None], spool: str | None = None,
               digests: Iterable[str | None] | None = None) -> Run:
    """In a worker: the tar members of every processed sample (each item has its split), as one Run;
    DIGESTS: each item's input digest (dedup.read_inputs), None where it has none."""
    chunks: list[bytes] = []
    entries: list[Encoded | Skip] = []
    start = 0
    for item, digest in zip(items, digests or itertools.repeat(None)):
        if isinstance(item, Skip):
            entries.append(item)
            continue
        index = classes[item.label]
        size, members = sample_chunks(item.key, sample_members(item, index), chunks)
        picture = Picture(digest, item.key, item.source, item.group) if digest else None
        entries.append(Encoded(item.split or "train", index, start, size, members, item.stats, picture))
        start += size
    return Run(b"".join(chunks), entries, spool)


class SplitSink:
    """Writes the samples of one split, in arrival order, into shards of bounded count and size."""

    def __init__(self, out: Path, split: str, journal: Journal, shard_size: int, shard_bytes: int | None,
                 writes: Background, seals: Background, publish: Callable[[Path, Path], None] | None = None) -> None:
        self.out, self.split, self.journal = out, split, journal
        self.publish = publish  # OUT is a URL: uploads a sealed shard and its .idx before they are journaled
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
        self._pictures: list[list[str]] = []  # journaled with the record: what the duplicate report reads
        self._class_counts: dict[int, int] = {}
        self._sum, self._sum2, self._pixels = [0.0] * 3, [0.0] * 3, 0
        self._measured = 0  # samples whose pixels the statistics include (not --verify header copies)

    def skip(self, skip: Skip) -> None:
        self._skips.append(skip.as_dict())
        if skip.digest:  # a picture --dedup dropped: the report still counts it
            self._pictures.append(Picture(skip.digest, skip.key, skip.source, skip.group).entry(skip.reason))
        self.consumed += 1

    def add(self, samples: list[Encoded], data: memoryview) -> None:
        """Consecutive samples of a Run (a stretch), whose bytes lie back to back in `data`: written a
        shard's worth at a time, as one piece."""
        i = 0
        while i < len(samples):
            if self._shard is None:
                self._file = open(self._path(".tar.tmp"), "wb")
                self._shard = TarShard(self._file, self.writes.submit)
            end = self._fitting(samples, i)
            if end == i:  # the next sample would take the shard past --shard-bytes
                self._finish()
                continue
            base = samples[i].start
            self._shard.add_many(data[base:samples[end - 1].start + samples[end - 1].size],
                                 [(sample.start - base, sample.members) for sample in samples[i:end]])
            for sample in samples[i:end]:
                if sample.picture is not None:
                    self._pictures.append(sample.picture.entry())
                if sample.index is not None:
                    self._class_counts[sample.index] = self._class_counts.get(sample.index, 0) + 1
                if sample.stats is not None:
                    total, squares, pixels = sample.stats
                    self._sum = [a + b for a, b in zip(self._sum, total)]
                    self._sum2 = [a + b for a, b in zip(self._sum2, squares)]
                    self._pixels += pixels
                    self._measured += 1
            self._count += end - i
            self.consumed += end - i
            i = end
            if self._count >= self.shard_size:
                self._finish()

    def _fitting(self, samples: list[Encoded], i: int) -> int:
        """The end of samples[i:] that goes into the open shard: up to --shard-size samples, and up to
        --shard-bytes (a shard's first sample always goes in, however big)."""
        end = min(len(samples), i + self.shard_size - self._count)
        if not self.shard_bytes:
            return end
        assert self._shard is not None
        written = self._shard.bytes_written
        for j in range(i, end):
            if written + samples[j].size > self.shard_bytes and (j > i or self._count):
                return j
            written += samples[j].size
        return end

    def _path(self, suffix: str) -> Path:
        return self.out / (shard_name(self.split, self.next_index) + suffix)

    def _finish(self) -> None:
        """Close the open shard (if any) and journal it with the skips since the last record (in the
        background, after the shard's last bytes are written)."""
        record: dict[str, Any] = {"split": self.split, "consumed": self.consumed, "skips": self._skips}
        if self._pictures:
            record["pictures"] = self._pictures
        if self._shard is not None:
            size = self._shard.end()
            record.update(shard=shard_name(self.split, self.next_index), index=self.next_index,
                          num_samples=self._count, bytes=size, sha256=None,
                          class_counts={str(k): v for k, v in sorted(self._class_counts.items())},
                          stats={"sum": self._sum, "sum2": self._sum2, "pixels": self._pixels,
                                 "images": self._measured})
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
        if self.publish is not None:
            self.publish(stem.with_name(stem.name + ".tar"), stem.with_name(stem.name + ".idx"))
        self.journal.append(record)

    def close(self) -> None:
        self._finish()
