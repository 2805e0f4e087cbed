"""Both loader backends honour one contract: the same batches for eval, each sample once per epoch across
ranks, equal shares when training, exact resume (torch), and a corrupt image skipped (torch) or named (DALI).

The dataset: shapes (4 classes x 12 JPEGs of 64x64) packed with val=0.25 and 10 samples a shard,
so train has 34 samples in 4 shards (10, 10, 10, 4) and val 14 in 2 (10, 4).
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shardtool.errors import ConfigError
from shardtool.tario import TarShard
from tests.conftest import run_cli
from trainer.data import Batch, Loader, LoaderSpec, dali_available, make_loader
from trainer.dataset import open_dataset
from trainer.errors import TrainError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
dali = pytest.mark.dali
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
BACKENDS = ["torch", pytest.param("dali", marks=[dali, needs_dali])]


@pytest.fixture(scope="module")
def packed(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loaders") / "out"
    result = run_cli("pack", shapes, out, "--split", "val=0.25", "--shard-size", "10", "--workers", "0")
    assert result.exit_code == 0, result.output
    return out


def spec_of(out: Path, split: str, **changes: object) -> LoaderSpec:
    shards = tuple(open_dataset(str(out)).shards(split))
    spec = LoaderSpec(shards=shards, batch_size=8, image_size=48, mean=MEAN, std=STD, train=False, workers=0)
    return replace(spec, **changes)


def keys_in(out: Path, split: str) -> list[str]:
    """Every key of SPLIT in shard order, read with nothing but tarfile."""
    keys: list[str] = []
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return keys


def rewrite_shard(shard: Path, edit: Callable[[str, str, bytes], bytes | None]) -> None:
    """Rewrite SHARD with every member passed through EDIT(key, ext, data) (None drops it), and its .idx."""
    samples: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = edit(key, ext, tar.extractfile(member).read())  # type: ignore[union-attr]
            if data is not None:
                samples.setdefault(key, []).append((ext, data))
    with shard.open("wb") as file:
        writer = TarShard(file)
        for key, members in samples.items():
            writer.add_sample(key, members)
        writer.close()
    shard.with_suffix(".idx").write_text(writer.index_text())


def run_epoch(loader: Loader, epoch: int = 0, start_batch: int = 0) -> list[Batch]:
    return list(loader.epoch(epoch, start_batch))


def flat_keys(batches: list[Batch]) -> list[str]:
    return [key for batch in batches for key in batch.keys]


def unnormalised(batches: list[Batch]) -> torch.Tensor:
    images = torch.cat([batch.images for batch in batches])
    return images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_the_split_layout_the_tests_rely_on(packed):
    assert [s.num_samples for s in open_dataset(str(packed)).shards("train")] == [10, 10, 10, 4]
    assert [s.num_samples for s in open_dataset(str(packed)).shards("val")] == [10, 4]


@dali
@needs_dali
def test_dali_eval_batches_equal_the_torch_ones(packed):
    spec = spec_of(packed, "val")
    ours, theirs = make_loader(spec, "torch"), make_loader(spec, "dali")
    torch_batches, dali_batches = run_epoch(ours), run_epoch(theirs)

    assert (ours.num_batches, ours.num_samples) == (theirs.num_batches, theirs.num_samples) == (2, 14)
    assert [len(b) for b in dali_batches] == [len(b) for b in torch_batches] == [8, 6]  # DALI's padding dropped
    assert flat_keys(dali_batches) == flat_keys(torch_batches) == keys_in(packed, "val")
    for a, b in zip(torch_batches, dali_batches, strict=True):
        assert b.images.shape == a.images.shape and b.images.dtype == a.images.dtype == torch.float32
        assert b.images.device == a.images.device and b.images.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == torch.int64 and torch.equal(a.labels, b.labels) and a.groups == b.groups
    # same JPEG decoder family, both antialiased bilinear resize 64 -> 55, same centre crop: observed 0.19/255
    difference = (unnormalised(torch_batches) - unnormalised(dali_batches)).abs().mean(dim=(1, 2, 3)) * 255
    assert difference.max() < 1.0, difference
    channel_means = [torch.cat([b.images for b in batches]).mean(dim=(0, 2, 3))
                     for batches in (torch_batches, dali_batches)]
    assert torch.allclose(*channel_means, atol=0.01)
    assert channel_means[0].abs().max() > 0.1  # the mean/std were applied: not 0.5-centred data


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_at_full_scale_keeps_the_whole_image_and_flips_only_with_hflip(packed, backend):
    """scale (1, 1) on square 64x64 images at size 64: every crop is the whole image, so each training
    image equals the eval image (no resize) or its mirror."""
    whole = run_epoch(make_loader(spec_of(packed, "train", image_size=64, resize_size=64), backend))
    reference = {key: image for batch in whole for key, image in zip(batch.keys, batch.images, strict=True)}
    for hflip in (True, False):
        spec = spec_of(packed, "train", image_size=64, train=True, scale=(1.0, 1.0), hflip=hflip)
        kinds = []
        for batch in run_epoch(make_loader(spec, backend)):
            for key, image in zip(batch.keys, batch.images, strict=True):
                same = torch.allclose(image, reference[key], atol=1e-4)
                mirrored = torch.allclose(image, reference[key].flip(-1), atol=1e-4)
                kinds.append("same" if same else "mirrored" if mirrored else "other")
        counts = {kind: kinds.count(kind) for kind in ("same", "mirrored", "other")}
        assert counts["other"] == 0 and counts["same"] + counts["mirrored"] == 34
        assert (counts["mirrored"] > 0 and counts["same"] > 0) if hflip else counts["mirrored"] == 0, counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_unlabelled_batches_carry_label_minus_one(packed, tmp_path, backend):
    out = Path(shutil.copytree(packed, tmp_path / "out"))
    for shard in out.glob("val-*.tar"):  # what an unlabelled split looks like: no .cls members
        rewrite_shard(shard, lambda key, ext, data: None if ext == "cls" else data)

    batches = run_epoch(make_loader(spec_of(out, "val", labelled=False), backend))

    assert flat_keys(batches) == keys_in(packed, "val")
    assert torch.cat([b.labels for b in batches]).tolist() == [-1] * 14


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_on_two_ranks_sees_every_sample_once(packed, backend):
    loaders = [make_loader(spec_of(packed, "val", rank=rank, world=2), backend) for rank in (0, 1)]
    keys = [flat_keys(run_epoch(loader)) for loader in loaders]

    assert [len(k) for k in keys] == [loader.num_samples for loader in loaders] == [7, 7]
    assert sorted(keys[0] + keys[1]) == sorted(keys_in(packed, "val"))  # no duplicate, none missing


@pytest.mark.parametrize("world, share, batches", [(2, 17, 3), (3, 11, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_ranks_get_equal_disjoint_shares(packed, backend, world, share, batches):
    loaders = [make_loader(spec_of(packed, "train", train=True, rank=r, world=world), backend) for r in range(world)]

    assert [(loader.num_samples, loader.num_batches) for loader in loaders] == [(share, batches)] * world
    for epoch in (0, 1):
        keys = [flat_keys(run_epoch(loader, epoch)) for loader in loaders]
        assert [len(k) for k in keys] == [share] * world
        union = {key for rank_keys in keys for key in rank_keys}
        assert len(union) == share * world  # no key on two ranks, none twice
        assert union <= set(keys_in(packed, "train"))
        if share * world == 34:
            assert union == set(keys_in(packed, "train"))


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_resume_mid_epoch_yields_exactly_the_tail(packed, workers):
    loader = make_loader(spec_of(packed, "train", train=True, workers=workers), "torch")
    whole = run_epoch(loader, 3)
    tail = run_epoch(loader, 3, start_batch=2)

    assert [len(b) for b in whole] == [8, 8, 8, 8, 2]
    assert [b.keys for b in tail] == [b.keys for b in whole[2:]]
    for resumed, original in zip(tail, whole[2:], strict=True):
        assert torch.equal(resumed.images, original.images)  # same crops and flips, not just the same samples


def test_torch_epoch_order_is_a_function_of_the_seed_and_epoch(packed):
    loader = make_loader(spec_of(packed, "train", train=True), "torch")
    first, again, other = (flat_keys(run_epoch(loader, epoch)) for epoch in (0, 0, 1))

    assert first == again
    assert other != first and sorted(other) == sorted(first)


@dali
@needs_dali
def test_dali_epochs_replay_exactly_and_resume_mid_epoch(packed):
    loader = make_loader(spec_of(packed, "train", train=True, workers=2), "dali")
    whole, again, other = run_epoch(loader, 3), run_epoch(loader, 3), run_epoch(loader, 4)
    tail = run_epoch(loader, 3, start_batch=2)

    assert [len(b) for b in whole] == [8, 8, 8, 8, 2]
    assert flat_keys(other) != flat_keys(whole) and sorted(flat_keys(other)) == sorted(flat_keys(whole))
    for replayed in (again, [*whole[:2], *tail]):
        assert [b.keys for b in replayed] == [b.keys for b in whole]
        assert all(torch.equal(a.images, b.images) for a, b in zip(replayed, whole, strict=True))


@pytest.fixture(scope="module")
def corrupt(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A copy of `packed` with one undecodable JPEG in val-000000 (4th sample) and one in train-000001."""
    out = Path(shutil.copytree(packed, tmp_path_factory.mktemp("corrupt") / "out"))
    victims = []
    for shard, index in (("val-000000.tar", 3), ("train-000001.tar", 5)):
        victim = keys_in_shard(out / shard)[index]
        rewrite_shard(out / shard, lambda key, ext, data, v=victim: b"not a jpeg" if (key, ext) == (v, "jpg") else data)
        victims.append(victim)
    return out, victims[0], victims[1]


