"""`pack --distributor ray` on a Ray cluster started here (127.0.0.1, 2 CPUs): the same bytes as a local pack
for class folders, a CSV manifest and a BSON dump; a worker process killed mid-task, a driver killed and
re-run, and a task that raises.

The cluster is one `ray start --head --block` per test process that runs these tests (its own port and
temp folder, stopped after the module); every pack is `shardtool pack` in a subprocess that joins it with
--ray-address, as a user's would.
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.pack_ray import ENV, Head
from shardtool.synth import make_shapes
from tests.test_bson import document, picture
from tests.test_resume import journaled_shards, kill_after_shards

pytest.importorskip("ray")

BIN = Path(sys.executable).parent
OPTIONS = ["--shard-size", "16", "--split", "val=0.2", "--resize", "shorter:48", "--json"]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs (benchmarks.pack_ray.Head); its address."""
    head = Head(2)
    yield head.address
    head.close()


def pack(source: Path | str, out: Path | str, *extra: str, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / "shardtool"), "pack", str(source), str(out), *OPTIONS, *extra],
                            capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def digests(out: Path) -> dict[str, str]:
    """Every file of a finished pack (shards, .idx, manifest, sidecars, rejects) -> sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three kinds of source, small: class folders, a CSV manifest of them, a BSON dump."""
    folder = tmp_path_factory.mktemp("ray-src")
    shapes = make_shapes(folder / "shapes", per_class=40, size=64)
    table = folder / "images.csv"
    with open(table, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "label"])
        for image in sorted(shapes.glob("*/*.jpg")):
            writer.writerow([image.relative_to(shapes).as_posix(), image.parent.name])
    dump = folder / "train.bson"
    dump.write_bytes(b"".join(document(i, 1000 + i % 5, [picture(i * 3 + k) for k in range(1 + i % 3)])
                              for i in range(120)))
    return {"folder": shapes, "csv": table, "bson": dump}


def extra_for(kind: str, sources: dict[str, Path]) -> list[str]:
    return ["--images", str(sources["folder"])] if kind == "csv" else []


@pytest.mark.parametrize("kind", ["folder", "csv", "bson"])
def test_a_ray_pack_is_byte_identical_to_a_local_one(cluster, sources, tmp_path, kind):
    extra = extra_for(kind, sources)
    pack(sources[kind], tmp_path / "local", *extra, "--workers", "2")
    pack(sources[kind], tmp_path / "ray", *extra, "--distributor", "ray", "--ray-address", cluster)
    local, ray = digests(tmp_path / "local"), digests(tmp_path / "ray")
    assert len([n for n in local if n.endswith(".tar")]) >= 3
    assert ray == local


def test_a_worker_killed_mid_task_is_retried_and_changes_nothing(cluster, sources, tmp_path):
    pack(sources["folder"], tmp_path / "local", "--workers", "0")
    marker = tmp_path / "killed-once"
    pack(sources["folder"], tmp_path / "ray", "--distributor", "ray", "--ray-address", cluster,
         env={"SHARDTOOL_TEST_FAULT": f"kill:2:{marker}"})
    assert marker.exists()  # task 2's worker process was SIGKILLed, and Ray ran the task again
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")


def test_a_task_that_raises_fails_the_pack_with_one_line_naming_it(cluster, sources, tmp_path):
    result = pack(sources["folder"], tmp_path / "ray", "--distributor", "ray", "--ray-address", cluster,
                  env={"SHARDTOOL_TEST_FAULT": "raise:1"}, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Ray task for 32 inputs from " in line and "ValueError: injected failure in task 1" in line
    assert not (tmp_path / "ray" / "dataset.json").exists()  # no manifest: the pack did not finish


def test_a_killed_driver_re_run_ends_identical_without_rewriting_finished_shards(cluster, tmp_path):
    source = make_shapes(tmp_path / "many", per_class=150, size=64)
    local = tmp_path / "local"
    pack(source, local, "--workers", "2")
    resumed = tmp_path / "resumed"
    command = [str(BIN / "shardtool"), "pack", str(source), str(resumed), *OPTIONS, "--distributor", "ray",
               "--ray-address", cluster]
    assert kill_after_shards(command, resumed, 3, ENV) == -signal.SIGKILL
    assert not (resumed / "dataset.json").exists(), "the pack finished before it was killed"
    kept = {name: os.stat(resumed / name).st_ino for name in journaled_shards(resumed)}
    assert kept
    pack(source, resumed, "--distributor", "ray", "--ray-address", cluster)
    assert digests(resumed) == digests(local)
    assert {name: os.stat(resumed / name).st_ino for name in kept} == kept  # finished shards were not redone


def test_a_ray_pack_to_s3_verifies_and_matches_the_local_pack(cluster, sources, s3_server, tmp_path):
    pack(sources["bson"], tmp_path / "local", "--workers", "0")
    staging = tmp_path / "staging"
    pack(sources["bson"], "s3://shards/bson", "--distributor", "ray", "--ray-address", cluster, "--staging",
         str(staging), env=s3_server)
    assert not list(staging.glob("*.tar"))  # every finished shard uploaded, then its local copy deleted
    verified = subprocess.run([str(BIN / "shardtool"), "verify", "s3://shards/bson", "--decode"], capture_output=True,
                              text=True, timeout=600, env={**ENV, **s3_server})
    assert verified.returncode == 0 and verified.stdout.startswith("OK: "), verified.stderr[-2000:]
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="test", secret="test")
    for path in fs.ls("shards/bson"):
        fs.get_file(path, str(fetched / Path(path).name))
    assert digests(fetched) == digests(tmp_path / "local")  # the published dataset is the local pack, byte for byte
    assert not [name for name in digests(fetched) if name.endswith(".tmp")]
