"""What the processor does to pixels: resize geometry, every mode to 3-channel RGB, EXIF rotation,
byte-for-byte copies of inputs that already fit, and a normalisation that matches the written images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardtool.config import PackConfig, Resize, parse_resize
from shardtool.pack import pack
from tests.shards import read_shards as read_all


def save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Blurred-looking noise: smooth enough for JPEG, busy enough that quality matters."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 4), max(1, width // 4), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{source: {ext: bytes}} over every shard in OUT."""
    return {json.loads(s["json"])["source"]: s for s in read_all(out).values()}


def pack_files(tmp_path: Path, files: dict[str, bytes], **options) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """Write files (relative paths under class folders), pack them in-process; (manifest, samples by source)."""
    source, out = tmp_path / "src", tmp_path / "out"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    manifest = pack(PackConfig(str(source), str(out), workers=0, **options))
    return manifest, read_shards(out)


def pack_one(tmp_path: Path, name: str, data: bytes, **options) -> tuple[bytes, Image.Image]:
    """Pack one file as a.<ext>; (the image member's bytes, decoded)."""
    _, samples = pack_files(tmp_path, {f"a/{name}": data}, **options)
    (sample,) = samples.values()
    (ext,) = [e for e in sample if e in ("jpg", "png")]
    member = sample[ext]
    return member, Image.open(io.BytesIO(member))


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int16)


# --- geometry ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, resize, expected", [
    ((120, 80), "none", (120, 80)),
    ((120, 80), "shorter:40", (60, 40)),
    ((80, 120), "shorter:40", (40, 60)),
    ((120, 80), "longer:60", (60, 40)),
    ((80, 120), "longer:60", (40, 60)),
    ((120, 80), "fit:40", (40, 40)),
    ((80, 120), "fit:40", (40, 40)),
    ((120, 80), "pad:60", (60, 60)),
    ((120, 80), "squash:50", (50, 50)),
    ((30, 20), "shorter:40", (60, 40)),  # upscaled too
    ((101, 50), "shorter:25", (50, 25)),  # 50.5 rounds to even
])
def test_resize_output_sizes(tmp_path, size, resize, expected):
    _, image = pack_one(tmp_path, "x.jpg", save(noise(*size), "JPEG", quality=95), resize=parse_resize(resize))
    assert image.size == expected
    assert image.mode == "RGB"


def test_pad_puts_the_image_on_black_borders(tmp_path):
    colour = (200, 120, 40)
    data = save(Image.new("RGB", (120, 80), colour), "PNG")
    _, image = pack_one(tmp_path, "x.png", data, resize=Resize("pad", 60), encode="png")
    array = pixels(image)
    assert image.size == (60, 60)  # 120x80 -> 60x40, centred: rows 0-9 and 50-59 are border
    assert (array[:10] == 0).all() and (array[50:] == 0).all()
    assert (array[10:50] == colour).all()


