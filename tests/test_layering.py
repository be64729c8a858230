"""The import graph points from the hosts to the core, never back; the config never loads the layers.

The core (the package root, the ``quant:`` config and the quantizer specs, quantizers and
conversion, IDD and the teacher, parameter groups, the schedule, checkpoints, export, and the
helpers every layer uses) must import without any host: the OpenGait adapter, the built-in trainer,
the generator, the benchmarks or the CLI can be deleted and the core still works. The core is every
module of the package that is not a host, so a new core module is checked without being listed.
Checked twice: by importing every core module in a fresh interpreter and looking at what got
loaded, and by reading every ``import`` in the core's source (a lazy import inside a function never
runs at import time, but still points back). Separately, ``config``, ``spec`` and ``errors`` never
import ``quant/``: reading a config must not need the layers.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "qgait_plugin"
HOSTS = ("qgait_plugin.local", "qgait_plugin.opengait", "qgait_plugin.synth", "qgait_plugin.bench",
         "qgait_plugin.cli", "qgait_plugin.__main__")
#: modules that read the config and must not load the quantized layers
CONFIG_SIDE = ("config.py", "spec.py", "errors.py")


def _module_name(path: Path) -> str:
    parts = list(path.resolve().relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _within(module: str, prefixes: Tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_host(module: str) -> bool:
    return _within(module, HOSTS)


#: every source file of the package outside the hosts
CORE_FILES: List[Path] = [p for p in sorted(PKG.rglob("*.py")) if not _is_host(_module_name(p))]


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


def _imports_of(path: Path) -> Iterator[Tuple[int, str]]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _imported_names(path.read_text(), package)


def test_the_core_is_what_it_should_be():
    names = {_module_name(p) for p in CORE_FILES}
    assert {"qgait_plugin", "qgait_plugin.config", "qgait_plugin.spec", "qgait_plugin.errors",
            "qgait_plugin.checkpoint", "qgait_plugin.teacher", "qgait_plugin.param_groups", "qgait_plugin.schedule",
            "qgait_plugin.distill", "qgait_plugin.layout", "qgait_plugin.atomic", "qgait_plugin.quant.convert",
            "qgait_plugin.export.qdq"} <= names
    assert not [n for n in names if _is_host(n)]


def test_core_imports_load_no_host():
    """Importing every core module (each submodule of the core packages too) loads no host module."""
    modules = [_module_name(p) for p in CORE_FILES]
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


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_core_source_never_imports_a_host(path):
    """Every import statement of the core, lazy ones inside functions included, stays below the hosts."""
    bad = [f"{path.relative_to(REPO)}:{line}: {mod}" for line, mod in _imports_of(path) if _is_host(mod)]
    assert not bad, "core module imports a host:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", CONFIG_SIDE)
def test_config_does_not_load_the_layers(name):
    bad = [mod for _, mod in _imports_of(PKG / name) if _within(mod, ("qgait_plugin.quant",))]
    assert not bad, f"{name} imports {bad}"


def test_the_static_check_sees_lazy_and_relative_imports():
    """The checker itself: imports inside a function, relative ones and import_module calls are found."""
    source = ("import torch\n"
              "def f():\n    from ..local import trainer\n    from .. import opengait\n"
              "    import importlib\n    importlib.import_module('qgait_plugin.bench.cli')\n"
              "    from ..cli import main\n")
    found = [mod for _, mod in _imported_names(source, "qgait_plugin.quant") if _is_host(mod)]
    assert {"qgait_plugin.local", "qgait_plugin.opengait", "qgait_plugin.bench.cli", "qgait_plugin.cli"} <= set(found)
    assert not [mod for _, mod in _imported_names("from ..config import QuantConfig\n", "qgait_plugin.quant")
                if _is_host(mod)]
    # a name that merely starts like a host is not one
    assert not _is_host("qgait_plugin.client") and not _is_host("qgait_plugin.localize")
