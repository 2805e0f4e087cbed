"""Duplicate-aware packing (--dedup): pictures with the same bytes, found within a split and across splits,
reported in the manifest (report.duplicates) and in full in OUT/duplicates.json, and dropped on request.

    worker   read_inputs: the one read of each input's bytes (a file, a BSON picture, a pixel row) is hashed
             where it happens: sha256, its first 128 bits (the first 32 hex digits `sha256sum FILE` prints)
    writer   Dedup.check(run), before any byte of the Run is written: drop-within turns a picture whose bytes
             its split already has into a `duplicate` skip (the first of each group stays), drop-leaks a
             val/test picture whose bytes train has into a `leak` skip (train keeps all), drop-both does both
    journal  each record lists the pictures it accounts for, written or dropped (sample.Picture.entry)
    finish   find_duplicates(records) -> the counts and every group, from the journal alone

Order. drop-within needs only what came before in the same split, and the writer sees each split's pictures
in the pack order whatever the workers do, so "the first of each group" is the same in every run. drop-leaks
needs all of train's digests before the first held-out picture is written, so the plan runs in two phases
(phases(), in_phase()): train's items, then the other splits'. A split's items keep their order, so each
shard has the bytes a keep pack writes, less the dropped pictures. Class folders and CSVs are listed in memory
for it (they are anyway with the default --order shuffled); a BSON dump is read twice, each pass checking,
encoding and hashing only its own phase's pictures (the other phase's are decoded from BSON and dropped).

Resume. The digests live in the journal lines of the shards they describe, so a resumed pack rebuilds the
writer's state from them (Dedup.restore) and decides as an uninterrupted one would; the report is computed
from the journal at the end, so it is the same too. Memory: with a drop mode the writer keeps 16 bytes per
picture it tracks (DigestSet); the report keeps 16 bytes per picture for one sort, then only the duplicates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from shardtool.config import DEDUP_MODES
from shardtool.manifest import split_order, write_json_atomic
from shardtool.process.checks import load_bytes
from shardtool.sample import Item, Picture, Sample, Skip
from shardtool.sink import Encoded, Run

MODES = DEDUP_MODES  # keep (report only), drop-within, drop-leaks, drop-both
DROPPED = ("duplicate", "leak")  # the skip reasons --dedup gives: asked for, so not held against --max-skip-fraction
TRAIN_NAMES = ("train", "training")  # the split drop-leaks compares the others with (any case), never drops from
NAME = "duplicates.json"
HASH = "sha256 of each input's bytes, first 128 bits"
EXAMPLES = 5
MERGE = 1 << 16  # digests a DigestSet holds in a Python set before merging them into its sorted array


def digest(data: bytes) -> str:
    """sha256 rather than blake2b: with the CPU's SHA extensions it hashed 1.9 GB/s here, blake2b 1.0."""
    return hashlib.sha256(data).hexdigest()[:32]


def read_inputs(items: list[Item], max_pixels: int) -> tuple[list[Item], list[str | None]]:
    """In a worker: each sample with its bytes loaded (read from its file when the reader gave a path: the
    processor then has them and reads nothing again), and the digest of those bytes; Skips pass as they are.
    Bytes the reader gave (a BSON picture, a pixel row) are hashed as they are: the processor checks them."""
    loaded: list[Item] = []
    for item in items:
        if isinstance(item, Sample) and item.data is None:  # a path: read here, once
            data = load_bytes(item, max_pixels)
            item = data if isinstance(data, Skip) else item.with_(data=data, path=None)
        loaded.append(item)
    return loaded, [digest(item.data or b"") if isinstance(item, Sample) else None for item in loaded]


def phases(mode: str) -> list[str | None]:
    """The passes over the plan: one, or with drop-leaks train first and then the held-out splits."""
    return ["train", "held-out"] if mode in ("drop-leaks", "drop-both") else [None]


def in_phase(item: Item, phase: str | None) -> bool:
    return phase is None or is_train(item.split or "train") == (phase == "train")


