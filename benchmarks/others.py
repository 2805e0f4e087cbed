"""The loader benchmark's Mosaic Streaming and LitData rows (run by benchmarks/loader.py, never directly).

They live apart because they import mosaicml-streaming and litdata at the top, so that their datasets
are module-level classes (LitData's workers are spawned and pickle the dataset), and those two are
installed only in benchmarks/.cache/venv-others: mosaic pins numpy < 2.2 and both pull in cloud SDKs.

Each converts the shards' training JPEGs once into its own format (MDS shards / litdata chunks, bytes
kept as they are, no re-encoding) under benchmarks/.cache, then reads them with its own streaming
dataset + loader, decoding with PIL and the same torchvision transform as the imagefolder row.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import litdata
from PIL import Image
from streaming import MDSWriter, StreamingDataset

from benchmarks.common import (
    LOADER_BATCH,
    LOADER_WORKERS,
    copy_dir,
    data_loader,
    images_of,
    time_epochs,
    torchvision_transform,
    train_members,
)

TRANSFORM = torchvision_transform()


def decoded(sample: dict[str, Any]) -> tuple[Any, int]:
    image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    return TRANSFORM(image), int(sample["cls"])


class MosaicImages(StreamingDataset):
    def __getitem__(self, index: int) -> tuple[Any, int]:
        return decoded(super().__getitem__(index))


class LitdataImages(litdata.StreamingDataset):
    def __getitem__(self, index: Any) -> tuple[Any, int]:
        return decoded(super().__getitem__(index))


def litdata_sample(item: tuple[bytes, int]) -> dict[str, Any]:
    return {"jpg": item[0], "cls": item[1]}


def run_mosaic(shards: Path, epochs: int) -> list[float]:
    local = copy_dir(shards, "mds")
    if not (local / "index.json").exists():
        with MDSWriter(out=str(local), columns={"jpg": "bytes", "cls": "int"}, size_limit="64mb") as writer:
            for _, data, label in train_members(shards):
                writer.write({"jpg": data, "cls": label})
    dataset = MosaicImages(local=str(local), shuffle=True, batch_size=LOADER_BATCH, shuffle_seed=0)
    loader = data_loader(dataset)
    return time_epochs(lambda e: images_of(loader), epochs, dataset.num_samples)


def run_litdata(shards: Path, epochs: int) -> list[float]:
    local = copy_dir(shards, "litdata")
    if not (local / "index.json").exists():
        items = [(data, label) for _, data, label in train_members(shards)]
        litdata.optimize(fn=litdata_sample, inputs=items, output_dir=str(local), chunk_bytes="64MB", num_workers=1,
                         mode="overwrite")
    dataset = LitdataImages(str(local), shuffle=True, seed=0)
    loader = litdata.StreamingDataLoader(dataset, batch_size=LOADER_BATCH, num_workers=LOADER_WORKERS,
                                         persistent_workers=True, prefetch_factor=4)
    return time_epochs(lambda e: images_of(loader), epochs, len(dataset))
