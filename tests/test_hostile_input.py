"""Hostile but realistic inputs (issue 22): special files, symlink loops, bare CRs, duplicate columns,
labels that are not labels, folders named like images, and a pickle passed off as a checkpoint.

Each input ends as a counted skip with its reason, an ignored entry the report names, or a one-line
error; every finished pack accounts for seen == written + skipped. Nothing may hang: the tests that
meet a FIFO carry a timeout, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import fractions
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import bson  # pymongo's
import pytest

from tests.shards import read_shards
from tests.test_bad_input import assert_config_error, jpeg_bytes, read_rejects


def class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{i}.jpg").write_bytes(jpeg_bytes(seed))
            seed += 1
    return root


def pack_all(cli, source: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Pack in-process (a FIFO would block here, where the test's timeout can stop it); the manifest."""
    result = cli("pack", source, out, "--workers", "0", "--max-skip-fraction", "1", *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "dataset.json").read_text())


def counts_of(manifest: dict[str, Any]) -> dict[str, int]:
    return {reason: entry["count"] for reason, entry in manifest["report"]["skips"].items()}


def class_names(manifest: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in manifest["classes"]]


def ignored_of(manifest: dict[str, Any]) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in manifest["report"]["ignored"]["examples"]}


def assert_accounted(manifest: dict[str, Any], seen: int, written: int) -> None:
    report = manifest["report"]
    assert (report["seen"], report["written"], report["skipped"]) == (seen, written, seen - written)


# --- 1. only regular files are opened -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fifo_socket_and_device_in_class_folders_are_counted_skips(tmp_path, cli, monkeypatch):
    source = class_folders(tmp_path / "src", {"cat": 3, "dog": 3})
    os.mkfifo(source / "cat" / "x.jpg")
    (source / "cat" / "null.jpg").symlink_to(os.devnull)
    monkeypatch.chdir(source / "dog")  # a short relative name: socket paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("s.png")
        manifest = pack_all(cli, source, tmp_path / "out")
    assert counts_of(manifest) == {"not_a_regular_file": 3}
    assert_accounted(manifest, seen=9, written=6)
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert details == {"cat/x.jpg": "a FIFO (named pipe): only regular files are read",
                       "cat/null.jpg": "a character device: only regular files are read",
                       "dog/s.png": "a socket: only regular files are read"}
    assert class_names(manifest) == ["cat", "dog"]


@pytest.mark.timeout(30)
def test_csv_rows_pointing_at_a_fifo_or_a_device_are_counted_skips(tmp_path, cli):
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    os.mkfifo(tmp_path / "imgs" / "pipe.jpg")
    (tmp_path / "imgs" / "null.jpg").symlink_to(os.devnull)  # outside the folder: read only with --follow-links
    rows = [f"imgs/{i}.jpg,{'ab'[i % 2]}" for i in range(4)] + ["imgs/pipe.jpg,a", "imgs/null.jpg,b"]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    manifest = pack_all(cli, tmp_path / "list.csv", tmp_path / "out", "--follow-links")
    assert counts_of(manifest) == {"not_a_regular_file": 2}
    assert_accounted(manifest, seen=6, written=4)
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert details == {"list.csv:6": "a FIFO (named pipe): only regular files are read",
                       "list.csv:7": "a character device: only regular files are read"}


# --- 2. symlinked folders: never back into the tree, each outside folder once ---------------------------


def test_symlinks_back_into_the_tree_are_not_followed_and_are_reported(tmp_path, cli):
    source = class_folders(tmp_path / "src", {"cat": 3, "dog": 3})
    class_folders(tmp_path / "outside", {"bird": 2}, seed=10)
    (source / "all").symlink_to(source)  # the tree itself
    (source / "up").symlink_to(tmp_path)  # an ancestor
    (source / "bird").symlink_to(tmp_path / "outside" / "bird")  # elsewhere: followed, once
    (source / "bird_again").symlink_to(tmp_path / "outside" / "bird")
    (source / "cat" / "dogs").symlink_to(source / "dog")  # a folder inside the tree
    (tmp_path / "outside" / "bird" / "loop").symlink_to(tmp_path / "outside")  # around a folder already read
    manifest = pack_all(cli, source, tmp_path / "out")
    assert class_names(manifest) == ["bird", "cat", "dog"]
    assert_accounted(manifest, seen=8, written=8)
    assert manifest["report"]["ignored"]["count"] == 5
    assert ignored_of(manifest) == {
        "all": "symlink back to SOURCE or around it, not followed",
        "up": "symlink back to SOURCE or around it, not followed",
        "bird_again": "symlink to a folder already read, not followed",
        "bird/loop": "symlink to a folder already read, not followed",
        "cat/dogs": "symlink into SOURCE, not followed",
    }
    sources = sorted(json.loads(s["json"])["source"] for s in read_shards(tmp_path / "out").values())
    assert sources == ["bird/0.jpg", "bird/1.jpg"] + [f"{c}/{i}.jpg" for c in ("cat", "dog") for i in range(3)]


