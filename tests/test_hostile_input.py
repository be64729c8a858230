"""The issue's hostile and careless inputs, one test (or a few) per case, named after it.

Every expected failure goes through ``qgait`` (``cli.main``) where the issue went through the CLI:
exit code 2, one line ``qgait <command>: <message>``, no traceback, and the message names the file,
key or value. Cases: 1 code execution on load, 2 diverged runs, 3 stale checkpoints and reused
output folders, 4 ``qgait patch``, 6 data files, 7 config loading, 8 tracebacks instead of messages.
(Case 5, export overwriting its inputs, belongs to the export command's own tests.)
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qgait_plugin.cli import main
from qgait_plugin.compat import load_weights_only
from qgait_plugin.errors import ConfigError, NonFiniteError

REPO = Path(__file__).resolve().parents[1]
TYPES = ("nm-01", "nm-02", "nm-05", "bg-01", "cl-01")


def _one_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(f"qgait {command}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Traceback" not in captured.out
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from qgait_plugin.local.fixtures import write_random_dataset

    root = tmp_path_factory.mktemp("data")
    part = write_random_dataset(str(root), subjects=4, train=2, views=("000", "090"), frames=4, types=TYPES)
    return root, Path(part)


def _config(path: Path, data, **sections) -> str:
    root, part = data
    cfg = {"data_cfg": {"dataset_root": str(root), "dataset_partition": str(part), "resolution": [16, 11],
                        "cache": False},
           "model_cfg": {"channels": [4, 8], "layers": [1, 1], "strides": [1, 2], "bin_num": [4],
                         "SeparateFCs": {"out_channels": 8}, "SeparateBNNecks": {"class_num": 4}},
           "trainer_cfg": {"output_root": str(path.parent / "out"), "save_name": "run", "total_iter": 2,
                           "save_iter": 2, "sampler": {"batch_size": [2, 2], "frames_num_fixed": 3}},
           "evaluator_cfg": {"sampler": {"frames_all_limit": 4}}}
    for name, sec in sections.items():
        cfg[name] = {**cfg.get(name, {}), **sec}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _ck_dir(tmp_path: Path, save_name: str = "run") -> Path:
    return tmp_path / "out" / "SynthGait" / "GaitBaseLite" / save_name / "checkpoints"


# ------------------------------------------------------------------------------------------------
# case 1: loading a checkpoint or a data file never runs code


class _Payload:
    """What a hostile file holds: unpickling it would run a shell command that leaves a marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "iteration": 2, "payload": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("route", ["quant.init_from", "resume", "test", "export", "ablate"])
def test_case1_checkpoint_with_code_is_refused_not_run(tmp_path, data, capsys, route):
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    quant = {"weight": {"bits": 4}, "act": {"bits": 4}}
    if route == "quant.init_from":
        argv = ["train", "--cfgs", _config(tmp_path / "c.yaml", data, quant={**quant, "init_from": str(evil)})]
    elif route == "resume":
        evil = _evil_checkpoint(_ck_dir(tmp_path) / "run-00002.pt", marker)
        argv = ["train", "--cfgs", _config(tmp_path / "c.yaml", data, trainer_cfg={"restore_hint": 2, "total_iter": 4})]
    elif route == "test":
        argv = ["test", "--cfgs", _config(tmp_path / "c.yaml", data, evaluator_cfg={"restore_hint": str(evil)})]
    elif route == "export":
        argv = ["export", "--cfgs", _config(tmp_path / "c.yaml", data, quant=quant,
                                            evaluator_cfg={"restore_hint": str(evil)}),
                "--out", str(tmp_path / "m.onnx")]
    else:  # a "finished demo" whose FP checkpoint is hostile
        demo = tmp_path / "demo"
        (demo / "data").mkdir(parents=True)
        (demo / "data" / "partition.json").write_text(json.dumps({"TRAIN_SET": ["001"], "TEST_SET": ["002"]}))
        evil = _evil_checkpoint(demo / "output" / "SynthGait" / "GaitBaseLite" / "fp" / "checkpoints" / "fp-00020.pt",
                                marker)
        argv = ["ablate", "--demo-dir", str(demo), "--variants", "lsq", "--quick", "--no-progress"]
    assert main(argv + ["--no-progress"] * (argv[0] in ("train", "test"))) == 2
    err = _one_line(capsys, argv[0])
    assert f"'{evil}' holds objects that are not tensors or plain data" in err and "system" in err
    assert not marker.exists()


