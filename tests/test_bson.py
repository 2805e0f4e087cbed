"""BSON dumps (MongoDB, Cdiscount): one sample per picture, every picture of a product in one split, each
damaged document a counted skip, --categories names each class exactly, and a killed pack resumes to the
same bytes. Dumps are built here with pymongo's `bson`; expectations come from `bson` and the csv module."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import signal
import struct
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pytest
from PIL import Image

from shardtool.sink import Encoded, Run
from tests.shards import read_shards
from tests.test_bad_input import assert_config_error, corrupt_jpeg, jpeg_bytes, noisy_jpeg, read_rejects
from tests.test_resume import SHARDTOOL, journaled_shards, kill_after_shards, run, shard_digests

SIZE = (180, 180)  # Cdiscount's pictures: 180x180 RGB JPEGs


def picture(seed: int) -> bytes:
    return jpeg_bytes(seed, SIZE)  # quality 90, RGB, no EXIF: packed as is


def document(_id: Any, category: int | None, pictures: list[bytes]) -> bytes:
    """One dump document in Cdiscount's field order: _id, imgs, category_id (absent when None)."""
    doc: dict[str, Any] = {"_id": _id, "imgs": [{"picture": p} for p in pictures]}
    if category is not None:
        doc["category_id"] = category
    return bson.encode(doc)


def manifest_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "dataset.json").read_text())


def skip_counts(out: Path) -> dict[str, int]:
    return {reason: entry["count"] for reason, entry in manifest_of(out)["report"]["skips"].items()}


def infos(out: Path) -> dict[str, dict[str, Any]]:
    """key -> the sample's json member, plus the split its shard belongs to."""
    return {key: {**json.loads(s["json"]), "split": s["split"].decode()} for key, s in read_shards(out).items()}


def splits_of_products(out: Path) -> dict[str, set[str]]:
    """_id -> the splits its pictures landed in."""
    found: dict[str, set[str]] = defaultdict(set)
    for info in infos(out).values():
        found[info["_id"]].add(info["split"])
    return found


# --- the real Cdiscount sample ------------------------------------------------------------------------------


def document_offsets(path: Path) -> list[int]:
    """Where each document starts, walking the int32 length prefixes."""
    data, offsets, position = path.read_bytes(), [], 0
    while position < len(data):
        offsets.append(position)
        position += struct.unpack_from("<i", data, position)[0]
    assert position == len(data)
    return offsets


def read_category_names(path: Path) -> tuple[list[str], dict[int, list[str]]]:
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    return rows[0][1:], {int(row[0]): [name.strip() for name in row[1:]] for row in rows[1:]}


