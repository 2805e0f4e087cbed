"""Hostile but realistic inputs (issue 22): special files, symlink loops, bare CRs, duplicate columns,
labels that are not labels, folders named like images, and a pickle passed off as a checkpoint.

Each input ends as a counted skip with its reason, an ignored entry the report names, or a one-line
error; every finished pack accounts for seen == written + skipped. Nothing may hang: the tests that
meet a FIFO carry a timeout, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import fractions
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import bson  # pymongo's
import pytest

from tests.shards import read_shards
from tests.test_bad_input import assert_config_error, jpeg_bytes, read_rejects


def class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{i}.jpg").write_bytes(jpeg_bytes(seed))
            seed += 1
    return root


def pack_all(cli, source: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Pack in-process (a FIFO would block here, where the test's timeout can stop it); the manifest."""
    result = cli("pack", source, out, "--workers", "0", "--max-skip-fraction", "1", *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "dataset.json").read_text())


def counts_of(manifest: dict[str, Any]) -> dict[str, int]:
    return {reason: entry["count"] for reason, entry in manifest["report"]["skips"].items()}


def class_names(manifest: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in manifest["classes"]]


def ignored_of(manifest: dict[str, Any]) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in manifest["report"]["ignored"]["examples"]}


def assert_accounted(manifest: dict[str, Any], seen: int, written: int) -> None:
    report = manifest["report"]
    assert (report["seen"], report["written"], report["skipped"]) == (seen, written, seen - written)


# --- 1. only regular files are opened -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fifo_socket_and_device_in_class_folders_are_counted_skips(tmp_path, cli, monkeypatch):
    source = class_folders(tmp_path / "src", {"cat": 3, "dog": 3})
    os.mkfifo(source / "cat" / "x.jpg")
    (source / "cat" / "null.jpg").symlink_to(os.devnull)
    monkeypatch.chdir(source / "dog")  # a short relative name: socket paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.png")
        manifest = pack_all(cli, source, tmp_path / "out")
    assert counts_of(manifest) == {"not_a_regular_file": 3}
    assert_accounted(manifest, seen=9, written=6)
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert details == {"cat/x.jpg": "a FIFO (named pipe): only regular files are read",
                       "cat/null.jpg": "a character device: only regular files are read",
                       "dog/s.png": "a socket: only regular files are read"}
    assert class_names(manifest) == ["cat", "dog"]


@pytest.mark.timeout(30)
def test_csv_rows_pointing_at_a_fifo_or_a_device_are_counted_skips(tmp_path, cli):
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    os.mkfifo(tmp_path / "imgs" / "pipe.jpg")
    rows = [f"imgs/{i}.jpg,{'ab'[i % 2]}" for i in range(4)] + ["imgs/pipe.jpg,a", f"{os.devnull},b"]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    manifest = pack_all(cli, tmp_path / "list.csv", tmp_path / "out")
    assert counts_of(manifest) == {"not_a_regular_file": 2}
    assert_accounted(manifest, seen=6, written=4)
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert details == {"list.csv:6": "a FIFO (named pipe): only regular files are read",
                       "list.csv:7": "a character device: only regular files are read"}
