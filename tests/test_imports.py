"""The import graph: hosts import the core, the core never imports a host, the config never loads the layers."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qgait_plugin"
CORE = ["__init__.py", "atomic.py", "checkpoint.py", "config.py", "distill.py", "errors.py", "param_groups.py",
        "schedule.py", "spec.py", "teacher.py", "quant", "export"]
HOSTS = ("qgait_plugin.opengait", "qgait_plugin.local", "qgait_plugin.synth", "qgait_plugin.bench", "qgait_plugin.cli")


def _imports(path: Path):
    """Absolute names of the qgait_plugin modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for alias in node.names:  # ``from . import x`` names a module
                yield f"{mod}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _files(entries):
    for e in entries:
        p = PKG / e
        yield from (sorted(p.rglob("*.py")) if p.is_dir() else [p])


@pytest.mark.parametrize("path", list(_files(CORE)), ids=lambda p: str(p.relative_to(PKG)))
def test_core_never_imports_a_host(path):
    bad = [m for m in _imports(path) if m.startswith(HOSTS)]
    assert not bad, f"{path.name} imports host modules {bad}"


@pytest.mark.parametrize("name", ["config.py", "spec.py", "errors.py"])
def test_config_does_not_load_the_layers(name):
    bad = [m for m in _imports(PKG / name) if m.startswith("qgait_plugin.quant")]
    assert not bad, f"{name} imports {bad}"
