"""A file's sha256, read a MiB at a time: shard checks, the feature cache's key, a checkpoint's identity.

(hashlib.file_digest does this from Python 3.11; the package supports 3.10.)
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
