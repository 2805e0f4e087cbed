"""The benchmark scripts run end to end at tiny sizes and write the rows they promise (speed is never asserted)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks import common
from shardtool.synth import make_shapes


def run_script(module, monkeypatch: pytest.MonkeyPatch, results: Path, *argv: str) -> None:
    """MODULE.main() with ARGV, writing its JSON and table under RESULTS (not benchmarks/results)."""
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()


def test_pack_benchmark_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import pack

    source = make_shapes(tmp_path / "shapes", per_class=3, size=64)
    # hermetic: never build the alternatives' virtualenv (pip, minutes) from a test; img2dataset becomes a note
    monkeypatch.setattr(pack, "other_venv", lambda: (None, "not made in tests"))
    run_script(pack, monkeypatch, tmp_path / "results", "--source", str(source), "--repeats", "1", "--size", "32")
    written = json.loads((tmp_path / "results" / "pack.json").read_text())
    rows = {r["name"]: r for r in written["results"]}
    names = {"shardtool-pil-resize", "shardtool-pil-passthrough", "shardtool-dali-resize",
             "shardtool-dali-passthrough", "img2dataset", "hand-loop", "hand-loop-pool"}
    left_out = {name for name in names for note in written["notes"] if name.startswith(note.split(":")[0].rstrip("*"))}
    assert set(rows) == names - left_out  # a row not measured (DALI or img2dataset missing) is a note
    assert {"shardtool-pil-resize", "shardtool-pil-passthrough", "hand-loop", "hand-loop-pool"} <= set(rows)
    assert rows["hand-loop-pool"]["out_mb"] == rows["hand-loop"]["out_mb"]  # the same files, in 2 processes
    assert all(r["out_mb"] > 0 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert written["settings"]["images"] == 12
    assert "img2dataset: not measured, not made in tests" in written["notes"]


def test_pack_benchmark_runs_only_the_rows_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import pack

    source = make_shapes(tmp_path / "shapes", per_class=2, size=48)
    monkeypatch.setattr(pack, "other_venv", lambda: (None, "not made in tests"))
    run_script(pack, monkeypatch, tmp_path / "results", "--source", str(source), "--repeats", "1", "--rows",
               "hand-loop,shardtool-pil-resize")
    rows = json.loads((tmp_path / "results" / "pack.json").read_text())["results"]
    assert sorted(r["name"] for r in rows) == ["hand-loop", "shardtool-pil-resize"]
    with pytest.raises(SystemExit, match="^unknown or unavailable rows: img2dataset, nope"):
        run_script(pack, monkeypatch, tmp_path / "results", "--source", str(source), "--rows", "nope,img2dataset")


def test_pack_benchmark_skips_without_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import pack

    run_script(pack, monkeypatch, tmp_path / "results", "--source", str(tmp_path / "absent"))
    assert capsys.readouterr().out.startswith("skipped: ")
    assert not (tmp_path / "results").exists()


def test_memory_benchmark_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import memory

    run_script(memory, monkeypatch, tmp_path / "results", "--sizes", "500,100", "--work", str(tmp_path), "--repeats", "1")
    rows = json.loads((tmp_path / "results" / "memory.json").read_text())["results"]
    assert [r["name"] for r in rows] == ["pack 100", "pack 500", "loader-epoch 100", "loader-epoch 500"]
    by_name = {r["name"]: r for r in rows}
    for kind in ("pack", "loader-epoch"):  # each size against that kind's smallest, whatever order --sizes gave
        small, large = by_name[f"{kind} 100"], by_name[f"{kind} 500"]
        assert large["rss_vs_smallest"] == round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        assert large["growth_mb"] == round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-memory-")]  # dumps and shards removed


def test_accuracy_paired_comparison_counts_disagreements_and_gives_mcnemars_p() -> None:
    from benchmarks.accuracy import mcnemar

    start = {f"k{i}": i < 50 for i in range(100)}  # right on the first 50
    fit = {f"k{i}": 10 <= i < 70 for i in range(100)}  # loses 10 of them, wins 20 others
    won, lost, p = mcnemar(fit, start)
    assert (won, lost) == (20, 10)
    assert p == round(2 * sum(math.comb(30, k) for k in range(11)) / 2**30, 4) == 0.0987  # by hand: 0.09874
    assert mcnemar(start, start) == (0, 0, 1.0)  # no disagreement: no evidence either way
    assert mcnemar({"a": True, "b": True}, {"a": False, "b": False})[2] == 0.5  # 2 of 2 is a coin's 1 in 4, twice


def test_accuracy_over_seeds_gives_each_figure_its_mean_min_and_max() -> None:
    from benchmarks.accuracy import mean_row

    rows = [{"name": "d", "seed": 0, "fit_test": 92.5, "epoch1_images": -1, "test_p": 0.03},
            {"name": "d", "seed": 1, "fit_test": 93.5, "epoch1_images": 2, "test_p": 0.01},
            {"name": "d", "seed": 2, "fit_test": 92.0, "epoch1_images": 2, "test_p": 0.2, "fit_val": None}]
    mean = mean_row(rows)
    assert (mean["name"], mean["seed"]) == ("d", "mean")
    assert (mean["fit_test"], mean["fit_test_min"], mean["fit_test_max"]) == (92.6667, 92.0, 93.5)
    assert (mean["epoch1_images"], mean["epoch1_images_min"], mean["epoch1_images_max"]) == (1.0, -1, 2)
    assert "fit_val" not in mean  # a figure missing from one seed has no mean: not a mean of the others
    assert "test_p" not in mean  # nor has a p-value


def test_accuracy_reads_right_and_wrong_per_image_as_evaluate_scores_them(shapes_model, tmp_path: Path) -> None:
    from benchmarks.accuracy import right_by_key
    from trainer.predict import evaluate_checkpoint, load_predictor

    right = right_by_key(shapes_model.ckpt, shapes_model.data, "val", tmp_path / "val.csv")
    result, _ = evaluate_checkpoint(load_predictor(str(shapes_model.ckpt), str(shapes_model.data), "cpu"), "val")
    assert len(right) == result["num_samples"] == 32
    assert sum(right.values()) == round(result["top1"] * 32)


def test_probe_grid_marks_the_head_val_chose(tmp_path: Path) -> None:
    """Every L2 of the probe's grid gets a row, and the one `trainer probe` keeps is the row with the most
    val images right (so the table shows how far that choice flatters the start's val)."""
    import numpy as np

    from benchmarks.probe_grid import grid_rows
    from trainer.features import SplitFeatures
    from trainer.linear import L2_GRID, choose_head
    from trainer.metrics import EvalMeter

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 0.6
    for role, n in (("train", 90), ("val", 45), ("test", 45)):
        labels = np.arange(n) % 3
        np.save(tmp_path / f"{role}.features.npy", (centres[labels] + rng.normal(size=(n, 16))).astype(np.float32))
        np.save(tmp_path / f"{role}.labels.npy", labels.astype(np.int64))
    rows = grid_rows("blobs", tmp_path, 3)
    features = {role: SplitFeatures(np.load(tmp_path / f"{role}.features.npy"), np.load(tmp_path / f"{role}.labels.npy"))
                for role in ("train", "val")}
    kept = choose_head(features["train"], features["val"], 3, lambda: EvalMeter(3)).l2  # what `trainer probe` keeps
    assert [float(row["l2"]) for row in rows] == list(L2_GRID)
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_right"] == max(row["val_right"] for row in rows)
    assert float(chosen[0]["l2"]) == kept
    assert all(0 < row["val_right"] <= 45 and 0 < row["test_right"] <= 45 for row in rows)
    assert len({row["val_right"] for row in rows}) > 1  # the grid's heads differ: there is something to choose
    cross = [row for row in rows if row["cv_chosen"]]  # the choice cross-validation on train alone would make
    assert len(cross) == 1 and cross[0]["cv_right"] == max(row["cv_right"] for row in rows)
    assert all(0 < row["cv_right"] <= row["train_images"] == 90 for row in rows)
    assert len({row["cv_right"] for row in rows}) > 1