def test_a_loop_beside_given_splits_keeps_the_splits(tmp_path, cli):
    source = tmp_path / "src"
    class_folders(source / "train", {"cat": 2, "dog": 2})
    class_folders(source / "val", {"cat": 1, "dog": 1}, seed=10)
    (source / "everything").symlink_to(source)
    manifest = pack_all(cli, source, tmp_path / "out")
    assert sorted(manifest["splits"]) == ["train", "val"]
    assert class_names(manifest) == ["cat", "dog"]
    assert_accounted(manifest, seen=6, written=6)
    assert ignored_of(manifest) == {"everything": "symlink back to SOURCE or around it, not followed"}


# --- 3. a bare CR that ends a row ends it: rows are counted as the user counts lines -----------------


def test_a_bare_cr_ending_a_row_does_not_merge_two_rows(tmp_path, cli):
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    text = "path,label\nimgs/0.jpg,a\nimgs/1.jpg,a\nimgs/2.jpg,b\rimgs/3.jpg,b\nimgs/4.jpg,c\nimgs/5.jpg,c\n"
    (tmp_path / "list.csv").write_bytes(text.encode())
    manifest = pack_all(cli, tmp_path / "list.csv", tmp_path / "out")
    assert_accounted(manifest, seen=6, written=6)
    assert class_names(manifest) == ["a", "b", "c"]
    lines = {json.loads(s["json"])["path"]: json.loads(s["json"])["source"]
             for s in read_shards(tmp_path / "out").values()}
    assert lines == {f"imgs/{i}.jpg": f"list.csv:{i + 2}" for i in range(6)}  # as the user counts lines


# --- 4. duplicate column names ----------------------------------------------------------------------------