def test_case1_dataset_pickle_with_code_is_refused_not_run(tmp_path, data, capsys):
    import shutil

    from qgait_plugin.layout import DataError
    from qgait_plugin.synth.difficulty import load_geis

    root = tmp_path / "data"
    shutil.copytree(data[0], root)
    marker = tmp_path / "PWNED"
    evil = root / "001" / "nm-01" / "000" / "000.pkl"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    cfg = _config(tmp_path / "c.yaml", (root, root / "partition.json"))
    assert main(["train", "--cfgs", cfg, "--no-progress"]) == 2
    assert f"{evil}: not a pickled numpy array" in _one_line(capsys, "train")
    with pytest.raises(DataError, match="refusing global (posix|os|nt).system"):
        load_geis(root, ["001"])  # the generator's difficulty probe reads through the same reader
    assert not marker.exists()


def test_case1_packed_file_with_code_is_refused(tmp_path):
    from qgait_plugin.checkpoint import CheckpointError
    from qgait_plugin.export.packed import load_packed

    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(tmp_path / "m.qgait", marker)
    with pytest.raises(CheckpointError, match="m.qgait' holds objects that are not tensors"):
        load_packed(torch.nn.Linear(2, 2), str(evil))
    assert not marker.exists()


#: the only places that may deserialize: the checkpoint reader's weights-only load (compat.py: torch's
#: own, or an allowlisting unpickler on torch 1.13), the restricted array unpickler, and the CPU
#: redirection of OpenGait's own torch.load (it only changes map_location for OpenGait's loader)
DESERIALIZERS = {("torch", "load"): {"compat.py", "opengait/runtime.py"},
                 ("pickle", "load"): set(), ("pickle", "loads"): set(),
                 ("pickle", "Unpickler"): {"layout.py", "compat.py"},
                 ("np", "load"): set(), ("numpy", "load"): set(), ("yaml", "load"): set(),
                 ("yaml", "safe_load"): set(), ("yaml", "unsafe_load"): set(), ("yaml", "full_load"): set(),
                 ("yaml", "SafeLoader"): {"yamlfile.py"}, ("yaml", "Loader"): set()}


def test_case1_every_read_goes_through_the_one_reader():
    pkg = REPO / "qgait_plugin"
    found = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                key = (node.value.id, node.attr)
                if key in DESERIALIZERS:
                    found.setdefault(key, set()).add(rel)
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch", "numpy", "yaml"):
                names = {a.name for a in node.names}
                assert not names & {"load", "loads", "Unpickler", "safe_load"}, (rel, names)
    for key, files in found.items():
        assert files <= DESERIALIZERS[key], (key, files - DESERIALIZERS[key])
    assert "load_weights_only(p)" in (pkg / "checkpoint.py").read_text()
    source = (pkg / "compat.py").read_text()
    assert "weights_only=True" in source and "weights_only=False" not in source and "def find_class" in source


# ------------------------------------------------------------------------------------------------
# case 2: a diverged run stops, keeps the last good checkpoint, and nothing scores NaN embeddings


def test_case2_diverged_training_stops_naming_iteration_and_loss_terms(tmp_path, data, capsys):
    cfg = _config(tmp_path / "c.yaml", data, optimizer_cfg={"lr": 1e12},
                  trainer_cfg={"total_iter": 6, "save_iter": 1})
    assert main(["train", "--cfgs", cfg, "--no-progress"]) == 2
    err = _one_line(capsys, "train")
    assert "iteration 2: non-finite loss (triplet=" in err and "softmax=nan" in err
    last = _ck_dir(tmp_path) / "run-00001.pt"
    assert f"The last good checkpoint is {last}" in err
    assert sorted(os.listdir(_ck_dir(tmp_path))) == ["run-00001.pt"]  # nothing written after the divergence
    ck = load_weights_only(last)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_case2_a_nan_model_is_never_saved(tmp_path, data):
    from qgait_plugin.local.config import load_config
    from qgait_plugin.local.trainer import Trainer

    tr = Trainer(load_config(_config(tmp_path / "c.yaml", data)), progress=False)
    with torch.no_grad():
        next(tr.model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"iteration 0: non-finite weights \(1 tensors, e.g. \['.*weight'\]\); "
                                             "not saved. No checkpoint of this run was written"):
        tr.save()
    assert not _ck_dir(tmp_path).exists() or not os.listdir(_ck_dir(tmp_path))


