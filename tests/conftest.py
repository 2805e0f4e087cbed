"""Shared fixtures: the real datasets (skipped when absent), a generated shapes dataset, the CLI."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from shardtool.cli import main
from shardtool.synth import make_shapes


T = TypeVar("T")


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], T]) -> T:
    """Session data built once per test run, not once in each pytest-xdist worker that needs it (make test runs
    two): the file-lock pattern of xdist's docs. MAKE(FOLDER) builds into the empty FOLDER and returns a
    picklable value, which every worker gets; the tests that share it only read it."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: the fixture's own scope is enough
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # this run's, above the workers' own folders
    folder, value = root / name, root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if not value.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose MAKE failed left
            folder.mkdir()
            value.write_bytes(pickle.dumps(make(folder)))
        return pickle.loads(value.read_bytes())


def real_data_root() -> Path | None:
    root = os.environ.get("SHARDTOOL_REAL_DATA")
    if root and Path(root).is_dir():
        return Path(root)
    return None


@pytest.fixture
def real_data() -> Path:
    """../shared/data (via SHARDTOOL_REAL_DATA); the test is skipped when it is not there."""
    root = real_data_root()
    if root is None:
        pytest.skip("real data not available: set SHARDTOOL_REAL_DATA to the shared/data folder")
    return root


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated class-folder dataset: 4 classes x 12 JPEGs of 64x64."""
    return make_shapes(tmp_path_factory.mktemp("shapes") / "shapes", per_class=12, size=64)


def run_cli(*args: str | os.PathLike[str]) -> Result:
    """Run `shardtool ARGS...` in-process; returns click's Result (exit_code, output, exception)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory: pytest.TempPathFactory):
    """A probe checkpoint on generated shapes (tests/models.py)."""
    from tests.models import shapes_checkpoint

    return once_per_run(tmp_path_factory, "shapes-model", shapes_checkpoint)


@pytest.fixture(scope="session")
def shapes_onnx(shapes_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """shapes_model `trainer export`ed to ONNX, its parity checked on the val split: (the file, --json's output)."""
    from tests.models import trainer

    def make(folder: Path) -> tuple[Path, dict[str, Any]]:
        done = trainer("export", shapes_model.ckpt, folder / "model.onnx", "--check-data", shapes_model.data,
                       "--split", "val", "--json")
        assert done.returncode == 0, done.stderr
        return folder / "model.onnx", json.loads(done.stdout)

    return once_per_run(tmp_path_factory, "shapes-onnx", make)


@pytest.fixture(scope="session")
def clothing_model(tmp_path_factory: pytest.TempPathFactory):
    """A probe checkpoint on 12 images per class of clothing-small (skipped without the real data)."""
    from tests.models import clothing_checkpoint

    root = real_data_root()
    if root is None:
        pytest.skip("real data not available: set SHARDTOOL_REAL_DATA to the shared/data folder")
    return once_per_run(tmp_path_factory, "clothing-model", lambda folder: clothing_checkpoint(root, folder))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist (make test: -n 2), a worker hands what its tests read back to the controller."""
    from tests.readback import FIGURES, READBACK

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["readback"] = json.dumps(READBACK)
        session.config.workeroutput["figures"] = json.dumps(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: merge a finished worker's read-back counts into this process's."""
    from tests.readback import FIGURES, READBACK

    output = getattr(node, "workeroutput", {})
    for tool, splits in json.loads(output.get("readback", "{}")).items():
        READBACK.setdefault(tool, {}).update(splits)
    for section, lines in json.loads(output.get("figures", "{}")).items():
        FIGURES.setdefault(section, []).extend(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Samples each outside reader read from our shards, per split: CI's log shows it without -s."""
    from tests.readback import FIGURES, READBACK

    for section, lines in sorted(FIGURES.items()):
        terminalreporter.section(section)
        for line in sorted(lines):
            terminalreporter.write_line(line)
    if READBACK:
        terminalreporter.section("shards read back by other tools (samples per split)")
        for tool, splits in sorted(READBACK.items()):
            terminalreporter.write_line(f"{tool}: " + ", ".join(f"{s} {n}" for s, n in splits.items()))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with an empty bucket `shards`; the environment variables that point
    boto (s3fs, the trainer, shardtool) at it. Skipped without moto and s3fs."""
    pytest.importorskip("s3fs")
    moto = pytest.importorskip("moto.server")
    import boto3

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="shards")
    yield env
    server.stop()
