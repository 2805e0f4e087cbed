"""trainer/ and benchmarks/ read top to bottom: a module imports only from its own layer or the ones below,
at module level or inside a function, and no imports go round in a circle.

Importing `a.b.c` also runs `a/b/__init__.py`, so a module depends on its parent packages too. A new module
must be given a layer here, which is the point: its place is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAINER = {  # lowest first; docs/code.md walks the same layers
    "runtime": ["trainer", "trainer.errors", "trainer.host", "trainer.distributed", "trainer.device", "trainer.remote"],
    "data": ["trainer.dataset", "trainer.cache", "trainer.data.sampling", "trainer.data.plan", "trainer.data.draws",
             "trainer.data.transforms", "trainer.data.images", "trainer.data.spec", "trainer.data.mixing",
             "trainer.data.torch", "trainer.data.dali", "trainer.data"],
    "model": ["trainer.checkpoint", "trainer.models.registry", "trainer.models"],
    "train": ["trainer.metrics", "trainer.schedule", "trainer.keylog", "trainer.loop", "trainer.config",
              "trainer.features", "trainer.linear", "trainer.probe"],
    "fit": ["trainer.run", "trainer.fit"],
    "use": ["trainer.exported", "trainer.infer", "trainer.predict", "trainer.export", "trainer.serve",
            "trainer.serve.protocol", "trainer.serve.local", "trainer.serve.batcher", "trainer.serve.app"],
    "cli": ["trainer.cli", "trainer.__main__"],
}
PARTS = ["benchmarks.gpu_measure", "benchmarks.longtail_dump", "benchmarks.others"]  # of gpu_check, longtail, loader
SCRIPTS = sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py")
                 if f"benchmarks.{p.stem}" not in ("benchmarks.__init__", "benchmarks.common", *PARTS))
BENCHMARKS = {"helpers": ["benchmarks", "benchmarks.common"], "parts": PARTS, "scripts": SCRIPTS}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str, known: set[str], name: str = "") -> set[str]:
    """The modules of PACKAGE that PATH (module NAME) imports anywhere in it (`from x import submodule` resolved)."""
    name, found = name or module_name(path), set()
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {m for m in found if m == package or m.startswith(package + ".")}


def with_parents(modules: set[str]) -> set[str]:
    return modules | {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}


def graph(package: str) -> dict[str, set[str]]:
    paths = sorted((ROOT / package).rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports(p, package, known) - {module_name(p)} for p in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One circle of imports, as the modules along it, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:  # on the current path: the circle closes here
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


@pytest.mark.parametrize("package, layers", [("trainer", TRAINER), ("benchmarks", BENCHMARKS)])
def test_every_module_has_a_layer_and_imports_only_downwards(package: str, layers: dict[str, list[str]]) -> None:
    edges = graph(package)
    rank = {module: i for i, members in enumerate(layers.values()) for module in members}
    listed = [module for members in layers.values() for module in members]
    assert sorted(listed) == sorted(edges), "every module in exactly one layer (tests/test_layers.py)"
    names = list(layers)
    upward = [f"{module} ({names[rank[module]]}) imports {target} ({names[rank[target]]})"
              for module, targets in sorted(edges.items()) for target in sorted(with_parents(targets))
              if target in rank and rank[target] > rank[module]]
    assert not upward, "\n".join(upward)
    assert not find_cycle(edges), " -> ".join(find_cycle(edges))


def test_no_benchmark_script_imports_another() -> None:
    """What two scripts share lives in benchmarks/common.py, so each script can be read (and run) alone."""
    edges = graph("benchmarks")
    shared = [f"{script} imports {target}" for script in SCRIPTS for target in sorted(edges[script])
              if target in SCRIPTS]
    assert not shared, "\n".join(shared)


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The rules above against a small graph with one of each."""
    edges = {"p.low": {"p.high"}, "p.high": {"p.low"}, "p.mid": {"p.low"}}
    assert find_cycle(edges) in (["p.high", "p.low", "p.high"], ["p.low", "p.high", "p.low"])
    assert find_cycle({"p.low": set(), "p.high": {"p.low"}}) == []
    assert with_parents({"p.a.b"}) == {"p.a.b", "p.a", "p"}
    (tmp_path / "mod.py").write_text("def f():\n    from trainer.fit import fit\nimport trainer.data.spec\n"
                                     "from .data import torch\nimport torch\n")
    found = imports(tmp_path / "mod.py", "trainer", {"trainer.data.torch"}, name="trainer.mod")
    assert found == {"trainer.fit", "trainer.data.spec", "trainer.data", "trainer.data.torch"}
