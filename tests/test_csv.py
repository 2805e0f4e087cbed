"""CSV manifests (joined, dirty, grouped) and pixel CSVs: what ends up in the shards and the report."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.shards import read_shards

CATEGORIES = {"p1": "Home & Garden / Dining / Cups", "p2": "Home & Garden / Kitchen", "p3": "Sports / Bikes / Road"}


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), tuple(int(v) for v in rng.integers(0, 256, 3))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()




def meta(sample: dict[str, bytes]) -> dict:
    return json.loads(sample["json"])


def load_report(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())["report"]


def skip_counts(out: Path) -> dict[str, int]:
    return {reason: entry["count"] for reason, entry in load_report(out)["skips"].items()}


# --- CSV manifests ------------------------------------------------------------------------------------------


@pytest.fixture
def marketplace(tmp_path: Path) -> Path:
    """Images.csv + Products.csv as pandas exported them: unnamed index columns, bare CRs, currency prices."""
    root = tmp_path / "market"
    (root / "images").mkdir(parents=True)
    images = ",id,product_id\n"
    for n, (image, product) in enumerate([("img1", "p1"), ("img2", "p1"), ("img3", "p2"), ("img4", "p3"),
                                          ("img5", "p3"), ("img6", "p3")]):
        images += f"{n},{image},{product}\n"
        (root / "images" / f"{image}.jpg").write_bytes(jpeg(n))
    (root / "Images.csv").write_text(images, newline="")
    products = (
        ",id,product_name,category,product_description,price,location\r\n"
        f'0,p1,Mug,{CATEGORIES["p1"]},Great mug\rdishwasher safe,"£1,250.00",London\r\n'
        f'1,p2,Pan,{CATEGORIES["p2"]},Non-stick,£7.50,"Leeds, West Yorkshire"\r\n'
        f'2,p3,Bike,{CATEGORIES["p3"]},"Fast\nand light",£300,Bristol\r\n'
    )
    (root / "Products.csv").write_text(products, encoding="utf-8", newline="")
    return root


def pack_market(cli, root: Path, out: Path, *extra: str):
    return cli("pack", root / "Images.csv", out, "--images", root / "images", "--image-col", "id",
               "--image-suffix", ".jpg", "--join", root / "Products.csv", "--join-on", "product_id=id",
               "--label-col", "category", "--workers", "0", *extra)


def test_joined_manifest_with_label_level(marketplace, tmp_path, cli):
    out = tmp_path / "out"
    result = pack_market(cli, marketplace, out, "--label-level", "1")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["Home & Garden", "Sports"]
    assert manifest["splits"]["train"]["class_counts"] == [3, 3]
    samples = read_shards(out)
    assert sorted(samples) == ["img1", "img2", "img3", "img4", "img5", "img6"]
    for key, sample in samples.items():
        assert sample["jpg"] == (marketplace / "images" / f"{key}.jpg").read_bytes()
    assert {key: s["cls"] for key, s in samples.items()} == {
        "img1": b"0", "img2": b"0", "img3": b"0", "img4": b"1", "img5": b"1", "img6": b"1"}
    assert load_report(out)["skipped"] == 0


def test_per_sample_metadata_is_cleaned(marketplace, tmp_path, cli):
    out = tmp_path / "out"
    assert pack_market(cli, marketplace, out).exit_code == 0
    samples = {key: meta(s) for key, s in read_shards(out).items()}
    mug = samples["img1"]
    assert mug["label"] == "Home & Garden / Dining / Cups"  # no --label-level: the full path
    assert mug["price"] == 1250.0  # '£1,250.00'
    assert mug["product_description"] == "Great mug\ndishwasher safe"  # the bare CR survives as a line break
    assert mug["location"] == "London"  # the CR did not end the record: later fields are in place
    assert mug["product_name"] == "Mug" and mug["product_id"] == "p1" and mug["id"] == "img1"
    assert "" not in mug and not any(k.startswith("Unnamed") for k in mug)  # the index columns are dropped
    assert (mug["width"], mug["height"]) == (24, 16)
    assert samples["img3"]["price"] == 7.5 and samples["img3"]["location"] == "Leeds, West Yorkshire"
    assert samples["img4"]["price"] == 300.0 and samples["img4"]["product_description"] == "Fast\nand light"
    assert {s["group"] for s in samples.values()} == {"p1", "p2", "p3"}  # grouped by the join key


def test_label_level_keeps_levels_in_classes(marketplace, tmp_path, cli):
    out = tmp_path / "out"
    assert pack_market(cli, marketplace, out, "--label-level", "2").exit_code == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["classes"] == [
        {"index": 0, "name": "Home & Garden / Dining", "levels": ["Home & Garden", "Dining"], "level_indexes": [0]},
        {"index": 1, "name": "Home & Garden / Kitchen", "levels": ["Home & Garden", "Kitchen"], "level_indexes": [0]},
        {"index": 2, "name": "Sports / Bikes", "levels": ["Sports", "Bikes"], "level_indexes": [1]},
    ]
    assert manifest["hierarchy"] == {"names": ["level1", "level2"], "levels": [["Home & Garden", "Sports"]]}


def test_bad_rows_are_counted_by_reason(tmp_path, cli):
    (tmp_path / "pics").mkdir()
    rows = ["image,label"]
    for i in range(6):
        (tmp_path / "pics" / f"ok{i}.png").write_bytes(jpeg(i))  # JPEG bytes under a .png name: still packed
        rows.append(f"pics/ok{i}.png,{'ab'[i % 2]}")
    rows += ["pics/ok0.png,a",  # duplicate_key
             "pics/gone.png,b",  # missing_file
             "pics/ok1.png,",  # missing_label (also a duplicate, but the label is checked first)
             "pics/ok2.png,  ",  # missing_label: only blanks
             ",a"]  # missing_image_ref
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = cli("pack", tmp_path / "list.csv", out, "--workers", "0", "--max-skip-fraction", "0.5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["seen"] == 11 and report["written"] == 6 and report["skipped"] == 5
    assert skip_counts(out) == {"duplicate_key": 1, "missing_file": 1, "missing_image_ref": 1, "missing_label": 2}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["source"]: r["reason"] for r in rejects} == {
        "list.csv:8": "duplicate_key", "list.csv:9": "missing_file", "list.csv:10": "missing_label",
        "list.csv:11": "missing_label", "list.csv:12": "missing_image_ref"}
    assert len(read_shards(out)) == 6


def test_unknown_join_key_is_counted(marketplace, tmp_path, cli):
    with open(marketplace / "Images.csv", "a") as file:
        file.write("6,img7,p404\n")
    (marketplace / "images" / "img7.jpg").write_bytes(jpeg(7))
    out = tmp_path / "out"
    result = pack_market(cli, marketplace, out, "--max-skip-fraction", "0.2")
    assert result.exit_code == 0, result.output
    assert skip_counts(out) == {"join_missing": 1}
    assert load_report(out)["skips"]["join_missing"]["examples"] == [
        {"source": "Images.csv:8", "detail": "product_id='p404' not in Products.csv"}]


def product_csv(tmp_path: Path, scattered: bool = False) -> None:
    """list.csv: 20 products x 3 views in img/, a product's rows together or (SCATTERED) view by view."""
    (tmp_path / "img").mkdir()
    rows = ["image,label,product_id"]
    pairs = [(p, v) for v in range(3) for p in range(20)] if scattered else [(p, v) for p in range(20) for v in range(3)]
    for product, view in pairs:
        name = f"img/p{product}_{view}.jpg"
        (tmp_path / name).write_bytes(jpeg(product * 3 + view))
        rows.append(f"{name},{'xyz'[product % 3]},prod{product}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")