@pytest.mark.parametrize("yaml_text, message", [
    ("quant:\n  init_from: fp.pt\n  idd: {enabled: true, weight: .inf}\n", "quant.idd.weight: .inf (line 3)"),
    ("optimizer_cfg:\n  lr: .nan\n", "optimizer_cfg.lr: .nan (line 2)"),
])
def test_case2_non_finite_settings_are_refused_when_read(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert main(["train", "--cfgs", str(cfg)]) == 2
    assert f"{cfg}: {message} is not a finite number" in _one_line(capsys, "train")


def test_case2_test_refuses_nan_embeddings(tmp_path, data, capsys):
    from qgait_plugin.checkpoint import write_checkpoint
    from qgait_plugin.local.config import load_config
    from qgait_plugin.local.model import build_model

    cfg = _config(tmp_path / "c.yaml", data)
    model = build_model(load_config(cfg)["model_cfg"])
    sd = {k: v.fill_(float("nan")) if k.endswith("weight") and v.is_floating_point() else v
          for k, v in model.state_dict().items()}
    ck = _ck_dir(tmp_path) / "run-00002.pt"
    write_checkpoint({"model": sd, "iteration": 2}, str(ck))
    assert main(["test", "--cfgs", cfg, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert f"evaluator_cfg.restore_hint: reading checkpoint {ck}" in captured.out
    assert captured.err.startswith(f"qgait test: {ck}: 20 of 20 sequences have non-finite embeddings")
    assert "rank-1" not in captured.out


# ------------------------------------------------------------------------------------------------
# case 3: no stale "latest" checkpoint, commands say which file they read, no silent overwrite


def test_case3_fresh_run_into_used_save_name_stops_then_overwrite_removes_the_old_run(tmp_path, data, capsys):
    long_run = _config(tmp_path / "long.yaml", data, trainer_cfg={"total_iter": 4, "save_iter": 2})
    assert main(["train", "--cfgs", long_run, "--no-progress"]) == 0
    capsys.readouterr()
    short_run = _config(tmp_path / "short.yaml", data, trainer_cfg={"total_iter": 2, "save_iter": 2})
    assert main(["train", "--cfgs", short_run, "--no-progress"]) == 2
    err = _one_line(capsys, "train")
    assert "trainer_cfg.save_name: 'run' already holds 2 checkpoint(s)" in err and str(_ck_dir(tmp_path)) in err
    assert "['run-00002.pt', 'run-00004.pt']" in err and "--overwrite" in err

    assert main(["train", "--cfgs", short_run, "--no-progress", "--overwrite"]) == 0
    assert "removed 2 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert os.listdir(_ck_dir(tmp_path)) == ["run-00002.pt"]  # the old run-00004 cannot pass for "latest"
    assert main(["test", "--cfgs", short_run, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"evaluator_cfg.restore_hint: reading checkpoint {_ck_dir(tmp_path) / 'run-00002.pt'}" in out


def test_case3_resume_and_init_from_say_which_file_they_read(tmp_path, data, capsys):
    fp = _config(tmp_path / "fp.yaml", data, trainer_cfg={"save_name": "fp"})
    assert main(["train", "--cfgs", fp, "--no-progress"]) == 0
    fp_ck = _ck_dir(tmp_path, "fp") / "fp-00002.pt"
    q = _config(tmp_path / "q.yaml", data, quant={"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": str(fp_ck)},
                trainer_cfg={"save_name": "q", "total_iter": 1, "save_iter": 1})
    assert main(["train", "--cfgs", q, "--no-progress"]) == 0
    assert f"quant.init_from: reading FP weights from {fp_ck}" in capsys.readouterr().out
    resume = _config(tmp_path / "r.yaml", data, quant={"weight": {"bits": 4}, "act": {"bits": 4}},
                     trainer_cfg={"save_name": "q", "total_iter": 2, "restore_hint": 1})
    assert main(["train", "--cfgs", resume, "--no-progress"]) == 0
    assert f"trainer_cfg.restore_hint: reading checkpoint {_ck_dir(tmp_path, 'q') / 'q-00001.pt'}" in \
        capsys.readouterr().out


def _fake_demo(out: Path, quick: bool = True, results: bool = True) -> Path:
    from qgait_plugin.local.demo import DATA_DEFAULT, DATA_QUICK, MARKER

    (out / "data").mkdir(parents=True)
    (out / "data" / "partition.json").write_text(json.dumps({"TRAIN_SET": ["001"], "TEST_SET": ["002"]}))
    settings = {"command": "demo", "quick": quick,
                "data": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in (DATA_QUICK if quick else DATA_DEFAULT).items()}}
    (out / MARKER).write_text(json.dumps(settings))
    if results:
        ck = out / "output" / "SynthGait" / "GaitBaseLite" / "fp" / "checkpoints" / "fp-00020.pt"
        ck.parent.mkdir(parents=True)
        torch.save({"model": {}}, ck)
        (out / "results.json").write_text("{}")
    return out


def test_case3_demo_refuses_an_earlier_demos_results_and_other_settings(tmp_path, capsys):
    from qgait_plugin.errors import OutputExists
    from qgait_plugin.local.demo import check_out_dir

    demo = _fake_demo(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", str(demo), "--no-progress"]) == 2
    err = _one_line(capsys, "demo")
    assert f"--out {demo}: holds results of an earlier demo: ['output', 'results.json']" in err
    assert "--overwrite" in err
    # the documented reuse: a folder holding only the data set of the same settings
    only_data = _fake_demo(tmp_path / "only_data", results=False)
    settings = json.loads((only_data / ".qgait-demo.json").read_text())
    assert check_out_dir(only_data, settings, overwrite=False) is False
    # ... but not one generated with other settings (--quick data under a full demo)
    with pytest.raises(OutputExists, match="a data set generated with other settings"):
        check_out_dir(only_data, {**settings, "quick": False, "data": {"subjects": 50}}, overwrite=False)
    assert check_out_dir(only_data, {**settings, "quick": False, "data": {"subjects": 50}}, overwrite=True) is True
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    with pytest.raises(OutputExists, match=r"entries no demo writes: \['thesis.tex'\]"):
        check_out_dir(stranger, settings, overwrite=False)


def test_case3_ablate_refuses_an_earlier_ablation_and_names_the_fp_checkpoint(tmp_path, capsys):
    demo = _fake_demo(tmp_path / "demo")
    (demo / "ablation_w2.json").write_text("{}")
    assert main(["ablate", "--demo-dir", str(demo), "--quick", "--no-progress"]) == 2
    err = _one_line(capsys, "ablate")
    assert f"{demo}: holds an earlier W2A2 ablation (1 files: ['ablation_w2.json'])" in err and "--overwrite" in err
    # the FP checkpoint is the latest by iteration, and is printed (a stale later file cannot exist: case 3 above)
    torch.save({"model": {}}, demo / "output" / "SynthGait" / "GaitBaseLite" / "fp" / "checkpoints" / "fp-00100.pt")
    assert main(["ablate", "--demo-dir", str(demo), "--quick", "--no-progress", "--overwrite", "--variants",
                 "lsq"]) == 2  # the fake checkpoint holds no weights
    captured = capsys.readouterr()
    assert "ablate: FP checkpoint " + str(demo / "output/SynthGait/GaitBaseLite/fp/checkpoints/fp-00100.pt") \
        in captured.out
    assert "fp-00100.pt does not match GaitBaseLite" in captured.err


def test_case3_synth_refuses_a_data_set_and_overwrite_leaves_no_stale_views(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["synth", "--out", str(out), "--subjects", "2", "--frames", "2", "--types", "nm-01", "--workers", "1"]
    assert main(args + ["--views", "0,90"]) == 0
    capsys.readouterr()
    assert main(args + ["--views", "0"]) == 2
    assert f"--out {out}: already holds a data set (partition.json)" in _one_line(capsys, "synth")
    assert main(args + ["--views", "0", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "001" / "nm-01").iterdir()) == ["000"]  # 090 of the old set is gone


# ------------------------------------------------------------------------------------------------
# case 4: qgait patch finds the import block with Python's parser and never writes a broken file


def _main_py(tmp_path: Path, text, encoding: str = "utf-8") -> Path:
    (tmp_path / "opengait").mkdir(exist_ok=True)
    p = tmp_path / "opengait" / "main.py"
    p.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    return p


@pytest.mark.parametrize("head, last_import_line", [
    ("import os\nfrom pkg import (\n    a,\n    b,\n)\n", 5),                  # parenthesised
    ("import os, \\\n    sys\nfrom x import y\n", 3),                           # backslash-continued
    ("import os\nfrom x import \\\n    y\n", 3),
    ('"""Doc.\n\nimport this is prose, not code\n"""\nimport os\n', 5),         # docstring line 'import ...'
    ("from __future__ import annotations\nimport os  # why\n\n# a comment\nimport sys\n", 5),
    ("import os\n# \x0c a form feed is not a line break\nimport sys\n", 3),
])
def test_case4_patch_inserts_after_the_whole_import_block(tmp_path, head, last_import_line):
    from qgait_plugin.opengait.patching import apply, load_patches, revert, status

    (patch,) = load_patches()
    text = head + "\nX = 1\nimport late\n"
    path = _main_py(tmp_path, text)
    assert "not applied" in status(tmp_path)[0]
    assert f"(line {last_import_line + 1})" in apply(tmp_path)[0]
    new = path.read_text()
    tree = ast.parse(new)  # still parses
    assert new.split("\n")[last_import_line] == patch.insert
    assert any(isinstance(n, ast.Import) and n.names[0].name == "qgait_plugin.opengait.autoload" for n in tree.body)
    assert status(tmp_path)[0].startswith(f"{patch.name}: applied (line {last_import_line + 1})")
    revert(tmp_path)
    assert path.read_text() == text


def test_case4_status_looks_for_the_statement_not_the_text(tmp_path):
    from qgait_plugin.opengait.patching import PatchError, apply, load_patches, status

    (patch,) = load_patches()
    _main_py(tmp_path, f'"""Notes.\n{patch.insert}\n"""\nimport os\n\nX = 1\n')
    assert "not applied" in status(tmp_path)[0]  # the line inside the docstring is not the import
    assert "applied" in apply(tmp_path)[0]
    _main_py(tmp_path, '"""\nimport os\n"""\nX = 1\n')
    with pytest.raises(PatchError, match=r"main\.py: no top-level import statement found"):
        apply(tmp_path)


def test_case4_bom_and_crlf_are_kept(tmp_path):
    from qgait_plugin.opengait.patching import apply, revert

    raw = b"\xef\xbb\xbf# -*- coding: utf-8 -*-\r\nimport os\r\n\r\nX = 1\r\n"
    path = _main_py(tmp_path, raw)
    apply(tmp_path)
    patched = path.read_bytes()
    assert patched.startswith(b"\xef\xbb\xbf") and patched.count(b"\r\n") == raw.count(b"\r\n") + 1
    revert(tmp_path)
    assert path.read_bytes() == raw


@pytest.mark.parametrize("problem", ["latin-1", "read-only", "syntax"])
def test_case4_unusable_main_py_is_a_message_naming_it(tmp_path, capsys, problem):
    text = "import os\n# caf\xe9\nX = 1\n"
    path = _main_py(tmp_path, text, encoding="latin-1" if problem == "latin-1" else "utf-8")
    if problem == "read-only":
        path.chmod(0o444)
    if problem == "syntax":
        path.write_text("import os\ndef broken(:\n")
    before = path.read_bytes()
    assert main(["patch", "apply", "--root", str(tmp_path)]) == 2
    err = _one_line(capsys, "patch")
    expected = {"latin-1": "not UTF-8 text (byte 0xe9 at offset 15)", "read-only": "is read-only",
                "syntax": "the file does not parse as Python (line 2"}[problem]
    assert err.startswith(f"qgait patch: {path}: {expected}")
    assert path.read_bytes() == before and os.listdir(path.parent) == ["main.py"]


# ------------------------------------------------------------------------------------------------
# case 6: data files are checked where they are read, and the file is named


@pytest.mark.parametrize("content, message", [
    (np.zeros((0, 64, 64), np.uint8), "holds 0 frames of 64 x 64; a sequence needs at least one non-empty frame"),
    (np.random.default_rng(0).random((4, 64, 64)), "frames are float64; expected uint8 silhouettes 0..255"),
    ({"frames": [1, 2]}, "holds a dict; expected a numpy array of frames [T, H, W]"),
    (np.zeros((64, 64), np.uint8), "holds shape (64, 64); expected a numpy array of frames [T, H, W]"),
])
def test_case6_bad_sequence_file_is_named(tmp_path, data, capsys, content, message):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data[0], root)
    bad = root / "002" / "bg-01" / "090" / "090.pkl"
    bad.write_bytes(pickle.dumps(content))
    assert main(["train", "--cfgs", _config(tmp_path / "c.yaml", (root, root / "partition.json")),
                 "--no-progress"]) == 2
    err = _one_line(capsys, "train")
    assert f"{bad}: {message}" in err
    if "float64" in message:
        assert "(frames * 255).round().astype(np.uint8)" in err


def test_case6_ids_missing_on_disk_and_empty_partition_are_named(tmp_path, data, capsys):
    root, part = data
    missing = tmp_path / "partition.json"
    missing.write_text(json.dumps({"TRAIN_SET": ["001", "002", "077", "099"], "TEST_SET": ["003", "004"]}))
    assert main(["train", "--cfgs", _config(tmp_path / "c.yaml", (root, missing)), "--no-progress"]) == 2
    assert f"2 of 4 ids listed in {missing} have no sequence files under it: ['077', '099']" in \
        _one_line(capsys, "train")
    missing.write_text("")
    assert main(["train", "--cfgs", _config(tmp_path / "c.yaml", (root, missing)), "--no-progress"]) == 2
    assert f"{missing}: is empty; expected a JSON object" in _one_line(capsys, "train")


# ------------------------------------------------------------------------------------------------
# case 7: config loading


def test_case7_alias_bomb_fails_fast_naming_the_line(tmp_path, capsys):
    lines = ["quant:", "  weight: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghi"):
        prev = "a" if i == 0 else "bcdefghi"[i - 1]
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 9 ** 9 = 387 million values
    t0 = time.perf_counter()
    assert main(["train", "--cfgs", str(bomb)]) == 2
    assert time.perf_counter() - t0 < 5
    err = _one_line(capsys, "train")
    assert f"{bomb}: line " in err and "expands (through aliases) to more than 100,000 values" in err
    assert len(err) < 400


def test_case7_huge_value_in_a_message_is_cut(tmp_path):
    from qgait_plugin.config import QuantConfig

    big = ["x"] * 10
    for _ in range(8):
        big = [big] * 10  # 10**9 values by shared reference: repr() would never finish
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        QuantConfig.from_dict({"weight": big})
    assert time.perf_counter() - t0 < 1 and len(str(e.value)) < 500
    assert str(e.value).startswith("quant.weight: expected a mapping with keys ['bits', 'per_channel'], got list [[")


def test_case7_duplicate_quant_key_names_both_lines(tmp_path, capsys):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("quant:\n  weight: {bits: 4}\n  act: {bits: 4}\ntrainer_cfg: {total_iter: 2}\n"
                   "quant:\n  weight: {bits: 8}\n")
    assert main(["train", "--cfgs", str(cfg)]) == 2
    assert f"{cfg}: quant: duplicate key (lines 1 and 5)" in _one_line(capsys, "train")
    cfg.write_text("quant:\n  weight: {bits: 4, bits: 8}\n")
    assert main(["train", "--cfgs", str(cfg)]) == 2
    assert f"{cfg}: quant.weight.bits: duplicate key (lines 2 and 2)" in _one_line(capsys, "train")


@pytest.mark.parametrize("section, key, value", [
    ({"schedule": {"soft": {"alpha": float("nan")}}}, "quant.schedule.soft.alpha", "nan"),
    ({"schedule": {"soft": {"alpha": 2.0, "alpha_end": float("inf")}}}, "quant.schedule.soft.alpha_end", "inf"),
    ({"schedule": {"lr_scale": float("nan")}}, "quant.schedule.lr_scale", "nan"),
    ({"idd": {"weight": float("nan")}}, "quant.idd.weight", "nan"),
    ({"idd": {"weight": float("inf")}}, "quant.idd.weight", "inf"),
])
def test_case7_validator_refuses_non_finite_floats(section, key, value):
    from qgait_plugin.config import QuantConfig

    with pytest.raises(ConfigError, match=rf"^{key}: {value} is not a finite number$"):
        QuantConfig.from_dict(section)


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n", "~\n"])
def test_case7_empty_config_is_refused(tmp_path, capsys, text):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(text)
    assert main(["train", "--cfgs", str(cfg)]) == 2
    err = _one_line(capsys, "train")
    assert err.startswith(f"qgait train: {cfg}: ") and ("is empty" in err or "holds no settings" in err)


def test_case7_opengait_launcher_reads_configs_through_the_same_loader(tmp_path):
    from types import SimpleNamespace

    from qgait_plugin.opengait.launcher import load_config

    cfg = tmp_path / "og.yaml"
    cfg.write_text("model_cfg: {model: Baseline}\nmodel_cfg: {model: GaitSet}\n")
    og = SimpleNamespace(root=tmp_path)
    with pytest.raises(ConfigError, match=r"og\.yaml: model_cfg: duplicate key \(lines 1 and 2\)"):
        load_config(og, cfg)


# ------------------------------------------------------------------------------------------------
# case 8: messages instead of tracebacks


def test_case8_malformed_yaml_names_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trainer_cfg:\n  total_iter: [1, 2\n")
    assert main(["train", "--cfgs", str(cfg)]) == 2
    err = _one_line(capsys, "train")
    assert f"{cfg}: not a valid YAML file" in err and "line 3, column 1" in err


@pytest.mark.parametrize("content", ["truncated", "random"])
def test_case8_truncated_or_random_checkpoint(tmp_path, data, capsys, content):
    import io

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(64)}}, buf)
    ck = _ck_dir(tmp_path) / "run-00002.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(buf.getvalue()[:300] if content == "truncated" else np.random.default_rng(0).bytes(3000))
    assert main(["test", "--cfgs", _config(tmp_path / "c.yaml", data), "--no-progress"]) == 2
    assert f"evaluator_cfg.restore_hint: '{ck}' is not a PyTorch checkpoint" in _one_line(capsys, "test")


def test_case8_checkpoint_of_another_bit_width_names_the_quantizer(tmp_path, data, capsys):
    from qgait_plugin.checkpoint import write_checkpoint
    from qgait_plugin.local.config import load_config
    from qgait_plugin.local.model import build_model, register_quant_handlers
    from qgait_plugin.quant.convert import quantize_model

    w4 = _config(tmp_path / "w4.yaml", data, quant={"weight": {"bits": 4}, "act": {"bits": 4}})
    register_quant_handlers()
    model = quantize_model(build_model(load_config(w4)["model_cfg"]), load_config(w4)["quant"])
    model.train()(torch.rand(2, 3, 16, 11))  # initialise the steps
    ck = _ck_dir(tmp_path) / "run-00002.pt"
    write_checkpoint({"model": model.state_dict(), "iteration": 2}, str(ck))
    w8 = _config(tmp_path / "w8.yaml", data, quant={"weight": {"bits": 8}, "act": {"bits": 8}})
    assert main(["test", "--cfgs", w8, "--no-progress"]) == 2
    err = _one_line(capsys, "test")
    assert f"evaluator_cfg.restore_hint: '{ck}' does not fit the configured model" in err
    assert "_quant: the checkpoint holds a 4-bit weight quantizer where the model has a 8-bit weight one" in err


@pytest.mark.parametrize("section, message", [
    ({"model_cfg": {"SeparateBNNecks": {"class_num": 0}}},
     "model_cfg.SeparateBNNecks.class_num: expected an int >= 1, got 0"),
    ({"trainer_cfg": {"device": "tpu"}}, "trainer_cfg.device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ({"trainer_cfg": {"device": "meta"}}, "trainer_cfg.device: 'meta' is not a device"),
    ({"trainer_cfg": {"overwrite": "yes"}}, "trainer_cfg.overwrite: expected true or false, got 'yes'"),
])
def test_case8_bad_values_are_messages(tmp_path, data, capsys, section, message):
    assert main(["train", "--cfgs", _config(tmp_path / "c.yaml", data, **section), "--no-progress"]) == 2
    assert message in _one_line(capsys, "train")


def test_case8_cuda_that_is_not_there(tmp_path, data, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--cfgs", _config(tmp_path / "c.yaml", data, trainer_cfg={"device": "cuda"}),
                 "--no-progress"]) == 2
    assert "trainer_cfg.device: 'cuda', but this machine has 0 CUDA device(s)" in _one_line(capsys, "train")


@pytest.mark.parametrize("argv, message", [
    (["--subjects", "0"], "--subjects: 0; need at least 2"),
    (["--frames", "0"], "--frames: 0; need at least 1"),
    (["--noise", "nan"], "--noise: nan; expected a finite number >= 0"),
    (["--spread", "-1"], "--spread: -1.0; expected a finite number >= 0"),
    (["--style-jitter", "inf"], "--style-jitter: inf; expected a finite number >= 0"),
])
def test_case8_synth_numbers_are_checked_not_replaced(tmp_path, capsys, argv, message):
    assert main(["synth", "--out", str(tmp_path / "s")] + argv) == 2
    assert message in _one_line(capsys, "synth")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["synth", "demo"])
def test_case8_out_naming_a_file(tmp_path, capsys, command):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert main([command, "--out", str(f)] + (["--quick"] if command == "demo" else [])) == 2
    assert f"--out {f}: is a file; expected a folder" in _one_line(capsys, command)
    assert f.read_text() == "mine"


_KILLED_WRITER = """
import os, signal, sys
from qgait_plugin.atomic import write_atomic
def write(tmp):
    with open(tmp, 'wb') as f:
        f.write(b'half a checkpoint')
    os.kill(os.getpid(), signal.SIGKILL)
write_atomic(sys.argv[1], write)
"""
_NEXT_WRITER = """
import sys
from qgait_plugin.atomic import write_atomic
write_atomic(sys.argv[1], lambda tmp: open(tmp, 'wb').write(b'whole'))
"""


def test_case8_sigkill_during_save_leaves_a_temp_file_the_next_save_removes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    target = tmp_path / "run-00010.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], env=env)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(f".tmp-qgait-{proc.pid}-") and not target.exists()
    # files the cleanup must never touch: a user's look-alike, and a temp file of a live writer (this process)
    (tmp_path / ".tmp-notes.pt").write_text("mine")
    live = tmp_path / f".tmp-qgait-{os.getpid()}-abcdefgh.pt"
    live.write_text("being written")
    os.utime(live, (0, 0))
    done = subprocess.run([sys.executable, "-c", _NEXT_WRITER, str(tmp_path / "run-00020.pt")], env=env, timeout=120)
    assert done.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".tmp-notes.pt", live.name, "run-00020.pt"])


