"""Bad data becomes a counted Skip (exact count per reason); bad config is one line, exit 2, no traceback."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.shards import read_shards

GOOD = {"cat": 3, "dog": 3}
EXPECTED_SKIPS = {  # source (relative to SOURCE) -> reason
    "cat/corrupt.jpg": "corrupt_image",
    "cat/truncated.jpg": "corrupt_image",
    "cat/empty.jpg": "empty_file",
    "cat/notes.jpg": "not_an_image",
    "dog/bomb.png": "too_many_pixels",
    "dog/big.png": "too_many_pixels",
    "dog/data.xyz": "unknown_extension",
}
EXPECTED_IGNORED = {"LICENSE", "README.md", "cat/.DS_Store"}
MAX_PIXELS = 5000  # the good images are 32x32 = 1024 pixels, big.png is 80x80 = 6400


def jpeg_bytes(seed: int, size: tuple[int, int] = (32, 32), quality: int = 90) -> bytes:
    """A smooth RGB gradient with a random colour cast: a JPEG that decodes cleanly."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
    pixels = np.clip(ramp * rng.uniform(60, 255, 3) + rng.uniform(0, 60, 3), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def noisy_jpeg(seed: int, size: int = 64) -> bytes:
    """Random pixels: several kB of entropy-coded data after the header."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def corrupt_jpeg(data: bytes) -> bytes:
    """512 bytes of garbage in the middle of the entropy-coded data: the header parses, the decode fails."""
    start = data.index(b"\xff\xda") + 20
    return data[:start] + bytes(range(256)) * 2 + data[start + 512 :]


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's header: a valid IHDR claiming width x height, an empty IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def make_dirty(root: Path) -> Path:
    """Class folders with good JPEGs and one of every kind of bad input, plus files that are not data."""
    seed = 0
    for label, count in GOOD.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"good_{i}.jpg").write_bytes(jpeg_bytes(seed))
            seed += 1
    real = noisy_jpeg(99)
    assert len(real) // 2 > real.index(b"\xff\xda") + 532  # both cuts land in the entropy data
    (root / "cat/corrupt.jpg").write_bytes(corrupt_jpeg(real))
    (root / "cat/truncated.jpg").write_bytes(real[: len(real) // 2])
    (root / "cat/empty.jpg").write_bytes(b"")
    (root / "cat/notes.jpg").write_text("these are my notes, not a picture\n")
    (root / "cat/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "dog/bomb.png").write_bytes(png_header_only(100_000, 100_000))
    Image.new("RGB", (80, 80), (10, 20, 30)).save(root / "dog/big.png")
    (root / "dog/data.xyz").write_bytes(b"\x01\x02\x03")
    (root / "README.md").write_text("# my dataset\n")
    (root / "LICENSE").write_text("CC-BY\n")
    return root




def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture
def dirty(tmp_path: Path) -> Path:
    return make_dirty(tmp_path / "dirty")


def pack_dirty(cli, source: Path, out: Path, *extra: str):
    return cli("pack", source, out, "--max-pixels", MAX_PIXELS, "--max-skip-fraction", "1", *extra)


def test_every_bad_input_is_counted_by_reason(dirty, tmp_path, cli):
    out = tmp_path / "out"
    result = pack_dirty(cli, dirty, out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "skipped 7 of 13 inputs" in result.stdout
    assert "ignored 3 entries" in result.stdout and "README.md" in result.stdout
    report = json.loads((out / "dataset.json").read_text())["report"]
    counts = {reason: entry["count"] for reason, entry in report["skips"].items()}
    assert counts == {"corrupt_image": 2, "empty_file": 1, "not_an_image": 1, "too_many_pixels": 2,
                      "unknown_extension": 1}
    assert report["seen"] == sum(GOOD.values()) + len(EXPECTED_SKIPS) == 13
    assert report["written"] == 6 and report["skipped"] == 7
    assert report["seen"] == report["written"] + report["skipped"]
    assert {e["path"] for e in report["ignored"]["examples"]} == EXPECTED_IGNORED
    assert report["ignored"]["count"] == 3

    rejects = read_rejects(out)
    assert {r["source"]: r["reason"] for r in rejects} == EXPECTED_SKIPS
    assert len(rejects) == 7
    details = {r["source"]: r["detail"] for r in rejects}
    assert details["dog/bomb.png"] == f"100000x100000 is over --max-pixels {MAX_PIXELS}"
    assert details["dog/big.png"] == f"80x80 is over --max-pixels {MAX_PIXELS}"
    assert details["cat/corrupt.jpg"] == "decode: broken data stream when reading image file"
    assert details["cat/truncated.jpg"].startswith("decode: image file is truncated")
    assert details["cat/empty.jpg"] == "0 bytes"
    assert details["dog/data.xyz"] == ".xyz is not an image type"
    assert all(r["split"] == "train" for r in rejects)


def test_good_samples_are_all_packed_unchanged(dirty, tmp_path, cli):
    out = tmp_path / "out"
    assert pack_dirty(cli, dirty, out, "--workers", "0").exit_code == 0
    samples = read_shards(out)
    assert len(samples) == 6
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    expected = {f"{label}/good_{i}.jpg" for label, n in GOOD.items() for i in range(n)}
    assert set(by_source) == expected
    classes = {"cat": b"0", "dog": b"1"}
    for source, sample in by_source.items():
        assert sample["jpg"] == (dirty / source).read_bytes()  # RGB, upright, --resize none: copied as is
        assert sample["cls"] == classes[source.split("/")[0]]
    assert not any(name in path for path in by_source for name in ("README", "LICENSE", "DS_Store"))


def test_two_workers_give_identical_output(dirty, tmp_path, cli):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert pack_dirty(cli, dirty, serial, "--workers", "0").exit_code == 0
    result = pack_dirty(cli, dirty, parallel, "--workers", "2")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in serial.glob("*-*.*"))
    assert names == sorted(p.name for p in parallel.glob("*-*.*")) and names
    for name in names + ["rejects.jsonl", "dataset.json"]:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name


def test_bomb_header_is_rejected_at_the_default_pixel_limit(tmp_path, cli):
    source = tmp_path / "src"
    (source / "a").mkdir(parents=True)
    for i in range(4):
        (source / "a" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (source / "a" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    out = tmp_path / "out"
    result = cli("pack", source, out, "--workers", "0", "--max-skip-fraction", "0.5")
    assert result.exit_code == 0, result.output
    (reject,) = read_rejects(out)
    assert reject["reason"] == "too_many_pixels"
    assert reject["detail"] == "100000x100000 is over --max-pixels 89478485"
    assert len(read_shards(out)) == 4


def test_too_many_skips_fail_without_a_manifest(dirty, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("pack", dirty, out, "--max-pixels", MAX_PIXELS, "--workers", "0")  # default --max-skip-fraction 0.01
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert message.startswith("error: 7 of 13 inputs were skipped (corrupt_image 2, empty_file 1, not_an_image 1, "
                              "too_many_pixels 2, unknown_extension 1), over --max-skip-fraction 0.01")
    assert "--max-skip-fraction" in message and str(out / "rejects.jsonl") in message
    assert not (out / "dataset.json").exists()
    assert len(read_rejects(out)) == 7
    assert len(read_shards(out)) == 6  # the written shards are kept
    again = cli("pack", dirty, out, "--max-pixels", MAX_PIXELS, "--workers", "0", "--max-skip-fraction", "0.6")
    assert again.exit_code == 0, again.output  # a higher ceiling accepts the same run
    assert json.loads((out / "dataset.json").read_text())["report"]["skipped"] == 7


def test_skips_under_the_ceiling_pass(dirty, tmp_path, cli):
    result = pack_dirty(cli, dirty, tmp_path / "out", "--workers", "0", "--max-skip-fraction", str(7 / 13 + 1e-9))
    assert result.exit_code == 0, result.output
    result = pack_dirty(cli, dirty, tmp_path / "out2", "--workers", "0", "--max-skip-fraction", str(6 / 13))
    assert result.exit_code == 2


# --- config mistakes: exit 2, one line "error: ...", no traceback ------------------------------------------


def assert_config_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith("error: "), message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def small(tmp_path: Path) -> Path:
    source = tmp_path / "small"
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        for i in range(2):
            (source / label / f"{i}.jpg").write_bytes(jpeg_bytes(i + (label == "b") * 10, size=(40, 30)))
    return source


def test_missing_source(tmp_path, cli):
    result = cli("pack", tmp_path / "nowhere", tmp_path / "out", "--workers", "0")
    assert_config_error(result, f"SOURCE {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "out").exists()


def test_csv_column_that_does_not_exist_lists_the_columns(tmp_path, cli):
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "list.csv").write_text("image,category,note\nx.jpg,cup,hi\n")
    result = cli("pack", tmp_path / "list.csv", tmp_path / "out", "--label-col", "label", "--workers", "0")
    assert_config_error(result, "--label-col 'label' is not a column of list.csv",
                        "its columns are 'image', 'category', 'note'")


@pytest.mark.parametrize("option, value, fragment", [
    ("--resize", "big:10", "--resize 'big:10' is not valid"),
    ("--resize", "shorter:0", "--resize 'shorter:0' is not valid"),
    ("--resize", "fit", "--resize 'fit' is not valid"),
    ("--split", "val=1.5", "--split 'val=1.5' is not valid"),
    ("--split", "train=0.2", "--split 'train=0.2' is not valid"),
    ("--split", "val=0.6,test=0.5", "leaves nothing for train"),
])
def test_bad_option_values(small, tmp_path, cli, option, value, fragment):
    result = cli("pack", small, tmp_path / "out", option, value, "--workers", "0")
    assert_config_error(result, fragment)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_out_holding_a_different_dataset_needs_overwrite(small, tmp_path, cli):
    out = tmp_path / "out"
    assert cli("pack", small, out, "--workers", "0").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = cli("pack", small, out, "--resize", "squash:16", "--workers", "0")
    assert_config_error(result, f"OUT {out} already holds a different dataset", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched

    result = cli("pack", small, out, "--resize", "squash:16", "--workers", "0", "--overwrite")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["options"]["resize"] == "squash:16"
    sizes = {Image.open(io.BytesIO(s["jpg"])).size for s in read_shards(out).values()}
    assert sizes == {(16, 16)}
    assert len(read_shards(out)) == 4


def test_out_that_is_a_foreign_folder_is_refused(small, tmp_path, cli):
    out = tmp_path / "holiday"
    out.mkdir()
    (out / "beach.jpg").write_bytes(b"not mine to delete")
    result = cli("pack", small, out, "--workers", "0")
    assert_config_error(result, f"OUT {out} is not empty and is not a shardtool output (beach.jpg, ...)")
    assert sorted(p.name for p in out.iterdir()) == ["beach.jpg"]
    result = cli("pack", small, out, "--workers", "0", "--overwrite")  # --overwrite never deletes foreign files
    assert_config_error(result, "is not a shardtool output")
    assert (out / "beach.jpg").read_bytes() == b"not mine to delete"


def test_python_script_packing_without_a_main_guard_is_told_how_to_fix_it(shapes, tmp_path):
    """Worker processes import the user's script again: without the guard they would pack too."""
    import subprocess
    import sys

    script = tmp_path / "pack_it.py"
    script.write_text("from shardtool.config import PackConfig\nfrom shardtool.pack import pack\n"
                      f"pack(PackConfig(source={str(shapes)!r}, out={str(tmp_path / 'out')!r}, workers=2))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"shardtool.errors.PackError: worker processes could not start: {script} calls pack() at import time; "
        'put that call under `if __name__ == "__main__":` (or pass workers=0)')
    script.write_text("from shardtool.config import PackConfig\nfrom shardtool.pack import pack\n"
                      "if __name__ == '__main__':\n"
                      f"    pack(PackConfig(source={str(shapes)!r}, out={str(tmp_path / 'out')!r}, workers=2))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["report"]["written"] == 48


def test_a_pool_that_breaks_while_work_is_submitted_is_the_one_line_error(monkeypatch):
    """CPython 3.11's submit can hit the wake-up pipe of a pool that broke a moment before ("OSError: handle is
    closed"), and so can the shutdown after it: the user gets the worker message, not that traceback."""
    from shardtool.errors import PackError
    from shardtool.parallel import Workers

    class BrokenPool:
        def submit(self, *args):
            raise OSError("handle is closed")

        def shutdown(self, **kwargs):
            raise OSError("handle is closed")

    workers = Workers(2)
    monkeypatch.setattr(workers, "_start", lambda: setattr(workers, "_pool", BrokenPool()) or workers._pool)
    with pytest.raises(PackError, match="worker process"), workers:
        list(workers.map(len, range(10), batch=2))
    assert workers._pool is None
