"""Byte ranges of remote objects (http(s):// through urllib3, s3://, gs://, ... through fsspec), read so that
a failing network never hangs a run and never loses or repeats a byte silently.

Every read is a range [start, end) of one object, read front to back by a RangeReader:

    request   connect timeout; inactivity timeout (no byte for `timeout` s is a failure, not a hang)
    failure   (reset, refused, timeout, 408/429/5xx, a body shorter than promised): closed and retried after a
              jittered exponential backoff, with a Range request from the last byte received ("resumed"
              when that is past where the failed request started);
              a server that ignores Range (200 instead of 206) is read from byte 0, the bytes before the
              position dropped
    give up   after `retries` + 1 failed requests in a row, a request that brought 1 MiB or more before it
              failed ending the run (so a server that sends a little and then stalls cannot keep a read
              alive forever): RemoteError, one line naming the URL, the byte range and the last failure.
              404/403/416 are not retried.

Nothing here knows about shards; trainer/data/torch.py reads samples through it and trainer/cache.py
downloads whole shards with it. COUNTS (per process) says how often it retried and resumed; the loader
sends the counts with each batch and fit writes them to metrics.csv.

Why by hand: webdataset's gopen pipes through curl, which neither resumes nor times out on a stalled
server, and fsspec's HTTP file has no inactivity timeout or Range resume of its own; urllib3 gives the
timeouts and connection pools, and this module the resume and the counting around them.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

COUNTS: Counter[str] = Counter()  # "retries", "resumed": this process's, since it started
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """How remote objects are read (--timeout, --retries, --cache, --cache-size); picklable: it travels to the
    loader's workers inside the LoaderSpec."""

    timeout: float = 30.0  # inactivity: seconds without a byte before a request counts as failed
    connect_timeout: float = 10.0
    retries: int = 5  # failed requests retried in a row (less than 1 MiB brought by each) before RemoteError
    backoff: float = 0.5  # the first retry waits up to this (full jitter), doubling up to 30 s
    cache: str = ""  # --cache DIR: whole shards kept on local disk (trainer/cache.py); "" reads ranges directly
    cache_gb: float = 0.0  # --cache-size: the cache's cap in GB; 0: none
    small_limit: int = 64 << 20  # the most bytes a manifest or .idx may have (an endless body is refused)


class RemoteError(OSError):
    """A byte range that could not be read: the message is one line naming URL, range and cause."""


class _Failed(Exception):
    """One failed attempt, worth retrying."""


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def fetch(url: str, remote: Remote) -> bytes:
    """The whole object at URL (a manifest, an .idx), refused past remote.small_limit bytes: a body that never
    ends is one line, not a MemoryError."""
    with RangeReader(url, 0, None, remote) as reader:
        data = reader.read(remote.small_limit + 1)
    if len(data) > remote.small_limit:
        raise RemoteError(f"cannot read {url}: longer than {remote.small_limit:,} bytes, more than a manifest "
                          "or index ever needs (a wrong URL, or a server that sends without end)")
    return data


