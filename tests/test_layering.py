"""The import graph points from the hosts to the core, never back.

The core (the ``quant:`` config, quantizers and conversion, IDD and the teacher, the schedule,
export) must import without any host: the OpenGait adapter, the built-in trainer, the generator or
the benchmarks can be deleted and the core still works. Checked twice: by importing every core
module in a fresh interpreter and looking at what got loaded, and by reading every ``import`` in the
core's source (a lazy import inside a function never runs at import time, but still points back).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

REPO = Path(__file__).resolve().parents[1]
CORE = ["qgait_plugin.config", "qgait_plugin.quant", "qgait_plugin.distill", "qgait_plugin.teacher",
        "qgait_plugin.schedule", "qgait_plugin.export"]
#: below the hosts as well: the package root and the helpers every layer uses
SHARED = ["qgait_plugin", "qgait_plugin.errors", "qgait_plugin.atomic", "qgait_plugin.layout"]
HOSTS = ("qgait_plugin.local", "qgait_plugin.opengait", "qgait_plugin.synth", "qgait_plugin.bench")


def _existing(names: List[str]) -> List[str]:
    """The names that exist in this checkout (``teacher`` arrives with another change)."""
    return [n for n in names if importlib.util.find_spec(n) is not None]


def _files(name: str) -> List[Path]:
    """Source files of a module, or of a package and everything under it."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    if spec.submodule_search_locations:
        if name == "qgait_plugin":  # the root package: its own __init__ only, not the hosts below it
            return [Path(spec.origin)]
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [Path(spec.origin)]


def _module_name(path: Path) -> str:
    rel = path.resolve().relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_names(source: str, package: str) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source`` (a module of ``package``), at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # `from .. import local` names a module too
                yield node.lineno, f"{mod}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _is_host(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HOSTS)


def test_core_imports_load_no_host():
    """Importing every core module (each submodule of the core packages too) loads no host module."""
    modules = [_module_name(p) for n in _existing(CORE + SHARED) for p in _files(n)]
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "qgait_plugin.config" in loaded and "qgait_plugin.quant.convert" in loaded
    assert not [m for m in loaded if _is_host(m)]


def test_core_source_never_imports_a_host():
    """Every import statement of the core, lazy ones inside functions included, stays below the hosts."""
    files = [p for n in _existing(CORE + SHARED) for p in _files(n)]
    assert any(p.name == "convert.py" for p in files) and any(p.name == "schedule.py" for p in files)
    bad = []
    for p in files:
        name = _module_name(p)
        package = name if p.name == "__init__.py" else name.rpartition(".")[0]
        bad += [f"{p.relative_to(REPO)}:{line}: {mod}" for line, mod in _imported_names(p.read_text(), package)
                if _is_host(mod)]
    assert not bad, "core modules import a host:\n" + "\n".join(bad)


def test_the_static_check_sees_lazy_and_relative_imports():
    """The checker itself: imports inside a function, relative ones and import_module calls are found."""
    source = ("import torch\n"
              "def f():\n    from ..local import trainer\n    from .. import opengait\n"
              "    import importlib\n    importlib.import_module('qgait_plugin.bench.cli')\n")
    found = [mod for _, mod in _imported_names(source, "qgait_plugin.quant") if _is_host(mod)]
    assert {"qgait_plugin.local", "qgait_plugin.opengait", "qgait_plugin.bench.cli"} <= set(found)
    assert not [mod for _, mod in _imported_names("from ..config import QuantConfig\n", "qgait_plugin.quant")
                if _is_host(mod)]