def test_fit_crops_around_the_centre(tmp_path):
    stripes = np.zeros((80, 120, 3), np.uint8)
    stripes[:, :40], stripes[:, 40:80], stripes[:, 80:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    _, image = pack_one(tmp_path, "x.png", save(Image.fromarray(stripes), "PNG"), resize=Resize("fit", 40),
                        encode="png")
    array = pixels(image)
    assert image.size == (40, 40)  # 120x80 -> 60x40, columns 10..49 kept: 10 red, 20 green, 10 blue
    assert (array[:, :9] == (255, 0, 0)).all()
    assert (array[:, 11:29] == (0, 255, 0)).all()
    assert (array[:, 31:] == (0, 0, 255)).all()


# --- every mode becomes 3-channel RGB ----------------------------------------------------------------------


def test_grayscale_becomes_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    _, image = pack_one(tmp_path, "x.png", save(Image.fromarray(gray, "L"), "PNG"), encode="png")
    assert (pixels(image) == gray[:, :, None]).all()


def test_grayscale_jpeg_is_reencoded_as_rgb(tmp_path):
    data = save(Image.new("L", (24, 16), 90), "JPEG", quality=95)
    member, image = pack_one(tmp_path, "x.jpg", data)
    assert member != data  # not copied: a grayscale JPEG is not what we write
    assert image.mode == "RGB" and image.size == (24, 16)
    assert np.abs(pixels(image) - 90).max() <= 2


def test_palette_becomes_rgb(tmp_path):
    indexed = Image.new("P", (8, 8), 0)
    indexed.putpalette([10, 200, 30, 250, 5, 128] + [0] * 762)
    indexed.paste(1, (4, 0, 8, 8))
    _, image = pack_one(tmp_path, "x.png", save(indexed, "PNG"), encode="png")
    array = pixels(image)
    assert (array[:, :4] == (10, 200, 30)).all() and (array[:, 4:] == (250, 5, 128)).all()


def test_palette_transparency_is_composited_on_white(tmp_path):
    indexed = Image.new("P", (8, 8), 0)
    indexed.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    indexed.paste(1, (0, 0, 8, 4))
    _, image = pack_one(tmp_path, "x.png", save(indexed, "PNG", transparency=0), encode="png")
    array = pixels(image)
    assert (array[:4] == (30, 60, 90)).all() and (array[4:] == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 0, 0))  # magenta
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 16))  # cyan
    _, image = pack_one(tmp_path, "x.jpg", save(cmyk, "JPEG", quality=95))
    array = pixels(image)
    assert np.abs(array[:, :6] - (255, 0, 255)).max() <= 8
    assert np.abs(array[:, 10:] - (0, 255, 255)).max() <= 8


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535], [1000, 20000, 50000, 65280]], dtype=np.uint16)
    source = Image.fromarray(values)
    data = save(source, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    _, image = pack_one(tmp_path, "x.png", data, encode="png")
    expected = np.rint(values / 65535 * 255)  # [[0, 100, 128, 255], [4, 78, 195, 254]]
    assert (pixels(image) == expected[:, :, None]).all()


def test_dark_sixteen_bit_png_stays_dark(tmp_path):
    values = np.array([[0, 100], [200, 255]], dtype=np.uint16)  # 16-bit values that happen to be small
    _, image = pack_one(tmp_path, "x.png", save(Image.fromarray(values), "PNG"), encode="png")
    assert (pixels(image) <= 1).all()


def test_transparent_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)  # fully transparent red: white
    rgba[:, 4:8] = (255, 0, 0, 255)  # opaque red
    rgba[:, 8:] = (0, 0, 255, 128)  # half blue over white
    _, image = pack_one(tmp_path, "x.png", save(Image.fromarray(rgba, "RGBA"), "PNG"), encode="png")
    array = pixels(image)
    assert (array[:, :4] == 255).all()
    assert (array[:, 4:8] == (255, 0, 0)).all()
    assert np.abs(array[:, 8:] - (127, 127, 255)).max() <= 1


def test_rgba_jpeg_output_is_rgb_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    member, image = pack_one(tmp_path, "x.png", save(rgba, "PNG"))
    assert member[:2] == b"\xff\xd8"  # --encode auto: JPEG for image files
    assert image.mode == "RGB" and np.abs(pixels(image) - 255).max() <= 2


# --- EXIF orientation ---------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    halves = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high: red left, blue right
    halves[:, :20], halves[:, 20:] = (255, 0, 0), (0, 0, 255)
    stored = Image.fromarray(halves)
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = save(stored, "JPEG", quality=95, exif=exif.tobytes())
    member, image = pack_one(tmp_path, "x.jpg", data)
    assert member != data
    assert image.size == (20, 40)  # width and height swapped
    assert image.getexif().get(0x0112) in (None, 1)  # nobody rotates it twice
    array = pixels(image)
    assert np.abs(array[:16] - (255, 0, 0)).max() <= 8  # the left (red) side is now on top
    assert np.abs(array[24:] - (0, 0, 255)).max() <= 8


