"""Reading a pack's output back with nothing but tarfile, for tests that check member bytes."""

from __future__ import annotations

import tarfile
from pathlib import Path


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes, ..., "split": b"train"|...}} over every shard in OUT."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                sample = samples.setdefault(key, {"split": shard.name.rsplit("-", 1)[0].encode()})
                sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples
