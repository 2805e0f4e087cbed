"""Training data over a network that fails: every sample of the epoch exactly once, or one clear error in
bounded time, never a hang (trainer/remote.py, trainer/cache.py).

A FaultServer (tests/faultserver.py) on 127.0.0.1 serves the packed shapes and breaks requests on demand;
each test compares the keys (and pixels) the loader delivers over HTTP with the local read of the same
shards. Over S3, moto's server on 127.0.0.1 stands in for the bucket.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.faultserver import FAULTS, FaultServer
from tests.readback import record_figure
from trainer import remote as remote_module
from trainer.data import LoaderSpec
from trainer.data.torch import TorchLoader
from trainer.dataset import open_dataset
from trainer.remote import Remote

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMEOUT = 1.0  # seconds of silence before a request is retried, in these tests
QUICK = Remote(timeout=TIMEOUT, connect_timeout=TIMEOUT, retries=3, backoff=0.05)
FAULT_SECTION = "remote reads against a failing server (tests/test_remote.py)"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 30 shapes, 10 samples a shard: train ~90 samples (split by hash) in 9 shards, val ~30."""
    from shardtool.synth import make_shapes

    source = make_shapes(tmp_path_factory.mktemp("remote-src") / "shapes", per_class=30, size=48)
    out = tmp_path_factory.mktemp("remote") / "shards"
    result = run_cli("pack", source, out, "--split", "val=0.25", "--shard-size", "10", "--workers", "0")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def server(packed: Path):
    with FaultServer(packed) as running:
        yield running


@dataclass
class Epoch:
    keys: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    io: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def read_epoch(data: str | Path, remote: Remote = QUICK, *, split: str = "train", workers: int = 0,
               **changes: object) -> Epoch:
    """One training epoch (seed 0, epoch 1) as the loader delivers it."""
    dataset = open_dataset(str(data), remote)
    spec = LoaderSpec(shards=tuple(dataset.shards(split)), batch_size=8, image_size=32, mean=MEAN, std=STD,
                      train=split == "train", workers=workers, remote=remote, on_corrupt="skip")
    loader = TorchLoader(replace(spec, **changes))
    epoch = Epoch()
    start = time.perf_counter()
    for batch in loader.epoch(1):
        epoch.keys += batch.keys
        epoch.images.append(batch.images)
        epoch.skipped += batch.skipped
        for name, count in batch.io.items():
            epoch.io[name] = epoch.io.get(name, 0) + count
    epoch.seconds = time.perf_counter() - start
    return epoch


@pytest.fixture(scope="module")
def local(packed: Path) -> Epoch:
    epoch = read_epoch(packed)
    assert len(epoch.keys) == open_dataset(str(packed)).num_samples("train") > 80
    return epoch


def same_epoch(got: Epoch, want: Epoch) -> None:
    assert not got.skipped, got.skipped[:3]
    assert got.keys == want.keys and len(set(got.keys)) == len(got.keys)  # every sample once, in the same order
    assert all(torch.equal(a, b) for a, b in zip(got.images, want.images, strict=True))  # the same bytes


def test_an_http_epoch_is_the_local_epoch(packed: Path, server: FaultServer) -> None:
    over_http = read_epoch(server.url, workers=2)
    same_epoch(over_http, read_epoch(packed, workers=2))
    assert not over_http.io.get("retries")
    ranges = [r for path, r, _ in server.log.requests if path.endswith(".tar")]
    assert ranges and all(r.startswith("bytes=") for r in ranges)  # samples by byte range, not whole shards


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_is_recovered_with_every_sample_once(server: FaultServer, local: Epoch, fault: str) -> None:
    server.inject(fault, times=3)
    got = read_epoch(server.url)
    same_epoch(got, local)
    faulted = [f for _, _, f in server.log.requests if f]
    assert faulted == [fault] * 3
    if fault == "ignore-range":  # read from byte 0, the bytes before the range dropped: no retry needed
        assert not got.io.get("retries")
    else:
        assert got.io["retries"] == 3
    if fault in ("drop", "stall", "short"):  # half a body arrived: the rest was asked for with a Range
        assert got.io["resumed"] == 3
    record_figure(FAULT_SECTION, f"{fault} x3, recovered: every sample once in {got.seconds:.2f} s (local "
                  f"{local.seconds:.2f} s), retries {got.io.get('retries', 0)}, resumed {got.io.get('resumed', 0)}")


@pytest.mark.parametrize("fault", ["drop", "503", "stall", "short"])
def test_a_fault_that_persists_fails_with_one_line_in_bounded_time(server: FaultServer, fault: str) -> None:
    """Retries run out (1 retry): the read fails naming shard and byte range; --on-corrupt fail stops on it."""
    server.inject(fault, times=None, match="train-000003.tar")
    once = replace(QUICK, retries=1)
    start = time.perf_counter()
    got = read_epoch(server.url, once)
    first = got.skipped[0]
    took = time.perf_counter() - start
    assert "train-000003.tar" in first[0] and "train-000003.tar bytes " in first[1] and "gave up after 2 tries" in first[1]
    assert "\n" not in first[1]
    # two attempts of at most TIMEOUT each (stall) plus backoff; the rest of the epoch reads normally
    assert took < 2 * TIMEOUT + 3, took
    record_figure(FAULT_SECTION, f"{fault} on every request of one shard, 1 retry: failed after {took:.2f} s "
                                 f"(--timeout {TIMEOUT:g}): {first[1]}")


