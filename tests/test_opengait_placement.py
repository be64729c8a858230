"""The OpenGait host places quantizers from the model's dataflow (skipped without OPENGAIT_ROOT).

A QAT run through the launcher stores its placement plan in OpenGait's checkpoint and the test phase
and the export rebuild it; a checkpoint placed by the block registry (what runs before dataflow
placement wrote) still tests and exports with today's config.
"""
from __future__ import annotations

import os

import pytest
import torch
from test_opengait_integration import _launch

ROOT = os.environ.get("OPENGAIT_ROOT")
pytestmark = [pytest.mark.opengait, pytest.mark.slow,
              pytest.mark.skipif(not ROOT, reason="needs an OpenGait checkout in OPENGAIT_ROOT")]
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import yaml

    from qgait_plugin.opengait.fixtures import tiny_baseline_config, write_tiny_dataset

    d = tmp_path_factory.mktemp("ogp")
    part = write_tiny_dataset(d)
    fp_cfg = tiny_baseline_config(d, part, "fp", total_iter=1, save_iter=1)
    (d / "fp.yaml").write_text(yaml.safe_dump(fp_cfg))
    _launch(["train", "--cfgs", d / "fp.yaml"], d)
    fp_ckpt = d / "output/CASIA-B/Baseline/fp/checkpoints/fp-00001.pt"
    for name, extra in (("df", {}), ("reg", {"residual": {"placement": "registry"}})):
        quant = {"weight": {"bits": 4}, "act": {"bits": 4}, "init_from": str(fp_ckpt),
                 "schedule": {"ste_iters": 1, "soft_iters": 1}, "idd": {"enabled": True}, **extra}
        cfg = tiny_baseline_config(d, part, name, quant=quant, total_iter=2, save_iter=2, test_restore_hint=2)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        quant.pop("residual", None)  # today's config for the same run: dataflow placement by default
        cfg = tiny_baseline_config(d, part, name, quant=quant, total_iter=2, save_iter=2, test_restore_hint=2)
        (d / f"{name}_now.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _model_sd(ws, name):
    from qgait_plugin.checkpoint import read_checkpoint

    return read_checkpoint(ws / f"output/CASIA-B/Baseline/{name}/checkpoints/{name}-00002.pt")["model"]


@pytest.mark.parametrize("name", ["df", "reg"])
def test_qat_run_then_test_and_export_with_todays_config(ws, name, capsys):
    from qgait_plugin.cli import main
    from qgait_plugin.quant.convert import REGISTRY, checkpoint_placement
    from qgait_plugin.quant.placement import Plan

    out = _launch(["train", "--cfgs", ws / f"{name}.yaml"], ws)
    assert "dataflow changed" not in out and "did not run on the example input" not in out, out[-3000:]
    found = checkpoint_placement(_model_sd(ws, name))
    assert isinstance(found, Plan) if name == "df" else found == REGISTRY
    if name == "df":  # every conv's input and output, the adds and the HPP concat
        assert len(found.groups) >= 10
    test = _launch(["test", "--cfgs", ws / f"{name}_now.yaml"], ws)
    assert f"Restore Parameters from output/CASIA-B/Baseline/{name}/checkpoints/{name}-00002.pt" in test
    assert "NM@R1" in test and "dataflow changed" not in test
    args = ["opengait", "export", "--root", ROOT, "--workdir", str(ws), "--cfgs", str(ws / f"{name}_now.yaml"),
            "--out", str(ws / f"{name}.onnx"), "--runs", "0", "--check", "2", "--force"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "cosine min" in ln)
    assert float(line.split("cosine min ")[1].split()[0]) >= 0.999
    assert "stays float:" in printed and "float Conv/MatMul left: none" in printed


def test_example_input_follows_the_config_and_leaves_the_random_state():
    from qgait_plugin.opengait.quant_model import example_inputs

    state = torch.random.get_rng_state()
    (ipts, labs, typs, vies, seql), = example_inputs({"trainer_cfg": {"sampler": {"frames_num_fixed": 7}}})
    assert ipts[0].shape == (1, 7, 64, 44) and set(ipts[0].unique().tolist()) <= {0.0, 1.0}
    assert labs.tolist() == [0] and typs == ["nm-01"] and vies == ["000"] and seql is None
    assert torch.equal(state, torch.random.get_rng_state())
    assert example_inputs({})[0][0][0].shape[1] == 30
