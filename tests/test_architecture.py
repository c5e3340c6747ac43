"""The shape of the code: every module has a layer and imports only from its own layer or lower
(module level and inside functions alike), no import cycles, no module over 500 lines, and a recipe
that can be loaded and validated without importing anything that loads models."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import ROOT

# package name -> folder (pyproject's package-dir: fastft.kernels lives in the top-level kernels/)
PACKAGES = {"fastft": ROOT / "fastft", "fastft.kernels": ROOT / "kernels"}


# The layers, lowest first; within a layer, the groups are siblings that must not import each other.
# A name ending in ".*" is a package: the package and everything in it.
LAYERS = [
    ("base", {"base": {"fastft", "fastft.errors", "fastft.files", "fastft.flat", "fastft.fmt", "fastft.progress",
                       "fastft.hardware", "fastft.schema", "fastft.gates", "fastft.recipe", "fastft.world",
                       "fastft.info", "fastft.downloads", "fastft.eval_table", "fastft.trackers"}}),
    ("runs", {"runs": {"fastft.rundir", "fastft.checkpoints", "fastft.report.*", "fastft.registry_meta",
                       "fastft.registry"}}),
    ("models and data", {
        "models": {"fastft.models.*", "fastft.kernels.*"},
        "data": {"fastft.data.*"}}),
    ("eval", {"eval": {"fastft.metrics", "fastft.generate", "fastft.evaluate"}}),
    ("train", {"train": {"fastft.callbacks", "fastft.trainer", "fastft.methods", "fastft.rewards", "fastft.distributed",
                         "fastft.oom", "fastft.summary", "fastft.train", "fastft.sweep"}}),
    ("export", {"export": {"fastft.merge", "fastft.export.*"}}),
    ("cli", {"cli": {"fastft.cli", "fastft.__main__", "fastft.assets.*"}}),
]
MAX_LINES = 500


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, group) of a module, or None when no layer lists it."""
    for i, (_, groups) in enumerate(LAYERS):
        for group, names in groups.items():
            for n in names:
                if module == n or (n.endswith(".*") and (module == n[:-2] or module.startswith(n[:-1]))):
                    return i, group
    return None


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point to a higher layer, or across to a sibling group of the same layer."""
    out = []
    for a in sorted(graph):
        la = layer_of(a)
        for b in sorted(graph[a]):
            lb = layer_of(b)
            if la is None or lb is None:
                continue  # test_every_module_has_a_layer names them
            if lb[0] > la[0]:
                out.append(f"{a} ({LAYERS[la[0]][0]}) -> {b} ({LAYERS[lb[0]][0]})")
            elif lb[0] == la[0] and lb[1] != la[1]:
                out.append(f"{a} ({la[1]}) -> {b} ({lb[1]}): siblings")
    return out


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            mods[".".join((pkg,) + rel)] = path
    return mods


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return name in mods and mods[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    """Every import of a fastft module by a fastft module, wherever it is written."""
    mods = _modules()

    def target(name: str) -> str | None:  # the longest fastft module that ``name`` names
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if _is_package(mod, mods) else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for n in names:
                t = target(n)
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    g = import_graph()
    assert "fastft.recipe" in g["fastft.cli"]  # imported inside a command function only
    assert "fastft.kernels.nf4" in g["fastft.kernels.lora"]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (module or function level): " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if layer_of(m) is None)
    assert not missing, "modules without a layer in LAYERS: " + ", ".join(missing)


def test_the_layer_check_finds_an_upward_and_a_sibling_edge():
    g = {"fastft.files": {"fastft.train"}, "fastft.data.cache": {"fastft.models.named"}, "fastft.train": {"fastft.files"}}
    assert upward_edges(g) == ["fastft.data.cache (data) -> fastft.models.named (models): siblings",
                               "fastft.files (base) -> fastft.train (train)"]


def test_no_import_points_up():
    found = upward_edges(import_graph())
    assert not found, "imports that point up a layer (module or function level):\n" + "\n".join(found)


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{m} ({n})" for m, n in sorted(long.items()))


def test_recipe_loads_without_the_model_stack():
    code = ("import sys; from fastft import recipe; recipe.load('recipes/tiny-demo.yaml'); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
