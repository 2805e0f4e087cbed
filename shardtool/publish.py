"""OUT as an fsspec URL (s3://bucket/prefix, gs://..., file:///shared/folder): pack into a local staging folder
and publish each piece to OUT as it is finished, the manifest last.

    staging   --staging DIR [~/.cache/shardtool/staging/<hash of OUT>]: the journal, the shard being written,
              and each finished shard until it is uploaded (so it needs room for a few shards, not the dataset)
    a shard   written, fsynced, renamed (as in a local pack) -> its .tar and .idx uploaded -> the local copies
              deleted -> journaled: a shard the journal lists is in OUT
    the end   rejects.jsonl and the other tools' sidecars, then dataset.json: a reader that finds the
              manifest finds every shard it lists

Uploads are atomic: an object store (s3, gs, az) shows an object only once its upload has completed;
anywhere else the file is written as NAME.tmp and renamed. A re-run with the same staging folder resumes
from its journal (a shard uploaded but not yet journaled is made and uploaded again, to the same bytes).
Credentials and endpoints come from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from shardtool.errors import ConfigError, PackError

SMALL_LIMIT = 64 << 20  # the most bytes a manifest or sidecar read from a URL may have
ATOMIC_PUT = ("s3", "s3a", "gs", "gcs", "az", "abfs")  # object stores: a put is all or nothing


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")  # a scheme: s3://, https://, file://, git+ssh://


def is_url(path: str) -> bool:
    """A URL (s3://, https://, file://, ...), not a local path; the trainer's DATA uses the same test."""
    return bool(_URL.match(path))


def default_staging(url: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "shardtool" / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


class Publisher:
    """Copies finished files from the staging folder to URL."""

    def __init__(self, url: str) -> None:
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url.rstrip("/"))
        except (ImportError, ValueError) as error:
            raise ConfigError(f"cannot write to {url}: {error} (s3:// needs pip install 'shardtool[s3]')") from None
        self.url = url.rstrip("/")
        protocol = self.fs.protocol
        self.atomic = bool(set([protocol] if isinstance(protocol, str) else protocol) & set(ATOMIC_PUT))

    def prepare(self) -> None:
        """OUT's folder (or bucket prefix) made where it needs to be; one line when it cannot be written."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as error:  # noqa: BLE001 - see put
            raise ConfigError(f"cannot write to {self.url}: {type(error).__name__}: {error}") from None

    def put(self, local: Path, keep: bool = False) -> None:
        """LOCAL's bytes at URL/<its name>, atomically; the local copy deleted unless KEEP."""
        target = f"{self.root}/{local.name}"
        try:
            if self.atomic:
                self.fs.put_file(str(local), target)
            else:
                self.fs.put_file(str(local), target + ".tmp")
                self.fs.mv(target + ".tmp", target)
        except Exception as error:  # noqa: BLE001 - every fsspec backend fails in its own way
            raise PackError(f"cannot upload {local.name} to {self.url}: {type(error).__name__}: {error}; "
                            "re-run the same command to resume") from None
        if not keep:
            local.unlink()

    def shard(self, tar: Path, index: Path) -> None:
        self.put(tar)
        self.put(index)

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(f"{self.root}/{name}"))

    def read_small(self, name: str, limit: int = SMALL_LIMIT) -> bytes:
        """A manifest or sidecar, refused past LIMIT bytes (a body that never ends is one line)."""
        data = bytearray()
        with self.fs.open(f"{self.root}/{name}", "rb") as file:
            while len(data) <= limit and (chunk := file.read(limit + 1 - len(data))):  # a stream reads in parts
                data += chunk
        if len(data) > limit:
            raise ConfigError(f"{self.url}/{name} is longer than {limit:,} bytes, more than a manifest ever needs")
        return bytes(data)

    def fetch(self, name: str, local: Path) -> None:
        self.fs.get_file(f"{self.root}/{name}", str(local))
