"""Duplicate-aware packing (shardtool/dedup.py, --dedup): pictures with the same bytes are reported exactly,
within a split and across splits, and dropped exactly as the mode says; a killed pack resumes to the same
report and the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import bson  # pymongo's
import numpy as np
import pytest

from benchmarks.common import rel
from shardtool.dedup import DigestSet
from shardtool.manifest import load_manifest, parse_manifest
from shardtool.synth import make_shapes
from tests.shards import read_shards
from tests.test_bad_input import assert_config_error, jpeg_bytes, read_rejects
from tests.test_resume import SHARDTOOL, kill_after_shards, run, shard_digests

# Given splits: train/{cat,dog}, test/{cat,dog}. Each name -> the seed of its bytes (the same seed, the same bytes)
TRAIN = {f"cat/{i}.jpg": i for i in range(10)} | {f"dog/{i}.jpg": i for i in range(10, 20)} | {
    "cat/again_3.jpg": 3, "dog/again_3.jpg": 3}  # a group of 3 in train, over two classes
TEST = {f"cat/{i}.jpg": i for i in range(100, 105)} | {f"dog/{i}.jpg": i for i in range(105, 110)} | {
    "cat/leak_5.jpg": 5, "dog/leak_12.jpg": 12, "dog/leak_12_again.jpg": 12,  # leaks: train has these bytes
    "cat/again_101.jpg": 101}  # a duplicate within test only
LEAKS = {"test/cat/leak_5.jpg", "test/dog/leak_12.jpg", "test/dog/leak_12_again.jpg"}
GROUPS = [{"train/cat/3.jpg", "train/cat/again_3.jpg", "train/dog/again_3.jpg"},
          {"train/cat/5.jpg", "test/cat/leak_5.jpg"},
          {"train/dog/12.jpg", "test/dog/leak_12.jpg", "test/dog/leak_12_again.jpg"},
          {"test/cat/101.jpg", "test/cat/again_101.jpg"}]


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leaky") / "src"
    for split, files in (("train", TRAIN), ("test", TEST)):
        for name, seed in files.items():
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)
            (root / split / name).write_bytes(jpeg_bytes(seed))
    return root


def pack(cli, source: Path, out: Path, *extra: str) -> dict:
    result = cli("pack", source, out, "--shard-size", "4", "--workers", "0", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def written_sources(out: Path) -> Counter[tuple[str, str]]:
    """(split, source) of every sample in every shard, counted (a picture written twice shows as 2)."""
    return Counter((sample["split"].decode(), json.loads(sample["json"])["source"])
                   for sample in read_shards(out).values())


def listed_groups(out: Path) -> list[set[str]]:
    """duplicates.json's groups as sets of sources (split/class/file)."""
    groups = json.loads((out / "duplicates.json").read_text())["groups"]
    assert all(p["source"].startswith(p["split"] + "/") for group in groups for p in group["pictures"])
    return [{p["source"] for p in group["pictures"]} for group in groups]


def everything() -> Counter[tuple[str, str]]:
    return Counter((split, f"{split}/{name}") for split, files in (("train", TRAIN), ("test", TEST)) for name in files)


def test_keep_writes_every_picture_and_reports_each_duplicate_and_leak(leaky, tmp_path, cli):
    out = tmp_path / "out"

    report = pack(cli, leaky, out)

    assert (report["seen"], report["written"], report["skipped"]) == (36, 36, 0)
    assert written_sources(out) == everything()
    duplicates = report["duplicates"]
    assert (duplicates["groups"], duplicates["pictures"]) == (4, 10)
    assert duplicates["exact_within"] == {"train": {"groups": 1, "copies": 2, "other_groups": 1, "left": 2},
                                          "test": {"groups": 2, "copies": 2, "other_groups": 2, "left": 2}}
    assert duplicates["exact_across"] == {"train/test": {"groups": 2, "pictures": 3, "other_groups": 2, "left": 3}}
    assert duplicates["dropped"] == {"duplicate": 0, "leak": 0}
    assert sorted(map(sorted, listed_groups(out))) == sorted(map(sorted, GROUPS))
    digests = {hashlib.sha256((leaky / "train/cat/5.jpg").read_bytes()).hexdigest()[:32]}
    assert digests <= {group["digest"] for group in json.loads((out / "duplicates.json").read_text())["groups"]}
    assert len(duplicates["examples"]) == 4 and all(":" in key for group in duplicates["examples"] for key in group)
    assert load_manifest(out).data["report"]["duplicates"] == duplicates  # the manifest holds what was printed


