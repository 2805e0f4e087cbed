"""The torch/webdataset loader: tar members -> decoded uint8 crops in DataLoader workers -> Batch on the device.

Each worker (persistent across epochs) runs one webdataset-style pipeline of small generators over
the samples plan.py gave it:

    segments -> raw samples {__key__, jpg|png, cls, json}   (read at the .idx offsets, no decoding;
                                                              training: spec.streams blocks in turn)
             -> shuffle buffer (training)                     (webdataset's, seeded per epoch, rank, worker)
             -> skip the samples already trained on          (resume mid-epoch)
             -> planned batches of raw samples
             -> decode + crop/flip -> uint8 batch in shared memory  (simplejpeg/Pillow, per-sample seeded RNG)
    main:    -> pinned host batch -> device, float, normalised, channels_last

Augmentation draws from a generator seeded by (seed, epoch, key), not from a stream, so a resumed
epoch gives every sample the crop it would have had. With a sampling (--sampling, --mix, --epoch-size)
the first stage is draws.py's instead: planned block reads, each sample drawn as often as its label says,
the first `size` draws; a draw's crop is seeded by (seed, epoch, key, draw).
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.transforms.v2 import functional as F
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from shardtool.process.pil import to_rgb
from trainer.cache import ShardCache
from trainer.data.spec import Batch, LoaderSpec, check_label
from trainer.data.draws import drawn
from trainer.data.plan import Segment, rank_samples, worker_plan
from trainer.dataset import is_url
from trainer.data.transforms import eval_crop, normalize
from trainer.remote import COUNTS, RangeReader, Remote, RemoteError, fetch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RATIO = (3 / 4, 4 / 3)
WHOLE_SHARD_STREAMS = 4  # shards streamed whole (no local .idx) that a worker reads at once
# A remote segment up to this size is read in one go (a training block of 16 samples: ~0.5 MB), so the
# `streams` blocks a worker interleaves do not each hold a connection open; longer ones (eval reads whole
# shards) are streamed.
WHOLE_READ = 16 << 20


def read_segment(segment: Segment, remote: Remote = Remote()) -> Iterator[dict[str, Any]]:
    """Raw samples START..STOP of one shard; a damaged tar raises with the shard's name.

    Read through the shard's index (the .idx DALI reads: each member's offset and size), one seek and
    one read per sample, because parsing the tar headers with tarfile costs ~100 us a sample, a sixth
    of a worker's time. A remote shard (a URL) is read the same way through one byte-range request for
    the whole segment (trainer/remote.py: timeouts, retries, resume), or from the --cache copy. A
    local shard without an index is read with webdataset's tar iterator.
    """
    shard = segment.shard
    url, index_url = shard.url, shard.index_url
    if remote.cache and is_url(url):
        tar_path, index_path = ShardCache(remote).local(url, shard.sha256, index_url, shard.bytes)
        url, index_url = str(tar_path), str(index_path)
    if is_url(url):
        lines = remote_index(index_url, remote)[segment.start:segment.stop]
        members = [_members(line, index_url) for line in lines]
        begin = members[0][1][0][1] if members else 0
        end = max((offset + size for _, parts in members[-1:] for _, offset, size in parts), default=0)
        with RangeReader(url, begin, end, remote, shard.bytes or None) as tar:
            if end - begin <= WHOLE_READ:  # a training block: read at once, its connection free for the next
                tar = Buffered(tar.read(end - begin), begin)
            yield from _samples(members, tar, url, segment.stop - segment.start, index_url)
        return
    index = Path(index_url) if index_url else None
    if index is None or not index.is_file():
        source = [{"url": url}]
        yield from islice(group_by_keys(tar_file_expander(url_opener(source))), segment.start, segment.stop)
        return
    stat = index.stat()
    starts = line_starts(str(index), stat.st_size, stat.st_mtime_ns)
    with open(index, "rb") as file, open(url, "rb") as tar:
        if segment.start < len(starts):
            file.seek(starts[segment.start])
        else:  # an index shorter than the manifest says: nothing to read, reported below
            file.seek(0, os.SEEK_END)
        members = (_members(line, index_url) for line in islice(file, segment.stop - segment.start))
        yield from _samples(members, tar, url, segment.stop - segment.start, index_url)


class Buffered:
    """Bytes read from offset START of a shard, with the seek/read of a file."""

    def __init__(self, data: bytes, start: int) -> None:
        self.data, self.start, self.pos = memoryview(data), start, start

    def seek(self, position: int) -> None:
        self.pos = position

    def read(self, size: int) -> bytes:
        chunk = self.data[self.pos - self.start:self.pos - self.start + size].tobytes()
        self.pos += len(chunk)
        return chunk


def _members(raw: bytes, index: str) -> tuple[str, list[tuple[str, int, int]]]:
    """One .idx line -> (key, [(ext, offset, size), ...])."""
    try:
        fields = raw.decode("utf-8").split()
        members = [(fields[i], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)]
        return fields[3][: -len(fields[0]) - 1], members
    except (IndexError, ValueError):  # the line itself is not quoted: the file may not be an index at all
        raise ValueError(f"{index} has a line ({len(raw)} bytes) that is not an index line") from None


def _samples(members: Iterable[tuple[str, list[tuple[str, int, int]]]], tar: Any, url: str,
             expected: int, index: str) -> Iterator[dict[str, Any]]:
    """Each sample's members read from TAR (a file or a RangeReader: forward seeks only)."""
    for key, parts in members:
        first = parts[0][1]
        tar.seek(first)
        data = tar.read(max(offset + size for _, offset, size in parts) - first)
        sample: dict[str, Any] = {"__key__": key, "__url__": url}
        for ext, offset, size in parts:
            sample[ext] = data[offset - first:offset - first + size]
            if len(sample[ext]) != size:
                raise ValueError(f"{url} is shorter than its index says (truncated?)")
        yield sample
        expected -= 1
    if expected:
        raise ValueError(f"{index} lists {expected} fewer samples than the manifest")


