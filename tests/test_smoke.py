"""The generated dataset packs, reads back and verifies: the path `make demo` takes."""

from __future__ import annotations

import json

from shardtool.synth import CLASSES


def test_pack_shapes_split_and_verify(shapes, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("pack", shapes, out, "--split", "val=0.25", "--stratify", "--workers", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["written"] == 48 and report["skipped"] == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == sorted(CLASSES)
    assert manifest["splits"]["val"]["class_counts"] == [3, 3, 3, 3]  # stratified: 12 * 0.25 per class
    assert manifest["splits"]["train"]["class_counts"] == [9, 9, 9, 9]
    verify = cli("verify", out, "--decode")
    assert verify.exit_code == 0 and "48 samples" in verify.output