def keys_in_shard(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]


def test_torch_skips_a_corrupt_image_and_names_it(corrupt):
    out, victim, _ = corrupt
    batches = run_epoch(make_loader(spec_of(out, "val", on_corrupt="skip"), "torch"))

    assert [len(b) for b in batches] == [7, 6]  # the hole stays in its batch: the next batch is not shifted
    assert flat_keys(batches) == [key for key in keys_in(out, "val") if key != victim]
    (where, why), = batches[0].skipped
    assert where == f"{out / 'val-000000.tar'} {victim}" and why.startswith("undecodable image")
    assert batches[1].skipped == []


@dali
@needs_dali
@pytest.mark.parametrize("split, train", [("val", False), ("train", True)])
def test_dali_stops_on_a_corrupt_image_with_its_shard_and_key(corrupt, split, train):
    out, val_victim, train_victim = corrupt
    loader = make_loader(spec_of(out, split, train=train), "dali")

    with pytest.raises(TrainError) as error:
        run_epoch(loader)

    shard, victim = ("val-000000.tar", val_victim) if split == "val" else ("train-000001.tar", train_victim)
    assert str(error.value) == (f"corrupt image {out / shard} {victim}: DALI cannot decode it; "
                                "rerun with --loader torch --on-corrupt skip")


