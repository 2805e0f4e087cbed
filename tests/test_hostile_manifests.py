"""Shards and manifests that are not what they claim (issue 36): labels the manifest does not know, class lists
that are empty or short, shard paths that leave the dataset folder, keys and members that repeat, and remote
bodies that never end. Each is a counted skip with its reason or one line, never a traceback or a leak."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from shardtool.errors import ConfigError
from shardtool.manifest import NAME, load_manifest
from shardtool.tario import TarShard
from tests.conftest import run_cli
from tests.faultserver import FaultServer
from trainer.data import LoaderSpec
from trainer.data.torch import TorchLoader
from trainer.dataset import open_dataset
from trainer.remote import Remote, RemoteError, fetch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUICK = Remote(timeout=1.0, connect_timeout=1.0, retries=1, backoff=0.01)
SECRET = "root:x:0:0:the-secret-line:/root:/bin/bash"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 3 shapes, 4 samples a shard, all in train."""
    from shardtool.synth import make_shapes

    source = make_shapes(tmp_path_factory.mktemp("hostile-src") / "shapes", per_class=3, size=32)
    out = tmp_path_factory.mktemp("hostile") / "shards"
    result = run_cli("pack", source, out, "--shard-size", "4", "--workers", "0")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "copy"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / NAME).read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / NAME).write_text(json.dumps(manifest))


def first_shard(folder: Path) -> dict:
    return manifest_of(folder)["splits"]["train"]["shards"][0]