# --- copy byte for byte, or re-encode -----------------------------------------------------------------------


@pytest.mark.parametrize("size, resize", [((48, 32), "none"), ((48, 32), "shorter:32"), ((32, 32), "squash:32"),
                                          ((48, 32), "longer:48")])
def test_jpeg_that_already_fits_is_copied(tmp_path, size, resize):
    data = save(noise(*size), "JPEG", quality=80)
    member, image = pack_one(tmp_path, "x.jpg", data, resize=parse_resize(resize), quality=30)
    assert member == data
    assert image.size == size


def test_png_that_already_fits_is_copied_when_writing_png(tmp_path):
    data = save(noise(20, 10), "PNG", compress_level=1)
    member, _ = pack_one(tmp_path, "x.png", data, encode="png")
    assert member == data


def test_png_becomes_a_jpeg_with_the_same_pixels(tmp_path):
    source = noise(32, 32)
    member, image = pack_one(tmp_path, "x.png", save(source, "PNG"), quality=95)
    assert member[:2] == b"\xff\xd8"
    luma = np.asarray(image.convert("L"), dtype=np.int16) - np.asarray(source.convert("L"), dtype=np.int16)
    assert np.abs(luma).mean() < 2  # JPEG keeps the brightness at q95; colour is subsampled


def test_quality_sets_the_size_of_reencoded_jpegs(tmp_path):
    data = save(noise(96, 96), "JPEG", quality=95)
    sizes = {}
    for quality in (30, 95):
        member, image = pack_one(tmp_path / str(quality), "x.jpg", data, resize=Resize("shorter", 64),
                                 quality=quality)
        assert image.size == (64, 64)
        sizes[quality] = len(member)
    assert sizes[30] < 0.6 * sizes[95]


# --- normalisation ------------------------------------------------------------------------------------------


def decoded_stats(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([pixels(image).reshape(-1, 3) for image in images]) / 255.0
    return values.mean(axis=0), values.std(axis=0)


@pytest.mark.parametrize("options", [
    {},  # copied JPEGs
    {"resize": Resize("shorter", 40)},  # re-encoded JPEGs
    {"resize": Resize("pad", 48), "quality": 60},  # re-encoded with black borders
    {"resize": Resize("fit", 40), "encode": "png"},
])
def test_normalisation_matches_the_decoded_images(tmp_path, options):
    files = {f"{label}/{i}.jpg": save(noise(48 + 8 * i, 64 - 4 * i, seed=i + 7 * (label == "b")), "JPEG", quality=90)
             for label in ("a", "b") for i in range(5)}
    manifest, samples = pack_files(tmp_path, files, **options)
    assert len(samples) == 10
    ext = options.get("encode", "jpg")
    mean, std = decoded_stats([Image.open(io.BytesIO(s[ext])) for s in samples.values()])
    norm = manifest["normalization"]
    assert norm["from"] == ["train"]
    assert np.abs(np.array(norm["mean"]) - mean).max() < 1e-3, (norm, mean)
    assert np.abs(np.array(norm["std"]) - std).max() < 1e-3, (norm, std)


def test_normalisation_comes_from_train_only(tmp_path):
    files = {f"a/{i}.png": save(Image.new("RGB", (8, 8), (20 * i, 100, 255 - 20 * i)), "PNG") for i in range(10)}
    manifest, samples = pack_files(tmp_path, files, encode="png", split={"val": 0.5})
    train = set()
    for shard in (tmp_path / "out").glob("train-*.tar"):
        with tarfile.open(shard) as tar:
            train |= {json.loads(tar.extractfile(m).read())["source"] for m in tar if m.name.endswith(".json")}
    assert 0 < len(train) < 10
    mean, std = decoded_stats([Image.open(io.BytesIO(samples[s]["png"])) for s in train])
    norm = manifest["normalization"]
    assert norm["from"] == ["train"]
    assert np.allclose(norm["mean"], mean, atol=1e-6) and np.allclose(norm["std"], std, atol=1e-6)
