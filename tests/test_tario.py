"""The hand-written tar writer must produce exactly what Python's tarfile writes (USTAR, mtime 0, mode 0444)."""

import io
import tarfile

import pytest

from shardtool.tario import TarShard, member_header


def tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 70_000])
def test_header_equals_tarfile(size):
    name = "train_dress_x_jpg_1a2b3c4d.jpg"
    assert member_header(name, size) == tarfile_bytes([(name, b"x" * size)])[:512]


def test_shard_equals_tarfile_and_index_points_at_the_data():
    samples = [("a_1", [("jpg", b"\xff\xd8" * 300), ("cls", b"3"), ("json", b"{}")]),
               ("b_2", [("jpg", b"z" * 512), ("cls", b"10"), ("json", b'{"k": 1}')])]
    buffer = io.BytesIO()
    shard = TarShard(buffer)
    for key, members in samples:
        shard.add_sample(key, members)
    size, _ = shard.close()
    flat = [(f"{key}.{ext}", data) for key, members in samples for ext, data in members]
    assert buffer.getvalue() == tarfile_bytes(flat) and size == len(buffer.getvalue())
    lines = shard.index_text().splitlines()
    assert lines[0] == "v1.2 2"
    for line, (key, members) in zip(lines[1:], samples):
        fields = line.split()
        for (ext, data), start in zip(members, range(0, len(fields), 4)):
            offset, length = int(fields[start + 1]), int(fields[start + 2])
            assert fields[start] == ext and buffer.getvalue()[offset:offset + length] == data