def test_group_split_keeps_a_product_together(tmp_path, cli):
    product_csv(tmp_path)
    out = tmp_path / "out"
    result = cli("pack", tmp_path / "list.csv", out, "--group-col", "product_id", "--split", "val=0.5",
                 "--workers", "0")
    assert result.exit_code == 0, result.output
    splits_of: dict[str, set[bytes]] = {}
    for sample in read_shards(out).values():
        splits_of.setdefault(meta(sample)["product_id"], set()).add(sample["split"])
    assert len(splits_of) == 20
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    val = sum(splits == {b"val"} for splits in splits_of.values())
    assert 4 <= val <= 16  # about half of the 20 products (a hash split, not exact)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["splits"]["val"]["num_samples"] == 3 * val
    assert manifest["splits"]["train"]["num_samples"] == 3 * (20 - val)


def test_shuffled_order_gathers_a_products_scattered_rows(tmp_path, cli):
    """Rows listed view by view (a product's 3 images far apart in the CSV): the default order writes
    each product's images consecutively, products in a shuffled order; --order source keeps the rows'."""
    product_csv(tmp_path, scattered=True)
    stored = {}
    for order in ("shuffled", "source"):
        out = tmp_path / order
        result = cli("pack", tmp_path / "list.csv", out, "--group-col", "product_id", "--order", order)
        assert result.exit_code == 0, result.output
        products = []
        for shard in json.loads((out / "dataset.json").read_text())["splits"]["train"]["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                products += [json.loads(tar.extractfile(m).read())["product_id"] for m in tar if m.name.endswith(".json")]
        stored[order] = products
    runs = [p for i, p in enumerate(stored["shuffled"]) if i == 0 or stored["shuffled"][i - 1] != p]
    assert len(runs) == 20 and runs != [f"prod{i}" for i in range(20)]  # together, and not in the CSV's order
    assert stored["source"] == [f"prod{i}" for _ in range(3) for i in range(20)]


# --- pixel CSVs ---------------------------------------------------------------------------------------------


def pixel_rows(count: int, n: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, n)), [int(v) for v in rng.integers(0, 10, count)]


def pngs_by_line(out: Path, stem: str) -> dict[int, np.ndarray]:
    images = {}
    for key, sample in read_shards(out).items():
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.format == "PNG" and image.mode == "RGB"
        images[int(key.removeprefix(f"{stem}_"))] = np.asarray(image)
    return images