class RangeReader:
    """Bytes [start, end) of URL as a forward-only file (end None: to the object's end). SIZE, when known (the
    manifest's), is the whole object's: a server that announces another length fails the request."""

    def __init__(self, url: str, start: int, end: int | None, remote: Remote, size: int | None = None) -> None:
        self.url, self.start, self.end, self.remote, self.size = url, start, end, remote, size
        self.pos = start
        self._body: Any = None  # the open response / file
        self._drop = 0  # bytes to discard first (a server that ignored Range)
        self._opened_at = start  # where the current request started

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._body is not None:
            try:
                if getattr(self._body, "length_remaining", None) == 0:  # read to its end: the connection is reusable
                    self._body.release_conn()
                else:
                    self._body.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in any way; it is gone anyway
                pass
            self._body = None

    def seek(self, position: int) -> None:
        """Forward only: skips to POSITION (tar headers between samples; a far jump starts a new request)."""
        if position < self.pos:
            raise RemoteError(f"{self.url}: cannot seek back from byte {self.pos} to {position}")
        if position - self.pos > _CHUNK:
            self.close()
            self.pos = position
        else:
            self.read(position - self.pos)

    def read(self, size: int = -1) -> bytes:
        """SIZE bytes (fewer only at END); -1: the rest. Retries, resumes or raises RemoteError."""
        out = bytearray()
        failures, last = 0, ""
        while size < 0 or len(out) < size:
            if self.end is not None and self.pos >= self.end:
                break
            want = _CHUNK if size < 0 else min(size - len(out), _CHUNK)
            if self.end is not None:
                want = min(want, self.end - self.pos)
            try:
                if self._body is None:
                    self._open()
                    if self.end is not None and self.pos >= self.end:
                        break
                chunk = self._read(want)
            except _Failed as error:
                self.close()
                if self.pos > self._opened_at:  # bytes arrived before it broke: the next request starts there
                    COUNTS["resumed"] += 1
                if self.pos - self._opened_at >= _CHUNK:  # real progress: a new run of failures starts
                    failures = 0
                failures, last = failures + 1, str(error)
                if failures > self.remote.retries:
                    span = f"{self.start}-{self.end - 1}" if self.end is not None else f"{self.start}-"
                    raise RemoteError(f"cannot read {self.url} bytes {span} (stopped at {self.pos}): {last}; "
                                      f"gave up after {failures} tries") from None
                COUNTS["retries"] += 1
                time.sleep(random.uniform(0, min(30.0, self.remote.backoff * 2 ** (failures - 1))))
                continue
            if not chunk:  # the object ended (no length was announced)
                break
            out += chunk
            self.pos += len(chunk)
        return bytes(out)

    # --- one attempt -----------------------------------------------------------------------------------

    def _open(self) -> None:
        self._opened_at = self.pos
        if is_http(self.url):
            self._open_http()
        else:
            self._open_fsspec()

    def _read(self, want: int) -> bytes:
        try:
            while True:
                # read1: what one receive brought, so bytes that arrived before a failure are kept
                chunk = self._body.read1(want) if hasattr(self._body, "read1") else self._body.read(want)
                if self._drop and chunk:
                    dropped = min(self._drop, len(chunk))
                    self._drop -= dropped
                    chunk = chunk[dropped:]
                    if not chunk:
                        continue
                break
        except Exception as error:  # noqa: BLE001 - urllib3, http.client, sockets and fsspec backends all fail differently
            raise _Failed(_why(error)) from None
        if not chunk and self.end is not None and self.pos < self.end:
            raise _Failed(f"connection closed at byte {self.pos} of {self.end}")
        return chunk

    def _open_http(self) -> None:
        import urllib3

        last = "" if self.end is None else str(self.end - 1)
        headers = {"Range": f"bytes={self.pos}-{last}"} if self.pos or self.end is not None else {}
        timeout = urllib3.Timeout(connect=self.remote.connect_timeout, read=self.remote.timeout)
        try:
            response = _pool().request("GET", self.url, headers=headers, preload_content=False, retries=False,
                                       redirect=True, timeout=timeout, decode_content=False)
        except Exception as error:  # noqa: BLE001 - see _read
            raise _Failed(_why(error)) from None
        status = response.status
        if status in _RETRY_STATUS:
            response.release_conn()
            raise _Failed(f"HTTP {status}")
        if status not in (200, 206):
            response.release_conn()
            raise RemoteError(f"cannot read {self.url}: HTTP {status}")
        if status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {self.pos}-"):
            response.close()
            raise _Failed(f"asked for bytes {self.pos}- and got {response.headers.get('Content-Range')!r}")
        announced = _length(response.headers, status, self.pos)
        if self.size is not None and announced is not None and announced != self.size:
            response.close()
            raise _Failed(f"the server's object is {announced:,} bytes, the manifest says {self.size:,}")
        self._body = response
        self._drop = self.pos if status == 200 else 0
        if self.end is None:
            self.end = announced

    def _open_fsspec(self) -> None:
        try:
            fs, path = _filesystem(self.url, self.remote)
            handle = fs.open(path, "rb", block_size=_CHUNK)
            if self.end is None:
                self.end = handle.size
            handle.seek(self.pos)
        except (FileNotFoundError, PermissionError) as error:
            raise RemoteError(f"cannot read {self.url}: {_why(error)}") from None
        except Exception as error:  # noqa: BLE001 - see _read
            raise _Failed(_why(error)) from None
        self._body = handle


def _length(headers: Any, status: int, position: int) -> int | None:
    """The object's end from Content-Range (206) or Content-Length (200), None when not announced."""
    if status == 206 and "/" in headers.get("Content-Range", ""):
        total = headers["Content-Range"].rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _why(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


_pools: dict[int, Any] = {}


def _pool() -> Any:
    """One urllib3 PoolManager per process (a forked DataLoader worker makes its own)."""
    import urllib3

    pid = os.getpid()
    if pid not in _pools:
        _pools.clear()
        _pools[pid] = urllib3.PoolManager(num_pools=16, maxsize=8)
    return _pools[pid]


def _filesystem(url: str, remote: Remote) -> tuple[Any, str]:
    """fsspec's filesystem for URL, with our timeouts where the backend takes them (s3: botocore's config;
    its own retries off, as ours count and resume); endpoint and credentials from the usual environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    import fsspec

    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")):
        options["config_kwargs"] = {"connect_timeout": remote.connect_timeout, "read_timeout": remote.timeout,
                                    "retries": {"max_attempts": 1}}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return fsspec.core.url_to_fs(url, **options)
