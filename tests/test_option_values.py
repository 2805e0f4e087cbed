"""Issue 36: no value of any option prints a traceback or is taken when it makes no sense.

The walk feeds every numeric option of every command of both CLIs wrong-type and out-of-range values, with
inputs that do not exist, so a command that takes the value fails at once on its input, never trains or packs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from shardtool.cli import main as shardtool_main
from shardtool.options import Bounded
from tests.test_bad_input import assert_config_error, jpeg_bytes
from trainer.cli import main as trainer_main

CLIS = {"shardtool": shardtool_main, "trainer": trainer_main}
ALWAYS_WRONG = ("abc", "-5", "nan", "inf", "-inf", "1.5e", "")  # no numeric option takes these
MAYBE = ("0", "1e12", "1000000000000", "0.5")  # in range for some options: refused naming it, or taken
NUMERIC_STRINGS = {("shardtool", "pack", "workers")}  # a str option for 'auto' that holds a number


def missing_inputs(tool: str, command: str, where: Path) -> list[str]:
    """The command's arguments, each a path that does not exist (OUT: a new one in an existing folder)."""
    nowhere, out = str(where / "nowhere"), str(where / "new")
    args = {("shardtool", "pack"): [nowhere, out], ("shardtool", "show"): [nowhere],
            ("trainer", "fit"): [nowhere, out], ("trainer", "evaluate"): [nowhere, nowhere],
            ("trainer", "predict"): [nowhere + ".pt", nowhere], ("trainer", "export"): [nowhere, out + ".onnx"],
            ("trainer", "serve"): [nowhere + ".pt"], ("trainer", "probe"): [nowhere]}
    return args.get((tool, command), [nowhere])


def numeric_options() -> list[tuple[str, str, click.Option]]:
    found = []
    for tool, group in CLIS.items():
        for name, command in group.commands.items():
            for param in command.params:
                numeric = isinstance(param.type, (Bounded, click.types.IntParamType, click.types.FloatParamType))
                if isinstance(param, click.Option) and not param.is_flag and (
                        numeric or (tool, name, param.name) in NUMERIC_STRINGS):
                    found.append((tool, name, param))
    return found


OPTIONS = numeric_options()


@pytest.fixture(autouse=True)
def _plain_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_MALLOC", "system")  # trainer's group callback would tune this test process's malloc


def invoke(tool: str, *args: str | Path) -> Result:
    return CliRunner().invoke(CLIS[tool], [str(a) for a in args], catch_exceptions=True)


def assert_refused_naming(result: Result, param: click.Option) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    last = result.output.strip().splitlines()[-1]
    assert len(result.output.strip().splitlines()) <= 5, result.output
    assert any(opt in last for opt in param.opts), result.output  # the error line names the option


def assert_short_error(result: Result) -> None:
    assert result.exit_code != 0 or result.exception is None, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception), repr(result.exception)  # SystemExit only
    assert len(result.output.strip().splitlines()) <= 5, result.output


def test_the_walk_finds_every_numeric_option():
    names = {(tool, command, param.name) for tool, command, param in OPTIONS}
    assert len(names) > 50
    for expected in [("shardtool", "pack", "quality"), ("trainer", "fit", "lr"), ("trainer", "serve", "port"),
                     ("trainer", "predict", "k"), ("trainer", "probe", "image_size"), ("trainer", "fit", "patience"),
                     ("trainer", "evaluate", "cache_size"), ("trainer", "serve", "max_upload_mb")]:
        assert expected in names


@pytest.mark.parametrize("tool, command, param", OPTIONS,
                         ids=[f"{t}-{c}-{p.name}" for t, c, p in OPTIONS])
def test_every_numeric_option_refuses_nonsense_in_one_line(tool, command, param, tmp_path):
    base = [command, *missing_inputs(tool, command, tmp_path)]
    flag = param.opts[-1]
    for value in ALWAYS_WRONG:
        assert_refused_naming(invoke(tool, *base, flag, value), param)
    for value in MAYBE:
        result = invoke(tool, *base, flag, value)
        assert_short_error(result)
        if result.exit_code == 2 and "Invalid value" in result.output:
            assert_refused_naming(result, param)
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.onnx").exists()  # nothing written


DEVICE_OPTIONS = [(t, c, p) for t, g in CLIS.items() for c, cmd in g.commands.items() for p in cmd.params
                  if p.name == "device"]


@pytest.mark.parametrize("tool, command, param", DEVICE_OPTIONS, ids=[c for _, c, _ in DEVICE_OPTIONS])
@pytest.mark.parametrize("value", ["bogus", "cuda:x", "1", "cpu:0:1"])
def test_every_device_option_refuses_a_name_that_is_no_device(tool, command, param, value, tmp_path):
    assert_refused_naming(invoke(tool, command, *missing_inputs(tool, command, tmp_path), "--device", value), param)


# --- outputs are checked before any work --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 JPEGs in 2 classes, packed (train and val)."""
    root = tmp_path_factory.mktemp("tiny")
    for label in ("a", "b"):
        (root / "src" / label).mkdir(parents=True)
        for i in range(4):
            (root / "src" / label / f"{i}.jpg").write_bytes(jpeg_bytes(i + 10 * (label == "b")))
    packed = invoke("shardtool", "pack", root / "src", root / "data", "--split", "val=0.25", "--workers", "0")
    assert packed.exit_code == 0, packed.output
    return root / "data"


TINY = ["--model", "tiny_cnn", "--weights", "none", "--workers", "0", "--amp", "none"]


@pytest.mark.parametrize("where, fragment", [("folder", "is a folder: give a file name"),
                                             ("missing", "does not exist")])
def test_probe_save_that_cannot_be_written_is_refused_before_features_are_extracted(tiny, tmp_path, where,
                                                                                   fragment):
    save = tmp_path if where == "folder" else tmp_path / "no" / "probe.pt"
    result = invoke("trainer", "probe", tiny, *TINY, "--out", tmp_path / "cache", "--save", save)
    assert_refused_naming(result, next(p for p in trainer_main.commands["probe"].params if p.name == "save"))
    assert fragment in result.output
    assert not (tmp_path / "cache").exists()  # no feature was extracted


def test_fit_out_that_is_a_file_is_refused_before_training(tiny, tmp_path):
    out = tmp_path / "run"
    out.write_text("mine")
    result = invoke("trainer", "fit", tiny, out, *TINY, "--epochs", "1")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is a file, not a folder" in result.output
    assert out.read_text() == "mine"


