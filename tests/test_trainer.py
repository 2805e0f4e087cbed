"""trainer fit / evaluate / predict end to end on a generated dataset, as a user runs them (subprocesses).

The spine: an interrupted run (SIGKILL mid-epoch) resumed with --resume trains on exactly the same
samples in the same order and ends with the same weights as a run that was never stopped; under
torchrun with 2 processes every training sample is seen exactly once per epoch.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from shardtool.synth import make_shapes
from tests.conftest import once_per_run, run_cli
from tests.zygote import run_trainer
from tests.faultserver import FaultServer
from tests.readback import record_figure
from trainer.keylog import read_keys
from trainer.models import create_model

TINY = ["--model", "tiny_cnn", "--weights", "none", "--batch-size", "4", "--workers", "2", "--amp", "none",
        "--freeze-epochs", "0", "--lr", "0.01", "--log-keys"]


def trainer(*args: str | Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = run_trainer(*args, **kw)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 40 shapes: 120 train samples (30 batches of 4), a val and a test split, 10 per shard."""
    def make(folder: Path) -> Path:
        source = make_shapes(folder / "src" / "shapes", per_class=40, size=64)
        out = folder / "shards" / "shapes"
        result = run_cli("pack", source, out, "--split", "val=0.125,test=0.125", "--stratify", "--shard-size", "10",
                         "--workers", "0")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "dataset.json").read_text())["splits"]["train"]["num_samples"] == 120
        return out

    return once_per_run(tmp_path_factory, "trainer-data", make)