@pytest.mark.parametrize("manifest_header, joined_header, where", [
    ("path,label,label", None, "list.csv"),
    ("path,pid,note", "id,label,label", "products.csv"),
])
def test_duplicate_column_names_are_one_clear_error(tmp_path, cli, manifest_header, joined_header, where):
    (tmp_path / "0.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "list.csv").write_text(f"{manifest_header}\n0.jpg,a,b\n")
    extra: list[str] = []
    if joined_header:
        (tmp_path / "products.csv").write_text(f"{joined_header}\na,x,y\n")
        extra = ["--join", str(tmp_path / "products.csv"), "--join-on", "pid=id"]
    result = cli("pack", tmp_path / "list.csv", tmp_path / "out", "--workers", "0", *extra)
    assert_config_error(result, f"{where} has 2 columns named 'label': rename all but one")
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_duplicate_pixel_columns_are_one_clear_error(tmp_path, cli):
    header = "label,label," + ",".join(f"pixel{i}" for i in range(783))
    (tmp_path / "px.csv").write_text(header + "\n" + ",".join(["1"] * 785) + "\n")
    result = cli("pack", tmp_path / "px.csv", tmp_path / "out", "--workers", "0")
    assert_config_error(result, "px.csv has 2 columns named 'label': rename all but one")


# --- 5. labels that are not labels: control characters, a BSON category_id that is not an integer ------


def test_control_characters_in_labels_and_paths_are_counted_skips(tmp_path, cli):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    rows = ["imgs/0.jpg,a", "imgs/1.jpg,a", "imgs/2.jpg,b",
            "imgs/3.jpg,d\re",  # a bare CR inside the label: the row has its two fields, the label a line break
            "imgs/4.jpg,x\x00y",  # a NUL
            "imgs/5.jpg,tab\there",
            '"imgs/6\n.jpg",a']  # a quoted line break in the path
    (tmp_path / "list.csv").write_bytes(("path,label\n" + "\n".join(rows) + "\n").encode())
    manifest = pack_all(cli, tmp_path / "list.csv", tmp_path / "out")
    assert counts_of(manifest) == {"bad_label": 3, "bad_image_ref": 1}
    assert_accounted(manifest, seen=7, written=3)
    assert class_names(manifest) == ["a", "b"]
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert details == {"list.csv:5": "'label' holds a control character: 'd\\ne'",
                       "list.csv:6": "'label' holds a control character: 'x\\x00y'",
                       "list.csv:7": "'label' holds a control character: 'tab\\there'",
                       "list.csv:8": "'path' holds a control character: 'imgs/6\\n.jpg'"}


def test_control_characters_in_pixel_csv_labels_and_folder_names_are_counted_skips(tmp_path, cli):
    rows = [",".join(["7" if i else "0"] + ["12"] * 784) for i in range(3)] + [",".join(["a\x01"] + ["12"] * 784)]
    (tmp_path / "px.csv").write_text("label," + ",".join(f"pixel{i}" for i in range(784)) + "\n" + "\n".join(rows))
    manifest = pack_all(cli, tmp_path / "px.csv", tmp_path / "out")
    assert counts_of(manifest) == {"bad_label": 1}
    assert_accounted(manifest, seen=4, written=3)
    assert class_names(manifest) == ["0", "7"]

    source = class_folders(tmp_path / "src", {"cat": 2, "new\nline": 2})
    manifest = pack_all(cli, source, tmp_path / "out2")
    assert counts_of(manifest) == {"bad_label": 2}
    assert_accounted(manifest, seen=4, written=2)
    assert class_names(manifest) == ["cat"]


def test_bson_category_ids_that_are_not_integers_are_counted_skips(tmp_path, cli):
    picture = jpeg_bytes(1, (32, 32))
    docs = [(1, 10), (2, "abc"), (3, 11), (4, 5.5), (5, "12"), (6, 13.0), (7, None)]
    dump = b"".join(bson.encode({"_id": i, "imgs": [{"picture": picture}]} |
                                ({"category_id": c} if c is not None else {})) for i, c in docs)
    (tmp_path / "train.bson").write_bytes(dump)
    manifest = pack_all(cli, tmp_path / "train.bson", tmp_path / "out")
    assert counts_of(manifest) == {"bad_label": 2, "missing_label": 1}
    assert class_names(manifest) == ["10", "11", "12", "13"]
    assert_accounted(manifest, seen=7, written=4)
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert details["train.bson@" + str(len(bson.encode({"_id": 1, "imgs": [{"picture": picture}],
                                                        "category_id": 10})))] == "category_id 'abc' is not an integer"
    assert "category_id 5.5 is not an integer" in details.values()


# --- 6. a folder named like an image ------------------------------------------------------------------------


def test_a_folder_named_like_an_image_is_reported(tmp_path, cli):
    source = class_folders(tmp_path / "src", {"cat": 2, "dog": 2})
    (source / "cat" / "x.jpg").mkdir()
    (source / "dog" / "y.png").mkdir()
    (source / "dog" / "y.png" / "inner.jpg").write_bytes(jpeg_bytes(20))  # a folder's files are read, as any
    manifest = pack_all(cli, source, tmp_path / "out")
    assert ignored_of(manifest) == {"cat/x.jpg": "folder named like an image",
                                    "dog/y.png": "folder named like an image"}
    assert_accounted(manifest, seen=5, written=5)
    assert class_names(manifest) == ["cat", "dog"]


def test_the_pack_report_names_each_ignored_entry_with_its_reason(tmp_path, cli):
    source = class_folders(tmp_path / "src", {"cat": 2})
    (source / "cat" / "x.jpg").mkdir()
    (source / "cat" / ".cache").mkdir()  # a hidden folder inside a class folder is reported too
    (source / "README.md").write_text("hi\n")
    result = cli("pack", source, tmp_path / "out", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert ("ignored 3 entries that are not samples (folder named like an image: cat/x.jpg; hidden: cat/.cache; "
            "not in a class folder: README.md)") in " ".join(result.stdout.split())


# --- 7. a pickle that is not a checkpoint -------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    pickle.dumps({"model": fractions.Fraction(1, 3)}, protocol=4),  # an arbitrary object; torch warns on protocol 4
    pickle.dumps(fractions.Fraction(1, 3), protocol=2),
    b"hello, I am not a checkpoint\n",
], ids=["object-protocol-4", "object-protocol-2", "text"])
def test_evaluate_refuses_an_arbitrary_pickle_plainly(tmp_path, content):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "trainer", "evaluate", str(ckpt), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == (f"error: {ckpt} is not a trainer checkpoint, or not one this version can load safely; "
                           "it was not loaded\n")  # no advice to pass weights_only=False, no torch warning