def rewrite_shard(folder: Path, name: str, labels: list[bytes | None]) -> list[str]:
    """The shard's samples again, the i-th sample's .cls replaced by labels[i] (None: no .cls); its .idx
    rewritten to match. Returns the keys in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(folder / name) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    with open(folder / name, "wb") as file:
        shard = TarShard(file)
        for (key, members), label in zip(samples.items(), labels + [b"keep"] * len(samples)):
            if label != b"keep":
                members.pop("cls")
                if label is not None:
                    members["cls"] = label
            shard.add_sample(key, sorted(members.items()))
        shard.close()
    (folder / name.replace(".tar", ".idx")).write_text(shard.index_text())
    return list(samples)


def read_split(data: str | Path, remote: Remote = Remote(), split: str = "train") -> tuple[list[str], list]:
    """(keys, skipped) of one pass in order, bad samples skipped and counted."""
    dataset = open_dataset(str(data), remote)
    spec = LoaderSpec(shards=tuple(dataset.shards(split)), batch_size=4, image_size=32, mean=MEAN, std=STD,
                      train=False, workers=0, on_corrupt="skip", remote=remote, num_classes=len(dataset.classes))
    keys, skipped = [], []
    for batch in TorchLoader(spec).epoch(0):
        keys += batch.keys
        skipped += batch.skipped
    return keys, skipped


# --- labels ---------------------------------------------------------------------------------------------------

def test_a_label_the_manifest_does_not_know_is_a_counted_skip_with_its_reason(copy: Path) -> None:
    name = first_shard(copy)["name"]
    keys = rewrite_shard(copy, name, [b"99", b"-1", None])
    got, skipped = read_split(copy)
    assert len(got) == open_dataset(str(copy)).num_samples("train") - 3
    reasons = {where.rsplit(" ", 1)[1]: why for where, why in skipped}
    assert set(reasons) == set(keys[:3])
    assert reasons[keys[0]].startswith("label '99' is not a class of the manifest's 4")
    assert reasons[keys[1]].startswith("label '-1' is not a class")
    assert reasons[keys[2]] == "no .cls label in a labelled split"
    assert all(str(copy / name) in where for where, _ in skipped)  # the shard is named


def test_a_class_list_that_is_empty_or_short_is_one_line_when_the_manifest_is_read(copy: Path) -> None:
    manifest = manifest_of(copy)
    for classes, words in (([], "lists no classes, but split 'train' is labelled"),
                           (manifest["classes"][:2], "lists 2 classes, but split 'train' counts labels up to 3")):
        write_manifest(copy, manifest | {"classes": classes})
        for read in (lambda: open_dataset(str(copy)), lambda: load_manifest(copy)):
            with pytest.raises(ConfigError, match=words) as error:
                read()
            assert "\n" not in str(error.value)


# --- paths ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["name", "index"])
@pytest.mark.parametrize("path", ["../../../../etc/passwd", "/etc/passwd", "a/../../x.tar", "http://evil/x.tar"])
def test_a_shard_path_outside_the_dataset_folder_is_refused_when_the_manifest_is_read(
        copy: Path, field: str, path: str) -> None:
    manifest = manifest_of(copy)
    manifest["splits"]["train"]["shards"][0][field] = path
    write_manifest(copy, manifest)
    for read in (lambda: open_dataset(str(copy)), lambda: load_manifest(copy)):
        with pytest.raises(ConfigError, match="outside its dataset folder"):
            read()
    result = run_cli("verify", copy)
    assert result.exit_code != 0 and "outside its dataset folder" in result.output and "root:" not in result.output


def test_a_symlink_out_of_the_dataset_folder_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.idx"
    outside.write_text(SECRET + "\n")
    manifest = manifest_of(copy)
    (copy / "link.idx").symlink_to(outside)
    manifest["splits"]["train"]["shards"][0]["index"] = "link.idx"
    write_manifest(copy, manifest)
    with pytest.raises(ConfigError, match="leads outside the dataset folder through a symlink"):
        open_dataset(str(copy))


def test_errors_about_a_file_never_quote_its_bytes(copy: Path) -> None:
    shard = first_shard(copy)
    (copy / shard["index"]).write_text(f"v1.2 1\n{SECRET}\n")  # an .idx that is not one
    _, skipped = read_split(copy)
    assert skipped and not any("secret" in why for _, why in skipped)
    result = run_cli("verify", copy)
    assert result.exit_code != 0 and "secret" not in result.output
    (copy / NAME).write_text(SECRET)  # a manifest that is not JSON
    with pytest.raises(ConfigError, match="is not valid JSON") as error:
        open_dataset(str(copy))
    assert "secret" not in str(error.value)


def test_a_remote_manifest_naming_a_path_above_its_base_url_is_refused(copy: Path) -> None:
    manifest = manifest_of(copy)
    manifest["splits"]["train"]["shards"][0]["name"] = "../other/train-000000.tar"
    write_manifest(copy, manifest)
    with FaultServer(copy) as server, pytest.raises(ConfigError, match="outside its dataset folder"):
        open_dataset(server.url, QUICK)


# --- keys and members ------------------------------------------------------------------------------------------

def plain_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar as another tool writes it: these members, in this order."""
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, "JPEG")
    return out.getvalue()


def test_the_same_key_in_two_shards_fails_verify_naming_the_key_and_both_shards(tmp_path: Path) -> None:
    image = jpeg()
    plain_tar(tmp_path / "train-000000.tar", [("a.jpg", image), ("a.cls", b"0"), ("b.jpg", image), ("b.cls", b"1")])
    plain_tar(tmp_path / "train-000001.tar", [("c.jpg", image), ("c.cls", b"1"), ("a.jpg", image), ("a.cls", b"0")])
    assert run_cli("index", tmp_path).exit_code == 0
    result = run_cli("verify", tmp_path)
    assert result.exit_code != 0
    assert "key 'a' is in both train-000000.tar and train-000001.tar" in result.output