@dali
@needs_dali
def test_dali_refuses_on_corrupt_skip_at_construction(packed):
    with pytest.raises(ConfigError, match=r"^--on-corrupt skip needs --loader torch"):
        make_loader(spec_of(packed, "val", on_corrupt="skip"), "dali")


@dali
@needs_dali
def test_dali_names_a_missing_index_file(packed, tmp_path):
    out = Path(shutil.copytree(packed, tmp_path / "out"))
    (out / "val-000001.idx").unlink()

    with pytest.raises(TrainError, match=r"^DALI cannot open the shards: Could not open file .*val-000001\.idx"):
        run_epoch(make_loader(spec_of(out, "val"), "dali"))


def test_the_shuffle_buffer_starts_yielding_before_it_is_full_and_loses_nothing() -> None:
    import random

    from trainer.data.torch import shuffled

    read = []

    def samples():
        for i in range(5000):
            read.append(i)
            yield {"__key__": i}

    out = shuffled(samples(), 1000, random.Random(0))
    first = next(out)["__key__"]
    assert len(read) <= 110  # the first batch waits for ~100 samples, not the whole 1000-sample buffer
    order = [first] + [s["__key__"] for s in out]
    assert sorted(order) == list(range(5000)) and order[:200] != sorted(order[:200])
    replay = [s["__key__"] for s in shuffled(({"__key__": i} for i in range(5000)), 1000, random.Random(0))]
    assert replay == order  # the same RNG replays the same order (what resume relies on)


