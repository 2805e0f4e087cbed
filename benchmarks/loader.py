"""Loader throughput: our loaders against what users would write instead, on the same images.

    python -m benchmarks.loader [--data SHARDS --files DIR] [--epochs 2] [--repeats 3] [--rows a,b] [--json]
    python -m benchmarks.loader --name loader-network --rows shardtool-torch,shardtool-torch-http,\
        shardtool-torch-http-cache-cold,shardtool-torch-http-cache-warm,imagefolder-256

Every row yields batches of 64 RandomResizedCrop(224) + horizontal-flip images from the same training
images in 2 worker processes (DALI: 2 threads), one untimed warm-up epoch first (page cache, worker
start, first allocations), then --epochs timed epochs, each in its own process, --repeats times.
images/s is per timed epoch, worker start included (as a user's epoch pays it); the table shows the
median and the JSON min/median/max.

- shardtool-torch: trainer.data.make_loader(spec, "torch") over the shards, as `trainer fit` builds it,
  taking its uint8 host batches (TorchLoader.host_batches): what its workers deliver, like every
  baseline below, and all of its work on a GPU box, where the float conversion runs on the device.
- shardtool-torch-whole-shards: the same loader reading as it did before its block mixing (spec
  block 0, streams 1): each worker reads its shards whole, in order, through the shuffle buffer. What
  the mixing costs in speed is shardtool-torch / this row.
- shardtool-torch-normalised: the same through TorchLoader.epoch(), which also converts each batch to
  float, normalises it and lays it out channels_last on the device: here the CPU, in the main process.
- shardtool-torch-http: shardtool-torch reading the shards over HTTP from 127.0.0.1 (the Range-capable
  Python server of tests/faultserver.py, no faults, in the measuring process: it shares the 2 cores),
  each training block of 16 samples one byte-range request (trainer/remote.py).
- shardtool-torch-http-cache-cold, -warm: the same with --cache: cold empties the cache before every
  epoch (each shard downloaded whole, sha256-checked, then read locally); warm keeps what the warm-up
  epoch fetched (each process hashes each cached shard once, then reads local files).
- shardtool-dali: DaliLoader over DALI's webdataset reader, every operator on the CPU (no GPU here);
  its fused crop_mirror_normalize delivers normalised float batches (on DALI's 2 threads).
- imagefolder: torchvision ImageFolder + DataLoader(shuffle) on the original files, PIL decode, the
  torchvision tutorial's RandomResizedCrop + RandomHorizontalFlip + PILToTensor.
- imagefolder-256: the same on files holding exactly the shards' JPEGs (shorter side 256): what a
  user who resized by hand gets, so the gap between it and imagefolder is resolution, not format.
- webdataset-naive: webdataset's README pipeline over our default shards (1000/1000/1000/68 here):
  .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(torchvision transform), shards split
  across workers before shuffling, so one worker reads 2,000 images and the other 1,068.
- webdataset: the layout and settings webdataset's docs recommend: the same samples rewritten by its
  ShardWriter into 16 equal shards (8 per worker), shardshuffle, .shuffle(1000), batched inside the
  workers (.batched(64), WebLoader(batch_size=None)).
- dali-files: DALI's fn.readers.file on the original files + the same fused decode/crop/normalise as
  shardtool-dali (decoders.image_random_crop, as DALI's own training examples use).
- decode-ceiling: the shards' JPEG bytes held in memory, decoded (by the torch loader's decoder) +
  cropped + flipped by our own transform in a tight loop, in 2 processes at once (half the images
  each, torch at 1 thread, as in a DataLoader worker): what 2 cores can do with no reading, batching or
  inter-process traffic at all: the bound for the rows that decode with it (ours).
  (Not one core's rate times 2: two such loops together did ~1.75x one alone, an observation on the AMD
  machine before 2026-12-02.)
- decode-ceiling-pil: the same with PIL decode + the torchvision transform on PIL images, as the
  imagefolder, webdataset, mosaic and litdata rows decode: the bound for those rows.
- mosaic, litdata: Mosaic Streaming and LitData on their own converted copies of the shards' JPEGs
  (MDS / litdata chunks, made once), with their own dataset + loader, PIL decode + the same transform.
  They pin numpy < 2.2 (mosaic) and pull in cloud SDKs, so they run from their own virtualenv in
  benchmarks/.cache/venv-others (common.other_venv: made on first use, torch from the same wheels);
  where it cannot be made (no network), the rows are left out with the reason in the notes.

Every DataLoader (ours and the baselines') keeps its workers across epochs (persistent_workers) with
prefetch_factor 4, as ours does.

With no --data, clothing-small is packed at shorter:256 into benchmarks/.cache (once, as fit.py
does); --files defaults to clothing-small/train, the originals those shards were packed from. A GPU
adds shardtool-dali-gpu and dali-files-gpu (nvJPEG decode, "mixed" device).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LOADER_BATCH,
    LOADER_MEAN,
    LOADER_SIZE,
    LOADER_STD,
    LOADER_WORKERS,
    add_ratio,
    copy_dir,
    data_loader,
    default_data,
    emit,
    gpu_name,
    images_of,
    other_venv,
    real_data,
    rel,
    row,
    time_epochs,
    timed_run,
    torchvision_transform,
    train_members,
)

BATCH, SIZE, WORKERS, BUFFER = LOADER_BATCH, LOADER_SIZE, LOADER_WORKERS, 1000
MEAN, STD = LOADER_MEAN, LOADER_STD
ROWS = ("shardtool-torch", "shardtool-torch-whole-shards", "shardtool-torch-normalised", "shardtool-torch-http",
        "shardtool-torch-http-cache-cold", "shardtool-torch-http-cache-warm", "shardtool-dali", "imagefolder",
        "imagefolder-256", "webdataset-naive", "webdataset", "dali-files", "decode-ceiling", "decode-ceiling-pil",
        "mosaic", "litdata")
WDS_SHARDS = 16  # the webdataset row's equal shards: 8 per worker
GPU_ROWS = ("shardtool-dali-gpu", "dali-files-gpu")
IN_OTHERS = ("mosaic", "litdata")  # rows that run under the other virtualenv's interpreter


# ---- data ----------------------------------------------------------------------------------------------------


def default_files() -> Path:
    real = real_data()
    return real / "clothing-small" / "train"


def train_count(shards: Path) -> int:
    """The training split's samples, as the manifest counts them."""
    return json.loads((shards / "dataset.json").read_text())["splits"]["train"]["num_samples"]


