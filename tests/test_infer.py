"""Using a trained model: predict on image files, the Python API, odd images, export with parity."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.models import trainer
from trainer.infer import BadImage, Classifier, read_image


def odd_versions(image: Image.Image, folder: Path) -> dict[str, Path]:
    """IMAGE saved the ways real uploads come: greyscale, CMYK JPEG, 16-bit PNG, RGBA PNG, EXIF-rotated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = image.convert("RGB")
    paths = {name: folder / f"{name}.{ext}" for name, ext in
             [("rgb", "png"), ("grey", "png"), ("cmyk", "jpg"), ("sixteen", "png"), ("alpha", "png"), ("exif", "jpg")]}
    rgb.save(paths["rgb"])
    rgb.convert("L").save(paths["grey"])
    rgb.convert("CMYK").save(paths["cmyk"], quality=100)
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(paths["sixteen"])  # mode I;16
    rgb.convert("RGBA").save(paths["alpha"])
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": the pixels are stored turned counter-clockwise
    rgb.transpose(Image.Transpose.ROTATE_90).save(paths["exif"], exif=exif, quality=100)
    return paths


def test_odd_images_are_read_upright_and_rgb_as_pack_reads_them(shapes_model, tmp_path: Path) -> None:
    original = Image.open(next((shapes_model.source / "circle").glob("*.jpg")))
    paths = odd_versions(original, tmp_path)
    reference = read_image(paths["rgb"]).float()
    grey = read_image(paths["grey"])
    for name, path in paths.items():
        tensor = read_image(path)
        assert tensor.dtype == torch.uint8 and tensor.shape == reference.shape, name  # 3 channels, upright
        target = grey.float() if name in ("grey", "sixteen") else reference
        assert (tensor.float() - target).abs().mean() < 3, name  # JPEG at quality 100: within a few levels
    clf = Classifier.load(shapes_model.ckpt, "cpu")
    answers = {name: clf.classify(path, k=1)[0] for name, path in paths.items()}
    assert {answers[name].label for name in ("rgb", "cmyk", "alpha", "exif")} == {"circle"}, answers


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"just some text, not a picture", "not_an_image"),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not_an_image"),  # a JPEG's first marker, then junk
])
def test_bad_bytes_raise_one_clear_error(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage) as caught:
        read_image(data)
    assert caught.value.reason == reason and "\n" not in str(caught.value)


