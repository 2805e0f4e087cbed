"""The PIL processor: Sample (encoded or raw bytes) -> Sample (output encoding) | Skip.

Every image is decoded in full once, so no later decoder meets a corrupt one. An input that is
already what we would write (same format, RGB, upright, right size) is copied byte for byte.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, ImageStat

from shardtool.config import Resize
from shardtool.process.checks import decode, load_bytes, open_header, open_image, or_skip, planned
from shardtool.process.geometry import Plan, plan
from shardtool.process.guard import Reject, guarded
from shardtool.sample import Item, Sample, Skip

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class OutputSpec:
    resize: Resize
    encode: str  # "jpg" or "png"
    quality: int
    max_pixels: int
    verify: str = "full"  # or "header": inputs already in the output spec are copied after a header parse
    backend: str = "pil"  # or "dali-cpu" / "dali-gpu": shardtool/process/dali.py decodes and resizes
    threads: int = 1  # DALI's CPU threads in each process that runs batches (pack: dali.threads_per_process)


def process(item: Item, spec: OutputSpec) -> Item:
    if isinstance(item, Skip):
        return item
    data = load_bytes(item, spec.max_pixels)
    if isinstance(data, Skip):
        return data
    if spec.verify == "header" and item.raw_shape is None and (copied := jpeg_header_copy(item, data, spec)):
        return copied
    if item.raw_shape is not None:
        height, width = item.raw_shape[:2]
        if isinstance(checked := planned(item, (width, height), spec.resize, spec.max_pixels), Skip):
            return checked
        image, source_format = Image.fromarray(_raw_array(data, item.raw_shape)), None
    else:
        opened = _open_checked(item, data, spec)
        if not isinstance(opened, Image.Image):
            return opened
        image, source_format = opened, opened.format
    upright = orientation(image) in (None, 1)
    rgb = or_skip(item, upright_rgb(image, upright))
    if isinstance(rgb, Skip):
        return rgb
    geometry = plan(*rgb.size, spec.resize)
    out = rgb if geometry.identity else apply(rgb, geometry)
    keep = (source_format in ("JPEG", "MPO") and spec.encode == "jpg" or source_format == "PNG" and spec.encode == "png")
    if keep and upright and image.mode == "RGB" and geometry.identity and not has_alpha(image):
        encoded = data
    else:
        encoded = encode(out, spec)
        if spec.encode == "jpg":  # lossy: the stats describe what a reader decodes, not the pixels before
            out = open_header(encoded)
    stat = ImageStat.Stat(out)
    meta = {**item.meta, "width": out.width, "height": out.height}
    return item.with_(data=encoded, path=None, raw_shape=None, ext=spec.encode, meta=meta,
                      stats=(tuple(stat.sum), tuple(stat.sum2), out.width * out.height))


def _open_checked(item: Sample, data: bytes, spec: OutputSpec) -> Image.Image | Sample | Skip:
    """The decoded image once the guard passed it (header, planned resize, pixels), or the input copied
    as it is (--verify header, already what we write), or a Skip."""
    opened = open_image(item, data, spec.max_pixels)
    if isinstance(opened, Skip):
        return opened
    if isinstance(checked := planned(item, opened.size, spec.resize, spec.max_pixels), Skip):
        return checked
    if spec.verify == "header" and conforms(opened, data, spec):
        return item.with_(data=data, path=None, ext=spec.encode,
                          meta={**item.meta, "width": opened.width, "height": opened.height})
    return decode(item, opened)


def jpeg_header_copy(item: Sample, data: bytes, spec: OutputSpec) -> Sample | None:
    """--verify header, JPEG fast path: libjpeg-turbo reads the markers up to the scan (~2 us, no pixels).

    None when the input is not a JPEG we would copy; the caller then takes the full path.
    """
    if spec.encode != "jpg" or not data.startswith(b"\xff\xd8") or data.find(b"Exif\x00\x00", 0, 65536) >= 0:
        return None  # EXIF may rotate the image: PIL reads the orientation on the slower path
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB") or width * height > spec.max_pixels or not _kept_as_is(width, height, spec.resize):
        return None
    if not _complete(data, "JPEG"):
        return None  # cut off: the full decode names the damage
    return item.with_(data=data, path=None, ext="jpg", meta={**item.meta, "width": width, "height": height})


@functools.lru_cache(maxsize=256)
def _kept_as_is(width: int, height: int, resize: Resize) -> bool:
    """Whether --resize leaves a width x height image alone (a dump has few distinct sizes)."""
    return plan(width, height, resize).identity


def conforms(image: Image.Image, data: bytes, spec: OutputSpec) -> bool:
    """From the header alone: what we would write already (format, RGB, upright, size), and not cut off."""
    if image.mode != "RGB" or has_alpha(image) or orientation(image) not in (None, 1):
        return False
    if not _kept_as_is(*image.size, spec.resize):
        return False
    same_format = image.format in ("JPEG", "MPO") and spec.encode == "jpg" or image.format == "PNG" and spec.encode == "png"
    return same_format and _complete(data, "PNG" if image.format == "PNG" else "JPEG")


def _complete(data: bytes, image_format: str) -> bool:
    """The file ends on its format's end marker (JPEG EOI, PNG IEND), so it was not cut off."""
    if image_format == "PNG":
        return data.endswith(b"IEND\xaeB`\x82")
    return data.endswith(b"\xff\xd9") or data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def process_batch(items: list[Item], spec: OutputSpec) -> list[Item]:
    return [process(item, spec) for item in items]


def _raw_array(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    return array[:, :, 0] if shape[2] == 1 else array


def orientation(image: Image.Image) -> int | None:
    exif = guarded("exif", image.getexif)  # a broken EXIF block is not a broken image
    return None if isinstance(exif, Reject) else exif.get(0x0112)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def upright_rgb(image: Image.Image, upright: bool) -> Image.Image | Reject:
    """The decoded image turned by its EXIF orientation and made RGB; hostile EXIF or mode data (a rotation
    tag of the wrong type, a palette that is too short) is a Reject, like hostile pixels."""
    return guarded("convert", lambda: to_rgb(image if upright else ImageOps.exif_transpose(image)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB: 16-bit scaled to 8, alpha composited on white, CMYK and palettes converted."""
    if image.mode in _SIXTEEN_BIT:
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 or image.mode != "I" else 255.0
        image = Image.fromarray(np.clip(np.rint(array * 255.0 / peak), 0, 255).astype(np.uint8))
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def apply(image: Image.Image, geometry: Plan) -> Image.Image:
    scaled = image if geometry.scaled == image.size else image.resize(geometry.scaled, Image.Resampling.BILINEAR)
    if geometry.canvas == geometry.scaled and geometry.offset == (0, 0):
        return scaled
    canvas = Image.new("RGB", geometry.canvas, (0, 0, 0))
    canvas.paste(scaled, geometry.offset)
    return canvas


def encode(image: Image.Image, spec: OutputSpec) -> bytes:
    buffer = io.BytesIO()
    if spec.encode == "jpg":
        image.save(buffer, "JPEG", quality=spec.quality)
    else:
        image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()