def resized_files(shards: Path) -> Path:
    """The shards' training JPEGs as class folders (made once): ImageFolder at the shards' resolution."""
    out = copy_dir(shards, "files")
    if not (out / ".done").exists():
        for key, data, label in train_members(shards):
            folder = out / f"{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{key}.jpg").write_bytes(data)
        (out / ".done").touch()
    return out


def equal_shards(shards: Path) -> list[str]:
    """The shards' training samples rewritten by webdataset's ShardWriter into WDS_SHARDS equal shards
    (made once): the layout webdataset's docs recommend for its workers."""
    import webdataset as wds

    out = copy_dir(shards, f"wds-{WDS_SHARDS}")
    if not (out / ".done").exists():
        members = list(train_members(shards))
        out.mkdir(parents=True, exist_ok=True)
        per_shard = -(-len(members) // WDS_SHARDS)
        with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for key, data, label in members:
                sink.write({"__key__": key, "jpg": data, "cls": label})
        (out / ".done").touch()
    return sorted(str(p) for p in out.glob("train-*.tar"))


# ---- one measurement per child process -----------------------------------------------------------------------


def run_shardtool(shards: Path, backend: str, device: str, epochs: int, normalised: bool = True,
                  **mixing: int) -> list[float]:
    from trainer.data import LoaderSpec, make_loader
    from trainer.dataset import open_dataset

    dataset = open_dataset(str(shards))
    spec = LoaderSpec(shards=tuple(dataset.shards("train")), batch_size=BATCH, image_size=SIZE, mean=MEAN, std=STD,
                      train=True, workers=WORKERS, shuffle_buffer=BUFFER, device=device, **mixing)
    loader = make_loader(spec, backend)
    if normalised:
        return time_epochs(lambda e: (batch.images for batch in loader.epoch(e)), epochs, loader.num_samples)
    host_batches = loader.host_batches  # type: ignore[attr-defined]  # TorchLoader's
    return time_epochs(lambda e: (raw["images"] for raw in host_batches(e)), epochs, loader.num_samples)


def run_shardtool_http(shards: Path, epochs: int, cache: str) -> list[float]:
    """shardtool-torch over HTTP on 127.0.0.1; CACHE: "" (byte ranges), "cold" or "warm" (--cache)."""
    import shutil

    from tests.faultserver import FaultServer
    from trainer.data import LoaderSpec, make_loader
    from trainer.dataset import open_dataset
    from trainer.remote import Remote

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder, FaultServer(shards) as server:
        remote = Remote(cache=folder if cache else "")
        dataset = open_dataset(server.url, remote)
        spec = LoaderSpec(shards=tuple(dataset.shards("train")), batch_size=BATCH, image_size=SIZE, mean=MEAN,
                          std=STD, train=True, workers=WORKERS, shuffle_buffer=BUFFER, remote=remote)
        loader = make_loader(spec, "torch")

        def epoch(index: int) -> Iterator[Any]:
            if cache == "cold":
                shutil.rmtree(folder)
                Path(folder).mkdir()
            return (raw["images"] for raw in loader.host_batches(index))  # type: ignore[attr-defined]

        return time_epochs(epoch, epochs, loader.num_samples)


def run_imagefolder(files: Path, epochs: int) -> list[float]:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(files), transform=torchvision_transform())
    loader = data_loader(dataset, shuffle=True)
    return time_epochs(lambda e: images_of(loader), epochs, len(dataset))


