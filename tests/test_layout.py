"""The package's shape: every module imports on its own, and imports only run down the layers.

Layers: ``programs`` (pure DSPy) <- ``dspy_ray`` <- ``stages`` <- ``tasks`` <- ``pipelines`` / ``optimize``
/ ``serve``.  A module may import its own package and the packages below it; the three top packages
do not import each other.  Imports inside functions count too: they tie modules together just the same.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"programs": 0, "dspy_ray": 1, "stages": 2, "tasks": 3, "pipelines": 4, "optimize": 4, "serve": 4}


def package_modules() -> list[str]:
    mods = []
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods.append(".".join(parts))
    return mods


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def test_imports_only_run_down_the_layers():
    wrong = []
    for pkg, layer in LAYERS.items():
        for path in (ROOT / pkg).rglob("*.py"):
            for other in imported_packages(path) - {pkg}:
                if LAYERS[other] >= layer:
                    wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not wrong, "\n".join(sorted(wrong))


def module_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (anywhere in the file, functions included)."""
    modules = set(package_modules())
    graph: dict[str, set[str]] = {}
    for module in modules:
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__init__.py"
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        graph[module] = {n for n in names if n in modules and n != module}
    return graph


def test_no_import_cycles():
    graph = module_graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module first in a new interpreter: no hidden dependence on another module having loaded first."""
    modules = package_modules()
    assert len(modules) > 30
    # One interpreter per module, run a few at a time (each pays DSPy's import once).
    script = "import importlib, sys; importlib.import_module(sys.argv[1])"
    failures = []
    batch = 6
    for i in range(0, len(modules), batch):
        procs = [(m, subprocess.Popen([sys.executable, "-c", script, m], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)) for m in modules[i:i + batch]]
        for module, proc in procs:
            _, err = proc.communicate(timeout=300)
            if proc.returncode:
                failures.append(f"{module}: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    assert not failures, "\n".join(failures)
