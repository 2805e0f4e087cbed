"""--cache DIR [--cache-size GB]: remote shards kept whole on local disk, checked, evicted least-recently-used.

    shard URL -> DIR/<hash of its folder URL>/<shard name>    (and its .idx beside it)
    fetch     -> DIR/.../<name>.<pid>.part, hashed while it is written, compared with the manifest's sha256,
                 then renamed: a name in the cache is always a whole, checked shard
    use       -> each process hashes a cached shard once before its first use and touches its access time; one
                 that no longer matches (bit rot, truncation, an edit) is deleted and fetched again, never
                 read
    evict     -> after each fetch, the least recently used shards go until the cache holds --cache-size
                 (the shard just fetched stays, even when it alone is bigger)

Several processes (DataLoader workers, DDP ranks) may share one DIR: a shard two of them miss at once is
fetched twice and renamed twice, both whole; an open shard that another process evicts stays readable.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from shardtool.hashing import file_sha256
from trainer.remote import COUNTS, RangeReader, Remote, RemoteError

_CHUNK = 1 << 20
_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) this process has hashed


@dataclass(frozen=True)
class ShardCache:
    remote: Remote  # its cache folder and size cap, and how shards are fetched

    @property
    def folder(self) -> str:
        return self.remote.cache

    @property
    def size_bytes(self) -> int:
        return int(self.remote.cache_gb * 1e9)

    def local(self, url: str, sha256: str, index_url: str, size: int = 0) -> tuple[Path, Path]:
        """Local paths of the shard at URL (checked against SHA256 and SIZE, the manifest's; 0: unknown) and of
        its .idx (at most remote.small_limit bytes), fetched when missing."""
        folder = Path(self.folder) / hashlib.sha256(url.rsplit("/", 1)[0].encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        tar = folder / url.rsplit("/", 1)[1]
        index = folder / index_url.rsplit("/", 1)[1]
        if not index.is_file():
            self._fetch(index_url, index, None, 0, self.remote.small_limit)
        for _ in range(2):  # a corrupt or vanished copy is fetched once more
            if not tar.is_file():
                self._fetch(url, tar, sha256, size, size or None)
                self._evict(keep={tar, index})
            elif not self._checked(tar, sha256):
                COUNTS["cache_corrupt"] += 1
                tar.unlink(missing_ok=True)
                continue
            try:  # most recently used: its access time (the mtime is part of what _checked remembers)
                os.utime(tar, ns=(time.time_ns(), tar.stat().st_mtime_ns))
                return tar, index
            except FileNotFoundError:  # evicted by another process in between
                continue
        raise RemoteError(f"{url}: the copy in --cache {self.folder} failed its sha256 check twice")

    def _checked(self, path: Path, sha256: str) -> bool:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return True  # gone: the caller fetches it again
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if not sha256 or key in _verified:
            return True
        if file_sha256(path) != sha256:
            return False
        _verified.add((str(path), stat.st_size, path.stat().st_mtime_ns))
        return True

    def _fetch(self, url: str, path: Path, sha256: str | None, size: int, limit: int | None) -> None:
        """URL into PATH through a .part file that is removed whatever happens: SIZE bytes exactly when the
        manifest gives it (0: unknown; a longer body is cut there and fails its sha256, a shorter one is
        retried, then an error), and never more than LIMIT (None: no limit)."""
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        digest = hashlib.sha256()
        limit = limit or 1 << 62
        try:
            with (RangeReader(url, 0, size or None, self.remote, size or None) as reader,
                  open(part, "wb") as out):
                while chunk := reader.read(min(_CHUNK, limit + 1 - out.tell())):
                    digest.update(chunk)
                    out.write(chunk)
                    if out.tell() > limit:
                        raise RemoteError(f"cannot read {url}: longer than {limit:,} bytes (the most it may be)")
            if sha256 and digest.hexdigest() != sha256:
                raise RemoteError(f"{url} does not match its sha256 in the manifest (downloaded "
                                  f"{part.stat().st_size:,} bytes): the server holds another file")
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        COUNTS["cache_fetched"] += 1
        if sha256:
            stat = path.stat()
            _verified.add((str(path), stat.st_size, stat.st_mtime_ns))

    def _evict(self, keep: set[Path]) -> None:
        if not self.size_bytes:
            return
        files = []
        for path in Path(self.folder).glob("*/*"):
            if path.suffix == ".part" or path in keep:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_atime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files) + sum(p.stat().st_size for p in keep if p.is_file())
        for _, size, path in sorted(files):
            if total <= self.size_bytes:
                break
            path.unlink(missing_ok=True)
            COUNTS["cache_evicted"] += 1
            total -= size
