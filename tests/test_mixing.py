"""Batches are mixed: distinct classes per batch of 32 within 10% of a uniformly shuffled epoch's,
over whole epochs and over the first 5 batches of every epoch, whatever order the shards are in.

clothing-small's train split (10 classes, 3,068 images) packed from its class folders both with the
default `--order shuffled` and with `--order source` (class by class, as packs before it were, and as
other tools write them): the torch loader must mix both; the DALI loader is held to it on shuffled
shards only (its reader streams whole shards, see trainer/data/dali.py).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import once_per_run, run_cli
from tests.readback import record_figure
from trainer.data import LoaderSpec, dali_available, make_loader
from trainer.data.mixing import Mixing, mixing, uniform_mixing
from trainer.dataset import open_dataset

pytestmark = pytest.mark.real
BATCH = 32
SECTION = "batch mixing on clothing-small (tests/test_mixing.py)"


@pytest.fixture(scope="session", params=["shuffled", "source"])
def clothing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from tests.conftest import real_data_root

    root = real_data_root()
    if root is None:
        pytest.skip("real data not available: set SHARDTOOL_REAL_DATA to the shared/data folder")

    def make(folder: Path) -> Path:
        result = run_cli("pack", root / "clothing-small", folder / "shards", "--resize", "shorter:40", "--order",
                         request.param)
        assert result.exit_code == 0, result.output
        return folder / "shards"

    return request.param, once_per_run(tmp_path_factory, f"mixing-{request.param}", make)


def epoch_labels(out: Path, backend: str, epochs: int = 3) -> list[list[int]]:
    dataset = open_dataset(str(out))
    spec = LoaderSpec(shards=tuple(dataset.shards("train")), batch_size=BATCH, image_size=32, mean=(0.5,) * 3,
                      std=(0.5,) * 3, train=True, workers=2, seed=3)
    loader = make_loader(spec, backend)
    return [[label for batch in loader.epoch(epoch) for label in batch.labels.tolist()] for epoch in range(epochs)]


def stored_labels(out: Path) -> list[int]:
    """The train split's labels in the order the shards store them (what any reader streaming them sees)."""
    labels = []
    for shard in json.loads((out / "dataset.json").read_text())["splits"]["train"]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
    return labels


def check(order: str, backend: str, found: Mixing, reference: Mixing) -> None:
    whole, first = found.ratio_to(reference)
    record_figure(SECTION, f"{backend} loader, --order {order}: {found.per_batch:.2f} classes per batch of {BATCH} "
                           f"(uniform {reference.per_batch:.2f}, {whole:.2f}x), first 5 batches "
                           f"{found.first_batches:.2f} (uniform {reference.first_batches:.2f}, {first:.2f}x)")
    assert whole >= 0.9 and first >= 0.9


def test_the_stored_order_is_mixed_only_when_shuffled(clothing):
    order, out = clothing
    assert json.loads((out / "dataset.json").read_text())["options"]["order"] == order
    labels = stored_labels(out)
    runs = 1 + sum(a != b for a, b in zip(labels, labels[1:]))
    found, reference = mixing([labels], BATCH), uniform_mixing(labels, BATCH)
    record_figure(SECTION, f"shards as stored, --order {order}: {runs} runs of one class, {found.per_batch:.2f} "
                           f"classes per {BATCH} consecutive samples (uniform {reference.per_batch:.2f})")
    if order == "source":
        assert runs == 10  # class folders, class by class
    else:
        assert found.per_batch >= 0.9 * reference.per_batch


def test_torch_loader_batches_are_as_mixed_as_a_uniform_shuffle(clothing):
    order, out = clothing
    epochs = epoch_labels(out, "torch")
    assert sorted(epochs[0]) == sorted(epochs[1])  # the same samples every epoch, in another order
    check(order, "torch", mixing(epochs, BATCH), uniform_mixing(epochs[0], BATCH))


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_loader_batches_are_mixed_on_shuffled_shards(clothing):
    order, out = clothing
    if order != "shuffled":
        pytest.skip("DALI's reader streams whole shards in order: it mixes shuffled shards only")
    epochs = epoch_labels(out, "dali", epochs=2)
    check(order, "dali", mixing(epochs, BATCH), uniform_mixing(epochs[0], BATCH))
