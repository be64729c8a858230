"""The ``qgait`` command: uniform command modules, and expected failures printed once by ``main``."""
from __future__ import annotations

import argparse
import importlib
import sys

import pytest

from qgait_plugin.cli import COMMANDS, build_parser, main
from qgait_plugin.errors import ConfigError, InputNotFound, QGaitError


def test_every_command_module_has_the_same_two_functions():
    from qgait_plugin.bench.cli import BENCHES

    modules = [m for _, m, _ in COMMANDS] + [m for m, _ in BENCHES.values()]
    for name in modules:
        mod = importlib.import_module(name)
        assert callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "run", None)), name
        assert mod.__doc__, f"{name}: its docstring is the command's --help description"
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [c for c, _, _ in COMMANDS]


def test_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "synth" in capsys.readouterr().out
    assert main([]) == 0 and "COMMAND" in capsys.readouterr().out


def test_expected_failures_print_one_line_and_exit_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "fp.json"), str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgait compare: ") and "fp.json: no such file" in err and "Traceback" not in err
    assert main(["patch", "status", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"qgait patch: {tmp_path} is not an OpenGait checkout")
    assert main(["synth", "--out", str(tmp_path / "s"), "--subjects", "2", "--types", "xx-01"]) == 2
    assert "qgait synth: SynthConfig.types: unknown type 'xx-01'" in capsys.readouterr().err
    assert main(["train", "--cfgs", str(tmp_path / "missing.yaml")]) == 2
    assert "qgait train: " in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import qgait_plugin.opengait.compare as compare

    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(compare, "compare_files", broken)
    with pytest.raises(KeyError):
        main(["compare", "a.json", "b.json"])


def test_every_expected_failure_is_a_qgait_error():
    from qgait_plugin.layout import DataError
    from qgait_plugin.opengait.compare import CompareError
    from qgait_plugin.opengait.env import OpenGaitNotFound
    from qgait_plugin.opengait.launcher import LaunchError
    from qgait_plugin.opengait.patching import PatchError

    for cls in (ConfigError, InputNotFound, DataError, CompareError, OpenGaitNotFound, LaunchError, PatchError):
        assert issubclass(cls, QGaitError), cls
    # callers that caught the built-in types still do
    assert issubclass(ConfigError, ValueError) and issubclass(InputNotFound, FileNotFoundError)
    assert issubclass(CompareError, ValueError) and issubclass(DataError, ValueError)


def test_module_entry_point(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-m", "qgait_plugin", "compare", str(tmp_path / "x.json"),
                           str(tmp_path / "y.json")], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("qgait compare: ")