@pytest.mark.real
def test_cdiscount_example_packs_every_picture_with_its_category_path(real_data, cli, tmp_path):
    wds = pytest.importorskip("webdataset")
    dump, names_csv = real_data / "cdiscount" / "train_example.bson", real_data / "cdiscount" / "category_names.csv"
    with open(dump, "rb") as file:
        docs = list(bson.decode_file_iter(file))
    offsets = document_offsets(dump)
    level_names, paths = read_category_names(names_csv)
    category_ids = sorted({doc["category_id"] for doc in docs})
    expected = {f"{doc['_id']}_{i}": (doc, offset, img["picture"])
                for doc, offset in zip(docs, offsets) for i, img in enumerate(doc["imgs"])}
    assert (len(expected), len(docs), len(category_ids)) == (110, 82, 36)
    out = tmp_path / "out"

    result = cli("pack", dump, out, "--categories", names_csv, "--split", "val=0.2", "--json")

    assert result.exit_code == 0, result.output
    manifest = manifest_of(out)
    report = manifest["report"]
    assert (report["seen"], report["written"], report["skipped"]) == (110, 110, 0)
    classes = manifest["classes"]
    assert [entry["category_id"] for entry in classes] == category_ids
    assert [entry["index"] for entry in classes] == list(range(36))
    assert all(entry["name"] == str(entry["category_id"]) for entry in classes)
    assert {entry["category_id"]: entry["levels"] for entry in classes} == {c: paths[c] for c in category_ids}
    index = {entry["category_id"]: entry["index"] for entry in classes}

    tree = manifest["hierarchy"]
    assert tree["names"] == level_names == ["category_level1", "category_level2", "category_level3"]
    for entry in classes:
        first, second = entry["level_indexes"]
        assert tree["levels"][0][first] == entry["levels"][0]
        assert tree["levels"][1][second] == entry["levels"][1]
    level1 = {tuple(e["levels"][:1]): e["level_indexes"][0] for e in classes}
    level2 = {tuple(e["levels"][:2]): e["level_indexes"][1] for e in classes}
    assert sorted(level1.values()) == list(range(len(tree["levels"][0])))  # one index per distinct ancestor
    assert sorted(level2.values()) == list(range(len(tree["levels"][1])))

    samples = {}
    for split, entry in manifest["splits"].items():  # read back with plain webdataset
        urls = [str(out / shard["name"]) for shard in entry["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False):
            samples[sample["__key__"]] = {**sample, "split": split}
    assert samples.keys() == expected.keys()
    splits: dict[str, set[str]] = defaultdict(set)
    for key, sample in samples.items():
        doc, offset, jpg = expected[key]
        info = json.loads(sample["json"])
        assert sample["jpg"] == jpg, key
        assert int(sample["cls"]) == index[doc["category_id"]] == info["class"]
        assert (info["_id"], info["group"], info["label"]) == (str(doc["_id"]), str(doc["_id"]), str(doc["category_id"]))
        assert info["source"] == f"train_example.bson@{offset}#{key.rsplit('_', 1)[1]}"
        assert (info["width"], info["height"]) == SIZE
        splits[info["_id"]].add(sample["split"])
    assert all(len(found) == 1 for found in splits.values()), splits  # a product never straddles two splits
    val = sum(found == {"val"} for found in splits.values())
    assert 0 < val < 82
    assert manifest["splits"]["val"]["num_samples"] == sum(s["split"] == "val" for s in samples.values())
    assert cli("verify", out).exit_code == 0


# --- a messy category CSV ----------------------------------------------------------------------------------

MESSY_CATEGORIES = (  # an Excel export: BOM, CRLF, stray spaces and tabs, quoted commas and doubled quotes
    "\ufeffcategory_id,category_level1,category_level2,category_level3\r\n"
    '10,ÉLECTROMÉNAGER ,"GROS ÉLECTROMÉNAGER, ENCASTRABLE",FOUR \r\n'
    '11,SPORT,CYCLES,"VELO ENFANT (10"" - 12"" - 14"" - 16"")"\r\n'
    "12,  ÉLECTROMÉNAGER,PETIT  DÉJEUNER ,CAFETIÈRE – THÉIÈRE\r\n"
    " 13 ,SPORT, CYCLES,VTT\t\r\n"
    "99,NOT IN THE DUMP,UNUSED,UNUSED\r\n"
)
MESSY_LEVELS = {
    10: ["ÉLECTROMÉNAGER", "GROS ÉLECTROMÉNAGER, ENCASTRABLE", "FOUR"],
    11: ["SPORT", "CYCLES", 'VELO ENFANT (10" - 12" - 14" - 16")'],
    12: ["ÉLECTROMÉNAGER", "PETIT  DÉJEUNER", "CAFETIÈRE – THÉIÈRE"],
    13: ["SPORT", "CYCLES", "VTT"],
}


def test_category_names_are_kept_exactly_and_only_stripped(tmp_path, cli):
    dump, names_csv, out = tmp_path / "train.bson", tmp_path / "category_names.csv", tmp_path / "out"
    dump.write_bytes(b"".join(document(i, 10 + i % 4, [picture(i)]) for i in range(8)))
    names_csv.write_bytes(MESSY_CATEGORIES.encode("utf-8"))

    result = cli("pack", dump, out, "--categories", names_csv, "--workers", "0")

    assert result.exit_code == 0, result.output
    manifest = manifest_of(out)
    assert {e["category_id"]: e["levels"] for e in manifest["classes"]} == MESSY_LEVELS  # 99 is no class
    tree = manifest["hierarchy"]
    assert tree["names"] == ["category_level1", "category_level2", "category_level3"]
    assert sorted(tree["levels"][0]) == ["SPORT", "ÉLECTROMÉNAGER"]  # stray spaces do not make a second one
    by_id = {e["category_id"]: e for e in manifest["classes"]}
    assert by_id[10]["level_indexes"][0] == by_id[12]["level_indexes"][0]
    assert by_id[11]["level_indexes"] == by_id[13]["level_indexes"]  # SPORT / CYCLES
    assert by_id[10]["level_indexes"][1] != by_id[12]["level_indexes"][1]
    for entry in manifest["classes"]:
        assert [tree["levels"][i][j] for i, j in enumerate(entry["level_indexes"])] == entry["levels"][:2]


# --- every kind of damage, each followed by a good document -----------------------------------------------

CATEGORIES = "category_id,category_level1,category_level2,category_level3\n5,A,B,C\n6,A,D,E\n"


def with_length(doc: bytes, length: int) -> bytes:
    return struct.pack("<i", length) + doc[4:]


def damaged_dump() -> list[tuple[bytes, list[tuple[str, str]]]]:
    """(document bytes, [(reason, source suffix) of each skip it causes]); keys of good pictures are `<_id>_<i>`."""
    broken_type = bytearray(document(109, 5, [picture(9)]))
    broken_type[broken_type.rindex(b"\x10category_id\x00")] = 0x99  # category_id's type byte: no such BSON type
    good = iter(range(1, 100))

    def ok(pictures: int = 1) -> tuple[bytes, list[tuple[str, str]]]:
        _id = next(good)
        return document(_id, 5 + _id % 2, [picture(_id * 10 + i) for i in range(pictures)]), []

    return [
        ok(2), ok(2), ok(),
        (with_length(document(100, 5, [picture(100), picture(101)]), 0x7FFFFFFF), [("corrupt_document", "")]),
        ok(),
        (with_length(document(101, 5, [picture(102)]), 10_000_000), [("corrupt_document", "")]),  # past the end
        ok(),
        (bytes(broken_type), [("corrupt_document", "")]),
        ok(),
        (bson.encode({"_id": 102, "category_id": 5}), [("missing_images", "")]),
        ok(),
        (document(103, 5, []), [("no_images", "")]),
        ok(),
        (document(104, None, [picture(104), picture(105)]), [("missing_label", "")]),
        ok(),
        (document(105, 5, [b"these are my notes, not a picture", picture(106)]), [("not_an_image", "#0")]),
        ok(),
        (document(106, 999, [picture(107), picture(108)]), [("unknown_category", "#0"), ("unknown_category", "#1")]),
        ok(),
        (bson.encode({"_id": 107, "category_id": 6, "imgs": [{"thumbnail": picture(109)}, {"picture": "a string"},
                                                             {"picture": picture(110)}]}),
         [("missing_picture", "#0"), ("missing_picture", "#1")]),
        ok(),
        (bson.encode({"category_id": 6, "imgs": [{"picture": picture(111)}]}), [("missing_id", "")]),
        ok(2),
        (document(108, 5, [picture(112), picture(113)])[:3000], [("truncated_document", "")]),
    ]


def test_every_damaged_document_is_counted_and_the_next_one_is_packed(tmp_path, cli):
    parts = damaged_dump()
    dump, names_csv, out = tmp_path / "dirty.bson", tmp_path / "category_names.csv", tmp_path / "out"
    dump.write_bytes(b"".join(data for data, _ in parts))
    names_csv.write_text(CATEGORIES)
    expected_skips, expected_sources, offset = [], {}, 0
    for data, skips in parts:
        expected_skips += [(reason, f"dirty.bson@{offset}{suffix}") for reason, suffix in skips]
        if not skips or skips[0][1].startswith("#"):  # a readable document: its other pictures are packed
            doc = bson.decode(data)
            bad = {int(suffix[1:]) for _, suffix in skips}
            expected_sources |= {f"{doc['_id']}_{i}": f"dirty.bson@{offset}#{i}"
                                 for i in range(len(doc["imgs"])) if i not in bad}
        offset += len(data)

    result = cli("pack", dump, out, "--categories", names_csv, "--workers", "0", "--max-skip-fraction", "0.9")

    assert result.exit_code == 0, result.output
    assert skip_counts(out) == {"corrupt_document": 3, "truncated_document": 1, "missing_images": 1, "no_images": 1,
                                "missing_label": 1, "not_an_image": 1, "unknown_category": 2, "missing_picture": 2,
                                "missing_id": 1}
    assert sorted((r["reason"], r["source"]) for r in read_rejects(out)) == sorted(expected_skips)
    written = infos(out)
    assert {key: info["source"] for key, info in written.items()} == expected_sources
    assert {"4_0", "5_0", "6_0", "7_0", "8_0", "9_0", "10_0", "11_0", "12_0", "13_0", "105_1", "107_2"} <= written.keys()
    assert "13_1" in written  # the good document right before the cut-off one
    report = manifest_of(out)["report"]
    assert report["written"] == len(expected_sources) == 18
    assert report["skipped"] == len(expected_skips) == 13
    assert report["seen"] == report["written"] + report["skipped"]
    assert [entry["category_id"] for entry in manifest_of(out)["classes"]] == [5, 6]  # 999 was skipped


@pytest.mark.parametrize("overshoot", ["into-next-prefix", "over-next-document"])
def test_a_too_long_length_prefix_does_not_swallow_the_next_document(tmp_path, cli, overshoot):
    first, second, third = (document(i, 5, [picture(i)]) for i in (1, 2, 3))
    bad = document(100, 5, [picture(100)])
    # +4 ends on the high byte of the next document's length (0 for any document under 16 MiB);
    # +len(second) ends on the next document's own terminator. Either way the last byte is 0.
    wrong = len(bad) + (4 if overshoot == "into-next-prefix" else len(second))
    dump, out = tmp_path / "dump.bson", tmp_path / "out"
    dump.write_bytes(first + with_length(bad, wrong) + second + third)

    result = cli("pack", dump, out, "--workers", "0", "--max-skip-fraction", "0.9")

    assert result.exit_code == 0, result.output
    assert sorted(read_shards(out)) == ["1_0", "2_0", "3_0"]
    assert skip_counts(out) == {"corrupt_document": 1}


def test_distinct_ids_give_distinct_keys(tmp_path, cli):
    wds = pytest.importorskip("webdataset")
    dump, out = tmp_path / "dump.bson", tmp_path / "out"
    dump.write_bytes(document("a/b", 1, [picture(1)]) + document("a_b", 2, [picture(2)]) +
                     document(7, 1, [picture(3)]) + document("7", 2, [picture(4)]))

    result = cli("pack", dump, out, "--workers", "0")

    assert result.exit_code == 0, result.output
    assert manifest_of(out)["report"]["written"] == 4
    shards = sorted(str(p) for p in out.glob("*.tar"))
    names = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    assert len(set(names)) == len(names) == 12
    keys = [sample["__key__"] for sample in wds.WebDataset(shards, shardshuffle=False)]
    assert len(set(keys)) == 4


# --- unlabelled dumps (Cdiscount's test.bson) and files that are not dumps --------------------------------


@pytest.fixture
def unlabelled(tmp_path: Path) -> Path:
    dump = tmp_path / "test.bson"
    dump.write_bytes(b"".join(document(i, None, [picture(i * 10 + k) for k in range(1 + i % 2)]) for i in range(6)))
    return dump


def test_unlabelled_dump_packs_into_its_own_split_without_classes(unlabelled, tmp_path, cli):
    out = tmp_path / "out"

    result = cli("pack", unlabelled, out, "--workers", "0")

    assert result.exit_code == 0, result.output
    manifest = manifest_of(out)
    assert list(manifest["splits"]) == ["unlabelled"] and manifest["classes"] == []
    with open(unlabelled, "rb") as file:
        pictures = {f"{d['_id']}_{i}": (str(d["_id"]), img["picture"])
                    for d in bson.decode_file_iter(file) for i, img in enumerate(d["imgs"])}
    samples = read_shards(out)
    assert samples.keys() == pictures.keys() and len(samples) == 9
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "json", "split"}  # no .cls
        assert sample["split"] == b"unlabelled"
        info = json.loads(sample["json"])
        assert (info["_id"], info["label"], info["class"]) == (pictures[key][0], None, None)
        assert sample["jpg"] == pictures[key][1]


@pytest.mark.parametrize("option", [["--split", "val=0.1"], ["--stratify"]])
def test_unlabelled_dump_refuses_a_split(unlabelled, tmp_path, cli, option):
    result = cli("pack", unlabelled, tmp_path / "out", *option, "--workers", "0")

    assert_config_error(result, "test.bson", option[0])
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.parametrize("content", [b"these are my notes, not a dump\n" * 4, b"", jpeg_bytes(0)],
                         ids=["text", "empty", "jpeg"])
def test_a_file_that_is_not_a_dump_is_one_line(tmp_path, cli, content):
    source = tmp_path / "train.bson"
    source.write_bytes(content)

    result = cli("pack", source, tmp_path / "out", "--workers", "0")

    assert_config_error(result, "train.bson is not a BSON dump")
    assert not (tmp_path / "out").exists()


# --- --verify header and full -----------------------------------------------------------------------------


def zeroed_jpeg(data: bytes) -> bytes:
    """256 bytes of the entropy-coded data zeroed: no marker appears, the end marker stays."""
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    return data[:middle] + bytes(256) + data[middle + 256:]


def test_verify_header_copies_what_full_copies_and_both_catch_a_cut_jpeg(tmp_path, cli):
    real = noisy_jpeg(7, size=180)
    garbled, zeroed, cut = corrupt_jpeg(real), zeroed_jpeg(real), real[: len(real) // 2]
    assert garbled.endswith(b"\xff\xd9") and zeroed.endswith(b"\xff\xd9") and len(garbled) == len(real)
    dump = tmp_path / "dump.bson"
    dump.write_bytes(b"".join([document(i, 1 + i % 2, [picture(i * 10), picture(i * 10 + 1)]) for i in range(1, 5)] +
                              [document(10, 1, [picture(100), cut]), document(11, 2, [garbled]),
                               document(12, 1, [zeroed])]))
    outputs = {}
    for mode in ("full", "header"):
        outputs[mode] = tmp_path / mode
        result = cli("pack", dump, outputs[mode], "--verify", mode, "--workers", "0", "--max-skip-fraction", "0.5")
        assert result.exit_code == 0, result.output
    full, header = read_shards(outputs["full"]), read_shards(outputs["header"])
    rejects = {mode: {r["key"]: (r["reason"], r["detail"]) for r in read_rejects(out)} for mode, out in outputs.items()}

    good = {f"{i}_{k}" for i in range(1, 5) for k in range(2)} | {"10_0"}
    assert good <= full.keys() and good <= header.keys()
    assert {key: full[key] for key in good} == {key: header[key] for key in good}  # jpg, cls, json: same bytes
    assert rejects["full"]["10_1"][0] == rejects["header"]["10_1"][0] == "corrupt_image"  # no end marker
    assert rejects["full"]["10_1"][1].startswith("decode: image file is truncated")
    # garbage with false markers mid-scan: the full decode fails; the header check cannot see it and copies it
    assert rejects["full"]["11_0"] == ("corrupt_image", "decode: broken data stream when reading image file")
    assert header["11_0"]["jpg"] == garbled and "11_0" not in rejects["header"]
    # zeroed entropy data: libjpeg only warns ("Corrupt JPEG data"), so even --verify full packs it as is
    assert full["12_0"]["jpg"] == header["12_0"]["jpg"] == zeroed
    damage = np.abs(np.asarray(Image.open(io.BytesIO(zeroed)), int) - np.asarray(Image.open(io.BytesIO(real)), int))
    assert damage.mean() > 10  # its pixels are visibly wrong
    assert (skip_counts(outputs["full"]), skip_counts(outputs["header"])) == ({"corrupt_image": 2}, {"corrupt_image": 1})
    assert (len(full), len(header)) == (10, 11)


# --- resume and workers ------------------------------------------------------------------------------------

PRODUCTS = 300  # 1-3 pictures each: 600 pictures, about 16 shards of 40 over train and val
BAD_PRODUCTS = range(25, PRODUCTS, 50)  # their first picture is not an image: 6 skips spread over the run
RESUME_OPTIONS = ["--shard-size", "40", "--split", "val=0.1", "--max-skip-fraction", "0.05", "--json"]


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pool = [picture(seed) for seed in range(40)]
    docs = []
    for i in range(PRODUCTS):
        pictures = [pool[(i + k) % len(pool)] for k in range(1 + i % 3)]
        if i in BAD_PRODUCTS:
            pictures[0] = b"not a picture"
        docs.append(document(i, 1000 + i % 5, pictures))
    dump = tmp_path_factory.mktemp("products") / "train.bson"
    dump.write_bytes(b"".join(docs))
    return dump


def pack_command(dump: Path, out: Path, workers: str) -> list[str]:
    return [str(SHARDTOOL), "pack", str(dump), str(out), *RESUME_OPTIONS, "--workers", workers]


@pytest.fixture(scope="module")
def uninterrupted(products: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run(pack_command(products, out, "0"))
    return out


@pytest.mark.parametrize("workers", ["0", "auto"])
def test_killed_bson_pack_resumes_to_the_same_bytes(products, uninterrupted, tmp_path, workers):
    resumed = tmp_path / "resumed"
    status = kill_after_shards(pack_command(products, resumed, workers), resumed, 3)
    assert status == -signal.SIGKILL
    assert not (resumed / "dataset.json").exists(), "the pack finished before it was killed: use more products"
    kept = {name: os.stat(resumed / name).st_ino for name in journaled_shards(resumed)}

    report = json.loads(run(pack_command(products, resumed, workers)).stdout)

    assert (report["seen"], report["written"], report["skipped"]) == (600, 594, 6)
    assert report["skips"]["not_an_image"]["count"] == 6
    assert shard_digests(resumed) == shard_digests(uninterrupted)
    assert len(shard_digests(uninterrupted)) > 2 * 10  # a .tar and an .idx per shard
    for name in ("dataset.json", "rejects.jsonl"):
        assert (resumed / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert {name: os.stat(resumed / name).st_ino for name in kept} == kept  # finished shards were not redone
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())


def test_bson_pack_gives_the_same_bytes_with_any_number_of_workers(products, uninterrupted, tmp_path, cli):
    out = tmp_path / "out"
    result = cli(*pack_command(products, out, "2")[1:])

    assert result.exit_code == 0, result.output
    assert shard_digests(out) == shard_digests(uninterrupted)  # made with --workers 0
    for name in ("dataset.json", "rejects.jsonl"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert all(len(found) == 1 for found in splits_of_products(out).values())
    assert not (out / ".shardtool" / "spool").exists()  # the workers' hand-off files are gone


def sample_bytes(shard: Path) -> list[int]:
    """Each sample's bytes in a shard (its members' headers, data and padding), in order."""
    sizes: dict[str, int] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key = member.name.rsplit(".", 1)[0]
            sizes[key] = sizes.get(key, 0) + 512 + -(-member.size // 512) * 512
    return list(sizes.values())


@pytest.mark.parametrize("workers", ["0", "2"])
def test_shard_bytes_fills_each_shard_as_far_as_the_limit(products, tmp_path, cli, workers):
    limit = 60_000
    out = tmp_path / "out"
    result = cli("pack", products, out, "--shard-bytes", str(limit), "--shard-size", "1000", "--workers", workers,
                 "--max-skip-fraction", "0.05")

    assert result.exit_code == 0, result.output
    shards = [sample_bytes(path) for path in sorted(out.glob("train-*.tar"))]
    assert sum(map(len, shards)) == 594 and len(shards) > 5
    for shard, following in zip(shards, shards[1:]):
        assert sum(shard) <= limit or len(shard) == 1
        assert sum(shard) + following[0] > limit  # the next sample would not have fitted


def test_a_big_run_pickles_through_a_spool_file_that_is_then_removed(tmp_path):
    big = Run(bytes(range(256)) * 4096, [Encoded("train", 3, 0, 1 << 20, (("jpg", 512, 100, "a.jpg"),), None)],
              str(tmp_path))
    pickled = pickle.dumps(big)
    assert len(pickled) < 10_000 and len(list(tmp_path.iterdir())) == 1  # the bytes went to a file
    copy = pickle.loads(pickled)
    assert bytes(copy.data) == big.data and copy.entries == big.entries
    assert not list(tmp_path.iterdir())
    small = Run(b"x" * 100, [], str(tmp_path))
    assert pickle.loads(pickle.dumps(small)).data == small.data and not list(tmp_path.iterdir())


# --- stratified splits --------------------------------------------------------------------------------------


def test_stratify_gives_every_category_its_share_of_products(tmp_path, cli):
    dump, out = tmp_path / "train.bson", tmp_path / "out"
    dump.write_bytes(b"".join(document(i, 1000 + i % 4, [picture(i * 10 + k) for k in range(1 + i % 3)])
                              for i in range(32)))  # 4 categories x 8 products

    result = cli("pack", dump, out, "--split", "val=0.25", "--stratify", "--workers", "0")

    assert result.exit_code == 0, result.output
    products_per_split = Counter()
    for _id, splits in splits_of_products(out).items():
        assert len(splits) == 1, _id
        products_per_split[(1000 + int(_id) % 4, *splits)] += 1
    assert products_per_split == {(c, split): n for c in range(1000, 1004) for split, n in (("val", 2), ("train", 6))}
    pictures = Counter(info["split"] for info in infos(out).values())
    assert pictures["val"] == manifest_of(out)["splits"]["val"]["num_samples"]
    assert pictures["val"] + pictures["train"] == sum(1 + i % 3 for i in range(32))


def stored_products(out: Path) -> list[tuple[str, str]]:
    """(product _id, class) of every train sample in the order the shards store them."""
    found = []
    for shard in manifest_of(out)["splits"]["train"]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            infos_in_order = (json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json"))
            found += [(str(info["_id"]), str(info["label"])) for info in infos_in_order]
    return found


def test_a_dump_sorted_by_category_is_mixed_in_the_shards_with_each_products_pictures_together(tmp_path, cli):
    """Shuffled order on a stream too big to permute in memory: byte ranges of 256 documents permuted,
    4 per task mixed. A dump sorted by category (30 x 100 products) is the worst case it meets."""
    from trainer.data.mixing import mixing, uniform_mixing

    source = tmp_path / "sorted.bson"
    pictures = [jpeg_bytes(seed, (16, 16)) for seed in range(8)]
    with open(source, "wb") as file:
        for product in range(3000):
            file.write(document(product, 1000 + product // 100, pictures[: 1 + product % 3]))
    orders = {}
    for order in ("shuffled", "source"):
        out = tmp_path / order
        result = cli("pack", source, out, "--order", order, "--workers", "2")
        assert result.exit_code == 0, result.output
        orders[order] = stored_products(out)
    shuffled, kept = orders["shuffled"], orders["source"]
    assert sorted(shuffled) == sorted(kept) and len(kept) == 6000
    assert [int(p) for p, _ in dict.fromkeys(kept)] == list(range(3000))  # --order source: the dump's order
    runs = [p for i, (p, _) in enumerate(shuffled) if i == 0 or shuffled[i - 1][0] != p]
    assert len(runs) == 3000  # every product once, its 1-3 pictures consecutive
    labels = {order: [int(label) for _, label in products] for order, products in orders.items()}
    found = {order: mixing([found], 32).per_batch for order, found in labels.items()}
    uniform = uniform_mixing(labels["source"], 32).per_batch
    print(f"\nclasses per 32 consecutive samples of a category-sorted dump: shuffled {found['shuffled']:.2f}, "
          f"source {found['source']:.2f}, uniform {uniform:.2f}")
    assert found["source"] < 1.5 and found["shuffled"] >= 7  # ~4 x 256 products from scattered places
