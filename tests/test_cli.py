"""The ``qgait`` command: uniform command modules, and expected failures printed once by ``main``."""
from __future__ import annotations

import argparse
import importlib
import os
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


# -- user-input failures of the built-in host: one line naming the file, exit code 2, no traceback


def _one_line(capsys, command):
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"qgait {command}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Traceback" not in captured.out
    return err


def _write_config(path, **sections):
    """A built-in-host config whose data paths are never read: every failure below comes first."""
    import yaml

    cfg = {"data_cfg": {"dataset_root": str(path.parent / "no-data"),
                        "dataset_partition": str(path.parent / "no-data" / "partition.json")},
           "model_cfg": {"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                         "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
           "trainer_cfg": {"output_root": str(path.parent / "out"), "save_name": "run", "total_iter": 2}}
    for name, sec in sections.items():
        cfg[name] = {**cfg.get(name, {}), **sec}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("command", ["train", "test", "export"])
def test_missing_cfgs_file(tmp_path, capsys, command):
    missing = tmp_path / "missing.yaml"
    extra = ["--out", str(tmp_path / "m.onnx")] if command == "export" else []
    assert main([command, "--cfgs", str(missing)] + extra) == 2
    assert f"{missing}: config file not found" in _one_line(capsys, command)


def test_cfgs_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer_cfg: [1\n")
    assert main(["train", "--cfgs", str(bad)]) == 2
    assert f"{bad}: not a valid YAML file" in _one_line(capsys, "train")


def test_test_without_a_checkpoint(tmp_path, capsys):
    cfg = _write_config(tmp_path / "fp.yaml")
    assert main(["test", "--cfgs", cfg, "--no-progress"]) == 2  # restore_hint 0: the latest one
    err = _one_line(capsys, "test")
    ck_dir = tmp_path / "out" / "SynthGait" / "GaitBaseLite" / "run" / "checkpoints"
    assert "evaluator_cfg.restore_hint: 0 asks for the latest checkpoint of 'run'" in err and str(ck_dir) in err

    cfg = _write_config(tmp_path / "fp5.yaml", evaluator_cfg={"restore_hint": 5})  # one iteration's checkpoint
    assert main(["test", "--cfgs", cfg, "--no-progress"]) == 2
    assert f"evaluator_cfg.restore_hint: '{ck_dir / 'run-00005.pt'}' does not exist" in _one_line(capsys, "test")


def test_garbage_checkpoint_as_init_from(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("this is not a checkpoint\n")
    cfg = _write_config(tmp_path / "q.yaml", quant={"weight": {"bits": 4}, "act": {"bits": 4},
                                                    "init_from": str(garbage)})
    assert main(["train", "--cfgs", cfg, "--no-progress"]) == 2
    assert f"quant.init_from: '{garbage}' is not a PyTorch checkpoint" in _one_line(capsys, "train")


def test_checkpoint_of_another_config(tmp_path, capsys):
    from qgait_plugin.checkpoint import write_checkpoint
    from qgait_plugin.local.config import load_config
    from qgait_plugin.local.model import build_model

    fp_cfg = load_config(_write_config(tmp_path / "fp.yaml"))
    fp = tmp_path / "fp.pt"
    write_checkpoint({"model": build_model(fp_cfg["model_cfg"]).state_dict()}, str(fp))
    cfg = _write_config(tmp_path / "q.yaml", quant={"weight": {"bits": 4}, "act": {"bits": 4}},
                        evaluator_cfg={"restore_hint": str(fp)})
    assert main(["test", "--cfgs", cfg, "--no-progress"]) == 2
    err = _one_line(capsys, "test")
    assert f"evaluator_cfg.restore_hint: '{fp}' does not fit the configured model" in err and "missing keys" in err


@pytest.mark.parametrize("section, value, message", [
    ("trainer_cfg", {"device": "gpu"}, "trainer_cfg.device: 'gpu' is not a device"),
    ("trainer_cfg", {"num_threads": -1}, "trainer_cfg.num_threads: expected an int >= 0, got -1"),
])
def test_bad_trainer_settings(tmp_path, capsys, section, value, message):
    cfg = _write_config(tmp_path / "c.yaml", **{section: value})
    assert main(["train", "--cfgs", cfg, "--no-progress"]) == 2
    assert message in _one_line(capsys, "train")


def test_bad_command_line_numbers(tmp_path, capsys):
    cfg = _write_config(tmp_path / "q.yaml", quant={"weight": {"bits": 4}, "act": {"bits": 4}})
    assert main(["export", "--cfgs", cfg, "--out", str(tmp_path / "m.onnx"), "--runs", "0"]) == 2
    assert "--runs: 0;" in _one_line(capsys, "export")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--threads", "-1"]) == 2
    assert "--threads: -1;" in _one_line(capsys, "demo")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--configs", str(tmp_path)]) == 2
    assert f"--configs {tmp_path}: missing ['fp.yaml'" in _one_line(capsys, "demo")
    assert not (tmp_path / "demo").exists()  # refused before generating any data


@pytest.mark.parametrize("front", [["--local-rank=1"], ["--local_rank=1"], ["--local_rank", "1"]])
def test_torch_distributed_launch_rank_in_front_of_the_command(monkeypatch, capsys, front):
    """`python -m torch.distributed.launch -m qgait_plugin opengait ...` puts the rank flag before the
    command: it becomes LOCAL_RANK (as torchrun sets it) and the command parses as usual."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        main(front + ["--version"])
    assert e.value.code == 0 and "qgait-plugin" in capsys.readouterr().out
    assert os.environ["LOCAL_RANK"] == "1"
    with pytest.raises(SystemExit, match="--local-rank 'x': expected a non-negative integer"):
        main(["--local-rank=x", "--version"])
