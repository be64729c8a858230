"""OpenGait models out as integer ONNX graphs (skipped without OPENGAIT_ROOT).

GaitBase (Baseline), DeepGaitV2 (2d, p3d, 3d) and GaitGL from the checkout's own configs (narrowed
for CPU time), quantized, calibrated on binary frames, exported: onnxruntime must reproduce the
fake-quantized PyTorch model, and for the residual backbones run every conv, add and the per-part
FC as integer ops. Then ``qgait opengait export`` end to end on a Baseline QAT checkpoint.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

ROOT = os.environ.get("OPENGAIT_ROOT")
pytestmark = [pytest.mark.opengait, pytest.mark.skipif(not ROOT, reason="needs an OpenGait checkout in OPENGAIT_ROOT")]
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def og():
    from qgait_plugin.opengait.env import import_opengait
    from qgait_plugin.opengait.registry import register

    og = import_opengait(ROOT)
    register(og)
    return og


def _calibrated(og, name: str, bits: int) -> nn.Module:
    """Zoo model ``name`` (narrow widths), BatchNorm statistics and quantizer steps set from binary frames."""
    from qgait_plugin import quantize_model
    from qgait_plugin.opengait.export import OpenGaitEmbeddings
    from qgait_plugin.opengait.zoo import SMALL, ZOO, build_bare

    config, ov, _, _, _ = ZOO[name]
    torch.manual_seed(0)
    model = build_bare(og, config, {**ov, **SMALL.get(name, {})})
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    g = torch.Generator().manual_seed(0)
    calib = [(torch.rand(2, 6, 64, 44, generator=g) > 0.5).float() for _ in range(2)]
    head = OpenGaitEmbeddings(model).train()
    with torch.no_grad():
        for x in calib:
            head(x)
        quantize_model(model, {"weight": {"bits": bits}, "act": {"bits": bits}})
        for m in bns:
            m.momentum = 0.0
        head(calib[0])
    return head.eval()


INTEGER = ["GaitBase", "DeepGaitV2-2d", "DeepGaitV2-p3d", "DeepGaitV2-3d"]


@pytest.mark.parametrize("name,bits", [(n, 8) for n in INTEGER] + [("GaitBase", 4), ("GaitGL", 8)])
def test_zoo_model_exports_and_agrees(og, tmp_path, name, bits):
    from qgait_plugin.export.deploy import export_and_check

    head = _calibrated(og, name, bits)
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.rand(1, 6, 64, 44, generator=g) > 0.5).float() for _ in range(2)]
    res = export_and_check(head, seqs[0], str(tmp_path / f"{name}.onnx"), checks=seqs, runs=0)
    assert res["cosine_min"] >= 0.9999, res["cosines"]
    opt = res["optimized_ops"]
    if name in INTEGER:
        assert res["problems"] == []
        assert not any(k.split(":")[-1] in ("Conv", "FusedConv") for k in opt), opt  # no float conv left
        assert opt.get("QLinearConv", 0) + opt.get("com.microsoft:QLinearConv", 0) == res["ops"]["Conv"]
        assert opt.get("com.microsoft:QLinearAdd", 0) == res["ops"]["Add"] - 1  # all but HPP's mean + max
        assert opt.get("com.microsoft:MatMulIntegerToFloat", 0) == 1
        assert res["fp32_bytes"] / res["onnx_bytes"] > 3.0


def test_opengait_export_command(og, tmp_path, capsys):
    import yaml

    from qgait_plugin.cli import main
    from qgait_plugin.opengait.export import build_network
    from qgait_plugin.opengait.fixtures import tiny_baseline_config, write_tiny_dataset
    from qgait_plugin.opengait.launcher import load_config

    part = write_tiny_dataset(tmp_path)
    quant = {"weight": {"bits": 4}, "act": {"bits": 4}}
    cfg = tiny_baseline_config(tmp_path, part, "qat", quant=quant, test_restore_hint=2)
    (tmp_path / "qat.yaml").write_text(yaml.safe_dump(cfg))
    model = build_network(og, load_config(og, tmp_path / "qat.yaml")).train()
    with torch.no_grad():
        model(([(torch.rand(2, 4, 64, 44) > 0.5).float()], [0, 1], ["nm-01"] * 2, ["000"] * 2, None))
    ckpt = tmp_path / "output/CASIA-B/Baseline/qat/checkpoints/qat-00002.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": 2}, ckpt)
    base = ["opengait", "export", "--root", ROOT, "--workdir", str(tmp_path), "--cfgs", str(tmp_path / "qat.yaml")]
    assert main(base + ["--out", str(tmp_path / "m.onnx"), "--packed", str(tmp_path / "m.qgpk"), "--runs", "2",
                        "--check", "2"]) == 0
    out = capsys.readouterr().out
    assert "cosine min" in out and "QLinearConv" in out and (tmp_path / "m.qgpk").stat().st_size > 0
    line = next(ln for ln in out.splitlines() if "cosine min" in ln)
    assert float(line.split("cosine min ")[1].split()[0]) >= 0.9999
    # bad input: the checkpoint as output, an existing file, a config whose bits differ from the checkpoint's
    before = ckpt.read_bytes()
    assert main(base + ["--out", str(ckpt), "--force"]) == 2
    assert ckpt.read_bytes() == before
    assert main(base + ["--out", str(tmp_path / "m.onnx")]) == 2
    assert "--force" in capsys.readouterr().err
    cfg8 = tiny_baseline_config(tmp_path, part, "qat", quant={"weight": {"bits": 8}, "act": {"bits": 8}},
                                test_restore_hint=2)
    (tmp_path / "qat8.yaml").write_text(yaml.safe_dump(cfg8))
    args8 = base[:-1] + [str(tmp_path / "qat8.yaml"), "--out", str(tmp_path / "m8.onnx"), "--runs", "0"]
    assert main(args8) == 2
    assert "does not fit the configured model" in capsys.readouterr().err
    assert not (tmp_path / "m8.onnx").exists()
