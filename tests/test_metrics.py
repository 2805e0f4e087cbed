"""trainer.metrics: hand-computed top-1/top-5, confusion and level accuracy; reduce() over 2 gloo ranks;
metrics.csv, TensorBoard events and PNGs after a run and after a resume."""

from __future__ import annotations

import csv
import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from shardtool.classes import Categories, class_entries, hierarchy
from trainer.metrics import EvalMeter, RunLog, level_maps_from_manifest

DESCENDING = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # class 0 first ... class 5 last

# Cdiscount's shape (docs/FORMAT.md): LUMINAIRE sits under two parents, so it has two level-2 indexes.
CDISCOUNT_CLASSES = [
    {"index": 0, "name": "1000001859", "category_id": 1000001859,
     "levels": ["DECO", "LUMINAIRE", "LAMPE A POSER"], "level_indexes": [0, 1]},
    {"index": 1, "name": "1000001861", "category_id": 1000001861,
     "levels": ["DECO", "LUMINAIRE", "APPLIQUE"], "level_indexes": [0, 1]},
    {"index": 2, "name": "1000003564", "category_id": 1000003564,
     "levels": ["DECO", "LINGE", "RIDEAU"], "level_indexes": [0, 0]},
    {"index": 3, "name": "1000010100", "category_id": 1000010100,
     "levels": ["INFORMATIQUE", "LUMINAIRE", "LAMPE USB"], "level_indexes": [1, 2]},
]
CDISCOUNT_HIERARCHY = {"names": ["category_level1", "category_level2", "category_level3"],
                       "levels": [["DECO", "INFORMATIQUE"], ["LINGE", "LUMINAIRE", "LUMINAIRE"]]}


def test_top1_top5_loss_and_unlabelled():
    meter = EvalMeter(6)
    meter.update(torch.tensor([DESCENDING, DESCENDING, [0, 0, 0, 0, 0, 9.0]]), torch.tensor([0, 5, -1]), 1.5)
    meter.update(torch.tensor([DESCENDING, [1, 2, 9, 3, 4, 5.0]]), torch.tensor([4, 2]), 0.5)
    meter.reduce()
    # class 0: top-1 hit; class 5: ranked 6th, missed by top-5; class 4: ranked 5th; class 2: top-1 hit
    # classes 0 and 2 right, 4 and 5 wrong: every sampled class's recall is 1 or 0
    assert meter.result() == {"loss": 0.5, "top1": 0.5, "top5": 0.75, "num_samples": 4, "num_unlabelled": 1,
                              "level_acc": {}, "balanced_acc": 0.5,
                              "class_acc": {"0": 1.0, "1": None, "2": 1.0, "3": None, "4": 0.0, "5": 0.0}}


def test_confusion_rows_true_columns_predicted():
    meter = EvalMeter(3)
    logits = torch.eye(3)[[0, 1, 1, 2, 0]] * 5  # predicts 0, 1, 1, 2, 0
    meter.update(logits, torch.tensor([0, 0, 1, 2, -1]), 0.0)
    assert meter.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert meter.result()["top5"] == 1.0  # k = min(5, C) = 3 covers every class