def train_keys(data: Path) -> set[str]:
    manifest = json.loads((data / "dataset.json").read_text())
    keys = set()
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(data / shard["name"]) as tar:
            keys |= {m.name.split(".")[0] for m in tar}
    return keys


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.fixture
def served(data: Path):
    """DATA over HTTP from a server on 127.0.0.1 that breaks some requests (tests/faultserver.py): every 4th
    shard request is dropped half way, every 5th answered 503."""
    with FaultServer(data) as server:
        server.inject("drop", times=None, every=4)
        server.inject("503", times=None, every=5)
        yield server


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(data: Path, served: FaultServer,
                                                                    tmp_path: Path) -> None:
    """The uninterrupted run reads local files; the killed and resumed one reads them over a failing HTTP
    server: the same samples, order, weights and metrics."""
    args = [data, "--epochs", "3", "--checkpoint-every", "1", "--ema-epochs", "0.5", *TINY]
    trainer("fit", args[0], tmp_path / "whole", *args[1:])

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", served.url, str(killed), *map(str, args[1:])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = killed / "keys" / "rank-0.tsv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 45:  # epoch 2, batch 15 of 30
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(killed / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 1 and 0 < state["batch"] < 30, state  # the kill landed inside epoch 2

    trainer("fit", served.url, killed, "--resume")

    whole, resumed = read_keys(tmp_path / "whole" / "keys" / "rank-0.tsv"), read_keys(log)
    assert resumed == whole  # same samples, same order, nothing repeated or skipped
    for epoch in resumed.values():
        assert len(epoch) == len(set(epoch)) == 120 and set(epoch) == train_keys(data)
    assert resumed[0] != resumed[1]  # and epochs are shuffled differently
    a, b = weights(tmp_path / "whole"), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(run / "last.pt", weights_only=True)["ema"] for run in (tmp_path / "whole", killed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the moving average resumed exactly too
    rows = list(csv.DictReader(open(killed / "metrics.csv")))
    whole_rows = list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # the killed epoch's row is written once
    for column in ("train_loss", "train_top1", "val_loss", "val_top1"):
        assert [r[column] for r in rows] == [r[column] for r in whole_rows], column
    faults = sum(1 for _, _, fault in served.log.requests if fault)
    assert faults > 20 and sum(int(r["retries"]) for r in rows) > 0  # the network failed, and it shows
    assert all(int(r["retries"]) == 0 for r in whole_rows)


def test_with_an_ema_best_pt_holds_the_average_that_was_validated(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer("fit", data, run, "--epochs", "1", "--ema-epochs", "0.25", *TINY)
    last, best = (torch.load(run / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert "ema" in last and "ema" not in best
    average = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert set(average) == set(best["model"]) and all(torch.equal(average[k], best["model"][k]) for k in average)
    assert not all(torch.equal(last["model"][k], best["model"][k]) for k in best["model"])  # not the raw weights
    evaluated = json.loads(trainer("evaluate", run / "best.pt", data, "--split", "val", "--json").stdout)
    logged = list(csv.DictReader(open(run / "metrics.csv")))[-1]
    assert evaluated["top1"] == pytest.approx(float(logged["val_top1"]))


def test_save_epochs_keeps_each_epochs_validated_weights(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer("fit", data, run, "--epochs", "2", "--ema-epochs", "0.25", "--save-epochs", *TINY)
    logged = list(csv.DictReader(open(run / "metrics.csv")))
    saved = [torch.load(run / f"epoch-{n}.pt", weights_only=True)["model"] for n in (1, 2)]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    for n, row in zip((1, 2), logged):
        evaluated = json.loads(trainer("evaluate", run / f"epoch-{n}.pt", data, "--split", "val", "--json").stdout)
        assert evaluated["top1"] == pytest.approx(float(row["val_top1"]))
        assert evaluated["loss"] == pytest.approx(float(row["val_loss"]), rel=1e-4)


def test_a_resume_that_would_resolve_auto_settings_differently_is_refused(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer("fit", data, run, "--epochs", "1", *TINY)
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["state"]["resolved"] == {"loader": "torch", "device": "cpu", "amp": "none", "world": 1,
                                               "batch_size": 4}
    checkpoint["state"]["resolved"] |= {"loader": "dali", "amp": "bfloat16", "batch_size": 256}  # as on a GPU box
    torch.save(checkpoint, run / "last.pt")
    refused = trainer("fit", data, run, "--resume", "--epochs", "2", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "loader dali -> torch, amp bfloat16 -> none, batch_size 256 -> 4" in refused.stderr


def test_more_epochs_on_resume_train_on_at_the_floor_lr_without_a_jump(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer("fit", data, run, "--epochs", "2", "--warmup-epochs", "0", *TINY)
    trainer("fit", data, run, "--resume", "--epochs", "3")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    lrs = [float(r["lr"]) for r in rows]
    assert len(lrs) == 3 and lrs[0] > lrs[1] > 0.01 * 0.01  # the schedule laid out for 2 epochs...
    assert lrs[2] == pytest.approx(0.01 * 0.01)  # ...ends at its floor (--min-lr 0.01 x --lr 0.01) and stays there
    assert torch.load(run / "last.pt", weights_only=True)["state"]["schedule_epochs"] == 2


def test_norm_dataset_refuses_statistics_that_miss_copied_images(tmp_path: Path) -> None:
    source = make_shapes(tmp_path / "src", per_class=6, size=64)
    for jpeg in sorted(source.glob("*/*.jpg"))[::6]:  # one PNG per class: decoded; the JPEGs are copied
        from PIL import Image

        Image.open(jpeg).save(jpeg.with_suffix(".png"))
        jpeg.unlink()
    out = tmp_path / "shards"
    assert run_cli("pack", source, out, "--verify", "header", "--workers", "0").exit_code == 0
    norm = json.loads((out / "dataset.json").read_text())["normalization"]
    assert (norm["images"], norm["of"]) == (4, 24)
    refused = trainer("fit", out, tmp_path / "run", "--norm", "dataset", *TINY, check=False)
    assert refused.returncode == 2 and "cover 4 of 24 images" in refused.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_see_each_training_sample_once_per_epoch(data: Path, served: FaultServer,
                                                                  tmp_path: Path) -> None:
    """Over the failing HTTP server."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "trainer", "fit", served.url, str(out), "--epochs", "2", *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read_keys(out / "keys" / f"rank-{r}.tsv") for r in (0, 1)]
    for epoch in (0, 1):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(b) == 60
        assert not set(a) & set(b) and set(a) | set(b) == train_keys(data)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["num_samples"] == 20  # eval reduced over both ranks: every test sample once
    assert sum(1 for _, _, fault in served.log.requests if fault) > 10


def test_a_server_that_stalls_stops_the_run_with_one_line(data: Path, tmp_path: Path) -> None:
    with FaultServer(data) as server:
        server.inject("stall", times=None, match="train-000002.tar")
        start = time.perf_counter()
        result = trainer("fit", server.url, tmp_path / "run", "--epochs", "1", "--timeout", "1", "--retries", "1",
                         *TINY, check=False)
        took = time.perf_counter() - start
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot read {server.url}train-000002.tar bytes " in line and "gave up after 2 tries" in line
    record_figure("remote reads against a failing server (tests/test_remote.py)",
                  f"trainer fit, a stalled shard, --timeout 1 --retries 1: exit 2 after {took:.1f} s (the whole "
                  f"command, forked from tests/zygote.py with its imports done): {line}")


def test_a_process_that_would_get_no_training_samples_is_refused(data: Path, tmp_path: Path) -> None:
    from trainer.config import FitConfig
    from trainer.distributed import Dist
    from trainer.errors import ConfigError
    from trainer.run import build_run

    config = FitConfig(str(data), str(tmp_path / "run"), model="tiny_cnn", weights="none", amp="none", workers=0)
    with pytest.raises(ConfigError, match="process 1 of 121 gets no training samples: train has 120"):
        build_run(config, Dist(rank=1, world=121), None)


def test_fit_evaluate_predict_outputs(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = trainer("fit", data, run, "--epochs", "2", *TINY)
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "confusion.png", "summary.json", "config.yaml"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert "test top-1" in result.stdout

    evaluated = json.loads(trainer("evaluate", run / "best.pt", data, "--split", "test", "--json").stdout)
    assert evaluated["num_samples"] == 20 and {"top1", "top5", "loss"} <= set(evaluated)
    summary = json.loads((run / "summary.json").read_text())
    assert evaluated["top1"] == pytest.approx(summary["test"]["top1"])

    preds = tmp_path / "preds.csv"
    trainer("predict", run / "best.pt", data, "--split", "val", "--out", preds)
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == 20 and {r["prediction"] for r in rows} <= {"circle", "cross", "square", "triangle"}
    assert all(r["label"] in {"circle", "cross", "square", "triangle"} for r in rows)


def test_config_file_and_flags(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny_cnn\nweights: none\nepochs: 3\nbatch-size: 8\namp: none\nworkers: 0\n")
    trainer("fit", data, tmp_path / "run", "--config", config, "--epochs", "1")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "epochs: 1\n" in saved and "batch_size: 8\n" in saved and "model: tiny_cnn\n" in saved
    assert "optimizer: adamw\n" in saved and "weight_decay: 0.05\n" in saved


def test_sgd_gets_an_sgd_weight_decay_unless_one_is_given(data: Path, tmp_path: Path) -> None:
    from trainer.config import FitConfig, build_config

    trainer("fit", data, tmp_path / "run", "--optimizer", "sgd", "--lr", "0.01", "--epochs", "1", *TINY)
    assert "weight_decay: 0.0001\n" in (tmp_path / "run" / "config.yaml").read_text()  # not AdamW's 0.05
    config = tmp_path / "c.yaml"
    config.write_text("optimizer: sgd\nweight_decay: 0.001\n")
    assert build_config({"data": "d", "out": "o"}, str(config)).weight_decay == 0.001
    assert build_config({"data": "d", "out": "o", "weight_decay": 0.0}, str(config)).weight_decay == 0.0
    assert build_config({"data": "d", "out": "o", "optimizer": "sgd"}, None).weight_decay == 1e-4
    assert FitConfig("d", "o", optimizer="sgd").weight_decay == 1e-4  # the Python API too
    assert FitConfig("d", "o").weight_decay == 0.05


def test_freeze_bn_keeps_the_pretrained_batchnorm_statistics(data: Path, tmp_path: Path) -> None:
    pretrained = create_model("tiny_cnn", 4, "none").module.state_dict()
    stats = [k for k in pretrained if k.endswith(("running_mean", "running_var"))]
    for k in stats:
        pretrained[k] = torch.rand_like(pretrained[k]) + 0.5
    torch.save(pretrained, tmp_path / "pretrained.pt")
    args = ["--epochs", "1", *TINY, "--weights", tmp_path / "pretrained.pt"]
    trainer("fit", data, tmp_path / "kept", *args)  # --freeze-bn is the default with pretrained weights
    trainer("fit", data, tmp_path / "updated", *args, "--no-freeze-bn")
    kept, updated = weights(tmp_path / "kept"), weights(tmp_path / "updated")
    assert len(stats) == 6  # tiny_cnn's three BatchNorms
    assert all(torch.equal(kept[k], pretrained[k]) for k in stats)
    assert not any(torch.equal(updated[k], pretrained[k]) for k in stats)
    assert not torch.equal(kept["0.weight"], pretrained["0.weight"])  # while the convolutions learn


def test_the_backbone_warms_up_again_after_unfreezing(data: Path, tmp_path: Path) -> None:
    """Its optimizer state starts empty at the unfreeze: its LR ramps from 0 (metrics.csv's backbone_lr,
    read at each epoch's last step) over --unfreeze-warmup-epochs, while the head's follows the schedule."""
    trainer("fit", data, tmp_path / "run", "--epochs", "3", *TINY, "--freeze-epochs", "1",
            "--unfreeze-warmup-epochs", "2", "--backbone-lr-mult", "0.1", "--warmup-epochs", "0")
    with open(tmp_path / "run" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    head = [float(row["lr"]) for row in rows]
    backbone = [float(row["backbone_lr"]) for row in rows]
    assert backbone[0] == 0.0  # frozen
    assert backbone[1] == pytest.approx(head[1] * 0.1 * 0.5)  # half-way up its 2-epoch ramp
    assert backbone[2] == pytest.approx(head[2] * 0.1)  # ramp done


def test_the_backbone_warms_up_over_at_least_100_steps_by_default(data: Path, tmp_path: Path) -> None:
    """Without frozen epochs the backbone trains from the first step, on its own ramp: by default one epoch
    and at least 100 steps, so a small dataset (here 30 steps an epoch) does not hit its full LR within one."""
    trainer("fit", data, tmp_path / "run", "--epochs", "2", *TINY, "--backbone-lr-mult", "0.1",
            "--warmup-epochs", "0")
    with open(tmp_path / "run" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    head = [float(row["lr"]) for row in rows]
    backbone = [float(row["backbone_lr"]) for row in rows]
    assert backbone[0] == pytest.approx(head[0] * 0.1 * 30 / 100)  # read at step 30 of its 100-step ramp
    assert backbone[1] == pytest.approx(head[1] * 0.1 * 60 / 100)


@pytest.fixture(scope="session")
def one_epoch_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run of the tiny model (left as it is by the tests that use it)."""
    def make(folder: Path) -> Path:
        trainer("fit", data, folder / "run", "--epochs", "1", *TINY)
        return folder / "run"

    return once_per_run(tmp_path_factory, "trainer-one-epoch", make)


@pytest.mark.parametrize("case", ["not_output", "missing_split", "other_dataset", "bad_option", "run_exists"])
def test_bad_input_gets_one_line(case: str, data: Path, one_epoch_run: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each mistake is one `error:` line and exit 2 (in-process: the same command, without a torch import each;
    the other tests run the CLI as a subprocess)."""
    from click.testing import CliRunner

    from trainer.cli import main

    args: list[str | Path]
    if case == "not_output":
        args = ["fit", tmp_path, tmp_path / "run", *TINY]
    elif case == "missing_split":
        args = ["fit", data, tmp_path / "run", "--train-split", "nope", *TINY]
    elif case == "bad_option":
        args = ["fit", data, tmp_path / "run", "--optimizer", "lion", *TINY]
    elif case == "run_exists":
        args = ["fit", data, one_epoch_run, "--epochs", "1", *TINY]
    else:
        other = tmp_path / "three"
        shutil.copytree(data, other)
        manifest = json.loads((other / "dataset.json").read_text())
        manifest["classes"][0]["name"] = "hexagon"
        (other / "dataset.json").write_text(json.dumps(manifest))
        args = ["evaluate", one_epoch_run / "best.pt", other]
    monkeypatch.setenv("TRAINER_MALLOC", "system")  # leave pytest's own allocator settings alone
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    expected = {"not_output": "not a shardtool output", "missing_split": "no split 'nope'",
                "bad_option": "optimizer must be one of", "run_exists": "already holds a run",
                "other_dataset": "other classes"}[case]
    assert expected in lines[0]


def corrupt_copy(data: Path, dest: Path, name: str = "train-000000.tar") -> str:
    """DATA with one JPEG of shard NAME replaced by garbage (same member size, so offsets stay valid); its key."""
    shutil.copytree(data, dest)
    shard = dest / name
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    shard.chmod(0o644)
    shard.write_bytes(bytes(raw))
    return member.name.split(".")[0]


def test_corrupt_sample_fails_with_shard_and_key_or_is_skipped_and_counted(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    key = corrupt_copy(data, bad)
    failed = trainer("fit", bad, tmp_path / "fail", "--epochs", "1", *TINY, check=False)
    assert failed.returncode == 2 and "train-000000.tar" in failed.stderr and key in failed.stderr
    trainer("fit", bad, tmp_path / "skip", "--epochs", "1", "--on-corrupt", "skip", *TINY)
    rows = list(csv.DictReader(open(tmp_path / "skip" / "metrics.csv")))
    assert int(rows[0]["skipped"]) == 1
    seen = read_keys(tmp_path / "skip" / "keys" / "rank-0.tsv")[0]
    assert len(seen) == 119 and key not in seen


def test_cdiscount_example_reports_level_accuracy_and_predicts_one_row_per_product(real_data: Path,
                                                                                   tmp_path: Path) -> None:
    """The real dump: per-level accuracy in metrics.csv, and a `_id,category_id` file for labelled and
    unlabelled dumps with one row per product of the split."""
    bson = pytest.importorskip("bson")
    dump, names = real_data / "cdiscount" / "train_example.bson", real_data / "cdiscount" / "category_names.csv"
    if not dump.is_file():
        pytest.skip("cdiscount/train_example.bson not in the real data")
    shards = tmp_path / "shards"
    assert run_cli("pack", dump, shards, "--categories", names, "--split", "val=0.2").exit_code == 0
    run = tmp_path / "run"
    result = trainer("fit", shards, run, "--epochs", "1", "--image-size", "64", *TINY)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert {"val_category_level1", "val_category_level2"} <= set(rows[0])
    level1, level2, top1 = (float(rows[0][c]) for c in ("val_category_level1", "val_category_level2", "val_top1"))
    assert level1 >= level2 >= top1  # a right class is right at every level above it
    assert "category_level1" in result.stdout  # the final evaluation prints them too

    manifest = json.loads((shards / "dataset.json").read_text())
    val_products = set()
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            val_products |= {json.loads(tar.extractfile(m).read())["group"] for m in tar if m.name.endswith(".json")}
    category_ids = {str(c["category_id"]) for c in manifest["classes"]}
    preds = tmp_path / "val.csv"
    trainer("predict", run / "best.pt", shards, "--split", "val", "--group", "--out", preds)
    rows = list(csv.DictReader(open(preds)))
    assert list(rows[0]) == ["_id", "category_id"]
    assert sorted(r["_id"] for r in rows) == sorted(val_products)  # every product once
    assert {r["category_id"] for r in rows} <= category_ids

    with open(dump, "rb") as f:  # test.bson's shape: the same products without category_id
        docs = [{k: v for k, v in doc.items() if k != "category_id"} for doc in bson.decode_file_iter(f)]
    unlabelled = tmp_path / "test.bson"
    unlabelled.write_bytes(b"".join(bson.encode(doc) for doc in docs))
    test_shards = tmp_path / "test_shards"
    assert run_cli("pack", unlabelled, test_shards).exit_code == 0
    split = next(iter(json.loads((test_shards / "dataset.json").read_text())["splits"]))
    preds = tmp_path / "test.csv"
    trainer("predict", run / "best.pt", test_shards, "--split", split, "--group", "--out", preds)
    rows = list(csv.DictReader(open(preds)))
    assert sorted(r["_id"] for r in rows) == sorted(str(doc["_id"]) for doc in docs)
    assert {r["category_id"] for r in rows} <= category_ids


def test_ddp_with_a_batch_of_only_corrupt_samples_skips_the_step_on_every_rank(data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    key = corrupt_copy(data, bad)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "trainer", "fit", str(bad), str(out), "--epochs", "1", *TINY,
           "--batch-size", "1", "--on-corrupt", "skip"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a rank stepping alone would hang
    assert result.returncode == 0, result.stderr[-3000:]
    seen = read_keys(out / "keys" / "rank-0.tsv")[0] + read_keys(out / "keys" / "rank-1.tsv")[0]
    assert len(seen) == 118 and key not in seen  # the corrupt sample and the one beside it on the other rank
    assert int(next(csv.DictReader(open(out / "metrics.csv")))["skipped"]) == 2


def test_a_diverging_run_stops_with_one_line_and_never_saves_non_finite_weights(data: Path, tmp_path: Path) -> None:
    """--lr 1e30 (finite, so no option check stops it) sends the weights to ~1e30 and the loss to nan."""
    run = tmp_path / "run"
    done = trainer("fit", data, run, "--epochs", "1", "--checkpoint-every", "1", *TINY, "--lr", "1e30", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: the training loss is nan at batch 2 of the epoch: training stopped and saved nothing of it "
        "(best.pt and last.pt keep the last finite weights); lower --lr"]
    assert not (run / "best.pt").exists() and not (run / "summary.json").exists()
    assert all(torch.isfinite(tensor).all() for tensor in weights(run).values() if tensor.is_floating_point())


def test_a_run_that_turns_nan_on_resume_leaves_best_pt_as_it_was(data: Path, one_epoch_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    best = (run / "best.pt").read_bytes()
    state = torch.load(run / "last.pt", weights_only=True)
    state["model"] = {name: tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
                      for name, tensor in state["model"].items()}
    torch.save(state, run / "last.pt")  # as a diverged step would leave the weights

    done = trainer("fit", data, run, "--resume", "--epochs", "2", check=False)

    assert done.returncode == 2 and "the training loss is nan at batch 1" in done.stderr, done.stderr[-2000:]
    assert (run / "best.pt").read_bytes() == best
