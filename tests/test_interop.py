"""Our shards read, unchanged, by the tools people already train with: timm's webdataset dataset, wids
(random access), Hugging Face `datasets`, DALI (tests/test_readback.py); and `shardtool index` making
tars written by another tool (webdataset's ShardWriter) readable by all of them and by `trainer fit`.

Every expectation is our own read of the shards with `tarfile`, in the manifest's order.
The "Reading the shards with ..." snippets of docs/reading-shards.md are copied from these tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import real_data_root, run_cli
from tests.readback import record_readback

SIDECARS = ("_info.json", "classes.txt")


@pytest.fixture(scope="module")
def packed(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes (4 classes x 12) split 36/12 into shards of 10."""
    out = tmp_path_factory.mktemp("interop") / "shapes"
    result = run_cli("pack", shapes, out, "--split", "val=0.25", "--stratify", "--shard-size", "10", "--workers", "0")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def clothing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clothing-small (3,781 real photos; train/validation/test) packed at 64 px (skipped without the data)."""
    root = real_data_root()
    if root is None:
        pytest.skip("real data not available: set SHARDTOOL_REAL_DATA to the shared/data folder")
    out = tmp_path_factory.mktemp("interop") / "clothing-small"
    result = run_cli("pack", root / "clothing-small", out, "--resize", "shorter:64")
    assert result.exit_code == 0, result.output
    return out


def manifest_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "dataset.json").read_text())


def our_samples(out: Path, split: str) -> list[dict[str, Any]]:
    """Every sample of SPLIT in the manifest's shard order: key, label (or None) and image bytes."""
    samples = []
    for shard in manifest_of(out)["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                key, ext = member.name[: len(member.name) - len(base)] + base.split(".")[0], base.split(".", 1)[1]
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key, "label": None})
                data = tar.extractfile(member).read()
                if ext == "cls":
                    samples[-1]["label"] = int(data)
                elif ext in ("jpg", "png", "webp"):
                    samples[-1]["image"] = data
    return samples


def pixels(image: Image.Image | bytes) -> str:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def read_with_timm(out: Path, split: str) -> list[tuple[Image.Image, int]]:
    import timm.data

    # docs/reading-shards.md: timm
    dataset = timm.data.create_dataset("wds/shapes", root=str(out), split=split)  # counts from OUT/_info.json
    assert len(dataset) == manifest_of(out)["splits"][split]["num_samples"]  # no scan: _info.json says it
    return list(dataset)


def check_timm(out: Path, name: str) -> None:
    pytest.importorskip("timm")
    for split in manifest_of(out)["splits"]:
        read = read_with_timm(out, split)
        record_readback(f"timm wds ({name})", split, len(read))
        ours = our_samples(out, split)
        assert Counter((label, pixels(image)) for image, label in read) == \
            Counter((s["label"], pixels(s["image"])) for s in ours), split


def check_wids(out: Path, name: str, tmp_path: Path, picks: int = 25) -> None:
    wids = pytest.importorskip("wids")
    for split in manifest_of(out)["splits"]:
        # docs/reading-shards.md: wids
        dataset = wids.ShardListDataset(str(out / f"{split}.wids.json"), cache_dir=str(tmp_path / "wids"))
        ours = our_samples(out, split)
        assert len(dataset) == len(ours)
        indices = random.Random(0).sample(range(len(ours)), min(picks, len(ours))) + [0, len(ours) - 1]
        for i in indices:
            sample = dataset[i]
            assert sample["__key__"] == ours[i]["key"], i
            assert sample[".cls"] == ours[i]["label"], i
            assert pixels(sample[".jpg"]) == pixels(ours[i]["image"]), i
        record_readback(f"wids random access, samples picked ({name})", split, len(indices))


