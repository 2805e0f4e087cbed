"""Cheap checks before decoding: the bytes exist, are an image type we pack, and are not a bomb."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from shardtool.sample import Sample, Skip

FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})


def load_bytes(sample: Sample) -> bytes | Skip:
    """The sample's encoded bytes, reading its file if the reader gave a path."""
    if sample.data is not None:
        data = sample.data
    else:
        try:
            with open(sample.path or "", "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return _skip(sample, "missing_file", f"{sample.path} does not exist")
        except OSError as error:
            return _skip(sample, "unreadable_file", f"{error.strerror}: {sample.path}")
    if not data:
        return _skip(sample, "empty_file", "0 bytes")
    return data


def open_image(sample: Sample, data: bytes, max_pixels: int) -> Image.Image | Skip:
    """Parse the header only: the format is one we pack and the pixel count is under the limit."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _skip(sample, "not_an_image", f"{len(data)} bytes that no image decoder recognises")
    except (OSError, SyntaxError, ValueError) as error:
        return _skip(sample, "corrupt_image", f"header: {error}")
    if image.format not in FORMATS:
        return _skip(sample, "unsupported_format", f"{image.format} is not one of {', '.join(sorted(FORMATS))}")
    width, height = image.size
    if width * height > max_pixels:
        return _skip(sample, "too_many_pixels", f"{width}x{height} is over --max-pixels {max_pixels}")
    return image


def _skip(sample: Sample, reason: str, detail: str) -> Skip:
    return Skip(reason, sample.key, sample.source, detail, sample.group, sample.split)
