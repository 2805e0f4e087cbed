"""A pack killed midway and re-run gives the same bytes as one that was never interrupted; so does any
number of workers; and re-running a finished pack changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardtool.synth import make_shapes
from tests.conftest import once_per_run

SHARDTOOL = Path(sys.executable).parent / "shardtool"
OPTIONS = ["--shard-size", "50", "--resize", "shorter:96", "--split", "val=0.1", "--json"]
SHARD_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def many_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 JPEGs of 160px: a pack that takes a few seconds and writes about 20 shards of 50."""
    return once_per_run(tmp_path_factory, "many-shapes",
                        lambda folder: make_shapes(folder / "shapes", per_class=250, size=160))


def command(source: Path, out: Path, workers: int = 2) -> list[str]:
    return [str(SHARDTOOL), "pack", str(source), str(out), *OPTIONS, "--workers", str(workers)]


def shard_digests(out: Path) -> dict[str, str]:
    """Every .tar and .idx in OUT (whatever the manifest says) -> sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def manifest_digests(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "dataset.json").read_text())
    return {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


def journaled_shards(out: Path) -> list[str]:
    """Shards a killed run had finished and journaled: a resumed run must keep them, not redo them."""
    journal = out / ".shardtool" / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")[:-1] if journal.exists() else []  # a cut last line is not kept
    records = [json.loads(line) for line in lines]
    return [record["shard"] + ".tar" for record in records if "shard" in record]


def kill_after_shards(cmd: list[str], out: Path, shards: int, env: dict[str, str] | None = None) -> int:
    """Start `cmd` in its own process group, SIGKILL the group once `shards` .tar exist; the exit status."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    deadline = time.monotonic() + SHARD_TIMEOUT
    try:
        while not (out.is_dir() and len(list(out.glob("*.tar"))) >= shards):
            if process.poll() is not None:
                pytest.fail(f"pack ended ({process.returncode}) before {shards} shards: {process.stderr.read()!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {shards} shards in {out} after {SHARD_TIMEOUT} s")
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGKILL)  # the workers too
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
    return process.returncode


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def clean(many_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pack, never interrupted."""
    def make(folder: Path) -> Path:
        run(command(many_shapes, folder / "out"))
        return folder / "out"

    return once_per_run(tmp_path_factory, "many-shapes-packed", make)


@pytest.mark.parametrize("kills", [(1,), (10,), (1, 10)], ids=["after-1-shard", "after-10-shards", "twice"])
def test_killed_pack_resumes_to_the_same_bytes_as_an_uninterrupted_one(many_shapes, clean, tmp_path, kills):
    resumed = tmp_path / "resumed"
    for shards in kills:
        status = kill_after_shards(command(many_shapes, resumed), resumed, shards)

        assert status == -signal.SIGKILL
        assert not (resumed / "dataset.json").exists(), "the pack finished before it was killed: use more images"
    kept = {name: os.stat(resumed / name).st_ino for name in journaled_shards(resumed)}
    report = json.loads(run(command(many_shapes, resumed)).stdout)

    assert (report["seen"], report["written"], report["skipped"]) == (1000, 1000, 0)
    assert shard_digests(resumed) == shard_digests(clean)
    assert len(shard_digests(clean)) == 2 * len(manifest_digests(clean)) > 2 * 10  # a .tar and .idx per shard
    assert manifest_digests(resumed) == manifest_digests(clean)
    assert (resumed / "dataset.json").read_bytes() == (clean / "dataset.json").read_bytes()
    assert {name: os.stat(resumed / name).st_ino for name in kept} == kept  # finished shards were not redone
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in clean.iterdir())  # no .tmp left


def test_any_number_of_workers_gives_the_same_bytes(many_shapes, tmp_path, cli):
    outputs = []
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        result = cli(*command(many_shapes, out, workers)[1:])
        assert result.exit_code == 0, result.output
        outputs.append(out)

    assert shard_digests(outputs[0]) == shard_digests(outputs[1])
    assert len(shard_digests(outputs[0])) == 2 * len(manifest_digests(outputs[0])) > 2 * 10
    assert (outputs[0] / "dataset.json").read_bytes() == (outputs[1] / "dataset.json").read_bytes()


def test_rerunning_a_finished_pack_changes_nothing(shapes, tmp_path, cli):
    out = tmp_path / "out"
    args = ["pack", shapes, out, "--split", "val=0.25", "--shard-size", "10", "--workers", "0", "--json"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    shards = {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
              for p in out.iterdir() if p.suffix in (".tar", ".idx")}
    manifest = (out / "dataset.json").read_bytes()

    again = cli(*args)

    assert again.exit_code == 0, again.output
    assert json.loads(again.output) == json.loads(first.output)
    assert {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in out.iterdir() if p.suffix in (".tar", ".idx")} == shards
    assert (out / "dataset.json").read_bytes() == manifest
    assert len(shards) == 2 * 6  # 4 train + 2 val shards, untouched


def test_a_pack_to_a_file_url_publishes_the_local_pack(tmp_path, cli):
    """OUT as a URL (a shared folder as file://): staged, uploaded shard by shard, the manifest last."""
    source = make_shapes(tmp_path / "shapes", per_class=20, size=48)
    assert cli("pack", source, tmp_path / "local", "--shard-size", "16", "--workers", "0").exit_code == 0
    shared = tmp_path / "shared" / "shapes"
    done = cli("pack", source, f"file://{shared}", "--shard-size", "16", "--workers", "0", "--staging", tmp_path / "stage")
    assert done.exit_code == 0, done.output
    def files(out: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    assert files(shared) == files(tmp_path / "local") and len([n for n in files(shared) if n.endswith(".tar")]) == 5
    assert not list((tmp_path / "stage").glob("*.tar"))  # uploaded, then deleted from the staging folder
    verified = cli("verify", f"file://{shared}")
    assert verified.exit_code == 0 and verified.output.startswith("OK: 5 shards, 80 samples"), verified.output
