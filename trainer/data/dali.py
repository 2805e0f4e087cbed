"""The DALI loader: tar members -> decoded, cropped, normalised images in one DALI pipeline -> Batch.

One pipeline definition for both devices; only the decoder's device changes ("mixed" = nvJPEG on
the GPU, "cpu" otherwise, where every operator runs on the CPU and the pipeline has device_id=None):

    shards in the epoch's order (plan.epoch_shards: whole shards, shuffled; DALI's reader cannot
    start mid-shard, so unlike the torch loader it mixes only shards packed --order shuffled)
      -> fn.readers.webdataset(shard_id=rank, num_shards=world, stick_to_shard, pad_last_batch,
                               random_shuffle + initial_fill when training)  -> encoded image, [cls], json
      -> train: fn.decoders.image_random_crop(RGB, scale) + fn.resize(S x S)  -> uint8 S x S x 3
         (DALI's fused decode + random crop, as its ImageNet examples train: it decodes only the crop
         window where the format allows)
         eval: fn.decoders.image(RGB) + fn.resize(resize_shorter)
      -> fn.crop_mirror_normalize(float, HWC, mean*255, std*255; train: coin-flip mirror, eval: centre crop)
    python: -> torch (one copy), viewed as N x 3 x S x S: HWC memory is exactly channels_last
            -> labels from cls, keys and groups from the json member, DALI's padding trimmed -> Batch

A fresh pipeline is built for every epoch, seeded by (seed, epoch, rank): an epoch's order and
augmentations are a function of the seed alone, whatever ran before, and a loop that stops early
leaves no half-read epoch behind. DALI gives its shard floor or ceil of total/world samples; when
training every rank keeps the first total // world (plan.rank_samples), so all ranks run the same
number of batches. Eval keeps the rank's whole share, each sample once.

Resume (start_batch > 0): the skipped batches are read, decoded and dropped. Because the epoch's
pipeline is deterministic, the batches that follow are exactly those of an uninterrupted epoch, at
the cost of decoding the skipped ones (the torch loader skips without decoding). DALI's own
checkpointing would make it cheap: with enable_checkpointing=True, a pipeline rebuilt from
pipe.checkpoint() taken after batch k yields batches k+1... with the same keys and pixels (tried on
DALI 2.4 CPU), but that string would have to travel in the trainer's checkpoint, and the Loader
protocol has no place for it.

Corrupt images: DALI stops the pipeline on the first undecodable image, so only --on-corrupt fail
is supported; the error names the shard and key (found by replaying the reader without decoding).
"""

from __future__ import annotations

import io
import json
import dataclasses
import math
import random
import re
from collections.abc import Iterator
from typing import Any

import torch

from shardtool.process.dali import DECODER
from trainer.data.spec import Batch, LoaderSpec, check_label
from trainer.data.plan import epoch_shards, rank_samples
from trainer.cache import ShardCache
from trainer.dataset import Shard, is_url
from trainer.errors import ConfigError, TrainError

IMAGE_EXTS = "jpg;jpeg;png;webp"
DEVICE_FAILURE = re.compile(r"CUDA error|CUDA_ERROR|cuda\w*Error|NVJPEG_STATUS|out of memory")  # not the shards' fault


def reader_args(spec: LoaderSpec, shards: list[Shard], seed: int) -> dict[str, Any]:
    """fn.readers.webdataset's arguments: this rank's part of SHARDS, shuffled when training."""
    exts = [IMAGE_EXTS, "cls", "json"] if spec.labelled else [IMAGE_EXTS, "json"]
    return {"paths": [s.url for s in shards], "index_paths": [s.index_url for s in shards], "ext": exts,
            "missing_component_behavior": "error", "shard_id": spec.rank, "num_shards": spec.world,
            "stick_to_shard": True, "pad_last_batch": True, "random_shuffle": spec.train,
            "initial_fill": max(spec.shuffle_buffer, 1), "seed": seed, "name": "reader"}