def test_fit_refuses_weights_that_are_an_arbitrary_pickle_plainly(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(pickle.dumps(fractions.Fraction(1, 3), protocol=2))
    from trainer.errors import ConfigError
    from trainer.models import create_model

    with pytest.raises(ConfigError, match="not a state dict of tensors this version can load safely"):
        create_model("tiny_cnn", 3, str(bad))


# --- CSV rows may not read files outside --images (issue 19, item 5) -----------------------------------------


def test_csv_rows_cannot_reach_outside_images(tmp_path, cli):
    images, private = tmp_path / "images", tmp_path / "private"
    images.mkdir()
    private.mkdir()
    (images / "ok.jpg").write_bytes(jpeg_bytes(1))
    (images / "sub").mkdir()
    (images / "sub" / "deep.jpg").write_bytes(jpeg_bytes(2))
    (private / "secret.jpg").write_bytes(jpeg_bytes(3))
    (images / "link.jpg").symlink_to(private / "secret.jpg")
    rows = ["ok.jpg", "sub/../sub/deep.jpg", "../private/secret.jpg", str(private / "secret.jpg"), "/dev/zero",
            "link.jpg"]
    manifest_csv = tmp_path / "list.csv"
    manifest_csv.write_text("path,label\n" + "".join(f"{row},{'ab'[i % 2]}\n" for i, row in enumerate(rows)))
    refused = pack_all(cli, manifest_csv, tmp_path / "out", "--images", images)
    assert counts_of(refused) == {"outside_images": 4}
    assert_accounted(refused, seen=6, written=2)
    details = {r["source"]: r["detail"] for r in read_rejects(tmp_path / "out")}
    assert "through a symlink (--follow-links allows it)" in details["list.csv:7"]
    assert details["list.csv:4"] == f"'../private/secret.jpg' is outside --images {images}"

    followed = pack_all(cli, manifest_csv, tmp_path / "out-links", "--images", images, "--follow-links")
    assert counts_of(followed) == {"outside_images": 3}  # the symlink is followed; '..' and absolute paths never
    assert_accounted(followed, seen=6, written=3)


# --- no import-time global side effects (issue 19, item 6) ------------------------------------------------------


def test_importing_and_packing_leave_pillow_and_csv_globals_alone(tmp_path):
    script = f"""
import csv, warnings
from PIL import Image
before = (Image.MAX_IMAGE_PIXELS, csv.field_size_limit())
from click.testing import CliRunner
from shardtool.cli import main
import trainer.infer, trainer.serve.app
from shardtool.synth import make_shapes
make_shapes({str(tmp_path / 'src')!r}, per_class=2, size=32)
result = CliRunner().invoke(main, ["pack", {str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, "--workers", "0"])
assert result.exit_code == 0, result.output
bomb_filters = [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning]  # torch's own filters aside
print(before == (Image.MAX_IMAGE_PIXELS, csv.field_size_limit()) and not bomb_filters)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_pillows_bomb_check_is_off_for_our_header_reads_only():
    import io

    from PIL import Image

    from shardtool.process.checks import open_header

    data = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(data, "PNG")  # 400 Mpixels: Pillow alone refuses to open it
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data.getvalue()))
    assert open_header(data.getvalue()).size == (20_000, 20_000)  # we check --max-pixels ourselves, next
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data.getvalue()))  # and the guard is back for everyone else


def test_file_names_with_terminal_escape_codes_are_never_printed_raw(tmp_path, cli):
    """A name holding ESC [ 2 J (clear the screen) or a bell is spelled out, in the report, the manifest and errors."""
    source = class_folders(tmp_path / "src", {"cat": 3, "dog": 3})
    (source / "cat" / "evil\x1b[2J\x07.jpg").write_bytes(b"not a jpeg")
    (source / "dog" / "notes\x1b[31m.txt").write_text("x")

    result = cli("pack", source, tmp_path / "out", "--workers", "0", "--max-skip-fraction", "1")
    missing = cli("pack", tmp_path / "gone\x1b[2J", tmp_path / "out2")

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    sources = {json.loads(line)["source"] for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()}
    assert sources == {"cat/evil\\x1b[2J\\x07.jpg", "dog/notes\\x1b[31m.txt"}
    assert "\x1b" not in (tmp_path / "out" / "dataset.json").read_text()
    assert "\x1b" not in missing.output and "gone\\x1b[2J" in assert_config_error(missing)