def test_skip_counts_exactly_the_samples_a_failed_shard_lost(server: FaultServer, local: Epoch) -> None:
    server.inject("503", times=None, match="train-000003.tar")
    got = read_epoch(server.url, replace(QUICK, retries=1))
    lost = {key for key in local.keys if key not in got.keys}
    assert len(got.keys) == len(set(got.keys)) == len(local.keys) - 10 and len(lost) == 10  # one shard of 10
    assert len(got.skipped) == 10  # each lost sample counted once
    assert [k for k in local.keys if k not in lost] == got.keys  # the others in their places
    record_figure(FAULT_SECTION, f"503 on every request of one shard, --on-corrupt skip: {len(got.skipped)} samples "
                                 f"lost and counted, {len(got.keys)} delivered")


def test_the_cache_serves_checked_copies_and_fetches_a_corrupt_one_again(packed: Path, server: FaultServer,
                                                                         local: Epoch, tmp_path: Path) -> None:
    cached = replace(QUICK, cache=str(tmp_path / "cache"))
    cold = read_epoch(server.url, cached, workers=2)
    same_epoch(cold, read_epoch(packed, workers=2))
    files = sorted((tmp_path / "cache").glob("*/*"))
    assert len([f for f in files if f.suffix == ".tar"]) == 9 and not [f for f in files if ".part" in f.name]
    for tar in (f for f in files if f.suffix == ".tar"):
        assert tar.read_bytes() == (packed / tar.name).read_bytes()
    fetched = len([p for p, _, _ in server.log.requests if p.endswith(".tar")])
    assert fetched == 9  # whole shards, once each

    warm = read_epoch(server.url, cached)
    same_epoch(warm, local)
    assert len([p for p, _, _ in server.log.requests if p.endswith(".tar")]) == 9  # nothing fetched again

    victim = next(f for f in files if f.suffix == ".tar")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot in the middle of an image
    victim.write_bytes(bytes(data))
    before = remote_module.COUNTS["cache_corrupt"]
    again = read_epoch(server.url, cached)
    same_epoch(again, local)  # never trained on the corrupt copy
    assert remote_module.COUNTS["cache_corrupt"] == before + 1
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == hashlib.sha256((packed / victim.name).read_bytes()).hexdigest()


def test_the_cache_keeps_to_its_size_by_evicting_the_least_recently_used(server: FaultServer, local: Epoch,
                                                                         packed: Path, tmp_path: Path) -> None:
    shard = (packed / "train-000000.tar").stat().st_size
    capped = replace(QUICK, cache=str(tmp_path / "cache"), cache_gb=3.5 * shard / 1e9)
    got = read_epoch(server.url, capped)
    same_epoch(got, local)
    held = sum(f.stat().st_size for f in (tmp_path / "cache").glob("*/*"))
    assert held <= 3.5 * shard, (held, shard)
    assert got.io.get("cache_evicted", 0) >= 5


def test_a_remote_manifest_that_is_not_there_is_one_line(server: FaultServer) -> None:
    from shardtool.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        open_dataset(server.url + "missing/", QUICK)
    assert str(caught.value) == f"cannot read {server.url}missing/dataset.json: HTTP 404"


def test_an_epoch_over_s3_is_the_local_epoch(packed: Path, s3_server: dict[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    for file in (f for f in packed.iterdir() if f.is_file()):
        s3.upload_file(str(file), "shards", f"shapes/{file.name}")
    got = read_epoch("s3://shards/shapes/", workers=2)
    same_epoch(got, read_epoch(packed, workers=2))


@pytest.mark.dali
def test_the_dali_loader_reads_urls_through_the_cache(packed: Path, server: FaultServer, tmp_path: Path) -> None:
    from shardtool.errors import ConfigError
    from trainer.data import dali_available, make_loader

    if not dali_available():
        pytest.skip("nvidia-dali is not installed")

    def dali_epoch(data: str | Path, remote: Remote) -> list:
        dataset = open_dataset(str(data), remote)
        spec = LoaderSpec(shards=tuple(dataset.shards("train")), batch_size=8, image_size=32, mean=MEAN, std=STD,
                          train=True, workers=1, remote=remote)
        return list(make_loader(spec, "dali").epoch(1))

    with pytest.raises(ConfigError, match="--loader dali reads shards from local files: give URL DATA a --cache DIR"):
        dali_epoch(server.url, QUICK)
    server.inject("drop", times=2)
    over_http = dali_epoch(server.url, replace(QUICK, cache=str(tmp_path / "cache")))
    local = dali_epoch(packed, QUICK)
    assert [b.keys for b in over_http] == [b.keys for b in local]
    assert all(torch.equal(a.images, b.images) for a, b in zip(over_http, local, strict=True))


def test_auto_takes_the_torch_loader_for_urls_without_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU box `--loader auto` means DALI, which reads local files only: URL DATA without --cache gets the
    torch loader instead of an error (and fit records that as what auto resolved to)."""
    import trainer.data as data

    monkeypatch.setattr(data, "dali_available", lambda: True)
    assert data.resolve_backend("auto", "cuda:0") == "dali"
    assert data.resolve_backend("auto", "cuda:0", torch_only=True) == "torch"
    assert data.resolve_backend("dali", "cuda:0", torch_only=True) == "dali"  # asked for: local_shards says why not