@pytest.mark.parametrize("members, words", [
    ([("a.jpg", b"1"), ("a.cls", b"0"), ("a.jpg", b"2")], "member 'a.jpg' is in the tar twice"),
    ([("a.jpg", b"1"), ("a.cls", b"0"), ("README", b"hello")], "member 'README' has no extension"),
    ([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.cls", b"0")], "member 'a.cls' belongs to sample 'a'"),
])
def test_index_refuses_a_member_readers_cannot_place_in_one_line(tmp_path: Path, members: list, words: str) -> None:
    plain_tar(tmp_path / "train-000000.tar", members)
    result = run_cli("index", tmp_path)
    assert result.exit_code != 0
    assert f"train-000000.tar: {words}" in result.output
    assert not (tmp_path / NAME).exists()


# --- remote bodies ---------------------------------------------------------------------------------------------

def test_a_remote_manifest_that_never_ends_is_one_line(packed: Path) -> None:
    with FaultServer(packed) as server:
        server.inject("endless", times=None, match=NAME)
        with pytest.raises(RemoteError, match="longer than 1,048,576 bytes"):
            fetch(server.url + NAME, Remote(small_limit=1 << 20))
        with pytest.raises(ConfigError, match="longer than 1,048,576 bytes"):
            open_dataset(server.url, Remote(small_limit=1 << 20))
        assert server.sent < 64 << 20  # the client hung up; it did not read on


def test_a_shard_served_without_end_is_cached_up_to_its_size_and_no_further(
        packed: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    remote = Remote(timeout=1.0, connect_timeout=1.0, retries=1, backoff=0.01, cache=str(cache))
    with FaultServer(packed) as server:
        dataset = open_dataset(server.url, remote)
        server.inject("endless", times=None, match=".tar")
        keys, skipped = read_split(server.url, remote)
        biggest = max(s.bytes for s in dataset.shards("train"))
        assert server.sent < biggest * len(dataset.shards("train")) + (64 << 20)  # not the 256 MB it offered
    assert not skipped and len(keys) == dataset.num_samples("train")  # the shard's bytes, then it hung up
    cached = {path.name: path.stat().st_size for path in cache.glob("*/*.tar")}
    assert cached == {Path(s.url).name: s.bytes for s in dataset.shards("train")}
    assert not list(cache.glob("*/*.part"))


@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_a_shard_of_another_size_than_the_manifest_says_is_an_error(packed: Path, tmp_path: Path,
                                                                    change: str) -> None:
    served = Path(shutil.copytree(packed, tmp_path / "served"))
    shard = first_shard(served)
    data = (served / shard["name"]).read_bytes()
    (served / shard["name"]).write_bytes(data + bytes(10240) if change == "longer" else data[:-1024])
    for remote in (QUICK, Remote(timeout=1.0, retries=1, backoff=0.01, cache=str(tmp_path / "cache"))):
        with FaultServer(served) as server:
            _, skipped = read_split(server.url, remote)
        lost = [why for _, why in skipped]
        assert len(lost) == shard["num_samples"]
        assert all(f"the manifest says {shard['bytes']:,}" in why for why in lost), lost[:1]
    assert not list((tmp_path / "cache").glob("*/*.part"))


# --- fit ---------------------------------------------------------------------------------------------------------

def test_fit_stops_with_one_line_naming_shard_and_key_or_counts_the_skip(copy: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from click.testing import CliRunner

    from trainer.cli import main

    name = first_shard(copy)["name"]
    key = rewrite_shard(copy, name, [b"99"])[0]
    tiny = ["--model", "tiny_cnn", "--weights", "none", "--batch-size", "4", "--workers", "0", "--amp", "none",
            "--freeze-epochs", "0", "--epochs", "1", "--device", "cpu"]
    monkeypatch.setenv("TRAINER_MALLOC", "system")
    failed = CliRunner().invoke(main, ["fit", str(copy), str(tmp_path / "fail"), *tiny])
    assert failed.exit_code == 2 and (failed.exception is None or isinstance(failed.exception, SystemExit))
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and key in lines[0] and "label '99'" in lines[0], failed.stderr
    skipped = CliRunner().invoke(main, ["fit", str(copy), str(tmp_path / "skip"), *tiny, "--on-corrupt", "skip"])
    assert skipped.exit_code == 0, skipped.output[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "skip" / "metrics.csv")))
    assert int(rows[0]["skipped"]) == 1


def test_verify_of_a_url_whose_manifest_never_ends_is_one_line(packed: Path) -> None:
    from shardtool.publish import Publisher

    with FaultServer(packed) as server:
        server.inject("endless", times=None, match=NAME)
        with pytest.raises(ConfigError, match="longer than 1,048,576 bytes"):
            Publisher(server.url).read_small(NAME, limit=1 << 20)
        assert server.sent < 64 << 20
