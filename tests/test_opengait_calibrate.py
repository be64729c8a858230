"""`qgait opengait calibrate`: PTQ of an OpenGait FP checkpoint (skipped without OPENGAIT_ROOT)."""
import os

import pytest
import torch
import yaml

from qgait_plugin.compat import load_weights_only

ROOT = os.environ.get("OPENGAIT_ROOT")
pytestmark = [pytest.mark.opengait, pytest.mark.skipif(not ROOT, reason="needs an OpenGait checkout in OPENGAIT_ROOT")]


@pytest.fixture(scope="module")
def og():
    from qgait_plugin.opengait.env import import_opengait
    from qgait_plugin.opengait.registry import register

    og = import_opengait(ROOT)
    register(og)
    return og


def test_opengait_calibrate_writes_what_test_and_export_read(og, tmp_path, capsys):
    from qgait_plugin.cli import main
    from qgait_plugin.opengait.export import build_network
    from qgait_plugin.opengait.fixtures import tiny_baseline_config, write_tiny_dataset
    from qgait_plugin.opengait.launcher import load_config
    from qgait_plugin.quant.convert import dequantize_model, iter_quantizers

    part = write_tiny_dataset(tmp_path)
    # an FP checkpoint of the tiny Baseline, in OpenGait's layout
    fp_cfg = tiny_baseline_config(tmp_path, part, "fp", quant={})
    (tmp_path / "fp.yaml").write_text(yaml.safe_dump(fp_cfg))
    fp = dequantize_model(build_network(og, load_config(og, tmp_path / "fp.yaml")))
    fp_path = tmp_path / "fp-00001.pt"
    torch.save({"model": fp.state_dict(), "iteration": 1}, fp_path)

    def cfg_file(name, calibrate, init_from=str(fp_path)):
        quant = {"weight": {"bits": 4}, "act": {"bits": 4}, "calibrate": calibrate}
        if init_from:
            quant["init_from"] = init_from
        cfg = tiny_baseline_config(tmp_path, part, name, quant=quant)
        ck = tmp_path / f"output/CASIA-B/Baseline/{name}/checkpoints/{name}-00000.pt"
        cfg["evaluator_cfg"]["restore_hint"] = str(ck)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        return ["opengait", "calibrate", "--root", ROOT, "--workdir", str(tmp_path), "--cfgs",
                str(tmp_path / f"{name}.yaml")], ck

    args, ck = cfg_file("ptq", {"samples": 8, "batch": 4, "frames": 4, "objective": "kd", "iters": 3})
    assert main(args) == 0
    assert "wall time" in capsys.readouterr().out
    saved = load_weights_only(ck)
    assert saved["iteration"] == 0 and saved["calibration"]["objective"] == "kd"
    steps = [k for k in saved["model"] if k.endswith("act_quant.initialized")]
    assert steps and any(bool(saved["model"][k]) for k in steps)
    # qgait opengait export reads it (restore_hint: the file)
    exp = ["opengait", "export", "--root", ROOT, "--workdir", str(tmp_path), "--cfgs", str(tmp_path / "ptq.yaml"),
           "--out", str(tmp_path / "ptq.onnx"), "--runs", "0", "--check", "2"]
    assert main(exp) == 0 and "cosine min" in capsys.readouterr().out
    # a model built from the config loads the steps the calibration set
    model = build_network(og, load_config(og, tmp_path / "ptq.yaml"))
    model.load_state_dict({k: v for k, v in saved["model"].items() if not k.startswith("qgait_state.")})
    assert all(bool(q.initialized) for _, q in iter_quantizers(model) if q.enabled)
    # bad input: one line, exit 2, nothing written
    for name, calib, init, msg in (("big", {"samples": 100000}, str(fp_path), "quant.calibrate.samples: 100000"),
                                   ("noinit", {"samples": 4}, None, "quant.init_from"),
                                   ("task", {"samples": 4, "objective": "task"}, str(fp_path), "'task'")):
        args, ck = cfg_file(name, calib, init)
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()  # OpenGait's DataSet logs its id list before
        assert err[-1].startswith("qgait opengait: ") and msg in err[-1], err
        assert not any(line.startswith("Traceback") for line in err)
        assert not ck.exists()
