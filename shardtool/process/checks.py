"""Cheap checks before decoding: the bytes exist, are an image type we pack, and are not a bomb."""

from __future__ import annotations

import io
import os
import stat
import threading

from PIL import Image, UnidentifiedImageError

from shardtool.sample import Sample, Skip

_HEADER_LOCK = threading.Lock()
FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def load_bytes(sample: Sample) -> bytes | Skip:
    """The sample's encoded bytes, reading its file if the reader gave a path."""
    data = sample.data if sample.data is not None else read_file(sample)
    if isinstance(data, Skip):
        return data
    if not data:
        return _skip(sample, "empty_file", "0 bytes")
    return data


def read_file(sample: Sample) -> bytes | Skip:
    """The bytes of the sample's file if it is a regular file. It is stat'ed before it is opened: opening a
    FIFO waits for a writer that never comes and a device may never end; those are skips, not reads."""
    path = sample.path or ""
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            return _not_regular(sample, mode)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:  # swapped since the stat: no wait
            if not stat.S_ISREG(mode := os.fstat(file.fileno()).st_mode):
                return _not_regular(sample, mode)
            return file.read()
    except FileNotFoundError:
        return _skip(sample, "missing_file", f"{sample.path} does not exist")
    except OSError as error:
        return _skip(sample, "unreadable_file", f"{error.strerror}: {sample.path}")


def _not_regular(sample: Sample, mode: int) -> Skip:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return _skip(sample, "not_a_regular_file", f"{kind}: only regular files are read")


def open_image(sample: Sample, data: bytes, max_pixels: int) -> Image.Image | Skip:
    """Parse the header only: the format is one we pack and the pixel count is under the limit."""
    try:
        image = open_header(data)
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


def open_header(data: bytes) -> Image.Image:
    """Image.open (the header only) with Pillow's decompression-bomb check off for this call: every caller
    checks the pixel count against its own limit (--max-pixels) before decoding. Pillow reads the limit
    from a module global; it is put back at once, never left off for the program that imports us."""
    with _HEADER_LOCK:  # threads (trainer serve) would otherwise restore each other's values
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _skip(sample: Sample, reason: str, detail: str) -> Skip:
    return Skip(reason, sample.key, sample.source, detail, sample.group, sample.split)
