"""trainer probe: frozen-backbone features cached on disk, a softmax head, val/test top-1, a checkpoint.

The library is called in-process (fast); the command line once as a user runs it, and for its errors.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shardtool.synth import make_shapes
from tests.conftest import run_cli
from tests.zygote import run_trainer as trainer
from trainer.predict import evaluate_checkpoint, load_predictor, predict_csv
from trainer.probe import ProbeConfig, probe

TINY = {"model": "tiny_cnn", "weights": "none", "workers": 0, "amp": "none", "batch_size": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 40 shapes of 64 px: 120 train, 20 val, 20 test samples, 10 per shard."""
    source = make_shapes(tmp_path_factory.mktemp("src") / "shapes", per_class=40, size=64)
    out = tmp_path_factory.mktemp("shards") / "shapes"
    result = run_cli("pack", source, out, "--split", "val=0.125,test=0.125", "--stratify", "--shard-size", "10",
                     "--workers", "0")
    assert result.exit_code == 0, result.output
    return out


def run(data: Path, out: Path, calls: list | None = None, **options) -> dict:
    config = ProbeConfig(data=str(data), out=str(out), **(TINY | options)).validate()
    return probe(config, progress=lambda *call: None if calls is None else calls.append(call))


def test_pretrained_features_separate_the_shapes_and_the_second_run_is_a_cache_hit(data: Path,
                                                                                      tmp_path: Path) -> None:
    calls: list = []
    lite = {"model": "efficientnet_lite0", "weights": "imagenet", "amp": "auto", "image_size": 64}
    first = run(data, tmp_path / "cache", calls, **lite, save=str(tmp_path / "probe.pt"))
    assert not first["cached"] and first["splits"] == {"train": "train", "val": "val", "test": "test"}
    assert first["val"]["top1"] >= 0.75 and first["test"]["top1"] >= 0.75  # chance is 0.25
    assert [(role, total) for role, _, total in calls if _ == total] == [("train", 120), ("val", 20), ("test", 20)]
    assert first["l2"] in [row["l2"] for row in first["grid"]] and len(first["grid"]) == 7

    calls.clear()
    second = run(data, tmp_path / "cache", calls, **lite)
    assert second["cached"] and not calls  # the backbone did not run
    for role in ("train", "val", "test"):
        assert second[role] == first[role]

    # bf16 autocast: evaluate runs the head in bf16 too, so allow one image of rounding
    evaluated, _ = evaluate_checkpoint(load_predictor(str(tmp_path / "probe.pt"), str(data), "cpu"), "test",
                                       workers=0)
    assert abs(evaluated["top1"] - first["test"]["top1"]) * 20 <= 1


