"""--sampling, --mix and --epoch-size (issue 37): what an epoch draws, how often, and that it stays exact.

Most tests run the plan as the torch loader runs it (plan.worker_plan -> draws.drawn -> the first `size`
draws of each loader worker) over shards held in memory, so a 8,880-sample epoch takes a fraction of a
second: frequencies per class and per DATA, ranks disjoint and equal, uniform unchanged. The loader itself
is run on a small skewed pack (100:10:1 classes) for exact mid-epoch resume in every mode, and `trainer fit
--sampling balanced` once through the CLI, killed mid-epoch and resumed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest
import torch

from shardtool.errors import ConfigError
from shardtool.synth import make_shapes
from tests.conftest import once_per_run, run_cli
from tests.zygote import run_trainer
from trainer.data import LoaderSpec, make_loader, spec_backend
from trainer.data.draws import drawn
from trainer.data.plan import worker_plan
from trainer.data.sampling import class_shares, make_sampling, read_class_weights, with_class_counts
from trainer.dataset import Shard, open_dataset, open_sources
from trainer.keylog import read_keys

SKEWED = [8000, 800, 80]  # 100:10:1
NAMES = ["a", "b", "c"]
TINY = ["--model", "tiny_cnn", "--weights", "none", "--batch-size", "4", "--workers", "2", "--amp", "none",
        "--freeze-epochs", "0", "--lr", "0.01", "--log-keys", "--image-size", "32"]


def memory_shards(counts: list[int], layout: str, per_shard: int = 100, source: int = 0,
                  seed: int = 0) -> tuple[list[Shard], dict[str, list[int]]]:
    """Shards of COUNTS[c] samples of class c, PER_SHARD a shard, packed class by class ("sorted") or in a
    shuffled order; and each shard's labels in order (what reading it would find)."""
    labels = [label for label, n in enumerate(counts) for _ in range(n)]
    if layout == "shuffled":
        random.Random(seed).shuffle(labels)
    shards, table = [], {}
    for start in range(0, len(labels), per_shard):
        part, url = labels[start:start + per_shard], f"mem://{source}/{start}"
        table[url] = part
        shards.append(Shard(url, "", len(part), class_counts=tuple(sorted(Counter(part).items())), source=source))
    return shards, table


def draw_epoch(shards: list[Shard], table: dict[str, list[int]], sampling, *, epoch: int = 0, world: int = 1,
               workers: int = 2, seed: int = 0, batch: int = 8) -> list[list[dict]]:
    """Each rank's draws of EPOCH, as its loader workers make them (before the shuffle buffer)."""
    spec = LoaderSpec(shards=tuple(shards), batch_size=batch, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                      train=True, sampling=sampling, num_classes=max(len(NAMES), 4), seed=seed)

    def read(segment):
        labels = table[segment.shard.url]
        return [{"__key__": f"{segment.shard.url}/{i}", "cls": str(labels[i]).encode()}
                for i in range(segment.start, segment.stop)]

    ranks = []
    for rank in range(world):
        draws = []
        for worker in range(workers):
            plan = worker_plan(tuple(shards), seed=seed, epoch=epoch, train=True, rank=rank, world=world,
                               batch_size=batch, workers=workers, worker=worker, start_batch=0, block=16,
                               sampling=sampling)
            draws += islice(drawn(plan, read, spec, epoch, 64), plan.size)
        ranks.append(draws)
    return ranks


def class_counts(draws: list[dict]) -> list[int]:
    counts = Counter(int(d["cls"]) for d in draws)
    return [counts[c] for c in range(len(NAMES))]


def test_class_shares_follow_each_mode() -> None:
    counts = [100, 10, 1, 0]
    assert class_shares("uniform", counts) == pytest.approx([100 / 111, 10 / 111, 1 / 111, 0])
    assert class_shares("balanced", counts) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    roots = [10, 10 ** 0.5, 1, 0]
    assert class_shares("sqrt", counts) == pytest.approx([r / sum(roots) for r in roots])
    assert class_shares("weights", counts, [2, 1, 0, 5]) == pytest.approx([2 / 3, 1 / 3, 0, 0])  # no samples: none


