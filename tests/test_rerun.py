"""A pack re-run over a source that changed never reports OK over a wrong dataset (issue 36): the run's
identity covers the listing its plan was made from, so the journal of the old run is never resumed
over a new listing (which packed 4 images twice, missed 4 new ones and reported `written 14`).
And OUT inside SOURCE is never read back as a class."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import bson  # pymongo's
import pytest

from tests.test_bad_input import assert_config_error, jpeg_bytes


def folders(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    for label, count in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            (root / label / f"{i}.jpg").write_bytes(jpeg_bytes(hash((label, i)) % 1000))
    return root


def members(out: Path) -> Counter[str]:
    """Every sample key over every shard, counted: a doubled image shows as 2 (read_shards would hide it)."""
    keys: Counter[str] = Counter()
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(m.name.split(".", 1)[0] for m in tar if m.name.endswith(".cls"))
    return keys


def pack(cli, source: Path, out: Path, *extra: str):
    return cli("pack", source, out, "--shard-size", "4", "--split", "val=0.25", "--workers", "0", *extra)


def test_a_rerun_after_images_were_added_is_refused_and_overwrite_packs_each_once(tmp_path, cli):
    source = folders(tmp_path / "src", {"cat": 5, "dog": 5})
    out = tmp_path / "out"
    assert pack(cli, source, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    folders(source, {"cat": 2, "dog": 2}, start=5)

    again = pack(cli, source, out)

    assert_config_error(again, "SOURCE changed since OUT", "10 inputs then, 14 now", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # left as it was
    fresh = pack(cli, source, out, "--overwrite", "--json")
    assert fresh.exit_code == 0, fresh.output
    keys = members(out)
    assert len(keys) == 14 and set(keys.values()) == {1}
    assert json.loads(fresh.output)["written"] == 14


@pytest.mark.parametrize("change", ["modified", "renamed", "removed+added"])
def test_a_rerun_over_the_same_number_of_other_files_is_refused(tmp_path, cli, change):
    source = folders(tmp_path / "src", {"cat": 4, "dog": 4})
    out = tmp_path / "out"
    assert pack(cli, source, out).exit_code == 0
    first = source / "cat" / "0.jpg"
    if change == "modified":
        first.write_bytes(jpeg_bytes(999) + b"\0" * 10)  # same name, other bytes
    elif change == "renamed":
        first.rename(source / "cat" / "9.jpg")
    else:
        first.unlink()
        (source / "dog" / "9.jpg").write_bytes(jpeg_bytes(5))

    assert_config_error(pack(cli, source, out), "SOURCE changed since OUT", "files added, removed, renamed or modified")


def test_an_interrupted_run_is_not_resumed_over_a_changed_source(tmp_path, cli):
    """A run that journaled some shards and died (no dataset.json yet) is resumed only over its own listing."""
    source = folders(tmp_path / "src", {"cat": 6, "dog": 6})
    out = tmp_path / "out"
    assert pack(cli, source, out).exit_code == 0
    (out / "dataset.json").unlink()  # as a kill before the manifest leaves it: the journal holds every shard
    assert pack(cli, source, out).exit_code == 0  # unchanged: resumed, finished
    (out / "dataset.json").unlink()
    folders(source, {"bird": 3})

    assert_config_error(pack(cli, source, out), "SOURCE changed since OUT", "12 inputs then, 15 now")


def test_a_csv_manifest_that_gained_rows_is_not_resumed(tmp_path, cli):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"{i}.jpg,{'ab'[i % 2]}\n" for i in range(8)))
    out = tmp_path / "out"
    args = ["--images", images, "--image-col", "path", "--label-col", "label"]
    assert pack(cli, manifest, out, *args).exit_code == 0
    with open(manifest, "a") as file:
        file.write("8.jpg,a\n9.jpg,b\n")

    assert_config_error(pack(cli, manifest, out, *args), "SOURCE changed since OUT", "8 inputs then, 10 now")


def test_a_bson_dump_that_grew_is_not_resumed(tmp_path, cli):
    dump = tmp_path / "train.bson"
    def documents(ids: range) -> bytes:
        return b"".join(bson.encode({"_id": i, "category_id": 1000 + i % 3, "imgs": [{"picture": jpeg_bytes(i)}]})
                        for i in ids)
    dump.write_bytes(documents(range(12)))
    out = tmp_path / "out"
    assert pack(cli, dump, out).exit_code == 0
    with open(dump, "ab") as file:
        file.write(documents(range(12, 16)))

    assert_config_error(pack(cli, dump, out), "SOURCE changed since OUT", "12 inputs then, 16 now")


@pytest.mark.parametrize("where", ["src/out", "src/cat/out"])
def test_out_inside_source_is_never_read_back(tmp_path, cli, where):
    source = folders(tmp_path / "src", {"cat": 4, "dog": 4})
    out = tmp_path / where

    first = pack(cli, source, out, "--json")
    second = pack(cli, source, out, "--json")

    assert first.exit_code == 0 and second.exit_code == 0, second.output
    manifest = json.loads((out / "dataset.json").read_text())
    assert [entry["name"] for entry in manifest["classes"]] == ["cat", "dog"]
    assert manifest["report"]["skipped"] == 0 and len(members(out)) == 8
    ignored = {entry["path"]: entry["reason"] for entry in manifest["report"]["ignored"]["examples"]}
    assert ignored[where.removeprefix("src/")] == "the output folder OUT"
