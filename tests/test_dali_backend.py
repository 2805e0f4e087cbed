"""--backend dali against --backend pil: same sizes, pixels within a stated tolerance, the same skips.

The tolerance is the mean absolute difference per channel (0-255 scale) between the two backends' decoded
outputs for the same input and options. DALI's linear antialiased resize and PIL's BILINEAR differ by
~0.17 per channel before encoding (the decoders agree exactly); re-encoding as JPEG turns that into up to
~2, because a pixel that moves by one can move a quantised DCT coefficient by a whole step.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.common import samples, spec
from benchmarks.dali_parity import compare
from shardtool.config import PackConfig, Resize
from shardtool.pack import pack
from shardtool.process import dali, pil
from shardtool.sample import Sample, Skip
from tests.test_bad_input import MAX_PIXELS, jpeg_bytes, make_dirty, read_rejects
from tests.test_process import noise, pack_files, save

JPEG_TOLERANCE = 3.0  # re-encoded at --quality 90
PNG_TOLERANCE = 0.5  # lossless output: only the resize kernels differ
GPU_TOLERANCE = 3.0  # nvJPEG is not libjpeg-turbo; not measured (no GPU where this was written)

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="nvidia-dali not installed")
needs_gpu = pytest.mark.skipif(dali.cuda_devices() == 0, reason="no CUDA device")


def worst_difference(items: list[Sample], resize: str, encode: str, backend: str = "dali-cpu") -> tuple[float, str]:
    """Both backends over ITEMS: the same kinds, skip reasons and sizes; (worst difference, its source)."""
    _, worst, mismatches = compare(items, resize, encode, backend)
    assert not mismatches, mismatches[:5]
    return worst


def report(name: str, tolerance: float, worst: tuple[float, str], count: int) -> str:
    line = (f"{name}: {count} images, worst mean |PIL - DALI| per channel {worst[0]:.3f} "
            f"(tolerance {tolerance}) at {worst[1]}")
    print(line)
    return line


# --- parity on real data ------------------------------------------------------------------------------------


# Every third image of each dataset, in name order (every split and class folder is represented): the whole
# sets took 90 s of the test run for the same property; `python -m benchmarks.dali_parity` measures them all.
STRIDE = 3


@needs_dali
def test_parity_on_clothing_small(real_data):
    files = sorted((real_data / "clothing-small").rglob("*.jpg"))
    assert len(files) == 3781
    worst = worst_difference(samples(files[::STRIDE]), "shorter:256", "jpg")
    message = report("clothing-small shorter:256 jpg", JPEG_TOLERANCE, worst, len(files[::STRIDE]))
    assert worst[0] <= JPEG_TOLERANCE, message


@needs_dali
def test_parity_on_fb_marketplace(real_data):
    files = sorted((real_data / "fb-marketplace" / "images").glob("*.jpg"))
    assert len(files) == 1500
    worst = worst_difference(samples(files[::STRIDE]), "fit:224", "jpg")
    message = report("fb-marketplace fit:224 jpg", JPEG_TOLERANCE, worst, len(files[::STRIDE]))
    assert worst[0] <= JPEG_TOLERANCE, message


# --- parity on generated inputs: every mode the PIL path handles, every resize mode ------------------------


def exif_rotated(orientation: int) -> bytes:
    halves = np.zeros((20, 40, 3), np.uint8)
    halves[:, :20], halves[:, 20:] = (255, 0, 0), (0, 0, 255)
    stored = Image.fromarray(halves)
    exif = stored.getexif()
    exif[0x0112] = orientation
    return save(stored, "JPEG", quality=95, exif=exif.tobytes())


def generated() -> dict[str, bytes]:
    rgba = np.zeros((30, 44, 4), np.uint8)
    rgba[:, :15], rgba[:, 15:30], rgba[:, 30:] = (255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)
    indexed = Image.new("P", (40, 24), 0)
    indexed.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    indexed.paste(1, (0, 0, 40, 12))
    cmyk = Image.new("CMYK", (48, 32), (0, 255, 0, 0))
    cmyk.paste((255, 0, 0, 90), (24, 0, 48, 32))
    sixteen = (np.arange(36 * 52, dtype=np.uint32).reshape(36, 52) * 33 % 65536).astype(np.uint16)
    return {
        "noise.jpg": save(noise(120, 80), "JPEG", quality=90),
        "noise.png": save(noise(80, 120, seed=1), "PNG"),
        "exif6.jpg": exif_rotated(6),
        "exif8.jpg": exif_rotated(8),
        "exif3.jpg": exif_rotated(3),
        "cmyk.jpg": save(cmyk, "JPEG", quality=95),
        "gray.jpg": save(noise(40, 30).convert("L"), "JPEG", quality=95),
        "gray.png": save(noise(30, 40).convert("L"), "PNG"),
        "sixteen.png": save(Image.fromarray(sixteen), "PNG"),
        "rgba.png": save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette_transparent.png": save(indexed, "PNG", transparency=0),
        "anim.gif": save(noise(36, 24).convert("P"), "GIF"),
        "noise.webp": save(noise(64, 48, seed=2), "WEBP", lossless=True),
        "noise.bmp": save(noise(50, 30, seed=3), "BMP"),
    }


@pytest.fixture(scope="module")
def generated_items(tmp_path_factory) -> list[Sample]:
    folder = tmp_path_factory.mktemp("generated")
    for name, data in generated().items():
        (folder / name).write_bytes(data)
    return samples(sorted(folder.iterdir()))


@needs_dali
@pytest.mark.parametrize("resize", ["none", "shorter:40", "longer:60", "fit:40", "pad:60", "squash:50"])
@pytest.mark.parametrize("encode, tolerance", [("png", PNG_TOLERANCE), ("jpg", JPEG_TOLERANCE)])
def test_parity_on_generated_inputs(generated_items, resize, encode, tolerance):
    worst = worst_difference(generated_items, resize, encode)
    message = report(f"generated {resize} {encode}", tolerance, worst, len(generated_items))
    assert worst[0] <= tolerance, message


@needs_dali
def test_bad_inputs_give_the_same_skips_and_samples(tmp_path):
    source = make_dirty(tmp_path / "dirty")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(source / "dog/cut.png")
    (source / "dog/cut.png").write_bytes((source / "dog/cut.png").read_bytes()[:60])  # header fine, IDAT cut
    outputs = {}
    for backend in ("pil", "dali"):
        out = tmp_path / backend
        manifest = pack(PackConfig(str(source), str(out), workers=0, max_pixels=MAX_PIXELS, max_skip_fraction=1.0,
                                   backend=backend, resize=Resize("shorter", 24)))
        outputs[backend] = (manifest["report"], {r["source"]: r["reason"] for r in read_rejects(out)})
    (pil_report, pil_rejects), (dali_report, dali_rejects) = outputs["pil"], outputs["dali"]
    assert dali_rejects == pil_rejects
    assert len(dali_rejects) == 8 and dali_rejects["dog/cut.png"] == "corrupt_image"
    assert (dali_report["written"], dali_report["skipped"]) == (pil_report["written"], pil_report["skipped"]) == (6, 8)


# --- a corrupt image in a DALI batch ------------------------------------------------------------------------


def cut_png(size: int = 32) -> bytes:
    """A PNG whose header parses (so the pre-screen passes it) and whose pixel data stops half way."""
    data = save(noise(size, size), "PNG")
    return data[: len(data) // 2]


@needs_dali
def test_one_corrupt_image_in_a_batch_is_one_skip():
    items = [Sample(key=f"k{i}", label="x", group="g", source=f"s{i}", data=save(noise(48, 40, seed=i), "JPEG"))
             for i in range(32)]
    items[13] = items[13].with_(data=cut_png())
    items[20] = items[20].with_(data=items[20].data[:-300])  # a JPEG cut inside its entropy-coded data
    results = dali.process_batch(items, spec("shorter:20"))
    skips = [r for r in results if isinstance(r, Skip)]
    assert [(s.key, s.reason) for s in skips] == [("k13", "corrupt_image"), ("k20", "corrupt_image")]
    assert [r.key for r in results] == [f"k{i}" for i in range(32)]
    assert all(r.meta["height"] == 20 for r in results if isinstance(r, Sample))
    assert not dali._failed  # screened out: DALI never saw them (a failed DALI batch taints the process)


@needs_dali
def test_pack_with_a_corrupt_image_packs_all_the_others(tmp_path):
    files = {f"{label}/{i}.jpg": jpeg_bytes(i + 100 * (label == "b"), size=(48, 40)) for label in "ab" for i in range(40)}
    files["a/cut.png"] = cut_png()
    manifest, packed = pack_files(tmp_path, files, backend="dali", resize=Resize("shorter", 32), max_skip_fraction=0.1)
    assert manifest["report"]["written"] == 80 and len(packed) == 80
    assert manifest["report"]["skipped"] == 1
    assert {reason: entry["count"] for reason, entry in manifest["report"]["skips"].items()} == {"corrupt_image": 1}
    assert manifest["options"]["backend"] == "dali-cpu" and manifest["options"]["dali"]


# --- passthrough, the option, the error ---------------------------------------------------------------------


@needs_dali
def test_jpeg_that_already_fits_is_copied_byte_for_byte():
    data = save(noise(48, 32), "JPEG", quality=80)
    item = Sample(key="k", label="x", group="g", source="s", data=data)
    (by_pil,) = pil.process_batch([item], spec("shorter:32", backend="pil"))
    (by_dali,) = dali.process_batch([item], spec("shorter:32"))
    assert by_dali.data == data == by_pil.data
    assert np.allclose(by_dali.stats[0], by_pil.stats[0]) and by_dali.stats[2] == by_pil.stats[2] == 48 * 32


def test_auto_is_pil_on_cpu_and_recorded(tmp_path):
    if dali.cuda_devices():
        pytest.skip("a GPU is present: auto picks DALI")
    manifest, _ = pack_files(tmp_path, {"a/x.jpg": jpeg_bytes(0)})
    assert manifest["options"]["backend"] == dali.CPU_AUTO == "pil"


def test_backend_dali_without_dali_is_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed: find_spec says None
    (tmp_path / "src/a").mkdir(parents=True)
    (tmp_path / "src/a/x.jpg").write_bytes(jpeg_bytes(0))
    result = cli("pack", tmp_path / "src", tmp_path / "out", "--backend", "dali")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert message == ("error: --backend dali needs NVIDIA DALI, which is not installed: "
                       "pip install 'shardtool[dali]', or use --backend pil")


@pytest.mark.gpu
@needs_gpu
@needs_dali
def test_parity_on_the_gpu(generated_items):
    for resize in ("shorter:40", "fit:40", "pad:60"):
        worst = worst_difference(generated_items, resize, "png", backend="dali-gpu")
        message = report(f"generated {resize} png on the GPU", GPU_TOLERANCE, worst, len(generated_items))
        assert worst[0] <= GPU_TOLERANCE, message
    assert json.dumps(dali.choose_backend("auto")) == '"dali-gpu"'


class _Recorded(Exception):
    pass


@needs_dali
def test_the_gpu_decoder_upsamples_chroma_as_the_cpu_decoder_does(monkeypatch):
    """nvJPEG's default (fast) chroma upsampling differs from libjpeg-turbo's by up to 32/255: the mixed
    decoder of the GPU pack must be built with jpeg_fancy_upsampling (recorded here, no GPU needed)."""
    from nvidia.dali import fn

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise _Recorded  # before the pipeline would need a GPU to build

    monkeypatch.setattr(fn.decoders, "image", record)
    with pytest.raises(_Recorded):
        dali._build("dali-gpu", 1)
    assert calls[0]["device"] == "mixed" and calls[0]["jpeg_fancy_upsampling"] is True


# --- the statistics ------------------------------------------------------------------------------------------


def int64_stats(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """How dali._stats computed them until issue 34: int64 squares of every pixel (6 ms at 400x533)."""
    flat = pixels.reshape(-1, 3).astype(np.int64)
    return tuple(map(float, flat.sum(0))), tuple(map(float, (flat * flat).sum(0))), len(flat)


@pytest.mark.parametrize("seed", range(4))
def test_the_histogram_stats_are_the_int64_sums_exactly(seed):
    rng = np.random.default_rng(seed)
    for shape in [(1, 1, 3), (7, 5, 3), (341, 256, 3), (533, 400, 3), (2000, 1500, 3)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels[0, 0] = (0, 255, 255)  # both ends of the range
        assert dali._stats(Image.fromarray(pixels)) == int64_stats(pixels), shape
    flat = np.full((64, 48, 3), 255, np.uint8)
    assert dali._stats(Image.fromarray(flat)) == int64_stats(flat) == ((255.0 * 3072,) * 3, (65025.0 * 3072,) * 3, 3072)


@pytest.mark.parametrize("encode", ["jpg", "png"])
def test_the_encoded_output_s_stats_describe_what_a_reader_decodes(encode):
    """_encode's second value (an RGBX view of simplejpeg's decode for JPEG, the encoded image for PNG) has the
    pixels PIL decodes from the bytes, so the stats are the int64 sums over those."""
    pixels = np.asarray(noise(160, 120, seed=5))
    data, written = dali._encode(pixels, spec("none", encode))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(written)[..., :3], decoded) and written.size == (160, 120)
    assert dali._stats(written) == int64_stats(decoded)
