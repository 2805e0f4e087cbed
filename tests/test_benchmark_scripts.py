"""The benchmark scripts run end to end and write what report.py renders (tiny sizes; never timed)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.common import copy_dir
from benchmarks.loader import ROWS, WDS_SHARDS
from shardtool.synth import make_shapes
from tests.conftest import run_cli

ROOT = Path(__file__).parents[1]


def run_module(module: str, *args: str, results: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"BENCHMARK_RESULTS": str(results)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def test_fit_benchmark_compares_real_batches_with_the_compute_only_ceiling(tmp_path: Path) -> None:
    source = make_shapes(tmp_path / "shapes", per_class=20, size=64)
    assert run_cli("pack", source, tmp_path / "shards", "--workers", "0").exit_code == 0
    results = tmp_path / "results"
    done = run_module("benchmarks.fit", "--data", str(tmp_path / "shards"), "--model", "tiny_cnn", "--image-size",
                      "32", "--batch-size", "8", "--steps", "3", "--repeats", "1", "--phases", "finetune", "--json",
                      results=results)  # one phase of the two: the rows and measures are the same code
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    names = [f"finetune-{source}-malloc-{malloc}" for source in ("synthetic", "real") for malloc in ("system", "keep")]
    assert [r["name"] for r in printed["results"]] == names
    for row in printed["results"]:
        assert row["img_s"] > 0 and 0 <= row["data_wait"] < 1 and row["peak_rss_mb"] > 0
        assert 0 <= row["kernel_share"] <= 1 and row["faults_per_step"] >= 0 and row["cpu_s_per_step"] > 0
        assert row["malloc_applied"] == (row["malloc"] == "keep")  # the setting reached the measured process
    written = json.loads((results / "fit.json").read_text())
    assert written["results"] == printed["results"] and written["machine"]["cpus"] == os.cpu_count()
    assert written["settings"]["data"] == os.path.relpath(tmp_path / "shards", ROOT)  # no absolute path of this machine
    assert "whole process tree" in written["memory_measure"]
    shards = os.path.relpath(tmp_path / "shards", ROOT)
    assert written["command"].startswith(f"python -m benchmarks.fit --data {shards} --model tiny_cnn")  # as run,
    assert not [arg for arg in shlex.split(written["command"]) if arg.startswith("/")]  # with no path of this machine
    assert (results / "fit.md").read_text().startswith("| name | img_s |")


def test_report_renders_every_result_into_one_page_and_a_chart(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name, rows in (("loader", [("shardtool-torch", 900.0), ("imagefolder", 300.0)]),
                       ("loader-network", [("shardtool-torch-http", 700.0)]), ("zeta", [("other", 5.0)])):
        payload = {"benchmark": name, "machine": {"cpus": 2, "python": "3.11", "commit": "abc1234"},
                   "settings": {"batch": 64}, "results": [{"name": n, "img_s": v} for n, v in rows]}
        if name == "zeta":
            payload["command"] = "python -m benchmarks.zeta --rows other"
        (results / f"{name}.json").write_text(json.dumps(payload))
        (results / f"{name}.md").write_text("| name | img_s |\n|---|---|\n" + "".join(f"| {n} | {v} |\n" for n, v in rows))
    done = run_module("benchmarks.report", results=results)
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "RESULTS.md").read_text()
    assert page.index("## Loaders") < page.index("## zeta")  # the known benchmarks first, in their order
    assert "| shardtool-torch | 900.0 |" in page and "commit abc1234" in page and "batch=64" in page
    assert "`python -m benchmarks.loader`;" in page  # results from before they recorded their command
    assert "`python -m benchmarks.loader --name loader-network`;" in page
    assert "`python -m benchmarks.zeta --rows other`;" in page  # the command the result recorded
    assert (tmp_path / "RESULTS.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loader_benchmark_measures_ours_and_the_baselines_on_the_same_images(tmp_path: Path) -> None:
    source = make_shapes(tmp_path / "shapes", per_class=20, size=64)
    # 4 shards: webdataset's README pipeline splits whole shards across the 2 workers
    assert run_cli("pack", source, tmp_path / "shards", "--workers", "0", "--shard-size", "20").exit_code == 0
    results = tmp_path / "results"
    rows = ("shardtool-torch,shardtool-torch-http-cache-cold,imagefolder-256,webdataset-naive,webdataset,decode-ceiling,"
            "decode-ceiling-pil")
    done = run_module("benchmarks.loader", "--data", str(tmp_path / "shards"), "--files", str(source), "--rows", rows,
                      "--epochs", "1", "--repeats", "1", "--json", results=results)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = {r["name"]: r for r in json.loads(done.stdout)["results"]}
    assert list(printed) == rows.split(",")
    assert all(r["img_s"] > 0 and r["peak_rss_mb"] > 0 for r in printed.values())
    for column, base in [("vs_imagefolder_256", "imagefolder-256"), ("vs_ceiling", "decode-ceiling"),
                         ("vs_pil_ceiling", "decode-ceiling-pil")]:
        assert all(r[column] == round(r["img_s"] / printed[base]["img_s"], 3) for r in printed.values()), column
    assert not any("vs_imagefolder" in r for r in printed.values())  # its base row was not measured
    written = json.loads((results / "loader.json").read_text())
    assert written["settings"]["persistent_workers"] and written["settings"]["prefetch_factor"] == 4
    assert written["settings"]["data"] == os.path.relpath(tmp_path / "shards", ROOT)
    # the recommended webdataset row read its own copy: the 80 training samples in 16 shards of 5
    copy = copy_dir(tmp_path / "shards", f"wds-{WDS_SHARDS}")
    assert [sum(1 for m in tarfile.open(t) if m.name.endswith(".cls")) for t in sorted(copy.glob("*.tar"))] == [5] * 16
    assert (results / "loader.md").read_text().startswith("| name | img_s | vs_imagefolder_256 | vs_imagefolder |")


def test_loader_benchmark_rejects_an_unknown_row_in_one_line(tmp_path: Path) -> None:
    source = make_shapes(tmp_path / "shapes", per_class=2, size=32)
    done = run_module("benchmarks.loader", "--data", str(tmp_path), "--files", str(source), "--rows", "imagefolder,pytorch",
                      results=tmp_path / "results")
    assert done.returncode == 1 and done.stderr.strip() == (
        f"unknown rows: pytorch (choose from {', '.join(ROWS)})")


def test_serve_benchmark_measures_the_checkpoint_and_its_onnx_export(shapes_model, shapes_onnx, tmp_path: Path) -> None:
    done = run_module("benchmarks.serve", "--ckpt", str(shapes_model.ckpt), "--onnx", str(shapes_onnx[0]),
                      "--images", str(shapes_model.source), "--requests", "4", "--repeats", "1", "--json",
                      results=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)["results"]}
    assert set(rows) == {"checkpoint", "onnx"}
    assert all(r["c1_p50_ms"] > 0 and r["c8_req_s"] > 0 and r["c1_p95_ms"] >= r["c1_p50_ms"] for r in rows.values())
    assert all(r["server_peak_mb"] > 100 for r in rows.values())  # the serving process was found and sampled


def test_longtail_benchmark_compares_the_samplings_on_held_out_products(tmp_path: Path) -> None:
    categories = tmp_path / "data" / "cdiscount" / "category_names.csv"
    categories.parent.mkdir(parents=True)
    categories.write_text("category_id,category_level1,category_level2,category_level3\n" +
                          "".join(f"{1000 + i},L1 {i % 3},L2 {i % 5},L3 {i}\n" for i in range(30)))
    results = tmp_path / "results"
    done = run_module("benchmarks.longtail", "--quick", "--classes", "12", "--products", "150", "--model", "tiny_cnn",
                      "--weights", "none", "--image-size", "32", "--head-epochs", "2", "--lrs", "0.001",
                      "--probe-row", "--data", str(categories.parents[1]), "--work", str(tmp_path / "work"), "--json",
                      results=results)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    rows = {r["name"]: r for r in printed["results"]}
    assert list(rows) == ["uniform", "balanced", "sqrt", "probe (LBFGS, uniform)"]
    for mode in ("uniform", "balanced", "sqrt"):
        assert 0 <= rows[mode]["top1"] <= 100 and 0 <= rows[mode]["balanced_acc"] <= 100
        ratio = round(rows[mode]["img_s"] / rows["uniform"]["img_s"], 3)
        assert rows[mode]["img_s"] > 0 and rows[mode]["vs_uniform"] == ratio
    # the project's draws reached the heads: balanced draws the tail more often than uniform
    assert rows["balanced"]["tail_draws_pct"] > rows["uniform"]["tail_draws_pct"]
    settings = printed["settings"]
    assert settings["classes"] == 12 and settings["zipf_exponent"] == 1.0
    assert settings["pictures"] == settings["head"]["train_pictures"] + sum(
        json.loads((tmp_path / "work" / "longtail-12c-150p-seed0-pack" / "dataset.json").read_text())["splits"][s]
        ["num_samples"] for s in ("val", "test"))
    assert json.loads((results / "longtail.json").read_text())["results"] == printed["results"]
    assert (results / "longtail.md").read_text().startswith("| name | top1 | balanced_acc |")
