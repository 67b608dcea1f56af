"""The layering of docs/architecture.md: core -> engine -> commands, each importing only downward.

- nexus_tune/core never imports the engine or the commands, and imports without torch;
- nexus_tune/engine/ never imports the commands;
- no module imports itself back through others (imports inside functions and under
  TYPE_CHECKING count: they are dependencies all the same).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE, ENGINE, COMMANDS = "nexus_tune.core", "nexus_tune.engine", "nexus_tune.commands"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in (ROOT / "nexus_tune").rglob("*.py")}


def imports(name: str) -> set[str]:
    """The project's modules `name` imports, anywhere in its file."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


@pytest.mark.parametrize("layer, forbidden", [(CORE, (ENGINE, COMMANDS)), (ENGINE, (COMMANDS,))])
def test_layers_import_only_downward(layer, forbidden):
    wrong = sorted((name, target) for name, targets in GRAPH.items() if in_layer(name, layer)
                   for target in targets if any(in_layer(target, f) for f in forbidden))
    assert not wrong, f"{layer} imports upward: {wrong}"


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_core_imports_without_torch_or_the_engine():
    core = sorted(name for name in MODULES if in_layer(name, CORE))
    code = ("import sys\n"
            "class NoTorch:\n"  # any `import torch` now raises
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('the core must not import torch')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            f"import {', '.join(core)}\n"
            "print(sorted(m for m in sys.modules if m.startswith(('nexus_tune.engine', 'nexus_tune.commands'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_test_sees_every_layer():
    """A guard on the test itself: a rename of a layer must not leave these checks looking at nothing."""
    assert {CORE, ENGINE, COMMANDS} <= set(MODULES)
    assert sum(in_layer(n, CORE) for n in MODULES) > 10 and GRAPH["nexus_tune.engine.llm"]
