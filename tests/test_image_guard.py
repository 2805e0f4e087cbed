"""One bad file must not end the run (issue 36): the image guard (shardtool/process/guard.py) shared by pack
(both backends), `trainer predict` on files and `trainer serve`.

    a PNG 1 pixel high and 80 million wide (under --max-pixels; its resize is not)   -> resize_too_large
    a 12 GB sparse file named like an image                                           -> file_too_large
    a TIFF whose strip offsets are not integers (Pillow raises TypeError)             -> corrupt_image
    --resize shorter:999999                                                           -> one config line
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from shardtool.config import MAX_PIXELS
from tests.models import trainer
from tests.shards import read_shards
from tests.test_bad_input import assert_config_error, jpeg_bytes, png_header_only, read_rejects
from trainer.infer import Classifier, Preprocessing
from trainer.serve.app import ServeConfig, create_app

GOOD = 1000


def thin_png(width: int, height: int) -> bytes:
    """A real 1-bit greyscale PNG of width x height, all black: a few KB however many pixels it has."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def bad_tiff() -> bytes:
    """A 16x16 TIFF whose StripOffsets tag says RATIONAL: Pillow opens it, then raises TypeError decoding."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 40, 10)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 5)  # type 5: RATIONAL
    return bytes(data)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)  # no blocks on disk: reading it whole would still ask for SIZE bytes of memory
    return path


def ppm() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PPM")
    return buffer.getvalue()


HOSTILE = {  # file under SOURCE/hostile -> the reason it is skipped for
    "wide.png": "resize_too_large",  # 80,000,000 x 1, as reported
    "tall.png": "resize_too_large",  # 1 x 6,000,000: 16 x 96,000,000 after shorter:16
    "sparse.jpg": "file_too_large",  # 12 GB
    "strips.tif": "corrupt_image",  # TypeError inside Pillow
    "truncated.jpg": "corrupt_image",
    "bomb.png": "too_many_pixels",
    "zeros.png": "not_an_image",  # 200 MB of zeros under the cap: not read whole (not a format we pack)
    "notes.jpg": "not_an_image",
    "empty.png": "empty_file",
    "pixmap.jpg": "unsupported_format",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guard") / "src"
    for index in range(GOOD):
        folder = root / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.jpg").write_bytes(jpeg_bytes(index, (16, 16)))
    hostile = root / "hostile"
    hostile.mkdir()
    files = {"wide.png": thin_png(80_000_000, 1), "tall.png": thin_png(1, 6_000_000), "strips.tif": bad_tiff(),
             "truncated.jpg": jpeg_bytes(1, (16, 16))[:300], "bomb.png": png_header_only(100_000, 100_000),
             "notes.jpg": b"not a picture", "empty.png": b"", "pixmap.jpg": ppm()}
    for name, data in files.items():
        (hostile / name).write_bytes(data)
    sparse(hostile / "sparse.jpg", 12 << 30)
    sparse(hostile / "zeros.png", 200 << 20)
    return root


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_a_pack_with_ten_hostile_files_writes_the_good_ones_and_counts_ten_skips(source, tmp_path, cli, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "out"
    result = cli("pack", source, out, "--resize", "shorter:16", "--workers", "0", "--backend", backend,
                 "--max-skip-fraction", "0.02")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    report = manifest["report"]
    assert manifest["options"]["backend"] == ("dali-cpu" if backend == "dali" else "pil")
    assert (report["seen"], report["written"], report["skipped"]) == (GOOD + 10, GOOD, 10)
    rejects = {r["source"]: r for r in read_rejects(out)}
    assert {source: r["reason"] for source, r in rejects.items()} == {f"hostile/{n}": r for n, r in HOSTILE.items()}
    counts = {reason: entry["count"] for reason, entry in report["skips"].items()}
    assert counts == {"resize_too_large": 2, "file_too_large": 1, "corrupt_image": 2, "too_many_pixels": 1,
                      "not_an_image": 2, "empty_file": 1, "unsupported_format": 1}
    assert rejects["hostile/wide.png"]["detail"] == (
        "--resize shorter:16 of this 80000000x1 image would be 1280000000x16 (20,480,000,000 pixels), "
        f"over --max-pixels {MAX_PIXELS}")
    assert rejects["hostile/sparse.jpg"]["detail"] == ("12,884,901,888 bytes is over the 732,605,096-byte cap that "
                                                "--max-pixels 89478485 sets (8 bytes a pixel + 16 MiB)")
    assert rejects["hostile/strips.tif"]["detail"].startswith("decode: ")
    assert len(read_shards(out)) == GOOD


def test_a_resize_no_image_fits_under_max_pixels_is_one_config_line(tmp_path, cli):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "0.jpg").write_bytes(jpeg_bytes(0, (16, 16)))
    result = cli("pack", tmp_path / "src", tmp_path / "out", "--resize", "shorter:999999", "--workers", "0")
    assert_config_error(result, "--resize 'shorter:999999' is not valid", "N from 1 to 65500")  # JPEG's largest side
    result = cli("pack", tmp_path / "src", tmp_path / "out", "--resize", "shorter:20000", "--workers", "0")
    assert_config_error(result, "--resize shorter:20000 makes every image at least 20000x20000 pixels",
                        f"over --max-pixels {MAX_PIXELS}: use N up to 9459")
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_the_guard_catches_what_pillow_raises_on_hostile_bytes() -> None:
    from shardtool.process import guard

    image = guard.open_image(bad_tiff(), guard.Limits())
    assert isinstance(image, Image.Image)  # the header parses
    rejected = guard.decode(image)
    assert rejected == guard.Reject("corrupt_image", "decode: 'IFDRational' object cannot be interpreted as an integer")
    assert guard.max_file_bytes(MAX_PIXELS) == 8 * MAX_PIXELS + (16 << 20)


def stub_classifier() -> Classifier:
    """A two-class model that answers 'good' for everything: the guard is under test, not the network."""
    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[2.0, 0.0]]).expand(len(images), 2)

    return Classifier(["good", "other"], Preprocessing(64, 73, (0.5,) * 3, (0.25,) * 3), logits, model_name="stub")


def test_predict_reports_the_thin_png_and_the_sparse_file_and_classifies_the_good_one(tmp_path) -> None:
    thin, big, good = tmp_path / "thin.png", sparse(tmp_path / "big.jpg", 12 << 30), tmp_path / "good.jpg"
    thin.write_bytes(thin_png(80_000_000, 1))
    good.write_bytes(jpeg_bytes(3, (16, 16)))
    results = list(stub_classifier().classify_many([str(thin), str(big), str(good)], k=1))
    assert [(r.source, r.reason) for r in results] == [(str(thin), "resize_too_large"), (str(big), "file_too_large"),
                                                       (str(good), "")]
    assert results[0].error.startswith("resize too large: the eval resize (shorter side to 73) of this 80000000x1")
    assert results[2].top[0].label == "good"


def test_serve_answers_each_hostile_upload_with_a_4xx_and_a_reason_and_stays_up() -> None:
    uploads = {"wide": (thin_png(80_000_000, 1), 422, "resize_too_large"),
               "strips": (bad_tiff(), 422, "corrupt_image"),
               "bomb": (png_header_only(100_000, 100_000), 422, "too_many_pixels")}
    app = create_app(stub_classifier(), ServeConfig(max_upload_bytes=1 << 20))

    async def scenario() -> list[tuple[str, int, dict]]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            bad = [client.post("/predict", content=data) for data, _, _ in uploads.values()] * 2  # six at once
            answers = await asyncio.gather(*bad)
            good = await client.post("/predict", content=jpeg_bytes(5, (16, 16)))
            return [(name, r.status_code, r.json()) for name, r in zip(list(uploads) * 2, answers)] + \
                [("good", good.status_code, good.json())]

    for name, status, body in asyncio.run(scenario()):
        if name == "good":
            assert status == 200 and body["top"][0]["label"] == "good", body
            continue
        assert (status, body["reason"]) == uploads[name][1:], (name, body)
        assert body["detail"] and "\n" not in body["detail"]


def test_a_file_over_the_byte_cap_is_not_read(tmp_path, monkeypatch) -> None:
    """The cap is checked on the stat: reading is never attempted (os.read would ask for 12 GB)."""
    from shardtool.process import guard

    path = sparse(tmp_path / "big.png", 12 << 30)
    monkeypatch.setattr(os, "open", lambda *args: pytest.fail("opened a file over the cap"))
    rejected = guard.read_file(str(path), guard.Limits())
    assert isinstance(rejected, guard.Reject) and rejected.reason == "file_too_large"


def test_trainer_predict_prints_an_error_line_for_each_and_classifies_the_good_file(shapes_model, tmp_path) -> None:
    thin, big = tmp_path / "thin.png", sparse(tmp_path / "big.jpg", 12 << 30)
    thin.write_bytes(thin_png(80_000_000, 1))
    good = next((shapes_model.source / "circle").glob("*.jpg"))
    table = trainer("predict", shapes_model.ckpt, thin, big, good, "-k", "1")
    assert table.returncode == 1, table.stderr  # two files could not be read: said, and the exit status shows it
    assert table.stdout.split() == [str(good), "circle", table.stdout.split()[2]]
    errors = " ".join(table.stderr.split())
    assert f"{thin} error: resize too large: the eval resize (shorter side to 73) of this 80000000x1 image" in errors
    assert f"{big} error: file too large: 12,884,901,888 bytes is over the 732,605,096-byte cap" in errors
    assert "2 of 3 files could not be classified" in errors and "Traceback" not in errors