def decode_augment(encoded: Any, spec: LoaderSpec, decoder: str) -> Any:
    """Encoded images -> float HWC S x S, normalised: the train or the eval transform. DECODER is the
    decoders' device ("cpu", or "mixed" for nvJPEG); both upsample chroma as pack and the torch loader's
    libjpeg-turbo do (shardtool.process.dali.DECODER)."""
    from nvidia.dali import fn, types

    size = spec.image_size
    # nvJPEG's device and pinned host buffers are allocated this much larger than asked, so a bigger image
    # seldom makes them reallocate (the sizes DALI's ResNet-50 example uses); the CPU decoder takes none
    buffers = {"device_memory_padding": 211025920, "host_memory_padding": 140544512} if decoder == "mixed" else {}
    norm = {"dtype": types.FLOAT, "output_layout": "HWC", "mean": [m * 255 for m in spec.mean],
            "std": [s * 255 for s in spec.std]}
    if spec.train:
        images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                               random_area=list(spec.scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                               **DECODER, **buffers)
        images = fn.resize(images, size=[size, size])
        mirror = fn.random.coin_flip(probability=0.5 if spec.hflip else 0.0)
        return fn.crop_mirror_normalize(images, mirror=mirror, **norm)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **DECODER, **buffers)
    images = fn.resize(images, resize_shorter=spec.eval_resize)
    return fn.crop_mirror_normalize(images, crop=[size, size], **norm)


def build_pipeline(spec: LoaderSpec, shards: list[Shard], seed: int, device_id: int | None) -> Any:
    """The pipeline: outputs (images, [cls], json); device_id None = every operator on the CPU."""
    from nvidia.dali import Pipeline, fn

    pipe = Pipeline(batch_size=spec.batch_size, num_threads=max(spec.workers, 1), device_id=device_id,
                    seed=seed)
    with pipe:
        encoded, *rest = fn.readers.webdataset(**reader_args(spec, shards, seed))
        pipe.set_outputs(decode_augment(encoded, spec, "cpu" if device_id is None else "mixed"), *rest)
    pipe.build()
    return pipe


def find_corrupt(spec: LoaderSpec, shards: list[Shard], seed: int, batch: int) -> str | None:
    """Replay the reader (same seed, no decoding) and name the first image around BATCH that Pillow
    cannot decode, as "shard key"; the batch before and after count too, in case DALI reported late."""
    from nvidia.dali import Pipeline, fn
    from PIL import Image

    pipe = Pipeline(batch_size=spec.batch_size, num_threads=1, device_id=None, seed=seed)
    with pipe:
        encoded, *_ = fn.readers.webdataset(**reader_args(spec, shards, seed))
        pipe.set_outputs(encoded, fn.get_property(encoded, key="source_info"))
    pipe.build()
    for index in range(batch + 2):
        encoded, sources = pipe.run()
        for i in range(len(encoded) if index >= batch - 1 else 0):
            try:
                Image.open(io.BytesIO(encoded.at(i).tobytes())).convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError):
                where, _, member = sources.at(i).tobytes().decode().rpartition(":")  # shard:offset:key.ext
                return f"{where.rpartition(':')[0]} {member.rpartition('.')[0]}"
    return None


def local_shards(spec: LoaderSpec) -> LoaderSpec:
    """DALI's reader opens local files: URL shards are fetched into --cache first (all of the split's)."""
    remote = [shard for shard in spec.shards if is_url(shard.url)]
    if not remote:
        return spec
    if not spec.remote.cache:
        raise ConfigError("--loader dali reads shards from local files: give URL DATA a --cache DIR, or use --loader torch")
    total = sum(shard.bytes for shard in spec.shards)
    if spec.remote.cache_gb and total > spec.remote.cache_gb * 1e9:
        raise ConfigError(f"--loader dali needs the whole split in --cache: {total / 1e9:.1f} GB, more than "
                          f"--cache-size {spec.remote.cache_gb:g}; raise it or use --loader torch")
    cache = ShardCache(spec.remote)
    local = []
    for shard in spec.shards:
        tar, index = cache.local(shard.url, shard.sha256, shard.index_url, shard.bytes)
        local.append(dataclasses.replace(shard, url=str(tar), index_url=str(index)))
    return dataclasses.replace(spec, shards=tuple(local))