def test_features_are_memory_mapped_files_of_one_row_per_sample(data: Path, tmp_path: Path) -> None:
    result = run(data, tmp_path / "cache")
    manifest = json.loads((data / "dataset.json").read_text())
    for role, split in result["splits"].items():
        features = np.load(tmp_path / "cache" / f"{role}.features.npy", mmap_mode="r")
        labels = np.load(tmp_path / "cache" / f"{role}.labels.npy", mmap_mode="r")
        assert isinstance(features, np.memmap) and features.dtype == np.float32
        assert features.shape == (manifest["splits"][split]["num_samples"], 64) == (len(labels),) + (64,)
        assert np.bincount(labels, minlength=4).tolist() == manifest["splits"][split]["class_counts"]
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary file left behind
    key = json.loads((tmp_path / "cache" / "features.json").read_text())["key"]
    assert key["preprocessing"] == {"resize_shorter": 73, "centre_crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert key["splits"]["train"]["sha256"] == [s["sha256"] for s in manifest["splits"]["train"]["shards"]]


@pytest.mark.parametrize("change", ["image_size", "shard", "seed"])
def test_a_changed_key_recomputes_the_features(change: str, data: Path, tmp_path: Path) -> None:
    if change == "shard":  # the same data re-packed differently: the manifest lists another sha256
        shutil.copytree(data, tmp_path / "data")
        manifest = json.loads((tmp_path / "data" / "dataset.json").read_text())
        manifest["splits"]["val"]["shards"][0]["sha256"] = "0" * 64
        (tmp_path / "data" / "dataset.json").write_text(json.dumps(manifest))
    assert not run(data, tmp_path / "cache")["cached"]
    assert run(data, tmp_path / "cache")["cached"]
    options = {"image_size": {"image_size": 48}, "seed": {"seed": 1}, "shard": {}}[change]
    changed = run(tmp_path / "data" if change == "shard" else data, tmp_path / "cache", **options)
    assert not changed["cached"]
    assert run(tmp_path / "data" if change == "shard" else data, tmp_path / "cache", **options)["cached"]


def test_the_saved_head_evaluates_and_predicts_like_the_probe(data: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()  # --save writes a file into a folder that exists
    result = run(data, tmp_path / "cache", save=str(tmp_path / "ckpt" / "probe.pt"))
    predictor = load_predictor(str(tmp_path / "ckpt" / "probe.pt"), str(data), "cpu")
    for split in ("val", "test"):
        evaluated, _ = evaluate_checkpoint(predictor, split, batch_size=16, workers=0)  # the batches the probe ran
        assert evaluated["top1"] == result[split]["top1"], split  # fp32 throughout: the same predictions
        assert evaluated["loss"] == pytest.approx(result[split]["loss"], rel=1e-4)
    rows = predict_csv(predictor, "test", tmp_path / "preds.csv", group=False, workers=0)
    predicted = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert rows == len(predicted) == 20
    correct = sum(r["prediction"] == r["label"] for r in predicted)
    assert correct == round(result["test"]["top1"] * 20)


def test_without_a_val_split_the_default_l2_is_used(data: Path, tmp_path: Path) -> None:
    result = run(data, tmp_path / "cache", val_split="nope")
    assert set(result["splits"]) == {"train", "test"} and result["grid"] == [] and result["l2"] == 0.1


def test_command_line_json_and_one_line_errors(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--model", "tiny_cnn", "--weights", "none", "--workers", "0", "--out", tmp_path / "cache"]
    result = trainer("probe", data, *args, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout)
    assert printed["cached"] is False and {"top1", "top5", "loss"} <= set(printed["test"])
    text = trainer("probe", data, *args)
    assert text.returncode == 0 and "features: 64-d, cached" in text.stdout and "test (test): top-1" in text.stdout
    from click.testing import CliRunner

    from trainer.cli import main

    monkeypatch.setenv("TRAINER_MALLOC", "system")  # in this process: leave pytest's allocator alone
    for bad, expected in ((["--train-split", "nope"], "no split 'nope'"), (["--model", "nonet"], "unknown model"),
                          (["--amp", "fp8"], "amp must be one of")):  # in-process: the same command, 5 s less each
        failed = CliRunner().invoke(main, ["probe", str(data), *map(str, args), *bad])
        lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert failed.exit_code == 2 and len(lines) == 1 and expected in lines[0], failed.stderr[-2000:]
        assert failed.exception is None or isinstance(failed.exception, SystemExit)  # no traceback


def test_a_split_larger_than_a_chunk_trains_to_the_same_head(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    whole = run(data, tmp_path / "cache")
    monkeypatch.setattr("trainer.linear.CHUNK_ROWS", 50)  # train: 3 chunks read from the memmap per pass
    chunked = run(data, tmp_path / "cache")
    assert chunked["cached"] and chunked["l2"] == whole["l2"]
    for role in ("val", "test"):
        assert chunked[role]["top1"] == whole[role]["top1"]
        assert chunked[role]["loss"] == pytest.approx(whole[role]["loss"], rel=1e-3)


def test_fit_starts_its_head_from_the_probe(data: Path, tmp_path: Path) -> None:
    """LP-FT: with pretrained weights `fit` fits the probe first (OUT/probe) and starts from its head. At an
    LR too small to move anything, one epoch later the model still scores exactly the probe's val top-1."""
    from trainer.config import FitConfig
    from trainer.fit import fit

    common = {"model": "efficientnet_lite0", "weights": "imagenet", "image_size": 64, "epochs": 1, "batch_size": 16,
              "workers": 0, "amp": "none", "lr": 1e-12, "warmup_epochs": 0}
    rows: list[dict] = []
    summary = fit(FitConfig(str(data), str(tmp_path / "lpft"), **common), on_epoch=rows.append)
    alone = run(data, tmp_path / "alone", model="efficientnet_lite0", weights="imagenet", image_size=64)
    assert (tmp_path / "lpft" / "probe" / "probe.pt").is_file()
    assert summary["probe"]["val"] == alone["val"]["top1"] >= 0.75
    assert rows[0]["val_top1"] == pytest.approx(alone["val"]["top1"])
    # the starting point is validated by fit itself, as every epoch is: nothing moved, so the same figure
    assert summary["start"]["val_top1"] == rows[0]["val_top1"]
    assert summary["start"]["val_loss"] == pytest.approx(rows[0]["val_loss"], rel=1e-4)
    # an epoch that does not beat the starting point does not replace it: best.pt is the probe's model
    assert summary["best_epoch"] == 0
    best = torch.load(tmp_path / "lpft" / "best.pt", weights_only=True)["model"]
    probe_model = torch.load(tmp_path / "lpft" / "probe" / "probe.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], probe_model[k]) for k in probe_model)

    random_rows: list[dict] = []
    summary = fit(FitConfig(str(data), str(tmp_path / "random"), **common, head_init="random"),
                  on_epoch=random_rows.append)
    assert "probe" not in summary and not (tmp_path / "random" / "probe").exists()
    assert random_rows[0]["val_top1"] < 0.75  # a random head, not moved: no better than guessing


def test_a_probe_stopped_by_a_corrupt_sample_leaves_no_half_written_feature_files(data: Path, tmp_path: Path) -> None:
    from tests.test_trainer import corrupt_copy
    from trainer.errors import TrainError

    last = sorted(data.glob("train-*.tar"))[-1].name  # the features of the shards before it are written by then
    key = corrupt_copy(data, tmp_path / "bad", last)
    with pytest.raises(TrainError, match=key):
        run(tmp_path / "bad", tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")] == []


def test_an_export_that_fails_midway_leaves_no_tmp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import export as exporting

    result = run_cli("pack", make_shapes(tmp_path / "src", per_class=4, size=32), tmp_path / "shards", "--workers", "0")
    assert result.exit_code == 0, result.output
    ckpt = tmp_path / "probe.pt"
    run(tmp_path / "shards", tmp_path / "cache", save=str(ckpt))
    def unloadable(path: Path) -> None:
        raise RuntimeError("the written model cannot be loaded back")  # as a full disk or a runtime bug would

    monkeypatch.setattr(exporting, "torchscript_runner", unloadable)
    with pytest.raises(RuntimeError, match="cannot be loaded back"):
        exporting.export(str(ckpt), tmp_path / "model.pt", "torchscript")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["probe.pt"]