def test_case7_every_shipped_config_loads_strictly():
    from qgait_plugin.local.config import load_config
    from qgait_plugin.yamlfile import load_yaml

    for path in sorted((REPO / "configs").rglob("*.yaml")):
        assert isinstance(load_yaml(path), dict), path
    for path in sorted((REPO / "configs" / "demo").glob("*.yaml")):
        load_config(str(path))


class _OGLog:
    def log_info(self, msg):
        pass

    log_warning = log_info


class _OGAggregator(torch.nn.Module):
    """OpenGait's loss aggregator's contract: ``(loss_sum, {'scalar/<prefix>/loss': tensor, ...})``."""

    def forward(self, feats):
        info = {f"scalar/{k}/loss": v for k, v in feats.items()}
        return sum(v.mean() for v in feats.values()), info


class _OGBase(torch.nn.Module):
    """The part of OpenGait's BaseModel the quant-aware subclass's training guards rely on."""

    def __init__(self, cfgs, training):
        super().__init__()
        self.msg_mgr, self.cfgs, self.iteration = _OGLog(), cfgs, 0
        self.engine_cfg = cfgs["trainer_cfg"]
        self.build_network(cfgs["model_cfg"])
        self.init_parameters()
        self.loss_aggregator = _OGAggregator()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 10)
        self.saved = []

    def build_network(self, model_cfg):
        self.fc = torch.nn.Linear(4, 2)

    def init_parameters(self):
        pass

    def train_step(self, loss_sum):
        self.iteration += 1
        return True

    def save_ckpt(self, iteration):
        self.saved.append(iteration)


@pytest.mark.parametrize("quant", [True, False])
def test_case2_opengait_qat_stops_on_non_finite_loss_and_weights(quant):
    from qgait_plugin.opengait.quant_model import make_quant_aware

    cls = make_quant_aware(_OGBase)
    cfgs = {"model_cfg": {}, "trainer_cfg": {"enable_float16": False}}
    if quant:
        cfgs["quant"] = {"weight": {"bits": 4}, "act": {"bits": 4}}
    model = cls(cfgs, training=True)
    loss, _ = model.loss_aggregator({"triplet": torch.tensor([0.2, 0.3]), "softmax": torch.tensor(float("nan"))})
    if not quant:  # a config without quant: runs exactly as OpenGait would
        assert model.train_step(loss) is True
        return
    with pytest.raises(NonFiniteError, match=r"^iteration 1: non-finite loss \(triplet=0.25, softmax=nan\)"):
        model.train_step(loss)
    assert model.iteration == 0
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"iteration 5: non-finite weights \(1 tensors, e.g. \['fc.weight'\]\)"):
        model.save_ckpt(5)
    assert model.saved == []