class DaliLoader:
    """One DALI pipeline per epoch; batches trimmed to the rank's planned samples."""

    def __init__(self, spec: LoaderSpec) -> None:
        if spec.on_corrupt != "fail":
            raise ConfigError("--on-corrupt skip needs --loader torch (DALI stops at the first corrupt image)")
        if spec.sampling is not None:  # its reader streams whole shards: it cannot draw blocks as plan.py does
            raise ConfigError("--sampling, --mix and --epoch-size need --loader torch (DALI's reader streams "
                              "whole shards and cannot follow the sampling plan)")
        self.spec = spec = local_shards(spec)
        self.num_samples = rank_samples(spec.shards, spec.rank, spec.world, spec.train)
        self.num_batches = math.ceil(self.num_samples / spec.batch_size)
        self.device = torch.device(spec.device)
        self.device_id = None
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        if start_batch >= self.num_batches:
            return
        spec = self.spec
        shards = epoch_shards(spec.shards, spec.seed, epoch, shuffle=spec.train)
        seed = random.Random(f"{spec.seed}/{epoch}/{spec.rank}/dali").randrange(2**31)
        try:
            pipe = build_pipeline(spec, shards, seed, self.device_id)
        except RuntimeError as error:  # a missing or unreadable .idx or shard, or the device itself
            what = "set up on the GPU" if DEVICE_FAILURE.search(str(error)) else "open the shards"
            raise TrainError(f"DALI cannot {what}: {dali_reason(error)}") from None
        for index in range(self.num_batches):
            try:
                outputs = pipe.run()
            except RuntimeError as error:
                raise TrainError(self._describe(error, shards, seed, index)) from None
            if index >= start_batch:
                yield self.to_batch(outputs, min(spec.batch_size, self.num_samples - index * spec.batch_size))

    def to_batch(self, outputs: tuple[Any, ...], keep: int) -> Batch:
        """DALI's outputs -> Batch of the first KEEP samples (the rest is DALI's padding)."""
        images, *labels, infos = outputs
        size = self.spec.image_size
        hwc = torch.empty((len(images), size, size, 3), dtype=torch.float32, device=self.device)
        self._copy(images, hwc)
        metas = [json.loads(infos.at(i).tobytes()) for i in range(keep)]
        keys = [str(meta["key"]) for meta in metas]
        groups = [str(meta.get("group", meta.get("_id", meta["key"]))) for meta in metas]
        values = [self._label(labels[0].at(i).tobytes(), keys[i]) for i in range(keep)] if labels else [-1] * keep
        labels = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":  # from pinned memory, so the copy is asynchronous like the images'
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        return Batch(hwc[:keep].permute(0, 3, 1, 2), labels, keys, groups)

    def _label(self, raw: bytes, key: str) -> int:
        """DALI has no skip (--on-corrupt fail only): a label the manifest does not know stops with one line."""
        try:
            return check_label(raw, self.spec.num_classes)
        except ValueError as error:
            raise TrainError(f"sample {key}: {error}") from None

    def _copy(self, images: Any, out: torch.Tensor) -> None:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        if images.is_dense_tensor():  # one contiguous buffer: one copy
            feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
            return
        for i in range(len(images)):  # DALI may hand samples in separate buffers; as_tensor() refuses those
            feed_ndarray(images[i], out[i], cuda_stream=stream)

    def _describe(self, error: RuntimeError, shards: list[Shard], seed: int, batch: int) -> str:
        """One line for a pipeline DALI stopped: the corrupt image when we can find it, else DALI's reason."""
        try:
            where = find_corrupt(self.spec, shards, seed, batch)
        except RuntimeError:  # the reader itself fails (a damaged tar or .idx): DALI's reason says which
            where = None
        if where:
            return f"corrupt image {where}: DALI cannot decode it; rerun with --loader torch --on-corrupt skip"
        return f"DALI stopped at batch {batch}: {dali_reason(error)}"


def dali_reason(error: RuntimeError) -> str:
    """The line of a DALI error that says what went wrong, after the pipeline traceback it quotes."""
    after = str(error).split("encountered:", 1)[-1]
    line = next((line.strip() for line in after.splitlines() if line.strip()), "no reason given")
    return re.sub(r'^Assert on ".*?" failed: ', "", line)
