"""fasteval's modules import one way: no import circles, and no module imports a higher layer.

Imports are read with ``ast`` from every module under fasteval/ (kernels/ through the fasteval/kernels
link), module-level and function-local alike, so a circle hidden inside a function fails too.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fasteval"
PACKAGE = "fasteval"
KERNELS = "fasteval.kernels"

# Lowest layer first; a module may import its own layer and the layers before it. Every module is
# named, so a new one fails test_every_module_placed until it is given a layer here.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": (
        "fasteval", "fasteval.errors", "fasteval.choices", "fasteval.procs", "fasteval.devices",
        "fasteval.cache_dir", "fasteval.files", "fasteval.versions", "fasteval.checkpoint_record",
        "fasteval.kernels", "fasteval.kernels.accumulator", "fasteval.kernels.fused_metrics",
        "fasteval.kernels.resize_crop",
    ),
    "data": (
        "fasteval.data", "fasteval.data.batch", "fasteval.data.dali_settings", "fasteval.data.transform_spec", "fasteval.data.dataset", "fasteval.data.decoded",
        "fasteval.data.decoder_output", "fasteval.data.loader_dali", "fasteval.data.loader_torch",
        "fasteval.data.loaders", "fasteval.data.pixels", "fasteval.data.prefetch", "fasteval.data.preprocess",
        "fasteval.data.probe", "fasteval.data.samples", "fasteval.data.synth",
        "fasteval.data.layouts", "fasteval.data.sources",
        "fasteval.data.decode_ahead",
    ),
    "model": (
        "fasteval.model", "fasteval.model.cache_damage", "fasteval.model.compile_cache",
        "fasteval.model.footprint", "fasteval.model.inference", "fasteval.model.init_skip",
        "fasteval.model.meta_facts", "fasteval.model.models", "fasteval.model.timm_models",
        "fasteval.model.torchvision_import",
        "fasteval.memory",
    ),
    "evaluation": (
        "fasteval.evaluation", "fasteval.evaluation.classes", "fasteval.evaluation.exact",
        "fasteval.evaluation.fast", "fasteval.evaluation.metrics", "fasteval.evaluation.plan",
        "fasteval.evaluation.reference", "fasteval.evaluation.recheck_pool", "fasteval.evaluation.recheck_stream",
        "fasteval.evaluation.route", "fasteval.evaluation.stats", "fasteval.evaluation.sweep",
        "fasteval.evaluation.validate",
    ),
    "output": (
        "fasteval.output", "fasteval.output.bench_table", "fasteval.output.class_table", "fasteval.output.curves",
        "fasteval.output.plots", "fasteval.output.report", "fasteval.output.sweep_report",
    ),
    "commands": (
        "fasteval.__main__", "fasteval.cli", "fasteval.options", "fasteval.bench", "fasteval.demo",
        "fasteval.distributed", "fasteval.sweep_command", "fasteval.spec_choice", "fasteval.api",
        "fasteval.training", "fasteval.training.command", "fasteval.training.data", "fasteval.training.history",
        "fasteval.training.loop", "fasteval.training.options", "fasteval.training.recipe",
        "fasteval.training.state",
    ),
}

# Upward imports still to be removed (test_no_upward_imports fails on any other upward import, and on an entry
# here that no longer occurs).
PENDING_UPWARD: set[str] = set()


def module_name(path: Path, root: Path, package: str) -> str:
    """The dotted name of the module at ``path`` inside the package rooted at ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package, by dotted name; follows links, so fasteval/kernels counts."""
    found = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder) / name
                found[module_name(path, root, package)] = path
    return found


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that ``tree`` imports anywhere, relative imports resolved against ``name``."""
    found = set()
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package mapped to the package's modules it imports."""
    files = module_files(root, package)
    known = set(files)
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a chain that starts and ends at the same module, or None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, tuple[str, ...]]) -> list[str]:
    """Each import of a module in a higher layer than the importer's, as 'importer (layer) -> target (layer)'."""
    rank = {module: (index, layer) for index, (layer, modules) in enumerate(layers.items()) for module in modules}
    return sorted(f"{source} ({rank[source][1]}) -> {target} ({rank[target][1]})"
                  for source, targets in graph.items() for target in targets
                  if source in rank and target in rank and rank[target][0] > rank[source][0])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_graph_reads_known_imports(graph):
    """The reader sees a module-level, a function-local and a relative import, so the checks below see imports."""
    assert "fasteval.errors" in graph["fasteval.procs"]
    assert "fasteval.training.command" in graph["fasteval.cli"]  # imported inside cmd_train
    assert "fasteval.kernels.fused_metrics" in graph["fasteval.kernels.accumulator"]  # from .fused_metrics


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_placed(graph):
    placed = [module for modules in LAYERS.values() for module in modules]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert sorted(set(graph) - set(placed)) == [], "modules with no layer in LAYERS"
    assert sorted(set(placed) - set(graph)) == [], "LAYERS names modules that do not exist"


def test_no_upward_imports(graph):
    upward = upward_imports(graph, LAYERS)
    assert sorted(set(upward) - PENDING_UPWARD) == [], "imports of a higher layer"
    assert sorted(PENDING_UPWARD - set(upward)) == [], "PENDING_UPWARD entries that no longer occur"


def test_kernels_import_nothing_from_fasteval(graph):
    outside = {f"{source} -> {target}" for source, targets in graph.items() if source.startswith(KERNELS)
               for target in targets if not target.startswith(KERNELS)}
    assert outside == set()


def test_checker_finds_planted_faults(tmp_path):
    """On a tiny package with a function-local circle and an upward import, the checks report both."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\nfrom pkg.sub import high\n")
    (pkg / "sub" / "high.py").write_text("def f():\n    from .mid import g\n")
    (pkg / "sub" / "mid.py").write_text("def g():\n    from ..low import x\n")
    (pkg / "alone.py").write_text("import pkg.low\n")
    planted = import_graph(pkg, "pkg")
    assert planted["pkg.low"] == {"pkg.sub.high"} and planted["pkg.alone"] == {"pkg.low"}
    assert find_cycle(planted) == ["pkg.low", "pkg.sub.high", "pkg.sub.mid", "pkg.low"]
    assert upward_imports(planted, {"low": ("pkg.low",), "high": ("pkg.sub.high", "pkg.sub.mid")}) == [
        "pkg.low (low) -> pkg.sub.high (high)"]
    del planted["pkg.sub.mid"]
    assert find_cycle(planted) is None
