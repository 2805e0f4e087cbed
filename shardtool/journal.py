"""The resume journal: OUT/.shardtool/journal.jsonl, one line per finished shard (and per tail of skips).

The identity of the run (source + every option that changes the bytes) sits beside it in run.json;
a journal from a different run is never resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_DIR = ".shardtool"


class Journal:
    def __init__(self, out: Path) -> None:
        self.folder = out / STATE_DIR
        self.path = self.folder / "journal.jsonl"
        self.records: list[dict[str, Any]] = []
        self._valid_bytes = 0
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    return  # a line cut by a kill: its shard is redone
                self.records.append(json.loads(line))
                self._valid_bytes += len(line)

    def identity(self) -> dict[str, Any] | None:
        path = self.folder / "run.json"
        return json.loads(path.read_text()) if path.exists() else None

    def start(self, identity: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run.json").write_text(json.dumps(identity, sort_keys=True, indent=1))
        with open(self.path, "ab") as file:
            file.truncate(self._valid_bytes)  # drop a half-written last line

    def resume_point(self, split: str) -> tuple[int, int]:
        """(next shard index, inputs of this split already accounted for)."""
        mine = [r for r in self.records if r["split"] == split]
        shards = [r["index"] for r in mine if "index" in r]
        return (max(shards) + 1 if shards else 0), max((r["consumed"] for r in mine), default=0)

    def consumed(self) -> dict[str, int]:
        return {split: self.resume_point(split)[1] for split in {r["split"] for r in self.records}}

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.records.append(record)