def test_mnist_style_csv_with_crlf_and_no_final_newline(tmp_path, cli):
    values, labels = pixel_rows(5, 784)
    lines = ["label," + ",".join(f"pixel{i}" for i in range(1, 785))]
    lines += [f"{label}," + ",".join(map(str, row)) for label, row in zip(labels, values)]
    (tmp_path / "train.csv").write_bytes("\r\n".join(lines).encode())  # CRLF, and none after the last row
    out = tmp_path / "out"
    result = cli("pack", tmp_path / "train.csv", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    images = pngs_by_line(out, "train")
    assert sorted(images) == [2, 3, 4, 5, 6]  # line numbers: the last row without a newline is there
    for line, row in zip(range(2, 7), values):
        assert images[line].shape == (28, 28, 3)
        for channel in range(3):
            assert (images[line][:, :, channel] == row.reshape(28, 28)).all()
    samples = {int(k.split("_")[1]): s for k, s in read_shards(out).items()}
    names = sorted(set(map(str, labels)), key=int)
    for line, label in zip(range(2, 7), labels):
        assert samples[line]["cls"] == str(names.index(str(label))).encode()
        assert meta(samples[line])["label"] == str(label)


@pytest.mark.parametrize("order", ["interleaved", "planar"])
def test_cifar_style_channel_order(tmp_path, cli, order):
    rng = np.random.default_rng(1)
    pictures = rng.integers(0, 256, (3, 32, 32, 3))  # H, W, C
    lines = ["label," + ",".join(f"pixel{i}" for i in range(3072))]
    for label, picture in enumerate(pictures):
        flat = picture.transpose(2, 0, 1).ravel() if order == "planar" else picture.ravel()
        lines.append(f"{label}," + ",".join(map(str, flat)))
    (tmp_path / "cifar.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = cli("pack", tmp_path / "cifar.csv", out, "--channel-order", order, "--workers", "0")
    assert result.exit_code == 0, result.output
    images = pngs_by_line(out, "cifar")
    assert sorted(images) == [2, 3, 4]
    for line, picture in zip((2, 3, 4), pictures):
        assert (images[line] == picture).all()

    wrong = "planar" if order == "interleaved" else "interleaved"
    other = tmp_path / "other"
    assert cli("pack", tmp_path / "cifar.csv", other, "--channel-order", wrong, "--workers", "0").exit_code == 0
    assert not (pngs_by_line(other, "cifar")[2] == pictures[0]).all()


def test_pixel_rows_with_bad_fields_are_skipped(tmp_path, cli):
    values, labels = pixel_rows(6, 16)
    lines = ["label," + ",".join(f"pixel{i}" for i in range(16))]
    lines += [f"{label}," + ",".join(map(str, row)) for label, row in zip(labels, values)]
    lines[2] = lines[2].rsplit(",", 1)[0]  # 16 fields instead of 17
    lines[3] += ",0"  # 18 fields
    lines[4] = lines[4].replace(",", ",300,", 1).rsplit(",", 1)[0]  # a value over 255
    lines[5] = "," + lines[5].split(",", 1)[1]  # empty label
    lines[6] = lines[6].replace(",", ",x,", 1).rsplit(",", 1)[0]  # not a number
    (tmp_path / "px.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = cli("pack", tmp_path / "px.csv", out, "--workers", "0", "--max-skip-fraction", "1")
    assert result.exit_code == 0, result.output
    assert skip_counts(out) == {"bad_row": 2, "bad_pixels": 2, "missing_label": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["source"]: r["reason"] for r in rejects} == {
        "px.csv:3": "bad_row", "px.csv:4": "bad_row", "px.csv:5": "bad_pixels", "px.csv:6": "missing_label",
        "px.csv:7": "bad_pixels"}
    assert [r["detail"] for r in rejects[:2]] == ["16 fields, expected 17", "18 fields, expected 17"]
    images = pngs_by_line(out, "px")
    assert sorted(images) == [2]
    assert (images[2][:, :, 0] == values[0].reshape(4, 4)).all()


def test_shape_overrides_the_inferred_one(tmp_path, cli):
    values, labels = pixel_rows(2, 784, seed=3)
    lines = ["label," + ",".join(f"pixel{i}" for i in range(784))]
    lines += [f"{label}," + ",".join(map(str, row)) for label, row in zip(labels, values)]
    (tmp_path / "wide.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = cli("pack", tmp_path / "wide.csv", out, "--shape", "14x56x1", "--workers", "0")
    assert result.exit_code == 0, result.output
    images = pngs_by_line(out, "wide")
    for line, row in zip((2, 3), values):
        assert images[line].shape == (14, 56, 3)
        assert (images[line][:, :, 1] == row.reshape(14, 56)).all()

    result = cli("pack", tmp_path / "wide.csv", tmp_path / "bad", "--shape", "28x28x3", "--workers", "0")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == "error: --shape 28x28x3 needs 2352 pixel columns; wide.csv has 784"