def test_drop_leaks_removes_exactly_the_test_pictures_train_has(leaky, tmp_path, cli):
    keep, out = tmp_path / "keep", tmp_path / "out"
    pack(cli, leaky, keep)

    report = pack(cli, leaky, out, "--dedup", "drop-leaks")

    assert (report["seen"], report["written"], report["skipped"]) == (36, 33, 3)
    assert report["skips"]["leak"]["count"] == 3 and list(report["skips"]) == ["leak"]
    expected = everything() - Counter(("test", name) for name in LEAKS)
    assert written_sources(out) == expected
    leaks = [r for r in read_rejects(out) if r["reason"] == "leak"]
    assert sorted(r["source"] for r in leaks) == sorted(LEAKS) and {r["split"] for r in leaks} == {"test"}
    assert all("same bytes as a picture of train" in r["detail"] for r in leaks)
    train = {name: digest for name, digest in shard_digests(out).items() if name.startswith("train-")}
    assert train == {name: d for name, d in shard_digests(keep).items() if name.startswith("train-")}  # untouched
    duplicates = report["duplicates"]
    assert duplicates["dropped"] == {"duplicate": 0, "leak": 3}
    assert duplicates["exact_across"]["train/test"] == {"groups": 2, "pictures": 3, "other_groups": 2, "left": 0}
    assert sorted(map(sorted, listed_groups(out))) == sorted(map(sorted, GROUPS))  # found, whether dropped or not


@pytest.mark.parametrize("order", ["shuffled", "source"])
def test_drop_within_keeps_exactly_one_of_each_group_in_each_split(leaky, tmp_path, cli, order):
    out = tmp_path / "out"

    report = pack(cli, leaky, out, "--dedup", "drop-within", "--order", order)

    assert (report["seen"], report["written"], report["skipped"]) == (36, 32, 4)
    assert report["skips"]["duplicate"]["count"] == 4
    written = written_sources(out)
    assert set(written.values()) == {1}
    for group in GROUPS:
        for split in ("train", "test"):
            members = {name for name in group if name.startswith(split + "/")}
            if members:
                kept = {name for name in members if (split, name) in written}
                assert len(kept) == 1, (group, kept)
    if order == "source":  # the first in the pack order stays: here the source's (sorted files, class by class)
        assert ("train", "train/cat/3.jpg") in written and ("test", "test/cat/101.jpg") in written
    assert report["duplicates"]["exact_within"]["train"]["left"] == 0
    assert report["duplicates"]["exact_across"]["train/test"]["left"] == 2  # leaks are drop-leaks' business


def test_drop_both_drops_duplicates_and_leaks_and_the_ceiling_ignores_them(leaky, tmp_path, cli):
    out = tmp_path / "out"

    report = pack(cli, leaky, out, "--dedup", "drop-both")  # 6 of 36 skipped: over the default ceiling of 0.01

    assert (report["seen"], report["written"], report["skipped"]) == (36, 30, 6)
    assert {reason: entry["count"] for reason, entry in report["skips"].items()} == {"duplicate": 3, "leak": 3}
    assert report["duplicates"]["dropped"] == {"duplicate": 3, "leak": 3}
    written = written_sources(out)
    assert not {("test", name) for name in LEAKS} & set(written)