@functools.lru_cache(maxsize=64)
def remote_index(url: str, remote: Remote) -> list[bytes]:
    """A remote .idx's sample lines (line 0, the header, dropped), fetched once per worker process."""
    return fetch(url, remote).splitlines(keepends=True)[1:]


@functools.lru_cache(maxsize=None)
def line_starts(index: str, size: int, mtime_ns: int) -> array:
    """Byte offset of each sample's line in an .idx (8 bytes a sample, read once per worker and version
    of the file), so a block of a shard starts with one seek instead of reading the index from line 0."""
    starts = array("q")
    with open(index, "rb") as lines:
        position = len(lines.readline())  # line 0: "v1.2 <samples>"
        for line in lines:
            starts.append(position)
            position += len(line)
    return starts


def shuffled(samples: Iterable[dict[str, Any]], size: int, rng: random.Random,
             initial: int = 100) -> Iterator[dict[str, Any]]:
    """A shuffle buffer: webdataset's, with our own RNG so that it replays exactly. Like webdataset's,
    it starts yielding once INITIAL samples are in and grows to SIZE as it goes (two in, one out),
    so the first batch waits for ~100 samples to be read, not the whole buffer."""
    iterator = iter(samples)
    buffer: list[dict[str, Any]] = []
    for sample in iterator:
        buffer.append(sample)
        if len(buffer) < size:
            buffer.extend(islice(iterator, 1))
        if len(buffer) < min(initial, size):
            continue
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def interleave(streams: Iterable[Iterable[Any]], width: int) -> Iterator[Any]:
    """One item from each of WIDTH streams in turn; a finished stream's place goes to the next one.
    Only WIDTH streams are open at a time (a block reader holds two open files)."""
    waiting = iter(streams)
    active = deque(iter(stream) for stream in islice(waiting, width))
    while active:
        stream = active.popleft()
        for item in stream:  # one item, then to the back of the queue
            yield item
            active.append(stream)
            break
        else:
            active.extend(iter(stream) for stream in islice(waiting, 1))


def crop_box(rng: random.Random, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm) drawn from RNG: top, left, height, width."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = width / height  # fallback: the centre crop at the nearest allowed ratio
    if aspect < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif aspect > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def transform(image: torch.Tensor, spec: LoaderSpec, rng: random.Random | None) -> torch.Tensor:
    """uint8 CHW -> uint8 3 x size x size: random crop + flip when training, resize + centre crop otherwise."""
    size = spec.image_size
    if rng is not None:
        top, left, h, w = crop_box(rng, image.shape[-2], image.shape[-1], spec.scale)
        image = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        return F.horizontal_flip(image) if spec.hflip and rng.random() < 0.5 else image
    return eval_crop(image, size, spec.eval_resize)