def run_webdataset(shards: Path, epochs: int) -> list[float]:
    import webdataset as wds

    manifest = json.loads((shards / "dataset.json").read_text())
    urls = [str(shards / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls)).shuffle(BUFFER).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(torchvision_transform(), lambda label: label))
    loader = data_loader(dataset)
    return time_epochs(lambda e: images_of(loader), epochs, train_count(shards))


def run_webdataset_tuned(shards: Path, epochs: int) -> list[float]:
    import webdataset as wds

    urls = equal_shards(shards)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls)).shuffle(BUFFER).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(torchvision_transform(), lambda label: label).batched(BATCH))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=WORKERS, persistent_workers=True, prefetch_factor=4)
    return time_epochs(lambda e: images_of(loader), epochs, train_count(shards))


def run_dali_files(files: Path, device: str, epochs: int) -> list[float]:
    import torch
    from nvidia.dali import Pipeline, fn
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from trainer.data import LoaderSpec
    from trainer.data.dali import decode_augment

    spec = LoaderSpec(shards=(), batch_size=BATCH, image_size=SIZE, mean=MEAN, std=STD, train=True)
    device_id = 0 if device == "cuda" else None
    pipe = Pipeline(batch_size=BATCH, num_threads=WORKERS, device_id=device_id, seed=0)
    with pipe:
        encoded, labels = fn.readers.file(file_root=str(files), random_shuffle=True, initial_fill=BUFFER,
                                          name="reader")
        pipe.set_outputs(decode_augment(encoded, spec, "mixed" if device == "cuda" else "cpu"), labels)
    pipe.build()
    iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
    total = pipe.epoch_size("reader")

    def epoch(_: int) -> Iterator[torch.Tensor]:
        for batch in iterator:
            yield batch[0]["images"]

    return time_epochs(epoch, epochs, total)


_ENCODED: list[Any] = []  # the ceiling's JPEGs, inherited by its forked processes


def _decode_range(task: tuple[int, int, int, bool]) -> int:
    """Decode + crop + flip _ENCODED[start:stop] in this process (PIL + torchvision's transform, or the
    torch loader's decoder + transform); the number done."""
    import io
    import random

    import torch
    from PIL import Image

    from trainer.data import LoaderSpec
    from trainer.data.torch import decode_bytes, transform

    start, stop, seed, pil = task
    torch.set_num_threads(1)  # what each DataLoader worker runs with
    if pil:
        torch.manual_seed(seed)
        pil_transform = torchvision_transform()
        for data in _ENCODED[start:stop]:
            pil_transform(Image.open(io.BytesIO(data)).convert("RGB"))
        return stop - start
    spec = LoaderSpec(shards=(), batch_size=BATCH, image_size=SIZE, mean=MEAN, std=STD, train=True)
    rng = random.Random(seed)
    for data in _ENCODED[start:stop]:
        transform(decode_bytes(data), spec, rng)
    return stop - start


