"""Packed shards read back with the readers users train with: plain webdataset, DALI, DALI's own index tool;
and the commands that check and show an output (verify, inspect, show) say what a user needs to see."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shardtool.cli import main
from shardtool.synth import CLASSES
from tests.readback import record_readback


@pytest.fixture(scope="module")
def packed(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes dataset (4 classes x 12) split 36/12, 10 samples a shard: train 4 shards, val 2."""
    out = tmp_path_factory.mktemp("readback") / "out"
    args = ["pack", str(shapes), str(out), "--split", "val=0.25", "--stratify", "--shard-size", "10",
            "--workers", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(packed: Path, tmp_path: Path) -> Path:
    """A private copy of `packed` a test may damage."""
    return Path(shutil.copytree(packed, tmp_path / "out"))


def manifest_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "dataset.json").read_text())


def shard_paths(out: Path, split: str, ext: str = "name") -> list[str]:
    return [str(out / shard[ext]) for shard in manifest_of(out)["splits"][split]["shards"]]


def source_labels(shapes: Path) -> dict[str, str]:
    """What the source says: relative path of every image -> its class folder."""
    return {str(p.relative_to(shapes)): p.parent.name for p in shapes.rglob("*.jpg")}


def test_shapes_output_has_the_layout_the_other_tests_rely_on(packed):
    manifest = manifest_of(packed)
    assert {name: len(s["shards"]) for name, s in manifest["splits"].items()} == {"train": 4, "val": 2}
    assert manifest["splits"]["val"]["class_counts"] == [3, 3, 3, 3]


def test_plain_webdataset_reads_every_sample_with_its_label(packed, shapes):
    wds = pytest.importorskip("webdataset")
    names = [entry["name"] for entry in manifest_of(packed)["classes"]]
    expected = source_labels(shapes)
    seen: dict[str, str] = {}
    for split in ("train", "val"):
        urls = shard_paths(packed, split)
        raw = {s["__key__"]: s["jpg"] for s in wds.WebDataset(urls, shardshuffle=False)}
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            info = sample["json"]
            assert names[sample["cls"]] == info["label"] == expected[info["source"]]
            assert sample["jpg"].size == (64, 64) and sample["jpg"].mode == "RGB"
            # resize none + JPEG in, JPEG out: the source bytes are kept as they are
            assert raw[sample["__key__"]] == (shapes / info["source"]).read_bytes()
            assert info["source"] not in seen
            seen[info["source"]] = names[sample["cls"]]
    assert seen == expected


def read_with_dali(out: Path, split: str, batch_size: int = 8) -> list[tuple[np.ndarray, int, dict[str, Any]]]:
    """One epoch of `split` through fn.readers.webdataset with our .idx files, decoded on the CPU."""
    dali = pytest.importorskip("nvidia.dali")
    fn = dali.fn
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=2, device_id=None)
    with pipe:
        jpg, cls, info = fn.readers.webdataset(paths=shard_paths(out, split), index_paths=shard_paths(out, split, "index"),
                                               ext=["jpg", "cls", "json"], missing_component_behavior="error",
                                               name="reader")
        pipe.set_outputs(fn.decoders.image(jpg, device="cpu"), cls, info)
    pipe.build()
    epoch = pipe.reader_meta("reader")["epoch_size"]
    samples = []
    while len(samples) < epoch:  # the last batch may wrap into the next epoch: keep the first `epoch`
        images, labels, infos = pipe.run()
        for i in range(len(images)):
            samples.append((np.array(images.at(i)), int(bytes(np.array(labels.at(i))).decode()),
                            json.loads(bytes(np.array(infos.at(i))))))
    return samples[:epoch]


@pytest.mark.dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_reads_every_sample_through_our_index(packed, shapes, split):
    manifest = manifest_of(packed)
    names = [entry["name"] for entry in manifest["classes"]]
    expected = source_labels(shapes)

    samples = read_with_dali(packed, split)
    record_readback("dali fn.readers.webdataset", split, len(samples))

    assert len(samples) == manifest["splits"][split]["num_samples"]
    assert len({info["key"] for _, _, info in samples}) == len(samples)  # every sample once
    assert Counter(label for _, label, _ in samples) == Counter(
        {i: n for i, n in enumerate(manifest["splits"][split]["class_counts"])})
    for image, label, info in samples:
        assert names[label] == expected[info["source"]]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        reference = np.asarray(Image.open(shapes / info["source"]).convert("RGB"), dtype=np.int16)
        assert np.abs(image.astype(np.int16) - reference).mean() < 2.0, info["source"]  # same JPEG, any decoder


