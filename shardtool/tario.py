"""Deterministic tar writing with the byte offsets DALI's index needs, and that index itself.

Hand-written rather than webdataset.TarWriter because we need each member's data offset as we
write (so no second pass like wds2idx) and a sha256 of the bytes without reading the shard back.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable
from typing import BinaryIO

IDX_VERSION = "v1.2"  # the format nvidia/dali wds2idx.py writes and fn.readers.webdataset reads


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256, self.position = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.position += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.position


class TarShard:
    """One shard being written: members in order, mtime 0 and no owner, so the bytes are reproducible."""

    def __init__(self, file: BinaryIO) -> None:
        self._out = _HashingFile(file)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self.index_lines: list[str] = []

    def add_sample(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        parts = []
        for ext, data in members:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            parts.append(f"{ext} {self._tar.offset - padded} {len(data)} {name}")
        self.index_lines.append(" ".join(parts))

    @property
    def bytes_written(self) -> int:
        return self._out.position

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (size in bytes, sha256 hex)."""
        self._tar.close()
        return self._out.position, self._out.sha256.hexdigest()

    def index_text(self) -> str:
        return f"{IDX_VERSION} {len(self.index_lines)}\n" + "".join(line + "\n" for line in self.index_lines)