@pytest.mark.parametrize("layout", ["shuffled", "sorted"])
def test_balanced_draws_every_class_equally_often_on_a_100_10_1_dataset(layout: str) -> None:
    shards, table = memory_shards(SKEWED, layout)
    sampling = make_sampling("balanced", shards, NAMES)
    total = Counter()
    for epoch in range(3):
        draws = [d for rank in draw_epoch(shards, table, sampling, epoch=epoch, world=2) for d in rank]
        assert len(draws) == sum(SKEWED)  # the epoch: the train split's size
        counts = class_counts(draws)
        assert all(abs(n / (len(draws) / 3) - 1) < 0.05 for n in counts), (epoch, counts)
        total.update(dict(enumerate(counts)))
    assert all(abs(total[c] / (sum(total.values()) / 3) - 1) < 0.02 for c in range(3)), total
    c_keys = Counter(d["__key__"] for d in draws if d["cls"] == b"2")
    assert len(c_keys) == 80 and sum(c_keys.values()) / 80 == pytest.approx(37, rel=0.05)  # each ~37 times


def test_sqrt_draws_classes_in_proportion_to_the_square_root_of_their_counts() -> None:
    shards, table = memory_shards(SKEWED, "shuffled")
    draws = draw_epoch(shards, table, make_sampling("sqrt", shards, NAMES))[0]
    roots = [n ** 0.5 for n in SKEWED]
    expected = [len(draws) * r / sum(roots) for r in roots]  # 6,270, 1,983, 627
    assert class_counts(draws) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("text", ['{"a": 1, "b": 3, "c": 0}', "class,weight\na,1\nb,3\nc,0\n", "b,3\na,1\nc,0"])
def test_weights_from_a_json_or_csv_file_are_honoured(text: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text(text)
    assert read_class_weights(str(path), NAMES) == [1.0, 3.0, 0.0]
    shards, table = memory_shards(SKEWED, "shuffled")
    counts = class_counts(draw_epoch(shards, table, make_sampling(f"weights:{path}", shards, NAMES))[0])
    assert counts[2] == 0 and sum(counts) == sum(SKEWED)  # weight 0: never drawn
    assert counts[1] / counts[0] == pytest.approx(3, rel=0.03)


@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "b": 1, "c": 1, "dog": 2}', r"'dog' is not a class of DATA \(it has 3, such as 'a'\)$"),
    ('{"a": 1, "b": -1, "c": 1}', r"the weight of 'b' is '-1': a weight is a finite number >= 0$"),
    ('{"a": 1, "b": NaN, "c": 1}', r"the weight of 'b' is 'nan'"),
    ('{"a": 1, "b": true, "c": 1}', r"the weight of 'b' is 'True'"),
    ("a,1\nb,inf\nc,1", r"the weight of 'b' is 'inf'"),
    ("a,1\nb,one\nc,1", r"the weight of 'b' is 'one'"),
    ("a,1\nb,2", r"no weight for class 'c' \(1 of 3 classes have none\); give every class one \(0 leaves it out\)$"),
    ("a,1\na,2\nb,1\nc,1", r"class 'a' has two weights$"),
    ('{"a": 1, "a": 2, "b": 1, "c": 1}', r"class 'a' has two weights$"),
    ("a,1,2\nb,1\nc,1", r"line 1 is not `class,weight`"),
    ('{"a": 1,', r"is not valid JSON"),
    ('{"a": 0, "b": 0, "c": 0}', r"no class with a weight above 0 has training samples$"),
])
def test_a_weights_file_that_cannot_be_used_is_one_line(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(text)
    shards, _ = memory_shards([30, 20, 10], "shuffled")
    with pytest.raises(ConfigError, match=message) as error:
        make_sampling(f"weights:{path}", shards, NAMES)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"weights:.*nowhere\.json: cannot read it \(FileNotFoundError\)$"):
        make_sampling(f"weights:{tmp_path / 'nowhere.json'}", shards, NAMES)