@pytest.mark.dali
@pytest.mark.parametrize("gnu_tar", [True, False], ids=["gnu-tar", "tarfile-fallback"])
def test_our_idx_files_equal_what_wds2idx_writes(packed, tmp_path, monkeypatch, gnu_tar):
    wds2idx = pytest.importorskip("wds2idx")
    if gnu_tar and wds2idx.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    if not gnu_tar:
        monkeypatch.setattr(wds2idx, "which", lambda name: None)
    tars = sorted(packed.glob("*.tar"))
    assert len(tars) == 6
    for tar in tars:
        theirs = tmp_path / (tar.stem + ".idx")
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_bytes() == theirs.read_bytes(), tar.name


def verify(out: Path):
    return CliRunner().invoke(main, ["verify", str(out), "--decode"])


def test_verify_passes_on_a_fresh_output(packed):
    result = verify(packed)
    assert result.exit_code == 0, result.output
    assert "OK: 6 shards, 48 samples, every image decoded" in result.output


def _middle(shard: Path) -> int:
    return shard.stat().st_size // 2


def _first_header(shard: Path) -> int:
    return 0  # the first member's name: its header checksum no longer matches


def _a_label(shard: Path) -> int:
    with tarfile.open(shard) as tar:
        return next(m for m in tar if m.name.endswith(".cls")).offset_data


@pytest.mark.parametrize("where, flip, message", [
    (_middle, 0x01, "sha256 differs from the manifest"),
    (_first_header, 0x01, "not a readable tar"),
    (_a_label, 0x80, None),  # the label bytes change: the split's class counts no longer add up
])
def test_verify_fails_after_one_byte_of_a_shard_flips(copy, where, flip, message):
    shard = copy / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[where(shard)] ^= flip
    shard.write_bytes(bytes(data))

    result = verify(copy)

    assert result.exit_code == 1, result.output
    assert "FAIL train-000002.tar: sha256 differs from the manifest (changed or corrupt)" in result.output
    assert f"train-000002.tar: {message}" in result.output if message else \
        "FAIL split train: class counts in the shards differ from the manifest" in result.output
    assert "train-000001" not in result.output and "val-" not in result.output  # only the damaged shard


def _shift_first_offset(text: str) -> str:
    header, first, *rest = text.splitlines()
    parts = first.split()
    parts[1] = str(int(parts[1]) + 512)
    return "\n".join([header, " ".join(parts), *rest]) + "\n"


def _drop_last_sample(text: str) -> str:
    return "".join(text.splitlines(keepends=True)[:-1])


@pytest.mark.parametrize("edit, message", [
    (_shift_first_offset, "val-000001.idx: offsets or names do not match val-000001.tar"),
    (_drop_last_sample, "val-000001.idx: unreadable"),
])
def test_verify_fails_after_an_idx_is_edited(copy, edit, message):
    index = copy / "val-000001.idx"
    index.write_text(edit(index.read_text()))

    result = verify(copy)

    assert result.exit_code == 1
    assert message in result.output
    assert "train-" not in result.output and "val-000000" not in result.output


def test_inspect_shows_classes_and_counts(packed):
    result = CliRunner().invoke(main, ["inspect", str(packed)])

    assert result.exit_code == 0, result.output
    rows = {line.split("│")[2].strip(): line for line in result.output.splitlines()
            if line.count("│") == 5 and line.split("│")[2].strip() in CLASSES}
    assert sorted(rows) == sorted(CLASSES)
    for name, line in rows.items():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        assert cells == [str(sorted(CLASSES).index(name)), name, "9", "3"]  # index, class, train, val


def test_inspect_json_is_the_manifest(packed):
    result = CliRunner().invoke(main, ["inspect", str(packed), "--json"])

    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown == manifest_of(packed)
    assert [c["name"] for c in shown["classes"]] == sorted(CLASSES)
    assert {name: s["class_counts"] for name, s in shown["splits"].items()} == {"train": [9] * 4, "val": [3] * 4}


def test_show_writes_a_png_contact_sheet(packed, tmp_path):
    grid = tmp_path / "grid.png"

    result = CliRunner().invoke(main, ["show", str(packed), "--out", str(grid)])

    assert result.exit_code == 0, result.output
    assert "(25 images)" in result.output
    image = Image.open(io.BytesIO(grid.read_bytes()))
    assert image.format == "PNG"
    assert image.size == (5 * 160, 5 * 176)  # 25 of the 36 train samples, 5 x 5 tiles with a caption line
