"""The import graph of the four packages, read statically from their source: no circles, no upward arrows.

Every ``import`` and ``from ... import`` statement counts, wherever it stands: at module level, inside a
function, or under ``if TYPE_CHECKING:``. A function-level import is how a circle hides from Python at import
time, and a TYPE_CHECKING import is a dependency a reader (and a type checker) follows all the same: either way
the two modules can no longer be understood, moved or tested one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("environments", "agents", "amft_vlm", "benchmarks")
"""The packages from the ground up: each may import those before it, never one after it."""


def module_name(path: Path) -> str:
    """``amft_vlm/compare/config.py`` -> ``amft_vlm.compare.config``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    return {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def imported_names(path: Path, name: str, modules: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The modules `path`'s import statements (at any depth) depend on, relative imports resolved.

    ``from pkg import name`` depends on ``pkg.name`` when that is a module in `modules` (the package's
    ``__init__`` runs first, as for every submodule, but it is not what the importer reads), else on ``pkg``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            for alias in node.names:
                found.add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the four packages it imports. ``import a.b.c`` names the module ``a.b.c`` (the
    packages above it run first, but their ``__init__`` is not what the importer depends on)."""
    modules = source_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {target for target in imported_names(path, name, set(modules)) if target in modules and target != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as ``[a, b, ..., a]``, or None (depth-first search, colouring the nodes on the path)."""
    on_path: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        on_path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*on_path[on_path.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        on_path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


KNOWN_UPWARD = {"agents.tiny imports amft_vlm.run.safe_io"}
"""Upward arrows still to remove (issue 24): the tiny model writes its files through amft_vlm's safe writer, which
belongs below agents/. Listed exactly, so a new arrow fails and so does this one's removal (then empty the set)."""


def test_no_package_imports_a_layer_above_it() -> None:
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    upward = [
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        for target in sorted(targets)
        if rank[target.split(".")[0]] > rank[source.split(".")[0]]
    ]
    assert set(upward) == KNOWN_UPWARD, "imports across layers (environments <- agents <- amft_vlm <- benchmarks): " + "; ".join(upward)


def test_the_walk_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    path = tmp_path / "sample.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from amft_vlm.learning.methods import Method\n"
        "def build():\n    from . import sibling\n    import agents.tiny\n"
    )
    names = imported_names(path, "amft_vlm.pkg.sample", {"amft_vlm.pkg.sibling"})
    assert {"amft_vlm.learning.methods", "agents.tiny", "amft_vlm.pkg.sibling"} <= names
    assert "amft_vlm.pkg" not in names  # `from . import sibling` reads the module, not the package's __init__


def test_find_cycle_names_the_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


STAGE_FLOORS = {"run": 0, "rollout": 1, "learning": 2, "evaluation": 3}
"""amft_vlm's stages from the ground up: each may import the floors below it, never one above or a neighbour on its
own floor. Every other module of amft_vlm (``cli``, ``demo``, ``compare``, ``settings_docs``) is the roof, above all."""
ROOF = len(STAGE_FLOORS)


def stage_floor(module: str) -> int:
    """The floor of an amft_vlm module: its stage's, or the roof's."""
    parts = module.split(".")
    return STAGE_FLOORS.get(parts[1], ROOF) if len(parts) > 1 else ROOF


def test_amft_vlm_stages_import_only_the_floors_below() -> None:
    """run <- rollout <- learning <- evaluation <- cli, demo, compare: the tree shows the data path and each stage can be
    read (and tested) with only the ones under it."""
    wrong = [
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        if source.startswith("amft_vlm.") and stage_floor(source) < ROOF
        for target in sorted(targets)
        if target.startswith("amft_vlm.") and stage_floor(target) >= stage_floor(source)
        and target.split(".")[1] != source.split(".")[1]
    ]
    assert not wrong, "an amft_vlm stage imports its own floor or one above: " + "; ".join(wrong)


def test_every_stage_module_sits_in_a_stage() -> None:
    """Only the roof's modules stay directly under amft_vlm/; the stages are folders."""
    top = sorted(path.stem for path in (ROOT / "amft_vlm").glob("*.py") if path.stem != "__init__")
    assert top == ["cli", "demo", "settings_docs"], f"modules directly under amft_vlm/: {top}; put each in its stage's folder"


def test_the_old_flat_paths_import_the_moved_modules_with_a_warning() -> None:
    """``amft_vlm.config`` (the layout before the stages) is the same module as ``amft_vlm.run.config``, and says so."""
    import importlib
    import sys
    import warnings

    import amft_vlm
    from amft_vlm.run import config

    for old in ("amft_vlm.config", "amft_vlm.served.client"):
        sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert importlib.import_module("amft_vlm.config") is config
        assert importlib.import_module("amft_vlm.served.client") is importlib.import_module("amft_vlm.evaluation.served.client")
    assert [str(w.message) for w in caught] == [
        "amft_vlm.config moved to amft_vlm.run.config; import it from there",
        "amft_vlm.served moved to amft_vlm.evaluation.served; import it from there",
        "amft_vlm.served.client moved to amft_vlm.evaluation.served.client; import it from there",
    ]
    assert set(amft_vlm.MOVED_MODULES.values()) <= {module for module in source_modules()}