def test_truncated_and_corrupt_jpegs_and_a_decompression_bomb_are_refused(shapes_model) -> None:
    whole = next((shapes_model.source / "square").glob("*.jpg")).read_bytes()
    with pytest.raises(BadImage, match="truncated") as caught:
        read_image(whole[: len(whole) // 2])
    assert caught.value.reason == "corrupt_image"
    png = io.BytesIO()
    Image.open(io.BytesIO(whole)).save(png, "PNG")
    data = bytearray(png.getvalue())
    start = data.index(b"IDAT") + 8
    data[start:start + 64] = bytes(64)  # zeros inside the compressed pixels: the header parses, the pixels do not
    with pytest.raises(BadImage, match="corrupt") as caught:
        read_image(bytes(data))
    assert caught.value.reason == "corrupt_image"
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 Mpixels in ~20 KB
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(BadImage, match="over the limit") as caught:
        read_image(bomb.getvalue())
    assert caught.value.reason == "too_many_pixels"


def test_predict_never_prints_a_file_name_s_escape_codes_raw(shapes_model, tmp_path: Path) -> None:
    good = tmp_path / "red\x1b[31m.jpg"
    good.write_bytes(next((shapes_model.source / "circle").glob("*.jpg")).read_bytes())
    broken = tmp_path / "clear\x1b[2J.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    done = trainer("predict", shapes_model.ckpt, good, broken)
    assert done.returncode == 1 and "\x1b" not in done.stdout + done.stderr, done.stderr
    assert "red\\x1b[31m.jpg" in done.stdout and "clear\\x1b[2J.jpg" in " ".join(done.stderr.split())


def test_predict_on_files_folders_and_globs_with_errors_per_file(shapes_model, tmp_path: Path) -> None:
    source = shapes_model.source
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    args = [source / "circle", str(source / "square" / "*.jpg"), broken]
    table = trainer("predict", shapes_model.ckpt, *args, "-k", "2")
    assert table.returncode == 1, table.stderr  # one file could not be read: said, and the exit status shows it
    lines = table.stdout.splitlines()
    assert len(lines) == 60 and all(len(line.split("%")) == 3 for line in lines)  # 30 + 30 files, 2 labels each
    assert f"{broken} error: not an image: 13 bytes" in " ".join(table.stderr.split())
    assert "1 of 61 files could not be classified" in table.stderr

    out = tmp_path / "preds.csv"
    written = trainer("predict", shapes_model.ckpt, *args, "--out", out)
    rows = list(csv.DictReader(out.open()))
    assert written.returncode == 1 and len(rows) == 60 * 4 + 1  # k 5 capped at the 4 classes, 1 error row
    top1 = {r["file"]: r["label"] for r in rows if r["rank"] == "1"}
    truth = {f: Path(f).parent.name for f in top1}
    correct = sum(top1[f] == truth[f] for f in top1)
    print(f"probe checkpoint on its own shapes files: {correct}/{len(top1)} top-1")
    assert correct >= 0.8 * len(top1)
    assert [r["error"] for r in rows if r["file"] == str(broken)] != [""]

    out_json = tmp_path / "preds.json"
    trainer("predict", shapes_model.ckpt, broken, source / "cross", "--out", out_json)
    entries = json.loads(out_json.read_text())
    assert entries[0] == {"file": str(broken), "error": entries[0]["error"], "reason": "not_an_image"}
    assert len(entries) == 31 and all(len(e["top"]) == 4 for e in entries[1:])  # k 5 capped at 4 classes
    assert all(abs(sum(t["prob"] for t in e["top"]) - 1) < 1e-4 for e in entries[1:])


def test_the_same_image_gets_the_same_answer_from_shards_and_from_files(shapes_model, tmp_path: Path) -> None:
    """The val split through the shard loader (predict DATA --amp none) and the shards' own JPEGs written out
    as files through predict on files: the same top-1 and probabilities within 1e-4 for every image."""
    shards_csv = tmp_path / "shards.csv"
    done = trainer("predict", shapes_model.ckpt, shapes_model.data, "--split", "val", "--out", shards_csv,
                   "--amp", "none")
    assert done.returncode == 0, done.stderr
    by_key = {r["key"]: r for r in csv.DictReader(shards_csv.open())}
    manifest = json.loads((shapes_model.data / "dataset.json").read_text())
    assert manifest["splits"]["val"]["num_samples"] == len(by_key) > 20
    files = tmp_path / "files"
    files.mkdir()
    for shard in sorted(shapes_model.data.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    (files / member.name).write_bytes(tar.extractfile(member).read())
    answers = {Path(r.source).stem: r.top[0]
               for r in Classifier.load(shapes_model.ckpt, "cpu").classify_many(map(str, sorted(files.iterdir())))}
    assert {key: a.label for key, a in answers.items()} == {key: r["prediction"] for key, r in by_key.items()}
    worst = max(abs(answers[key].prob - float(row["probability"])) for key, row in by_key.items())
    print(f"shards vs files: {len(answers)} images, same top-1, top probability within {worst:.1e}")
    assert worst < 1e-4 + 5e-5  # the CSV rounds to 4 decimals


def test_export_onnx_and_torchscript_match_the_checkpoint(shapes_model, shapes_onnx, tmp_path: Path) -> None:
    onnx_file, onnx_result = shapes_onnx  # exported once for this test and the serve benchmark's
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        if fmt == "onnx":
            result = onnx_result
        else:
            done = trainer("export", shapes_model.ckpt, tmp_path / name, "--format", fmt, "--check-data",
                           shapes_model.data, "--split", "val", "--json")
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
        sidecar = json.loads(Path(result["sidecar"]).read_text())
        parity = sidecar["parity"]
        print(f"{fmt}: {parity['by_input']}")
        assert parity["by_input"]["val"]["images"] == 32 == parity["by_input"]["val"]["top1_equal"]
        assert parity["max_prob_diff"] < 1e-4
        assert sidecar["classes"] == ["circle", "cross", "square", "triangle"]
        assert sidecar["input"]["shape"] == ["batch", 3, 64, 64]
        assert sidecar["preprocessing"]["resize_shorter"] == 73 and sidecar["checkpoint_sha256"]
    onnx = Classifier.load(onnx_file)
    torch_model = Classifier.load(shapes_model.ckpt, "cpu")
    images = torch.stack([torch_model.prepare(p) for p in sorted(shapes_model.source.glob("*/*.jpg"))[::7]])
    assert (onnx.probabilities(images) - torch_model.probabilities(images)).abs().max() < 1e-4
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    logits, probs = scripted(torch_model.preprocessing.normalize(images).contiguous())
    assert torch.allclose(probs, torch_model.probabilities(images), atol=1e-4)


@pytest.mark.real
def test_onnx_export_parity_on_every_clothing_small_test_image(clothing_model, real_data: Path,
                                                               tmp_path: Path) -> None:
    test_shards = tmp_path / "test-shards"
    from tests.conftest import run_cli

    packed = run_cli("pack", real_data / "clothing-small" / "test", test_shards, "--resize", "shorter:256",
                     "--workers", "0")
    assert packed.exit_code == 0, packed.output
    done = trainer("export", clothing_model.ckpt, tmp_path / "clothing.onnx", "--check-data", test_shards,
                   "--split", "train", "--json")
    assert done.returncode == 0, done.stderr
    parity = json.loads(done.stdout)["parity"]["by_input"]["train"]
    print(f"clothing-small test split, ONNX Runtime vs PyTorch: top-1 equal {parity['top1_equal']}/"
          f"{parity['images']}, max probability difference {parity['max_prob_diff']:.2e}")
    assert parity["images"] == parity["top1_equal"] == 372
    assert parity["max_prob_diff"] < 1e-4


def test_unreadable_checkpoint_and_missing_files_are_one_line_errors(shapes_model, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    done = trainer("predict", junk, shapes_model.source / "circle")
    assert done.returncode == 2 and "is not a trainer checkpoint" in done.stderr and "Traceback" not in done.stderr
    done = trainer("predict", shapes_model.ckpt, str(tmp_path / "nothing-*.jpg"))
    assert done.returncode == 2 and "no file matches" in done.stderr
    done = trainer("export", shapes_model.ckpt, tmp_path / "m.onnx", "--format", "tflite")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (tmp_path / "m.onnx").write_bytes(b"")
    done = trainer("export", tmp_path / "m.onnx", tmp_path / "again.onnx")
    assert done.returncode == 2 and "is already an export" in done.stderr
