"""The real datasets in ../shared/data pack with the counts, labels, metadata and pixels their sources hold.

Every expectation is computed here from the source files with plain Python, not with shardtool's readers.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.real

SPLITS = ("train", "validation", "test")


def read_samples(out: Path) -> dict[str, dict[str, Any]]:
    """split -> key -> {ext: bytes} for every sample of every shard the manifest lists."""
    manifest = json.loads((out / "dataset.json").read_text())
    samples: dict[str, dict[str, Any]] = {}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(split, {}).setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def counts_by_name(manifest: dict[str, Any], split: str) -> dict[str, int]:
    counts = manifest["splits"][split]["class_counts"]
    return {entry["name"]: counts[entry["index"]] for entry in manifest["classes"]}


def test_clothing_small_keeps_its_splits_and_class_counts(real_data, cli, tmp_path):
    source, out = real_data / "clothing-small", tmp_path / "out"
    expected = {split: {d.name: sum(1 for f in d.iterdir() if f.is_file())
                        for d in (source / split).iterdir() if d.is_dir()} for split in SPLITS}
    assert sum(sum(c.values()) for c in expected.values()) == 3781

    result = cli("pack", source, out, "--resize", "shorter:256", "--json")

    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    assert list(manifest["splits"]) == list(SPLITS)
    assert sorted(c["name"] for c in manifest["classes"]) == sorted(expected["train"])
    for split in SPLITS:
        assert counts_by_name(manifest, split) == expected[split], split
        assert manifest["splits"][split]["num_samples"] == sum(expected[split].values())
    report = manifest["report"]
    assert (report["seen"], report["written"], report["skipped"]) == (3781, 3781, 0)
    assert report["ignored"]["count"] == 2
    assert sorted(e["path"] for e in report["ignored"]["examples"]) == ["LICENSE", "README.md"]

    samples = read_samples(out)
    sources = [json.loads(s["json"])["source"] for split in samples.values() for s in split.values()]
    assert len(sources) == 3781 and not {"README.md", "LICENSE"} & set(sources)
    for split, by_key in samples.items():
        for sample in by_key.values():
            info = json.loads(sample["json"])
            assert Path(info["source"]).parts[:2] == (split, info["label"])
            assert min(info["width"], info["height"]) == 256, info["source"]


def fb_args(real_data: Path, out: Path) -> list[Any]:
    fb = real_data / "fb-marketplace"
    return ["pack", fb / "Images.csv", out, "--images", fb / "images", "--image-col", "id", "--image-suffix", ".jpg",
            "--join", fb / "Products.csv", "--join-on", "product_id=id", "--label-col", "category",
            "--label-level", "1", "--max-skip-fraction", "1"]


def read_products(path: Path) -> dict[str, dict[str, str]]:
    """Products.csv by id. Its bare CRs sit inside descriptions: read as spaces, compared whitespace-blind."""
    text = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b" ").decode("utf-8-sig")
    return {row["id"]: row for row in csv.DictReader(io.StringIO(text, newline=""))}


def read_images(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as file:
        return list(csv.DictReader(file))


def words(text: str) -> list[str]:
    return text.split()


def test_fb_marketplace_joins_products_and_counts_missing_files(real_data, cli, tmp_path):
    fb, out = real_data / "fb-marketplace", tmp_path / "out"
    products = read_products(fb / "Products.csv")
    present = [row for row in read_images(fb / "Images.csv") if (fb / "images" / f"{row['id']}.jpg").is_file()]
    expected = Counter(products[row["product_id"]]["category"].split(" / ")[0].strip() for row in present)
    assert len(present) == 1500 and len(expected) == 13

    result = cli(*fb_args(real_data, out), "--json")

    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    assert list(manifest["splits"]) == ["train"]
    assert counts_by_name(manifest, "train") == dict(expected)
    report = manifest["report"]
    assert (report["seen"], report["written"], report["skipped"]) == (12604, 1500, 11104)
    assert list(report["skips"]) == ["missing_file"] and report["skips"]["missing_file"]["count"] == 11104
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 11104 and {r["reason"] for r in rejects} == {"missing_file"}

    by_id = {row["id"]: row for row in present}
    samples = read_samples(out)["train"]
    assert len(samples) == 1500
    for sample in samples.values():
        info = json.loads(sample["json"])
        product = products[by_id[info["id"]]["product_id"]]
        assert info["product_id"] == product["id"]
        assert info["product_name"] == product["product_name"]
        assert words(info["product_description"]) == words(product["product_description"])
        assert isinstance(info["price"], float)
        assert info["price"] == float(product["price"].replace("£", "").replace(",", ""))
        assert info["label"] == product["category"].split(" / ")[0].strip()


def test_fb_marketplace_images_of_a_product_share_a_split(real_data, cli, tmp_path):
    out = tmp_path / "out"

    result = cli(*fb_args(real_data, out), "--split", "val=0.1,test=0.1", "--json")

    assert result.exit_code == 0, result.output
    splits_of: dict[str, set[str]] = {}
    images_of: Counter[str] = Counter()
    sizes = {}
    for split, by_key in read_samples(out).items():
        sizes[split] = len(by_key)
        for sample in by_key.values():
            product = json.loads(sample["json"])["product_id"]
            splits_of.setdefault(product, set()).add(split)
            images_of[product] += 1
    assert sum(sizes.values()) == 1500 and set(sizes) == {"train", "val", "test"}
    assert 75 <= sizes["val"] <= 225 and 75 <= sizes["test"] <= 225  # ~10% each, hashed by product
    assert sum(n > 1 for n in images_of.values()) > 50  # many products have several images here
    assert {product: s for product, s in splits_of.items() if len(s) > 1} == {}


def test_fashion_mnist_pixels_and_labels_match_the_csv(real_data, cli, tmp_path):
    source, out = real_data / "fashion-mnist" / "fashion-mnist_test.csv", tmp_path / "out"
    lines = source.read_bytes().decode("ascii").splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    assert header[0] == "label" and len(rows) == 1000

    result = cli("pack", source, out, "--json")

    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    names = [entry["name"] for entry in manifest["classes"]]
    samples = read_samples(out)["train"]
    assert len(samples) == 1000
    for sample in samples.values():
        info = json.loads(sample["json"])
        row = rows[int(info["source"].rsplit(":", 1)[1]) - 2]  # line 1 is the header
        assert info["label"] == row[0] and names[int(sample["cls"])] == row[0]
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (28, 28))
        expected = np.array([int(v) for v in row[1:]], dtype=np.uint8).reshape(28, 28)
        pixels = np.asarray(image)
        for channel in range(3):
            assert np.array_equal(pixels[:, :, channel], expected), info["source"]
    sources = {json.loads(s["json"])["source"] for s in samples.values()}
    assert len(sources) == 1000  # every row once
