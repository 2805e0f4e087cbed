"""Render every benchmarks/results/*.json into benchmarks/RESULTS.md and a bar chart, benchmarks/RESULTS.png.

    python -m benchmarks.report

Each section shows the command that measures it, the machine and commit it ran on, the table the
script wrote (figures are medians; the JSON keeps min/median/max) and its notes. The chart has one
panel per benchmark, images/s per row (peak RSS for memory), our rows in a darker colour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

HERE = RESULTS.parent  # benchmarks/, unless BENCHMARK_RESULTS points elsewhere
SCRIPTS = Path(__file__).resolve().parent  # the benchmark scripts
ORDER = ("loader", "pack", "pack_bson", "memory", "fit")  # the rest follow by name
TITLES = {"loader": "Loaders: images/s over the same images", "pack": "Packing clothing-small",
          "pack_bson": "Packing a Cdiscount-like BSON dump", "memory": "Peak memory vs dataset size",
          "fit": "Trainer: real data vs the compute-only ceiling",
          "serve": "trainer serve: checkpoint vs ONNX export",
          "decode": "The torch loader's decoder: candidates on the same bytes",
          "dali_parity": "--backend dali against --backend pil: pixel differences",
          "dedup": "Pictures with the same bytes in the real datasets (shardtool pack --dedup keep)",
          "dali_cpu_work": "The DALI path's CPU work per image, and pack's process layout",
          "longtail": "Long-tailed data: --sampling uniform, balanced, sqrt (accuracy and loader speed)",
          "equivalence": "The trainer's outputs before and after a refactor"}
FIGURES = {"memory": ("peak_rss_mb", "peak memory (MB)"), "serve": ("c8_req_s", "requests/s at concurrency 8"),
           "dali_parity": ("worst_difference", "worst mean |PIL - DALI| per channel")}  # what each panel charts; the rest: images/s


def ours(name: str) -> bool:
    return (name.startswith(("shardtool", "pack ", "loader-epoch", "loader-")) or name.endswith("-real")
            or name in ("checkpoint", "onnx"))


def load_results() -> list[dict[str, Any]]:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return [found[n] for n in names]


def how(result: dict[str, Any]) -> str:
    """The command the result records; results from before it did: the script of the same name, or the
    script before the first '-' run with --name (loader-network: benchmarks.loader --name loader-network)."""
    name = result["benchmark"]
    if result.get("command"):
        return result["command"]
    if (SCRIPTS / f"{name}.py").exists():
        return f"python -m benchmarks.{name}"
    script = name.split("-")[0]
    if (SCRIPTS / f"{script}.py").exists():
        return f"python -m benchmarks.{script} --name {name}"
    return f"... --name {name}"


def section(result: dict[str, Any]) -> str:
    name, machine = result["benchmark"], result["machine"]
    table = (RESULTS / f"{name}.md").read_text().strip()
    where = f"{machine.get('cpus')} CPUs, {machine.get('gpu') or 'no GPU'}, Python {machine.get('python')}"
    if machine.get("commit"):
        where += f", commit {machine['commit']}"
    settings = ", ".join(f"{k}={v}" for k, v in result.get("settings", {}).items() if not isinstance(v, dict))
    return "\n".join([f"## {TITLES.get(name, name)}", "", f"`{how(result)}`; {where}.", "",
                      f"Settings: {settings}.", "", table, ""])


def draw(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing global

    charted = [r for r in results if any(row.get(panel_figure(r)[0]) for row in r["results"])]
    figure = Figure(figsize=(9, 2.2 + sum(0.32 * len(r["results"]) + 0.6 for r in charted)))
    axes = figure.subplots(len(charted), 1, squeeze=False,
                           gridspec_kw={"height_ratios": [len(r["results"]) + 1 for r in charted]})[:, 0]
    for ax, result in zip(axes, charted):
        key, label = panel_figure(result)
        rows = [row for row in result["results"] if row.get(key)]
        names = [row["name"] for row in rows]
        values = [row[key] for row in rows]
        colours = ["#1f4e79" if ours(n) else "#9dc3e6" for n in names]
        bars = ax.barh(names, values, color=colours)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.1f}" for v in values], padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(TITLES.get(result["benchmark"], result["benchmark"]), fontsize=10, loc="left")
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def panel_figure(result: dict[str, Any]) -> tuple[str, str]:
    return FIGURES.get(result["benchmark"], ("img_s", "images/s"))


def main() -> None:
    results = load_results()
    if not results:
        raise SystemExit(f"no results in {RESULTS}: run a benchmark first (python -m benchmarks.loader)")
    text = ["# Benchmark results", "",
            "Measured by the scripts in this folder, each on this repository's own machine and written by",
            "`python -m benchmarks.report`; every figure is a median of repeats (min/median/max in",
            "results/*.json). Ratios compare rows of the same run, so they travel better than absolute numbers.",
            "", "![images/s per benchmark](RESULTS.png)", ""]
    (HERE / "RESULTS.md").write_text("\n".join(text + [section(r) for r in results]))
    draw(results, HERE / "RESULTS.png")
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'RESULTS.png'}")


if __name__ == "__main__":
    main()