def check_hf(out: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = manifest_of(out)
    # docs/reading-shards.md: datasets
    files = {split: [str(out / s["name"]) for s in entry["shards"]] for split, entry in manifest["splits"].items()}
    read = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf"))
    for split in manifest["splits"]:
        ours = our_samples(out, split)
        got = read[split]
        record_readback(f"hf datasets ({name})", split, len(got))
        assert len(got) == len(ours)
        assert Counter(zip(got["__key__"], got["cls"])) == Counter((s["key"], s["label"]) for s in ours), split
        for row in got.select(random.Random(1).sample(range(len(got)), min(5, len(got)))):
            image = next(s["image"] for s in ours if s["key"] == row["__key__"])
            assert pixels(row["jpg"]) == pixels(image)


def test_pack_writes_each_tools_index_derived_from_the_manifest(packed):
    manifest = manifest_of(packed)
    info = json.loads((packed / "_info.json").read_text())
    for split, entry in manifest["splits"].items():
        assert info["splits"][split]["num_samples"] == entry["num_samples"]
        assert info["splits"][split]["filenames"] == [s["name"] for s in entry["shards"]]
        assert info["splits"][split]["shard_lengths"] == [s["num_samples"] for s in entry["shards"]]
        wids_index = json.loads((packed / f"{split}.wids.json").read_text())
        assert wids_index["__kind__"] == "wids-shard-index-v1"
        assert [(s["url"], s["nsamples"]) for s in wids_index["shardlist"]] == \
            [(s["name"], s["num_samples"]) for s in entry["shards"]]
    assert (packed / "classes.txt").read_text().splitlines() == [c["name"] for c in manifest["classes"]]


def test_timm_reads_every_sample_with_its_label(packed):
    check_timm(packed, "shapes")


def test_wids_sample_i_is_our_sample_i(packed, tmp_path):
    check_wids(packed, "shapes", tmp_path)


def test_hugging_face_datasets_reads_every_sample_with_its_label(packed, tmp_path, monkeypatch):
    check_hf(packed, "shapes", tmp_path, monkeypatch)


@pytest.mark.real
def test_real_photos_read_back_by_timm_wids_and_datasets(clothing, tmp_path, monkeypatch):
    assert list(manifest_of(clothing)["splits"]) == ["train", "validation", "test"]
    check_timm(clothing, "clothing-small")
    check_wids(clothing, "clothing-small", tmp_path)
    check_hf(clothing, "clothing-small", tmp_path, monkeypatch)


def test_index_rewrites_the_sidecars_and_idx_of_an_older_pack(packed, tmp_path):
    out = Path(shutil.copytree(packed, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".txt", ".idx")}
    for path in [*out.glob("*.wids.json"), out / "_info.json", out / "classes.txt", out / "train-000001.idx"]:
        path.unlink()
    result = run_cli("index", out)
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".txt", ".idx")}
    assert after == before


# --- tars written by another tool -------------------------------------------------------------------------

NAMES = ("cat", "dog", "bird")


def write_with_webdataset(out: Path, text: bool = True) -> dict[str, dict[str, int]]:
    """What a user's own script writes with webdataset.ShardWriter: jpg + cls (+ the class name as txt);
    returns split -> key -> label."""
    wds = pytest.importorskip("webdataset")
    out.mkdir(parents=True)
    written: dict[str, dict[str, int]] = {}
    rng = random.Random(0)
    for split, count in (("train", 40), ("val", 12)):
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=16, verbose=0) as sink:
            for i in range(count):
                label = rng.randrange(3)
                image = Image.new("RGB", (48, 40), (90 * label, 200 - 90 * label, rng.randrange(256)))
                data = io.BytesIO()
                image.save(data, "JPEG")
                sample = {"__key__": f"{split}{i:05d}", "jpg": data.getvalue(), "cls": label}
                if text:
                    sample["txt"] = NAMES[label]
                sink.write(sample)
                written.setdefault(split, {})[f"{split}{i:05d}"] = label
    return written


