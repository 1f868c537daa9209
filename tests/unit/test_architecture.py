"""The layering of ``src/``, read from the source with ``ast``: no import cycles, and ``triton_vlm.engine`` is
generic machinery that imports nothing from ``triton_vlm.models`` (families plug into it, never the reverse).

An import counts wherever it stands (module level or inside a function: a function-level import only defers a
cycle to the first call); imports under ``if TYPE_CHECKING:`` do not (they never run). The registry's lazy
``(module, class)`` entries are data, not imports.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from .helpers import ROOT

SRC = ROOT / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module under ``src/`` by dotted name (packages by their ``__init__``)."""
    return {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements anywhere below ``node``, but in ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.orelse:
                yield from _import_nodes(ast.Module(body=[statement], type_ignores=[]))
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _import_nodes(child)


def _known(name: str) -> str | None:
    """The innermost module of ``src/`` that ``name`` (a module, or a module's attribute) lives in."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules of ``src/`` that one import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if _modules()[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # ``from a import b``: the module a.b where b is a submodule, else a itself.
        names = [f"{base}.{alias.name}" for alias in node.names]
    for name in names:
        target = _known(name)
        if target is not None and target != module:
            yield target


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """Each module of ``src/`` and the modules of ``src/`` it imports."""
    graph = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = frozenset(t for node in _import_nodes(tree) for t in _targets(module, node))
    return graph


def cycles(graph: dict[str, frozenset[str]]) -> list[frozenset[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# -- the checker itself -------------------------------------------------------------------------------------
def test_cycles_finds_each_strongly_connected_component() -> None:
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a", "e"}),
             "e": frozenset({"d"}), "f": frozenset({"a"})}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["d", "e"]]


def test_the_graph_reads_every_kind_of_import() -> None:
    graph = import_graph()
    assert len(graph) > 50
    # module level, ``from package import submodule``
    assert "triton_vlm.engine.engine" in graph["triton_vlm.engine"]
    # function level
    assert "triton_vlm.tiny" in graph["triton_vlm.models.llava.family"]
    source = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from . import kernels\n"
        "from .kv_cache import SlotKVCache\n"
        "from .. import errors\n"
        "import triton_vlm.engine.scheduler as scheduler\n"
        "if TYPE_CHECKING:\n"
        "    from triton_vlm.models.base import ModelFamily\n"
        "else:\n"
        "    from triton_vlm.sampling import SamplingParams\n"
        "def later():\n"
        "    from triton_vlm.engine.request import EngineRequest\n")
    targets = {t for node in _import_nodes(source) for t in _targets("triton_vlm.engine.runner", node)}
    assert targets == {"triton_vlm.engine.kernels", "triton_vlm.engine.kv_cache", "triton_vlm.errors",
                       "triton_vlm.engine.scheduler", "triton_vlm.sampling", "triton_vlm.engine.request"}


# -- the rules ----------------------------------------------------------------------------------------------
def test_src_has_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert [sorted(c) for c in found] == []


def test_the_engine_imports_nothing_from_the_model_families() -> None:
    graph = import_graph()
    offending = sorted((module, target) for module, targets in graph.items() if _inside(module, "triton_vlm.engine")
                       for target in targets if _inside(target, "triton_vlm.models"))
    assert offending == []


FAMILY_PACKAGES = ("llava", "llava_next", "llava_onevision", "kosmos2", "moondream2", "qwen2_vl", "smolvlm", "auto")


@pytest.mark.parametrize("name", FAMILY_PACKAGES)
def test_a_family_is_one_package(name: str) -> None:
    """The registry's entry and the family's engine adapter both live in ``models/<family>/``."""
    from triton_vlm.models import get_family

    package = f"triton_vlm.models.{name}"
    assert _modules()[package].name == "__init__.py"
    family = get_family(name)
    assert _inside(type(family).__module__, package)
    if family.engine_adapter_class is not None:
        module, class_name = family.engine_adapter_class
        assert _inside(module, package)
        assert isinstance(family.engine_adapter(), getattr(importlib.import_module(module), class_name))
    # Nothing of one family reaches into another's package.
    others = [f"triton_vlm.models.{o}" for o in FAMILY_PACKAGES if o != name]
    graph = import_graph()
    assert sorted((m, t) for m, targets in graph.items() if _inside(m, package) for t in targets
                  if any(_inside(t, o) for o in others)) == []


def _third_party_imports(path: Path) -> set[str]:
    """The top-level names of everything ``path`` imports, at any level (``if TYPE_CHECKING:`` excluded)."""
    names = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_protocol_package_imports_tritonclient() -> None:
    importers = sorted(module for module, path in _modules().items()
                       if "tritonclient" in _third_party_imports(path))
    assert importers and all(_inside(m, "triton_vlm._protocol") for m in importers), importers


@pytest.mark.parametrize("module", ["triton_vlm.openai.process", "triton_vlm.launcher", "triton_vlm.cli.main"])
def test_an_entry_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """The graph above sees modules, not the package ``__init__`` each import runs first: importing
    ``openai.process`` first once met a half-initialized module through ``launcher/__init__``."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