def decode_bytes(data: bytes) -> torch.Tensor:
    """Encoded image -> uint8 3 x H x W, RGB; raises ValueError when it cannot be decoded.

    JPEG through simplejpeg (libjpeg-turbo's TurboJPEG API): the same pixels as torchvision's and Pillow's
    decoders and the fastest of them here (`python -m benchmarks.decode`); torchvision's image decoding is
    deprecated since 0.29. Anything else (PNG, WebP, CMYK JPEGs, a JPEG TurboJPEG refuses) through
    Pillow, made RGB as shardtool makes it (alpha on white, 16-bit scaled to 8). The tensor is a CHW view
    of HWC memory, as torchvision's decoder returned it (a contiguous CHW copy made decode + crop slower
    in a one-off measurement of 2026-12-02).
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):  # CMYK/YCCK: Pillow's conversion
                return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
        except ValueError:
            pass  # Pillow decodes what TurboJPEG will not, or says why it cannot
    try:
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)
    except UnidentifiedImageError:
        raise ValueError(f"undecodable image: {len(data):,} bytes in no image format Pillow knows") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"undecodable image: {why}") from None


def decode(sample: dict[str, Any], spec: LoaderSpec, epoch: int) -> tuple[torch.Tensor, int, str, str]:
    """Raw sample -> (uint8 image, label, key, group); raises ValueError on a bad sample."""
    key = sample["__key__"]
    label = read_label(sample, spec)
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        raise ValueError("no image member")
    image = decode_bytes(data)
    draw = f"/{sample['__draw__']}" if "__draw__" in sample else ""  # one sample drawn twice: two crops
    rng = random.Random(f"{spec.seed}/{epoch}/{key}{draw}") if spec.train else None
    meta = json.loads(sample["json"]) if "json" in sample else {}
    group = str(meta.get("group", meta.get("_id", key)))
    return transform(image, spec, rng), label, key, group


def read_label(sample: dict[str, Any], spec: LoaderSpec) -> int:
    """A labelled split's .cls as a class index the manifest knows, else ValueError (a counted skip with
    --on-corrupt skip, one line naming shard and key otherwise); -1 for an unlabelled split."""
    if not spec.labelled:
        return -1
    return check_label(sample.get("cls"), spec.num_classes)


class ShardStream(IterableDataset):
    """One epoch of this rank's samples; each DataLoader worker yields its planned batches."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        # blocks need random access through .idx files: a URL's (fetched), or local ones that exist
        self.block = spec.block if all(is_url(s.index_url) or Path(s.index_url).is_file() for s in spec.shards) else 0
        self.streams = spec.streams if self.block else min(spec.streams, WHOLE_SHARD_STREAMS)
        # (epoch, start batch) in shared memory: the persistent workers, forked once, read it at each epoch
        self.position = multiprocessing.RawArray("q", 2)
        self._io_sent: Counter[str] = Counter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        epoch, start_batch = self.position
        self._io_sent = COUNTS.copy()  # batches carry this process's remote-read counts from here on
        info = get_worker_info()
        workers = max(spec.workers, 1)
        # DataLoader worker j plays planned worker (j + start) % workers, so batch start comes first.
        worker = ((info.id if info else 0) + start_batch) % workers
        plan = worker_plan(spec.shards, seed=spec.seed, epoch=epoch, train=spec.train, rank=spec.rank,
                           world=spec.world, batch_size=spec.batch_size, workers=workers, worker=worker,
                           start_batch=start_batch, block=self.block, sampling=spec.sampling)
        samples: Iterable[dict[str, Any]] = self._raw(plan.segments)
        if plan.reads is not None:  # sampling: the first `size` draws of the planned reads (segments: none)
            samples = islice(drawn(plan, self._read, spec, epoch, self.streams), plan.size)
        if spec.train:
            rng = random.Random(f"{spec.seed}/{epoch}/{spec.rank}/{worker}/buffer")
            samples = shuffled(samples, spec.shuffle_buffer, rng)
        samples = islice(samples, plan.skip, None)
        # from here: planned batches of raw samples; a bad one leaves a hole, never shifts the next batch
        for chunk in _chunks(samples, spec.batch_size):
            yield self._collate(chunk, epoch)

    def _raw(self, plan: list[Segment]) -> Iterator[dict[str, Any]]:
        streams = (self._read(segment) for segment in plan)
        return interleave(streams, self.streams) if self.spec.train else chain.from_iterable(streams)

    def _read(self, segment: Segment) -> Iterator[dict[str, Any]]:
        """The segment's raw samples; a damaged or unreachable shard gives one error sample per sample lost
        (the rest of the segment: --on-corrupt fail stops at the first, skip counts them all)."""
        seen = 0
        try:
            for sample in read_segment(segment, self.spec.remote):
                seen += 1
                yield sample
        except (tarfile.TarError, OSError, ValueError) as error:
            where = f"{segment.shard.url} after sample {segment.start + seen}"
            why = str(error) if isinstance(error, RemoteError) else f"corrupt shard: {error}"
            lost = segment.stop - segment.start - seen
            for _ in range(lost):  # each carries the reason: the shuffle buffer may put any of them first
                yield {"__key__": where, "__error__": f"{why} (one of the {lost} samples this read lost)"}

    def _collate(self, chunk: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
        images, labels, keys, groups, skipped = [], [], [], [], []
        for sample in chunk:
            try:
                if "__error__" in sample:
                    raise ValueError(sample["__error__"])
                image, label, key, group = decode(sample, self.spec, epoch)
            except ValueError as error:
                url = sample.get("__url__", "")
                skipped.append((f"{url} {sample['__key__']}".strip(), str(error)))
                continue
            images.append(image)
            labels.append(label)
            keys.append(key)
            groups.append(group)
        size = self.spec.image_size
        # default_collate stacks straight into shared memory inside a worker: no copy when the batch is sent
        stacked = default_collate(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
        io, self._io_sent = COUNTS - self._io_sent, COUNTS.copy()  # this process's retries, resumes since the last batch
        return {"images": stacked, "labels": torch.tensor(labels, dtype=torch.int64), "keys": keys,
                "groups": groups, "skipped": skipped, "io": dict(io)}


def _chunks(samples: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(samples)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class TorchLoader:
    """DataLoader over ShardStream; batches are built in the workers, normalised on the device."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.num_samples = rank_samples(spec.shards, spec.rank, spec.world, spec.train, spec.sampling)
        self.num_batches = math.ceil(self.num_samples / spec.batch_size)
        self.stream = ShardStream(spec)
        self.device = torch.device(spec.device)
        # Persistent workers, forked once rather than at every epoch: an epoch's first batch comes after
        # ~0.07 s instead of ~0.15 s (benchmarks/loader.py, 2 workers).
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=spec.workers, collate_fn=_identity,
                                 pin_memory=self.device.type == "cuda", prefetch_factor=4 if spec.workers else None,
                                 persistent_workers=spec.workers > 0,
                                 generator=torch.Generator())  # keeps the global RNG (dropout, mixup) untouched
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(spec.mean, device=self.device).view(shape) * 255
        self.inverse_std = 1 / (torch.tensor(spec.std, device=self.device).view(shape) * 255)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        for raw in self.host_batches(epoch, start_batch):
            yield self.to_device(raw)

    def host_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The epoch's batches as the workers build them: uint8 images N x 3 x S x S in host memory
        (pinned when the device is a GPU), labels, keys, groups, skipped."""
        self.stream.position[:] = [epoch, start_batch]
        yield from self.loader

    def to_device(self, raw: dict[str, Any]) -> Batch:
        # uint8 crosses to the device (a quarter of the bytes) and is laid out channels_last there;
        # float conversion and normalisation run in place: one pass each, 2.4x faster on a CPU than
        # chaining float(), -, / and contiguous(), which allocate and walk a 38 MB batch four times.
        images = normalize(raw["images"].to(self.device, non_blocking=True), self.mean, self.inverse_std)
        labels = raw["labels"].to(self.device, non_blocking=True)
        return Batch(images, labels, raw["keys"], raw["groups"], raw["skipped"], raw.get("io", {}))
