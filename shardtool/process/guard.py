"""The image guard: what an untrusted image must pass before anything is allocated for it. One module for
`shardtool pack` (checks.py wraps it into Skips), `trainer predict` on files and `trainer serve` (trainer/infer.py
turns its Rejects into BadImage), so a hostile file meets the same checks on every path:

    path  -> read_file:     a regular file; at most max_file_bytes(max_pixels) (a cap derived from the pixel
                            limit); over 1 MiB, it must start like a format we pack before it is read whole
    bytes -> open_image:    Pillow parses the header only; a format we pack; width x height within max_pixels
          -> check_planned: every size a resize will allocate (resize result, pad canvas, crop, the trainer's
                            eval resize) within max_pixels: a 1 x 80,000,000 PNG is 233 KB and under the limit,
                            but its shorter side at 256 is 20 billion pixels
          -> decode:        the pixels; whatever a decoder raises on hostile bytes is a Reject, caught here only
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from shardtool.config import MAX_PIXELS

FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})
BYTES_PER_PIXEL = 8  # the most a format we pack stores per pixel, uncompressed: 16-bit RGBA (TIFF, PNG)
METADATA_BYTES = 16 << 20  # room for EXIF, ICC profiles, XMP and thumbnails on top of the pixels
HEADER_ONLY_BYTES = 1 << 20  # a file over this is read whole only if its first bytes are a format we pack
_HEADER_LOCK = threading.Lock()
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))
T = TypeVar("T")


@dataclass(frozen=True)
class Reject:
    """Why an input is not a usable image: a stable `reason` and a one-line `detail`."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Limits:
    max_pixels: int = MAX_PIXELS
    name: str = "--max-pixels"  # how a message names the pixel limit

    @property
    def max_bytes(self) -> int:
        return max_file_bytes(self.max_pixels)


def max_file_bytes(max_pixels: int) -> int:
    """The byte cap: no image within max_pixels needs more than 8 bytes a pixel plus 16 MiB of metadata
    (733 MB at the default --max-pixels); a bigger file is not read, whatever its name says."""
    return BYTES_PER_PIXEL * max_pixels + METADATA_BYTES


def read_file(path: str, limits: Limits) -> bytes | Reject:
    """The bytes of a regular file within the byte cap. It is stat'ed before it is opened: opening a FIFO
    waits for a writer that never comes and a device may never end; those are Rejects, not reads."""
    try:
        if not stat.S_ISREG((info := os.stat(path)).st_mode):
            return _not_regular(info.st_mode)
        if too_large := check_size(info.st_size, limits):
            return too_large
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:  # swapped since the stat: no wait
            if not stat.S_ISREG(mode := os.fstat(file.fileno()).st_mode):
                return _not_regular(mode)
            head = file.read(16)
            if info.st_size > HEADER_ONLY_BYTES and not packable_prefix(head):
                return Reject("not_an_image", f"{info.st_size:,} bytes that start like none of "
                                              f"{', '.join(sorted(FORMATS))}: not read whole")
            data = head + file.read(limits.max_bytes + 1 - len(head))  # it may have grown since the stat
    except FileNotFoundError:
        return Reject("missing_file", f"{path} does not exist")
    except OSError as error:
        return Reject("unreadable_file", f"{error.strerror}: {path}")
    return check_size(len(data), limits) or data


def packable_prefix(head: bytes) -> bool:
    """Whether the first 16 bytes are what Pillow's plugin for a format we pack accepts (Image.open's test)."""
    Image.init()
    return any(Image.OPEN[name][1](head) is True for name in FORMATS if name in Image.OPEN)


def open_image(data: bytes, limits: Limits) -> Image.Image | Reject:
    """Parse the header only: within the byte cap, a format we pack, the pixel count within the limit."""
    if too_large := check_size(len(data), limits):
        return too_large
    image = guarded("header", lambda: _parse_header(data))
    if isinstance(image, Reject):
        return image
    if image.format not in FORMATS:
        return Reject("unsupported_format", f"{image.format} is not one of {', '.join(sorted(FORMATS))}")
    width, height = image.size
    if width * height > limits.max_pixels:
        return Reject("too_many_pixels", f"{width}x{height} is over {limits.name} {limits.max_pixels}")
    return image


def check_planned(planned: Iterable[tuple[str, tuple[int, int]]], limits: Limits) -> Reject | None:
    """A Reject for the first planned (what, (width, height)) over the pixel limit: checked before allocating."""
    for what, (width, height) in planned:
        if width * height > limits.max_pixels:
            return Reject("resize_too_large", f"{what} would be {width}x{height} ({width * height:,} pixels), "
                                              f"over {limits.name} {limits.max_pixels}")
    return None


def decode(image: Image.Image) -> Image.Image | Reject:
    """The image with its pixels loaded, or why they cannot be."""
    loaded = guarded("decode", image.load)
    return loaded if isinstance(loaded, Reject) else image


def guarded(stage: str, call: Callable[[], T]) -> T | Reject:
    """CALL, a decoder's work on untrusted bytes; whatever it raises is a Reject for this input.

    The one broad except of the pipeline, on purpose: Pillow's plugins raise OSError, ValueError, TypeError
    (a TIFF whose strip offsets are not integers), SyntaxError, struct.error, IndexError, KeyError,
    ZeroDivisionError, EOFError, DecompressionBombError... on hostile bytes, and no list of them is complete.
    Only running out of memory is not the input's fault alone: it still stops the program."""
    try:
        return call()
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 -- see the docstring
        return Reject("corrupt_image", f"{stage}: {str(error) or type(error).__name__}")


def _parse_header(data: bytes) -> Image.Image | Reject:
    try:
        return open_header(data)
    except UnidentifiedImageError:
        return Reject("not_an_image", f"{len(data)} bytes that no image decoder recognises")


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


def _not_regular(mode: int) -> Reject:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return Reject("not_a_regular_file", f"{kind}: only regular files are read")


def check_size(size: int, limits: Limits) -> Reject | None:
    """A Reject for SIZE bytes over the byte cap (max_file_bytes), before they are read or parsed."""
    if size <= limits.max_bytes:
        return None
    return Reject("file_too_large", f"{size:,} bytes is over the {limits.max_bytes:,}-byte cap that {limits.name} "
                                    f"{limits.max_pixels} sets (8 bytes a pixel + 16 MiB)")