@pytest.mark.parametrize("mode", ["uniform", "balanced"])
def test_mix_gives_each_data_its_share_and_the_mode_applies_within_it(mode: str) -> None:
    big, big_labels = memory_shards([2000, 600, 400], "shuffled", source=0)
    small, small_labels = memory_shards([100, 300, 100], "shuffled", source=1, seed=1)
    shards, table = big + small, big_labels | small_labels
    draws = draw_epoch(shards, table, make_sampling(mode, shards, NAMES, mix=[0.7, 0.3]))[0]
    by_source = [[d for d in draws if d["__key__"].startswith(f"mem://{s}/")] for s in (0, 1)]
    assert len(draws) == 3500 and [len(d) for d in by_source] == pytest.approx([2450, 1050], rel=0.02)
    if mode == "uniform":  # within DATA 2: each of its 500 samples 1050 / 500 = 2.1 times
        times = Counter(d["__key__"] for d in by_source[1])
        assert len(times) == 500 and set(times.values()) <= {1, 2, 3, 4}
        assert class_counts(by_source[1]) == pytest.approx([210, 630, 210], rel=0.05)
    else:
        assert class_counts(by_source[1]) == pytest.approx([350] * 3, rel=0.05)
        assert class_counts(by_source[0]) == pytest.approx([2450 / 3] * 3, rel=0.05)


SETUPS = {"balanced": {"mode": "balanced"}, "sqrt": {"mode": "sqrt"}, "uniform, --epoch-size": {"epoch_size": 2500},
          "balanced, --epoch-size": {"mode": "balanced", "epoch_size": 12_345}, "mix": {"mix": [0.25, 0.75]}}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("setup", SETUPS)
