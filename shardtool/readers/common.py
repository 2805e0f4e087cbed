"""What every reader shares: keys, paths shown to users, and the image extensions we accept."""

from __future__ import annotations

import hashlib
import os
import re

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1, and Unicode's line/paragraph separators
MAX_KEY = 80  # keeps tar member names under ustar's 100-byte limit


def make_key(text: str) -> str:
    """A webdataset key for `text`: no dots or slashes, ASCII, stable across runs.

    Texts that are already safe are kept as they are (CSV ids, BSON ids); any other text is
    sanitised and given a short hash of the original, so two different inputs never share a key.
    """
    if _UNSAFE.search(text) is None and 0 < len(text) <= MAX_KEY:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"{_UNSAFE.sub('_', text).strip('_')[: MAX_KEY - 9]}_{digest}"


def has_control(text: str) -> bool:
    """Whether `text` holds a line break, NUL or other control character: never part of a label or a path
    a user typed, so such a text is a skip (`bad_label`, `bad_image_ref`) and never becomes a class."""
    return _CONTROL.search(text) is not None


def shown(path: str | os.PathLike[str]) -> str:
    """A path as text that is always printable and JSON-safe, even with undecodable bytes or control
    characters in it (a file named with a terminal escape code is shown as `\\x1b[31m`, never sent raw)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