@pytest.mark.parametrize("damage", ["truncated shard", "short index"])
def test_torch_counts_every_sample_a_damaged_shard_loses_and_keeps_the_rest(packed, tmp_path, damage):
    out = Path(shutil.copytree(packed, tmp_path / "out"))
    if damage == "truncated shard":  # the last 4 of val-000000's 10 samples are cut off
        tar = out / "val-000000.tar"
        offset = int((out / "val-000000.idx").read_text().splitlines()[7].split()[1]) - 512
        tar.write_bytes(tar.read_bytes()[:offset])
    else:  # the index lost its last 4 lines
        index = out / "val-000000.idx"
        index.write_text("".join(index.read_text().splitlines(keepends=True)[:7]))
    batches = run_epoch(make_loader(spec_of(out, "val", on_corrupt="skip"), "torch"))

    assert flat_keys(batches) == keys_in(packed, "val")[:6] + keys_in(packed, "val")[10:]
    skipped = [why for b in batches for _, why in b.skipped]
    assert len(skipped) == 4 and skipped[0].startswith("corrupt shard: ")
    assert len(set(skipped)) == 1 and skipped[0].endswith("(one of the 4 samples this read lost)")


def test_the_torch_loaders_decoder_gives_pillows_pixels_for_every_format_and_says_why_it_cannot(shapes: Path) -> None:
    """JPEGs go through simplejpeg, the rest through Pillow; either way the pixels are Pillow's RGB, and an
    image neither can read is a ValueError the loader counts or reports, not a crash."""
    import io

    import numpy as np
    from PIL import Image

    from tests.conftest import real_data_root
    from trainer.data.torch import decode_bytes

    def pillow(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    real = real_data_root()  # and every 60th real photo when the shared data is here
    photos = sorted(shapes.rglob("*.jpg"))[:8] + (sorted((real / "clothing-small").rglob("*.jpg"))[::60] if real else [])
    for path in photos:
        data = path.read_bytes()
        assert np.array_equal(decode_bytes(data).permute(1, 2, 0).numpy(), pillow(data)), path
    source = Image.open(photos[0]).convert("RGB").resize((48, 32))
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG"), ("RGB", "WEBP")):
        out = io.BytesIO()
        source.convert(mode).save(out, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        decoded = decode_bytes(out.getvalue())
        assert decoded.shape == (3, 32, 48) and decoded.dtype == torch.uint8, (mode, fmt)
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), pillow(out.getvalue())), (mode, fmt)
    rgba = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(rgba, "PNG")  # transparent: on white, as shardtool packs it
    assert decode_bytes(rgba.getvalue()).min() == 255
    whole = io.BytesIO()
    source.save(whole, "JPEG")
    for bad, expected in ((whole.getvalue()[:300], "undecodable image"),
                          (b"no image at all", "undecodable image: 15 bytes in no image format Pillow knows")):
        with pytest.raises(ValueError, match=expected):
            decode_bytes(bad)
