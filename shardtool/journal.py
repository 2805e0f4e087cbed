"""The resume journal: OUT/.shardtool/journal.jsonl, one line per finished shard (and per tail of skips),
each listing the digests of the pictures it accounts for (`pictures`, for the duplicate report: dedup.py).

The identity of the run (source + every option that changes the bytes) sits beside it in run.json;
a journal from a different run is never resumed. Only the resume point of each split is held in
memory; the manifest and rejects.jsonl are built by streaming the file, so a 12k-shard run costs
no more memory than a 10-shard one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_DIR = ".shardtool"


class Journal:
    def __init__(self, out: Path) -> None:
        self.folder = out / STATE_DIR
        self.path = self.folder / "journal.jsonl"
        self.spool_folder = self.folder / "spool"  # Runs on their way from the workers (sink.Run)
        self._points: dict[str, tuple[int, int]] = {}
        self._valid_bytes = 0
        for record in self.records():
            self._advance(record)

    def records(self) -> Iterator[dict[str, Any]]:
        """The complete lines, in order; a line cut by a kill ends the journal (its shard is redone)."""
        if not self.path.exists():
            return
        valid = 0
        with open(self.path, "rb") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    break
                valid += len(line)
                yield json.loads(line)
        self._valid_bytes = valid

    def _advance(self, record: dict[str, Any]) -> None:
        next_index, consumed = self._points.get(record["split"], (0, 0))
        if "index" in record:
            next_index = max(next_index, record["index"] + 1)
        self._points[record["split"]] = (next_index, max(consumed, record["consumed"]))

    def identity(self) -> dict[str, Any] | None:
        path = self.folder / "run.json"
        return json.loads(path.read_text()) if path.exists() else None

    def start(self, identity: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run.json").write_text(json.dumps(identity, sort_keys=True, indent=1))
        with open(self.path, "ab") as file:
            file.truncate(self._valid_bytes)  # drop a half-written last line

    def spool(self) -> Path:
        """spool_folder, emptied of anything a killed run left there."""
        self.drop_spool()
        self.spool_folder.mkdir(parents=True)
        return self.spool_folder

    def drop_spool(self) -> None:
        shutil.rmtree(self.spool_folder, ignore_errors=True)

    def resume_point(self, split: str) -> tuple[int, int]:
        """(next shard index, inputs of this split already accounted for)."""
        return self._points.get(split, (0, 0))

    def consumed(self) -> dict[str, int]:
        return {split: consumed for split, (_, consumed) in self._points.items()}

    def append(self, record: dict[str, Any]) -> None:
        """Not fsynced: the shard it names already is, so losing this line only means redoing that shard."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._advance(record)