def run_ceiling(shards: Path, epochs: int, pil: bool) -> list[float]:
    import multiprocessing

    _ENCODED[:] = [data for _, data, _ in train_members(shards)]
    total = len(_ENCODED)
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:  # started once, outside the timing

        def epoch(index: int) -> list[range]:
            halves = [(total * i // WORKERS, total * (i + 1) // WORKERS, index, pil) for i in range(WORKERS)]
            return [range(done) for done in pool.map(_decode_range, halves)]  # one "batch" per process

        return time_epochs(epoch, epochs, total)


def measure(name: str, shards: Path, files: Path, epochs: int) -> list[float]:
    """The timed epochs' images/s of row NAME (in this process)."""
    device = "cuda" if name.endswith("-gpu") else "cpu"
    base = name.removesuffix("-gpu")
    if base == "shardtool-torch":
        return run_shardtool(shards, "torch", device, epochs, normalised=False)
    if base == "shardtool-torch-whole-shards":
        return run_shardtool(shards, "torch", device, epochs, normalised=False, block=0, streams=1)
    if base == "shardtool-torch-normalised":
        return run_shardtool(shards, "torch", device, epochs)
    if base == "shardtool-torch-http":
        return run_shardtool_http(shards, epochs, cache="")
    if base.startswith("shardtool-torch-http-cache-"):
        return run_shardtool_http(shards, epochs, cache=base.rpartition("-")[2])
    if base == "shardtool-dali":
        return run_shardtool(shards, "dali", device, epochs)
    if base == "imagefolder":
        return run_imagefolder(files, epochs)
    if base == "imagefolder-256":
        return run_imagefolder(resized_files(shards), epochs)
    if base == "webdataset-naive":
        return run_webdataset(shards, epochs)
    if base == "webdataset":
        return run_webdataset_tuned(shards, epochs)
    if base == "dali-files":
        return run_dali_files(files, device, epochs)
    if base in ("decode-ceiling", "decode-ceiling-pil"):
        return run_ceiling(shards, epochs, pil=base.endswith("-pil"))
    if base in IN_OTHERS:
        from benchmarks import others  # importable only in the other virtualenv

        return others.run_mosaic(shards, epochs) if base == "mosaic" else others.run_litdata(shards, epochs)
    raise ValueError(f"unknown row {name}")


# ---- the parent: which rows, in which interpreter; the table -------------------------------------------------


def run_once(name: str, python: str, args: argparse.Namespace) -> tuple[list[float], float]:
    """One process of row NAME: its timed epochs' images/s and its peak RSS."""
    out = Path(tempfile.mkstemp(prefix="bench-loader-", suffix=".json")[1])
    argv = [python, "-m", "benchmarks.loader", "--child", name, "--data", str(args.data), "--files",
            str(args.files), "--epochs", str(args.epochs), "--child-out", str(out)]
    _, rss = timed_run(argv, env={"PYTHONPATH": str(Path(__file__).parents[1])})
    rates = json.loads(out.read_text())
    out.unlink()
    return rates, rss


def run_rows(pythons: dict[str, str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row once per round, --repeats rounds: the rows take turns, so a slow spell of the machine
    falls on all of them rather than on one."""
    runs: dict[str, list[tuple[list[float], float]]] = {name: [] for name in pythons}
    for _ in range(args.repeats):
        for name, python in pythons.items():
            runs[name].append(run_once(name, python, args))
    results = []
    for name, done in runs.items():
        rates = [rate for rates, _ in done for rate in rates]
        results.append(row(name, rates, [rss for _, rss in done], epochs=len(rates)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="packed shards [clothing-small at shorter:256, packed once]")
    parser.add_argument("--files", type=Path, help="the original class folders of --data's train split "
                                                   "[clothing-small/train]")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per process, after one warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="processes per row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--name", default="loader", help="results/NAME.json and .md [loader]; the network rows "
                                                         "in docs/benchmarks.md: --name loader-network")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child_out.write_text(json.dumps(measure(args.child, args.data, args.files, args.epochs)))
        return
    if not args.data:
        args.data = default_data()
    args.files = args.files or default_files()
    if not args.files.is_dir():
        sys.exit(f"{args.files} not found: pass --files (the original class folders of the shards' train split)")
    names = [n for n in args.rows.split(",") if n]
    if unknown := set(names) - set(ROWS) - set(GPU_ROWS):
        sys.exit(f"unknown rows: {', '.join(sorted(unknown))} (choose from {', '.join(ROWS)})")
    if gpu_name():
        names += [n for n in GPU_ROWS if n not in names and n.removesuffix("-gpu") in names]
    pythons, notes = {}, []
    for name in names:
        pythons[name] = sys.executable
        if name in IN_OTHERS:
            bin_dir, why_not = other_venv()
            if bin_dir is None:
                del pythons[name]
                notes.append(f"{name}: not measured, {why_not}")
                continue
            pythons[name] = str(bin_dir / "python")
    results = run_rows(pythons, args)
    add_ratio(results, "vs_imagefolder_256", "imagefolder-256")
    add_ratio(results, "vs_imagefolder", "imagefolder")
    add_ratio(results, "vs_ceiling", "decode-ceiling")
    add_ratio(results, "vs_pil_ceiling", "decode-ceiling-pil")
    settings = {"data": rel(args.data), "files": rel(args.files), "batch_size": BATCH, "image_size": SIZE,
                "augment": "RandomResizedCrop + horizontal flip", "workers": WORKERS, "shuffle_buffer": BUFFER,
                "persistent_workers": True, "prefetch_factor": 4, "webdataset_equal_shards": WDS_SHARDS,
                "timed_epochs_per_process": args.epochs, "warmup_epochs": 1, "repeats": args.repeats,
                "train_images": train_count(args.data)}
    emit(args.name, settings, results, ["name", "img_s", "vs_imagefolder_256", "vs_imagefolder", "vs_ceiling",
                                        "vs_pil_ceiling", "peak_rss_mb"], args.json, notes)


if __name__ == "__main__":
    main()