def test_balanced_accuracy_is_the_mean_recall_of_a_hand_made_confusion():
    """True class 0: 8 of 10 right; class 1: 1 of 2; class 2: 0 of 1; class 3: never in the split. Top-1 is
    9/13; balanced accuracy (0.8 + 0.5 + 0) / 3, the absent class left out."""
    rows = [(0, 0)] * 8 + [(0, 1)] * 2 + [(1, 1), (1, 0), (2, 1)]
    truth, predicted = torch.tensor([t for t, _ in rows]), torch.tensor([p for _, p in rows])
    meter = EvalMeter(4, class_names=["cat", "dog", "owl", "yak"])
    meter.update(torch.eye(4)[predicted], truth, 0.0)
    assert meter.confusion.tolist() == [[8, 2, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    result = meter.result()
    assert result["top1"] == pytest.approx(9 / 13)
    assert result["class_acc"] == {"cat": 0.8, "dog": 0.5, "owl": 0.0, "yak": None}
    assert result["balanced_acc"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)


def test_nothing_labelled_gives_none():
    meter = EvalMeter(4)
    meter.update(torch.zeros(2, 4), torch.tensor([-1, -1]), 0.0)
    assert meter.result() == {"loss": None, "top1": None, "top5": None, "num_samples": 0, "num_unlabelled": 2,
                              "level_acc": {}, "balanced_acc": None,
                              "class_acc": {"0": None, "1": None, "2": None, "3": None}}
    assert meter.confusion.sum() == 0


def test_level_accuracy_credits_the_right_parent():
    # classes 0, 1 under parent 0; classes 2, 3 under parent 1
    meter = EvalMeter(4, [torch.tensor([0, 0, 1, 1])], ["level1"])
    predicted = torch.tensor([1, 2, 0, 1])
    meter.update(torch.eye(4)[predicted], torch.tensor([0, 2, 3, 1]), 0.0)
    result = meter.result()
    assert result["top1"] == 0.5  # 2 -> 2 and 1 -> 1
    assert result["level_acc"] == {"level1": 0.75}  # 0 -> 1 is wrong but under the same parent; 3 -> 0 is not


def test_level_maps_from_manifest():
    names, maps = level_maps_from_manifest(CDISCOUNT_CLASSES, CDISCOUNT_HIERARCHY)
    assert names == ["category_level1", "category_level2"]
    assert [m.tolist() for m in maps] == [[0, 0, 0, 1], [1, 1, 0, 2]]
    assert all(m.dtype == torch.long for m in maps)
    meter = EvalMeter(4, maps, names)
    meter.update(torch.eye(4)[[1, 3, 2]], torch.tensor([0, 0, 2]), 0.0)
    # 0 -> 1: same level 1 and 2; 0 -> 3: another DECO/INFORMATIQUE and another LUMINAIRE; 2 -> 2 right
    assert meter.result()["level_acc"] == {"category_level1": 2 / 3, "category_level2": 2 / 3}


def test_hand_written_manifest_matches_shardtool():
    entries = class_entries({c["name"] for c in CDISCOUNT_CLASSES}, None,
                            Categories(CDISCOUNT_HIERARCHY["names"], {c["name"]: c["levels"] for c in CDISCOUNT_CLASSES}))
    assert hierarchy(entries, Categories(CDISCOUNT_HIERARCHY["names"], {})) == CDISCOUNT_HIERARCHY
    assert entries == CDISCOUNT_CLASSES


def test_classes_without_levels():
    assert level_maps_from_manifest([{"index": 0, "name": "cat"}, {"index": 1, "name": "dog"}], None) == ([], [])
    classes = [{"index": 0, "name": "Appliances"},
               {"index": 1, "name": "Home / Dining", "levels": ["Home", "Dining"], "level_indexes": [0]},
               {"index": 2, "name": "Tools"}]
    names, maps = level_maps_from_manifest(classes, {"names": ["level1", "level2"], "levels": [["Home"]]})
    assert names == ["level1"] and maps[0].tolist() == [-1, 0, -1]
    meter = EvalMeter(3, maps, names)
    meter.update(torch.eye(3)[[2, 0]], torch.tensor([0, 0]), 0.0)
    assert meter.result()["level_acc"] == {"level1": 0.5}  # Appliances -> Tools is not right at any level


def _reduce_worker(rank: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    try:
        meter, idle = EvalMeter(3, [torch.tensor([0, 0, 1])]), EvalMeter(3)
        if rank == 0:  # 2 of 3 right
            meter.update(torch.eye(3)[[0, 1, 2]], torch.tensor([0, 1, 1]), 3.0)
            idle.update(torch.eye(3)[[2]], torch.tensor([2]), 1.0)
        else:  # 0 of 2 right, one unlabelled
            meter.update(torch.eye(3)[[1, 2, 0]], torch.tensor([2, 0, -1]), 2.0)
        meter.reduce()
        idle.reduce()  # rank 1 saw no batch at all
        result = meter.result() | {"confusion": meter.confusion.tolist(), "idle": idle.result()}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_reduce_sums_over_two_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reduce_worker, args=(port, tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    result = results[0]
    assert (result["top1"], result["num_samples"], result["num_unlabelled"], result["loss"]) == (0.4, 5, 1, 1.0)
    # rank 0: 1 -> 2 is wrong at level 1 too (parents 0 and 1); rank 1: 2 -> 1 and 0 -> 2 cross parents
    assert result["level_acc"] == {"level1": 0.4}
    assert result["confusion"] == [[1, 0, 1], [0, 1, 1], [0, 1, 0]]
    assert result["class_acc"] == {"0": 0.5, "1": 0.5, "2": 0.0}  # from the summed confusion
    assert result["balanced_acc"] == pytest.approx(1 / 3)
    assert (result["idle"]["top1"], result["idle"]["num_samples"]) == (1.0, 1)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _row(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "train_loss": loss, "train_top1": 0.5, "val_loss": loss + 0.1, "val_top1": 0.4,
            "val_top5": 0.9, "lr": 0.01, "img_s": 120.0, "data_wait": 0.2, "seconds": 3.5}


def _scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb))
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def _assert_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_run_log_and_resume(tmp_path):
    with RunLog(tmp_path) as log:
        log.log_epoch(_row(1, 2.0))
        log.log_epoch(_row(2, 1.5))
        log.log_epoch(_row(3, 1.0) | {"val_level1": 0.7})  # a new column: the header is rewritten
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0])[:2] == ["epoch", "train_loss"] and list(rows[0])[-1] == "val_level1"
    assert [r["val_level1"] for r in rows] == ["", "", "0.7"]
    assert list(tmp_path.glob("tb/events.out.tfevents.*"))
    assert _scalars(tmp_path / "tb", "loss/train") == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert _scalars(tmp_path / "tb", "level1/val") == [(3, 0.7)]
    _assert_png(tmp_path / "curves.png")

    with RunLog(tmp_path, resume_epoch=2) as log:  # the old epoch 3 came after the last checkpoint
        log.log_epoch(_row(3, 0.8))
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [(r["epoch"], r["train_loss"]) for r in rows] == [("1", "2.0"), ("2", "1.5"), ("3", "0.8")]
    assert _scalars(tmp_path / "tb", "loss/train") == [(1, 2.0), (2, 1.5), (3, 0.8)]
    assert _scalars(tmp_path / "tb", "speed/img_s")[-1] == (3, 120.0)


def test_confusion_png_10_named_classes(tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    matrix = torch.eye(10, dtype=torch.long) * 90 + 1
    RunLog.write_confusion(matrix, names, tmp_path / "confusion.png")
    width, height = _assert_png(tmp_path / "confusion.png")
    assert width >= 600 and height >= 600


def test_confusion_png_many_classes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randint(0, 20, (300, 300), generator=generator)
    RunLog.write_confusion(matrix, [f"class {i}" for i in range(300)], tmp_path / "confusion.png")
    width, _ = _assert_png(tmp_path / "confusion.png")
    assert width < 3000  # 50 rows drawn, not 300
    with pytest.raises(ValueError, match="299 class names for a 300x300"):
        RunLog.write_confusion(matrix, ["x"] * 299, tmp_path / "bad.png")


def test_write_summary_is_json_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "summary.json"
    RunLog.write_summary({"best_val_top1": 0.5, "confusion_total": torch.tensor(7), "out": tmp_path}, path)
    assert json.loads(path.read_text()) == {"best_val_top1": 0.5, "confusion_total": 7, "out": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