def test_ranks_get_equal_disjoint_draws_under_each_mode(setup: str, world: int) -> None:
    """Every draw is made once in an epoch, on one rank (repeats of a sample are other draws of it), and every
    rank draws E // world samples."""
    first, labels = memory_shards([900, 90, 9], "sorted", per_shard=50)
    second, more = memory_shards([300, 300, 300], "shuffled", per_shard=50, source=1)
    options = SETUPS[setup]
    shards = first + second if "mix" in options else first
    sampling = make_sampling(options.get("mode", "uniform"), shards, NAMES, options.get("mix"),
                             options.get("epoch_size", 0))
    size = sampling.epoch_size
    for epoch in (0, 1):
        ranks = draw_epoch(shards, labels | more, sampling, epoch=epoch, world=world, workers=2)
        assert [len(draws) for draws in ranks] == [size // world] * world
        ids = [(d["__key__"], d["__draw__"]) for draws in ranks for d in draws]
        assert len(set(ids)) == len(ids)  # no draw twice, none on two ranks
        reads = [{d["__draw__"].rpartition(".")[0] for d in draws} for draws in ranks]
        assert all(not a & b for i, a in enumerate(reads) for b in reads[i + 1:])  # no read shared by two ranks


def test_uniform_keeps_todays_plan() -> None:
    """--sampling uniform without --mix or --epoch-size has no Sampling: plan.py's own epoch, whose worker plans
    hash as they did before issue 37 (computed with main at 09d3c09)."""
    shards, _ = memory_shards([60, 60, 60], "shuffled")
    assert make_sampling("uniform", shards, NAMES) is None
    assert make_sampling("uniform", shards, NAMES, epoch_size=180) is None  # the split's size: the same
    shards = tuple(Shard(f"s{i}.tar", f"s{i}.idx", n) for i, n in enumerate([100, 37, 64, 5, 90]))
    rows = []
    for train in (True, False):
        for world, workers in ((1, 0), (2, 2), (3, 4)):
            for rank in range(world):
                for worker in range(max(workers, 1)):
                    for epoch in (0, 1):
                        plan = worker_plan(shards, seed=7, epoch=epoch, train=train, rank=rank, world=world,
                                           batch_size=8, workers=workers, worker=worker, start_batch=3, block=16)
                        rows.append((plan.skip, plan.size, [(s.shard.url, s.start, s.stop) for s in plan.segments]))
    digest = hashlib.sha256(repr(rows).encode()).hexdigest()
    assert digest == "fd224a98633f2217f0d68123caee32011d4c38ab0eef6bc5b649f616655850b9"


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes of 32 px, 100:10:1 in train (circle, cross, square; 111 images, 40 a shard) and a val split of
    10 circles and a cross."""
    def make(folder: Path) -> Path:
        source = make_shapes(folder / "src", per_class=111, size=32)
        shutil.rmtree(source / "triangle")
        for kind, keep in (("cross", 11), ("square", 1)):
            for path in sorted((source / kind).iterdir())[keep:]:
                path.unlink()
        out = folder / "out"
        result = run_cli("pack", source, out, "--split", "val=0.1", "--stratify", "--shard-size", "40",
                         "--workers", "0")
        assert result.exit_code == 0, result.output
        return out

    return once_per_run(tmp_path_factory, "sampling-skewed", make)


def test_the_manifest_gives_every_shard_its_class_counts(skewed: Path, tmp_path: Path) -> None:
    manifest = json.loads((skewed / "dataset.json").read_text())
    train = manifest["splits"]["train"]
    summed = Counter()
    for shard in train["shards"]:
        summed.update({int(k): v for k, v in shard["class_counts"].items()})
    assert [summed[c] for c in range(3)] == train["class_counts"] == [100, 10, 1]
    shards = open_dataset(str(skewed)).shards("train")
    assert [dict(s.class_counts) for s in shards] == [{int(k): v for k, v in s["class_counts"].items()}
                                                      for s in train["shards"]]
    assert run_cli("verify", skewed).exit_code == 0
    tampered = Path(shutil.copytree(skewed, tmp_path / "tampered"))
    manifest["splits"]["train"]["shards"][0]["class_counts"] = {"0": 40}
    (tampered / "dataset.json").write_text(json.dumps(manifest))
    result = run_cli("verify", tampered)
    assert result.exit_code != 0 and "class counts in the shard differ from the manifest's for it" in result.output


def test_a_manifest_without_shard_counts_is_read_once_locally_and_refused_for_a_url(skewed: Path,
                                                                                     tmp_path: Path) -> None:
    old = Path(shutil.copytree(skewed, tmp_path / "old"))
    manifest = json.loads((old / "dataset.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["class_counts"]  # as packs before issue 37 wrote it
    (old / "dataset.json").write_text(json.dumps(manifest))
    shards = open_dataset(str(old)).shards("train")
    assert all(shard.class_counts is None for shard in shards)
    assert with_class_counts(shards, "uniform") == tuple(shards)  # uniform needs no class counts
    counted = with_class_counts(shards, "balanced")
    assert [s.class_counts for s in counted] == [s.class_counts for s in open_dataset(str(skewed)).shards("train")]
    remote = replace(shards[0], url="https://host/shards/train-000000.tar", index_url="https://host/x.idx")
    with pytest.raises(ConfigError, match=r"^--sampling sqrt plans from each shard's class counts, and the manifest "
                                          r"of https://host/shards/train-000000.tar has none \(packed before them\): "
                                          r"repack it, or run `shardtool index` on its tars$"):
        with_class_counts([remote], "sqrt")


def spec_of(data: Path, **changes: object) -> LoaderSpec:
    shards = tuple(open_dataset(str(data)).shards("train"))
    spec = LoaderSpec(shards=shards, batch_size=8, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=True,
                      num_classes=3, workers=2, seed=5)
    return replace(spec, **changes)


@pytest.mark.parametrize("setup, workers", [("balanced", 2), ("balanced", 0), ("sqrt", 2), ("weights", 2),
                                            ("mix", 2), ("uniform, --epoch-size", 2)])
def test_resume_mid_epoch_yields_exactly_the_tail_under_each_mode(skewed: Path, tmp_path: Path, setup: str,
                                                                  workers: int) -> None:
    weights = tmp_path / "w.csv"
    weights.write_text("circle,1\ncross,2\nsquare,4\n")
    dataset = open_sources([str(skewed), str(skewed)] if setup == "mix" else [str(skewed)])
    shards = tuple(dataset.shards("train"))
    mode = {"balanced": "balanced", "sqrt": "sqrt", "weights": f"weights:{weights}"}.get(setup, "uniform")
    sampling = make_sampling(mode, shards, dataset.class_names, [0.5, 0.5] if setup == "mix" else None,
                             150 if "epoch" in setup else 0)
    loader = make_loader(replace(spec_of(skewed, shards=shards, workers=workers), sampling=sampling), "torch")
    whole = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_batch=3))
    assert loader.num_samples == sampling.epoch_size == sum(len(b) for b in whole)
    assert [b.keys for b in tail] == [b.keys for b in whole[3:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(tail, whole[3:], strict=True))  # same crops
    again = [b.keys for b in loader.epoch(2)]
    assert again == [b.keys for b in whole] != [b.keys for b in loader.epoch(3)]
    repeated = Counter(key for b in whole for key in b.keys)
    if setup == "balanced":  # the square is drawn ~37 times an epoch, each with its own crop
        square = [(key, image) for b in whole for key, image in zip(b.keys, b.images) if key.startswith("square")]
        assert len(square) > 20 and len({image.sum().item() for _, image in square}) > 10
        assert max(repeated.values()) == repeated[square[0][0]]


def test_dali_refuses_a_sampling_and_auto_picks_torch(skewed: Path) -> None:
    spec = spec_of(skewed, device="cuda")
    sampling = make_sampling("balanced", spec.shards, ["circle", "cross", "square"])
    assert spec_backend(replace(spec, sampling=sampling), "auto") == "torch"
    with pytest.raises(ConfigError, match=r"^--sampling, --mix and --epoch-size need --loader torch"):
        make_loader(replace(spec, device="cpu", sampling=sampling), "dali")


def test_mixed_data_must_share_the_class_list(skewed: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(skewed, tmp_path / "other"))
    manifest = json.loads((other / "dataset.json").read_text())
    manifest["classes"][1]["name"] = "star"
    (other / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"other has other classes than .* \(3 vs 3, first difference at index 1\): "
                                          r"mixed DATA must share one class list$"):
        open_sources([str(skewed), str(other)])
    mixed = open_sources([str(skewed), str(skewed)])
    assert mixed.num_samples("val") == 2 * open_dataset(str(skewed)).num_samples("val")  # eval: every sample, once
    assert {s.source for s in mixed.shards("train")} == {0, 1}


def kill_mid_epoch(args: list, log: Path, lines: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= lines:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def test_fit_with_balanced_sampling_through_the_cli_resumes_exactly(skewed: Path, tmp_path: Path) -> None:
    """111 train draws an epoch (28 batches): 37 of each class in expectation, the square's one image among them
    (its reads draw it ~30 times at once, so one epoch this small is rough: the pure tests above hold the
    frequencies to a few percent on 8,880 draws); killed in epoch 2 and resumed, the key log equals an
    uninterrupted run's; metrics.csv and summary.json give balanced and per-class accuracy."""
    args = ["--sampling", "balanced", "--epochs", "2", "--checkpoint-every", "1", *TINY]
    done = run_trainer("fit", skewed, tmp_path / "whole", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "balanced" in done.stdout and "per class: circle" in done.stdout
    killed = tmp_path / "killed"
    kill_mid_epoch([skewed, killed, *args], killed / "keys" / "rank-0.tsv", 28 + 10)
    assert 0 < torch.load(killed / "last.pt", weights_only=True)["state"]["batch"] < 28
    resumed = run_trainer("fit", skewed, killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    whole = read_keys(tmp_path / "whole" / "keys" / "rank-0.tsv")
    assert read_keys(killed / "keys" / "rank-0.tsv") == whole and whole[0] != whole[1]
    assert [len(keys) for keys in whole.values()] == [111, 111]
    assert all(sum(key.startswith("square") for key in keys) >= 15 for keys in whole.values())  # uniform: 1
    classes = Counter(key.split("_")[0] for keys in whole.values() for key in keys)
    assert all(0.2 <= classes[c] / 222 <= 0.45 for c in ("circle", "cross", "square")), classes  # uniform: 90% circles
    rows = list(csv.DictReader(open(killed / "metrics.csv")))
    assert {"val_balanced_acc", "val_acc_circle", "val_acc_cross", "val_acc_square"} <= set(rows[0])
    summary = json.loads((killed / "summary.json").read_text())["val"]
    assert set(summary["class_acc"]) == {"circle", "cross", "square"} and summary["class_acc"]["square"] is None
    assert summary["balanced_acc"] == pytest.approx((summary["class_acc"]["circle"] +
                                                     summary["class_acc"]["cross"]) / 2)