def test_index_makes_webdataset_written_tars_a_dataset(tmp_path):
    tars = tmp_path / "theirs"
    written = write_with_webdataset(tars)

    result = run_cli("index", tars)

    assert result.exit_code == 0, result.output
    manifest = manifest_of(tars)
    assert [c["name"] for c in manifest["classes"]] == list(NAMES)  # from the .txt beside each .cls
    for split, labels in written.items():
        ours = our_samples(tars, split)
        assert {s["key"]: s["label"] for s in ours} == labels
        assert manifest["splits"][split]["num_samples"] == len(labels)
        assert manifest["splits"][split]["class_counts"] == [Counter(labels.values())[i] for i in range(3)]
    assert run_cli("verify", tars, "--decode").exit_code == 0
    check_timm(tars, "webdataset-written")


@pytest.mark.dali
def test_dali_reads_indexed_webdataset_tars(tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    tars = tmp_path / "theirs"
    written = write_with_webdataset(tars)
    assert run_cli("index", tars).exit_code == 0
    shards = manifest_of(tars)["splits"]["train"]["shards"]
    pipe = dali.Pipeline(batch_size=8, num_threads=1, device_id=None)
    with pipe:
        _, cls = dali.fn.readers.webdataset(paths=[str(tars / s["name"]) for s in shards], ext=["jpg", "cls"],
                                           index_paths=[str(tars / s["index"]) for s in shards], name="reader")
        pipe.set_outputs(cls)
    pipe.build()
    labels: list[int] = []
    while len(labels) < 40:
        (batch,) = pipe.run()
        labels += [int(bytes(np.array(batch.at(i)))) for i in range(len(batch))]
    assert pipe.reader_meta("reader")["epoch_size"] == 40
    assert Counter(labels[:40]) == Counter(written["train"].values())


@pytest.mark.dali
def test_index_writes_the_idx_dali_wds2idx_writes_for_webdataset_tars(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    tars = tmp_path / "theirs"
    write_with_webdataset(tars)  # pax headers: data offsets are not our own tars' fixed 512-byte steps
    assert run_cli("index", tars).exit_code == 0
    for tar in sorted(tars.glob("*.tar")):
        theirs = tmp_path / (tar.stem + ".wds2idx")
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_bytes() == theirs.read_bytes(), tar.name


def test_index_class_names_from_a_file_and_clear_refusals(tmp_path):
    tars = tmp_path / "theirs"
    write_with_webdataset(tars, text=False)
    classes = tmp_path / "classes.txt"
    classes.write_text("kitten\npuppy\n")
    short = run_cli("index", tars, "--classes", classes)
    assert short.exit_code != 0 and "names 2 classes, but the shards use label 2" in short.output
    classes.write_text("kitten\npuppy\nchick\n")
    assert run_cli("index", tars, "--classes", classes).exit_code == 0
    assert [c["name"] for c in manifest_of(tars)["classes"]] == ["kitten", "puppy", "chick"]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.tar.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    refused = run_cli("index", empty)
    assert refused.exit_code != 0 and "a.tar.gz is compressed" in refused.output
    assert "Traceback" not in refused.output


def test_fit_on_webdataset_written_tars_after_index(tmp_path):
    tars = tmp_path / "theirs"
    written = write_with_webdataset(tars)
    tiny = ["--model", "tiny_cnn", "--weights", "none", "--batch-size", "4", "--workers", "2", "--amp", "none",
            "--freeze-epochs", "0", "--epochs", "1", "--log-keys"]

    def fit(*args: Any) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainer", "fit", *map(str, args), *tiny],
                              capture_output=True, text=True, timeout=600)

    before = fit(tars, tmp_path / "refused")
    assert before.returncode != 0 and f"run `shardtool index {tars}`" in before.stderr
    assert "Traceback" not in before.stderr

    assert run_cli("index", tars).exit_code == 0
    run = tmp_path / "run"
    result = fit(tars, run)

    assert result.returncode == 0, result.stderr[-2000:]
    from trainer.keylog import read_keys

    (keys,) = read_keys(run / "keys" / "rank-0.tsv").values()  # the one epoch
    assert sorted(keys) == sorted(written["train"])  # every training sample once
    import torch

    assert torch.load(run / "best.pt", weights_only=False, map_location="cpu")["classes"] == list(NAMES)