@pytest.mark.parametrize("tool, args, fragment", [
    ("trainer", ["predict", "CKPT", "DATA", "--out", "FOLDER"], "is a folder"),
    ("trainer", ["predict", "CKPT", "DATA", "--out", "MISSING/preds.csv"], "does not exist"),
    ("trainer", ["export", "CKPT", "MISSING/m.onnx"], "does not exist"),
    ("trainer", ["export", "CKPT", "FOLDER"], "is a folder"),
    ("shardtool", ["show", "DATA", "--out", "FOLDER"], "is a folder"),
    ("shardtool", ["show", "DATA", "--out", "MISSING/grid.png"], "does not exist"),
])
def test_outputs_that_cannot_be_written_are_refused_as_parsed(tiny, tmp_path, tool, args, fragment):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"not read: the output is refused first")
    names = {"CKPT": str(ckpt), "DATA": str(tiny), "FOLDER": str(tmp_path), "MISSING": str(tmp_path / "missing")}
    for placeholder, path in names.items():
        args = [a.replace(placeholder, path) for a in args]
    result = invoke(tool, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Invalid value for" in result.output and fragment in result.output, result.output


# --- export never overwrites its input ------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotted", "link"])
def test_export_to_its_own_checkpoint_is_refused_and_the_checkpoint_is_unchanged(tmp_path, monkeypatch, spelling):
    ckpt = tmp_path / "c.pt"
    content = b"the only copy of a week of training"
    ckpt.write_bytes(content)
    out = {"same": ckpt, "dotted": tmp_path / "." / "sub" / ".." / "c.pt", "link": tmp_path / "alias.pt"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "link":
        out.symlink_to(ckpt)
    result = invoke("trainer", "export", ckpt, out, "--format", "torchscript")
    assert_config_error(result, "is the checkpoint CKPT itself")
    assert ckpt.read_bytes() == content


# --- values that ran and did nothing sensible ------------------------------------------------------------------


def test_patience_minus_one_is_refused_and_nothing_is_written(tiny, tmp_path):
    out = tmp_path / "run"
    result = invoke("trainer", "fit", tiny, out, *TINY, "--patience", "-1")
    assert_refused_naming(result, next(p for p in trainer_main.commands["fit"].params if p.name == "patience"))
    assert not out.exists()


@pytest.mark.parametrize("line, fragment", [("patience: -1", "--patience -1"), ("lr: .nan", "--lr nan"),
                                            ("label_smoothing: 2", "--label-smoothing 2"),
                                            ("device: bogus", "--device 'bogus'"), ("workers: -3", "--workers -3"),
                                            ("image_size: 1", "--image-size 1")])
def test_a_config_file_is_held_to_the_same_ranges(tiny, tmp_path, line, fragment):
    config = tmp_path / "c.yaml"
    config.write_text(line + "\n")
    result = invoke("trainer", "fit", tiny, tmp_path / "run", "--config", config)
    assert_config_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_weights_that_are_a_text_file_are_one_line_without_its_contents(tmp_path):
    from trainer.errors import ConfigError
    from trainer.models import create_model

    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:secret-line:/root:/bin/bash\n")
    with pytest.raises(ConfigError) as raised:
        create_model("tiny_cnn", 2, str(text))
    assert "\n" not in str(raised.value) and "secret-line" not in str(raised.value)
    assert "is not a state dict of tensors" in str(raised.value)


# --- an ONNX export's sidecar -------------------------------------------------------------------------------------


SIDECAR = {"format": "trainer-export/1", "model": "m", "classes": ["a"], "class_entries": [], "checkpoint_sha256": "",
           "preprocessing": {"image_size": 64, "resize_shorter": 73, "mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.mark.parametrize("sidecar, fragment", [
    (b"\x89\xff\x00random bytes\xfe", "not JSON"),
    (b"[1, 2]", "is not a trainer export sidecar"),
    (json.dumps({"format": "trainer-export/1", "model": "m", "class_entries": [], "checkpoint_sha256": "",
                 "preprocessing": {"image_size": 64, "resize_shorter": 73, "mean": [0.5] * 3, "std": [0.5] * 3}})
     .encode(), "'classes'"),
    (json.dumps({"format": "trainer-export/1", "model": "m", "classes": ["a"], "class_entries": [],
                 "checkpoint_sha256": "", "preprocessing": {"image_size": 64, "resize_shorter": 73,
                                                            "mean": [0.5] * 3, "std": "x"}}).encode(),
     "'preprocessing.std'"),
], ids=["random-bytes", "a-list", "no-classes", "bad-std"])
def test_a_bad_sidecar_is_one_line(tmp_path, sidecar, fragment):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"never opened: the sidecar is read first")
    (tmp_path / "m.onnx.json").write_bytes(sidecar)
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes(0))
    message = assert_config_error(invoke("trainer", "predict", model, image), "m.onnx.json", fragment)
    assert "random bytes" not in message


def test_an_onnx_file_of_random_bytes_beside_a_good_sidecar_is_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "m.onnx.json").write_text(json.dumps(SIDECAR))
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes(0))
    assert_config_error(invoke("trainer", "predict", model, image), f"{model} is not an ONNX model")