class DigestSet:
    """16-byte digests at 16 bytes each: a sorted numpy array, plus the newest in a set until they are merged
    into it (a Python set alone costs ~80 bytes a digest: 1 GB for Cdiscount's 12.4 million pictures)."""

    def __init__(self, merge: int = MERGE) -> None:
        self._sorted = np.empty(0, "S16")
        self._recent: set[bytes] = set()
        self._merge = merge

    def __contains__(self, raw: bytes) -> bool:
        if raw in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, raw))
        # numpy hands out S16 items without their trailing NUL bytes; the stored 16 bytes are exact
        return i < len(self._sorted) and self._sorted[i] == raw.rstrip(b"\0")

    def add(self, raw: bytes) -> bool:
        """True if RAW is new (and now held)."""
        if raw in self:
            return False
        self._recent.add(raw)
        if len(self._recent) >= max(self._merge, len(self._sorted) // 8):  # merges stay O(n) amortised
            self._sorted = np.union1d(self._sorted, np.array(list(self._recent), "S16"))
            self._recent.clear()
        return True


def is_train(split: str) -> bool:
    """The split drop-leaks compares the others with and never drops from: train (Train, training...)."""
    return split.lower() in TRAIN_NAMES


class Dedup:
    """The writer's side of --dedup MODE: which pictures of a Run to drop, from the digests seen before."""

    def __init__(self, mode: str) -> None:
        self.within = mode in ("drop-within", "drop-both")
        self.leaks = mode in ("drop-leaks", "drop-both")
        self.seen: dict[str, DigestSet] = {}  # per split: every split with drop-within, train's with drop-leaks

    def _tracks(self, split: str) -> bool:
        return self.within or (self.leaks and is_train(split))

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """What a resumed pack's journal says was seen already (written, or dropped as a duplicate)."""
        if not (self.within or self.leaks):
            return
        for record in records:
            if self._tracks(record["split"]):
                seen = self.seen.setdefault(record["split"], DigestSet())
                for entry in record.get("pictures", ()):
                    if Picture.parse(entry)[1] != "leak":
                        seen.add(bytes.fromhex(entry[0]))

    def check(self, run: Run) -> None:
        """Turn the Run's samples that MODE drops into Skips (their bytes stay in run.data, unwritten)."""
        if not (self.within or self.leaks):
            return
        for i, entry in enumerate(run.entries):
            if isinstance(entry, Encoded) and entry.picture is not None:
                reason, where = self._reason(entry.split, bytes.fromhex(entry.picture.digest))
                if reason:
                    run.entries[i] = dropped(entry.picture, entry.split, reason, where)

    def _reason(self, split: str, raw: bytes) -> tuple[str, str]:
        """(why the picture is dropped, the split that has its bytes already), ("", "") to keep it."""
        if self.leaks and not is_train(split):
            for other, seen in self.seen.items():
                if is_train(other) and raw in seen:
                    return "leak", other
        if self._tracks(split) and not self.seen.setdefault(split, DigestSet()).add(raw) and self.within:
            return "duplicate", split
        return "", ""


def dropped(picture: Picture, split: str, reason: str, where: str) -> Skip:
    """The Skip of a picture --dedup dropped, with its digest (the sink journals it: the report counts it)."""
    earlier = "a picture of" if reason == "leak" else "an earlier picture of"
    detail = f"same bytes as {earlier} {where} (sha256 {picture.digest[:12]}...)"
    return Skip(reason, picture.key, picture.source, detail, picture.group, split, picture.digest)


def _pictures(records: Iterable[dict[str, Any]]) -> Iterator[tuple[str, int, Picture, str]]:
    """(split, the picture's place in its split, the picture, why it was dropped or "") over the journal."""
    counts: dict[str, int] = {}
    for record in records:
        split = record["split"]
        for entry in record.get("pictures", ()):
            picture, reason = Picture.parse(entry)
            counts[split] = counts.get(split, -1) + 1
            yield split, counts[split], picture, reason


def repeated_digests(records: Iterable[dict[str, Any]]) -> tuple[set[str], list[str]]:
    """(the digests held by more than one picture, every split with pictures): one sort of 16 bytes each."""
    raw, splits = bytearray(), set()
    for split, _, picture, _ in _pictures(records):
        raw += bytes.fromhex(picture.digest)
        splits.add(split)
    digests = np.frombuffer(raw, "S16")  # (a bytearray's: writable, sorted in place)
    digests.sort()
    rows = digests.view(np.uint8).reshape(-1, 16)
    repeats = rows[1:][digests[1:] == digests[:-1]]
    return {bytes(row).hex() for row in repeats}, sorted(splits, key=lambda split: split_order((split, None)))


def duplicate_groups(records: Iterable[dict[str, Any]], repeated: set[str]) -> list[dict[str, Any]]:
    """Every group of pictures with the same bytes, its pictures in split order then pack order, the groups in
    the order of their first pictures: the same however the journal's records of different splits interleave."""
    members: dict[str, list[tuple[tuple[int, str], int, dict[str, str]]]] = {}
    for split, place, picture, reason in _pictures(records):
        if picture.digest in repeated:
            shown = {"split": split, "key": picture.key, "source": picture.source, "group": picture.group}
            members.setdefault(picture.digest, []).append((split_order((split, None)), place,
                                                           shown | ({"dropped": reason} if reason else {})))
    groups = [(digest, sorted(found, key=lambda member: member[:2])) for digest, found in members.items()]
    groups.sort(key=lambda group: group[1][0][:2])  # (each picture has its own place in its split)
    return [{"digest": digest, "pictures": [member[2] for member in found]} for digest, found in groups]


def summarize(groups: list[dict[str, Any]], splits: list[str]) -> dict[str, Any]:
    """The counts of report.duplicates (docs/packing-duplicates.md) from the groups."""
    within = {split: {"groups": 0, "copies": 0, "other_groups": 0, "left": 0} for split in splits}
    across = {pair: {"groups": 0, "pictures": 0, "other_groups": 0, "left": 0} for pair in combinations(splits, 2)}
    dropped: dict[str, int] = {reason: 0 for reason in DROPPED}
    for group in groups:
        by_split: dict[str, list[dict[str, str]]] = {}
        for picture in group["pictures"]:
            by_split.setdefault(picture["split"], []).append(picture)
            if picture.get("dropped"):
                dropped[picture["dropped"]] += 1
        _count_within(within, by_split)
        _count_across(across, by_split)
    examples = [[f"{p['split']}:{p['key']}" for p in group["pictures"]] for group in groups[:EXAMPLES]]
    return {"hash": HASH, "groups": len(groups), "pictures": sum(len(g["pictures"]) for g in groups),
            "exact_within": within, "exact_across": {f"{a}/{b}": counts for (a, b), counts in across.items()},
            "dropped": dropped, "examples": examples, "file": NAME}


def _count_within(within: dict[str, dict[str, int]], by_split: dict[str, list[dict[str, str]]]) -> None:
    """Per split: the groups with more than one picture in it, their pictures past the first of each, the
    groups whose pictures there belong to more than one product group, and the copies --dedup left."""
    for split, pictures in by_split.items():
        if len(pictures) > 1:
            counts = within[split]
            counts["groups"] += 1
            counts["copies"] += len(pictures) - 1
            counts["other_groups"] += len({p["group"] for p in pictures}) > 1
            counts["left"] += max(sum("dropped" not in p for p in pictures) - 1, 0)


def _count_across(across: dict[tuple[str, str], dict[str, int]], by_split: dict[str, list[dict[str, str]]]) -> None:
    """Per pair of splits: the groups in both, the second split's pictures in them (what drop-leaks drops when
    the first is train), the groups whose pictures in the two splits share no product group, and the second
    split's pictures that --dedup left while the first split kept one of the group."""
    for (first, second), counts in across.items():
        if first in by_split and second in by_split:
            counts["groups"] += 1
            counts["pictures"] += len(by_split[second])
            counts["other_groups"] += not {p["group"] for p in by_split[first]} & {p["group"] for p in by_split[second]}
            if any("dropped" not in p for p in by_split[first]):
                counts["left"] += sum("dropped" not in p for p in by_split[second])


def find_duplicates(records: Callable[[], Iterable[dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report.duplicates, every group) from the journal's records (a callable: they are streamed twice)."""
    repeated, splits = repeated_digests(records())
    groups = duplicate_groups(records(), repeated) if repeated else []
    return summarize(groups, splits), groups


def write_duplicates(out: Path, groups: list[dict[str, Any]]) -> None:
    """OUT/duplicates.json, whole or not at all (before the manifest, which names it)."""
    write_json_atomic(out / NAME, {"hash": HASH, "groups": groups})