def test_the_printed_report_names_the_duplicates_and_the_file(leaky, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("pack", leaky, out, "--workers", "0", "--dedup", "drop-leaks")

    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "4 groups of pictures with the same bytes (10 pictures; every group in" in text
    assert "duplicates.json" in text and "across train/test" in text and "within train" in text
    assert "leak" in text and "e.g. train:" in text


def test_a_pack_without_duplicates_says_so(tmp_path, cli):
    source = make_shapes(tmp_path / "shapes", per_class=3, size=32)
    result = cli("pack", source, tmp_path / "out", "--workers", "0")

    assert result.exit_code == 0, result.output
    assert "no two pictures have the same bytes" in result.output
    duplicates = load_manifest(tmp_path / "out").data["report"]["duplicates"]
    assert (duplicates["groups"], duplicates["pictures"], duplicates["examples"]) == (0, 0, [])
    assert json.loads((tmp_path / "out" / "duplicates.json").read_text())["groups"] == []


# --- resuming ---------------------------------------------------------------------------------------------


def cut_journal(out: Path, lines: int) -> None:
    """OUT as a pack killed after its journal's first LINES lines leaves it: no manifest, no report files."""
    journal = out / ".shardtool" / "journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:lines]))
    for name in ("dataset.json", "duplicates.json", "rejects.jsonl"):
        (out / name).unlink()


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("mode", ["drop-within", "drop-leaks", "drop-both"])
@pytest.mark.parametrize("lines", [1, 4, 7])
def test_a_pack_cut_short_resumes_to_the_same_report_and_bytes(leaky, tmp_path, cli, mode, lines):
    clean, cut = tmp_path / "clean", tmp_path / "cut"
    report = pack(cli, leaky, clean, "--dedup", mode)
    shutil.copytree(clean, cut)
    assert len((cut / ".shardtool" / "journal.jsonl").read_text().splitlines()) > lines
    cut_journal(cut, lines)

    again = pack(cli, leaky, cut, "--dedup", mode)

    assert again == report
    assert outputs(cut) == outputs(clean)  # shards, dataset.json, duplicates.json, rejects.jsonl


@pytest.fixture(scope="module")
def many_duplicates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 JPEGs of 160px and 60 copies of some of them in other class folders (split by hashing the file)."""
    root = make_shapes(tmp_path_factory.mktemp("many") / "shapes", per_class=150, size=160)
    for i in range(60):
        shutil.copy(root / "circle" / f"circle_{i:04d}.jpg", root / ("square", "cross")[i % 2] / f"copy_{i}.jpg")
    return root


@pytest.mark.parametrize("phase", ["train", "held-out"])
def test_a_killed_drop_leaks_pack_resumes_to_the_same_report(many_duplicates, tmp_path, phase):
    """SIGKILLed while writing train (the first phase), or while writing val and test (the second): the re-run
    makes the same drops and the same report as a pack never interrupted."""
    options = ["--shard-size", "10", "--resize", "shorter:64", "--split", "val=0.1,test=0.1", "--dedup", "drop-leaks",
               "--workers", "2", "--json"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    report = json.loads(run([str(SHARDTOOL), "pack", str(many_duplicates), str(clean), *options]).stdout)
    assert report["duplicates"]["dropped"]["leak"] > 0 and report["skips"]["leak"]["count"] > 0

    full = sum(shard["num_samples"] == 10 for shard in load_manifest(clean).splits["train"]["shards"])
    shards = 3 if phase == "train" else full + 2  # (train's last shard is sealed at the very end)
    status = kill_after_shards([str(SHARDTOOL), "pack", str(many_duplicates), str(killed), *options], killed, shards)
    assert status == -signal.SIGKILL and not (killed / "dataset.json").exists()
    again = json.loads(run([str(SHARDTOOL), "pack", str(many_duplicates), str(killed), *options]).stdout)

    assert again == report
    assert outputs(killed) == outputs(clean)


# --- BSON dumps: products keep their pictures together; a picture two products share is what remains ----------


def test_bson_pictures_shared_by_products_are_counted_as_other_groups(tmp_path, cli):
    dump, out = tmp_path / "train.bson", tmp_path / "out"
    docs = [{"_id": i, "category_id": 1 + i % 2, "imgs": [{"picture": jpeg_bytes(i)}, {"picture": jpeg_bytes(i)}]}
            for i in range(40)]  # each product shows one picture twice: a duplicate within its own product
    docs += [{"_id": 100 + i, "category_id": 1, "imgs": [{"picture": jpeg_bytes(i)}]} for i in range(40)]  # reused
    dump.write_bytes(b"".join(bson.encode(doc) for doc in docs))

    report = pack(cli, dump, out, "--split", "test=0.3", "--dedup", "drop-leaks")

    duplicates = report["duplicates"]
    assert (duplicates["groups"], duplicates["pictures"]) == (40, 120)
    within, across = duplicates["exact_within"], duplicates["exact_across"]["train/test"]
    assert within["train"]["groups"] + within["test"]["groups"] == 40  # each product's own pair
    assert within["train"]["copies"] + within["test"]["copies"] + across["groups"] == 80  # 2 copies a group, 1 if split
    assert across["groups"] == across["other_groups"] > 0  # a product's pictures never span two splits
    assert report["skips"]["leak"]["count"] == across["pictures"] == duplicates["dropped"]["leak"]
    seeds = {split: {int(json.loads(s["json"])["_id"]) % 100 for s in read_shards(out).values() if s["split"] == split}
             for split in (b"train", b"test")}
    assert seeds[b"test"] and not seeds[b"test"] & seeds[b"train"]  # no test picture has bytes train has


# --- the parts ----------------------------------------------------------------------------------------------


def test_a_digest_set_holds_exactly_what_was_added_across_merges():
    rng = np.random.default_rng(0)
    digests = [rng.bytes(16) for _ in range(500)] + [bytes(15) + b"\1", bytes(16), b"\1" + bytes(15)]
    seen = DigestSet(merge=7)  # merges into the sorted array every few additions
    assert all(seen.add(d) for d in digests)
    assert not any(seen.add(d) for d in digests)
    assert all(d in seen for d in digests)
    assert not any(rng.bytes(16) in seen for _ in range(500)) and bytes(14) + b"\1\0" not in seen


def test_the_manifest_with_duplicates_parses_and_unknown_fields_stay_accepted(leaky, tmp_path, cli):
    out = tmp_path / "out"
    pack(cli, leaky, out)
    data = json.loads((out / "dataset.json").read_text())
    data["report"]["duplicates"]["something_new"] = {"from": "a later version"}
    data["another_field"] = [1, 2]

    parsed = parse_manifest(json.dumps(data).encode(), "dataset.json", "trainer", out)

    assert parsed["report"]["duplicates"]["exact_across"]["train/test"]["pictures"] == 3
    assert parsed["another_field"] == [1, 2]


def test_an_unknown_dedup_mode_is_refused_naming_the_option(leaky, tmp_path, cli):
    from shardtool.config import PackConfig
    from shardtool.errors import ConfigError

    result = cli("pack", leaky, tmp_path / "out", "--dedup", "drop")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--dedup" in result.output.strip().splitlines()[-1]
    with pytest.raises(ConfigError, match="--dedup 'drop' is not one of keep, drop-within, drop-leaks, drop-both"):
        PackConfig(str(leaky), str(tmp_path / "out"), dedup="drop").validate()
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_another_dedup_mode_is_refused(leaky, tmp_path, cli):
    out = tmp_path / "out"
    pack(cli, leaky, out)
    assert_config_error(cli("pack", leaky, out, "--shard-size", "4", "--workers", "0", "--dedup", "drop-leaks"),
                        "already holds a different dataset")


def test_the_benchmark_script_writes_each_dataset_s_counts(tmp_path):
    """benchmarks/dedup.py end to end on a stand-in for the shared data: a 3-product dump, one picture twice."""
    import os
    import subprocess
    import sys

    root, results = tmp_path / "data", tmp_path / "results"
    (root / "cdiscount").mkdir(parents=True)
    (root / "cdiscount" / "category_names.csv").write_text(
        "category_id,category_level1,category_level2,category_level3\n1,A,B,C\n2,A,B,D\n")
    docs = [{"_id": 1, "category_id": 1, "imgs": [{"picture": jpeg_bytes(1)}, {"picture": jpeg_bytes(1)}]},
            {"_id": 2, "category_id": 2, "imgs": [{"picture": jpeg_bytes(2)}]},
            {"_id": 3, "category_id": 2, "imgs": [{"picture": jpeg_bytes(3)}]}]
    (root / "cdiscount" / "train_example.bson").write_bytes(b"".join(bson.encode(doc) for doc in docs))
    env = os.environ | {"SHARDTOOL_REAL_DATA": str(root), "BENCHMARK_RESULTS": str(results)}

    done = subprocess.run([sys.executable, "-m", "benchmarks.dedup", "--datasets", "cdiscount,clothing-small",
                           "--json"], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300)

    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((results / "dedup.json").read_text())
    (row,) = written["results"]
    assert (row["name"], row["seen"], row["written"], row["groups"], row["pictures"]) == ("cdiscount", 4, 4, 1, 2)
    assert row["example"] == "train:1_0 = train:1_1" and row["command"].startswith("shardtool pack ")
    assert written["notes"] == [f"clothing-small: not measured, no {rel(root / 'clothing-small')}"]
    assert written["settings"]["date"] and "commit" in written["machine"]


def test_drop_leaks_knows_a_train_folder_by_any_case(tmp_path, cli):
    """Given split folders are kept as named (Train/, Test/): the training split is still the reference."""
    source = tmp_path / "src"
    for split, seeds in (("Train", [1, 2, 3]), ("Test", [3, 4])):
        (source / split / "cat").mkdir(parents=True)
        for seed in seeds:
            (source / split / "cat" / f"{seed}.jpg").write_bytes(jpeg_bytes(seed))

    report = pack(cli, source, tmp_path / "out", "--dedup", "drop-leaks")

    assert report["skips"]["leak"]["count"] == 1
    assert report["skips"]["leak"]["examples"][0]["source"] == "Test/cat/3.jpg"
    assert "same bytes as a picture of Train" in report["skips"]["leak"]["examples"][0]["detail"]
    assert written_sources(tmp_path / "out") == Counter({("Train", f"Train/cat/{i}.jpg"): 1 for i in (1, 2, 3)}
                                                        | {("Test", "Test/cat/4.jpg"): 1})


def test_every_number_in_the_duplicates_page_table_is_in_its_results_file():
    """docs/packing-duplicates.md's measured table, held to results/dedup.json as README tables are."""
    from tests.test_readme_numbers import NUMBER, RESULT, backed, leaves, tables

    root = Path(__file__).resolve().parents[1]
    measured = [(intro, rows) for _, intro, rows in tables((root / "docs" / "packing-duplicates.md").read_text())
                if RESULT.findall(intro)]
    assert len(measured) == 1
    intro, rows = measured[0]
    values = set(leaves(json.loads((root / "benchmarks" / "results" / "dedup.json").read_text())))
    numbers = [token for row in rows for cell in row[1:] for token in NUMBER.findall(cell)]
    assert len(numbers) > 30 and [token for token in numbers if not backed(token, values)] == []
    assert [row[0] for row in rows] == [r["name"] for r in json.loads(
        (root / "benchmarks" / "results" / "dedup.json").read_text())["results"]]
