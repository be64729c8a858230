"""PyTorch's eval computes what the integer runtime computes, on a deep network.

A conv + BatchNorm (+ ReLU) whose output the dataflow placement quantizes is requantized in eval as
onnxruntime's QLinearConv does after the exporter folded the BatchNorm (float32 folded step and
int32 bias, multiplier fp32(s_x * s_w / s_y), round half to even), so near-tie values that used to
round differently in float and integer arithmetic, and move every later layer, now agree.

Measured on the GaitBase-size network (64-128-256-512, [1, 4, 4, 1], 8 frames, W4A4; too slow for
the suite): cosine 0.99951 / 0.99946 / 0.99911 before, 1.0 / 1.0 / 0.9999999 after. On the narrower
network here the conv requantization alone changes nothing (W4A4 0.9999967 on one sequence either
way; what is left is not the convs', see the module's floor), so this test guards the path rather
than reproducing the old failure.
"""
import copy

import pytest
import torch
from conftest import w8_cosine_floor
from torch import nn

pytest.importorskip("onnxruntime")


def _calibrated(bits, channels=(16, 32, 64, 128), layers=(1, 4, 4, 1), frames=6):
    from qgait_plugin.bench.export_speed import Embeddings
    from qgait_plugin.local.model import GaitBaseLite, register_quant_handlers
    from qgait_plugin.quant.convert import quantize_model

    register_quant_handlers()
    torch.manual_seed(0)
    fp = GaitBaseLite(channels, layers, (1, 2, 2, 1), (16,), 64, 10)
    g = torch.Generator().manual_seed(2)
    calib = (torch.rand(4, frames, 64, 44, generator=g) > 0.5).float()
    for m in fp.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    fp.train()
    with torch.no_grad():
        for c in calib.split(2):
            fp(c)
    q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}}, example_inputs=calib[:1])
    q.train()
    with torch.no_grad():
        for c in calib.split(2):
            q(c)
    return Embeddings(q).eval(), frames


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_deep_network_agrees_with_onnxruntime_per_sequence(tmp_path, bits):
    from qgait_plugin.export.deploy import export_and_check

    head, frames = _calibrated(bits)
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.rand(1, frames, 64, 44, generator=g) > 0.5).float() for _ in range(3)]
    res = export_and_check(head, seqs[0], str(tmp_path / "m.onnx"), checks=seqs, runs=0)
    assert res["problems"] == []
    floor = 0.99999 if bits < 8 else w8_cosine_floor(bits)
    assert min(res["cosines"]) >= floor, res["cosines"]


def test_eval_requantizes_conv_outputs_as_the_runtime_does():
    head, frames = _calibrated(4, channels=(8, 16), layers=(1, 1), frames=3)
    convs = [m for m in head.modules() if getattr(m, "qgait_output_quant", None) is not None]
    assert len(convs) >= 4  # the stem and each block's convs know the quantizer of their output
    x = (torch.rand(1, frames, 64, 44) > 0.5).float()
    with torch.no_grad():
        out = head(x)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_residual_adds_compute_the_runtimes_qlinearadd_so_outputs_agree_to_float_rounding(tmp_path):
    """The same network at W4A4: on the third sequence one residual add rounded a tie the other way in
    float than onnxruntime's QLinearAdd (max deviation 4.7e-3 of the largest output, cosine 0.9999967);
    with the adds computed in the kernel's arithmetic (quant/qlinear_add.py) every output is within
    float32 rounding (3e-7 here)."""
    from qgait_plugin.export.onnx_export import export_onnx
    from qgait_plugin.export.runtime import cpu_session, run_session

    head, frames = _calibrated(4)
    placement = head.model.qgait_placement
    assert len(placement.plan.adds) == 11  # 10 residual adds and HPP's mean + max
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.rand(1, frames, 64, 44, generator=g) > 0.5).float() for _ in range(3)]
    path = str(tmp_path / "m.onnx")
    export_onnx(head, (seqs[0],), path)
    sess = cpu_session(path, 1)
    for x in seqs:
        with torch.no_grad():
            want = head(x)
        got = torch.from_numpy(run_session(sess, x.numpy())[0])
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


class LeakyNet(nn.Module):
    """GaitSet's shape: convs with no BatchNorm, each followed by LeakyReLU, max pooling, a mean at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 5, padding=2, bias=False)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.fc = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = nn.functional.leaky_relu
        y = act(self.c2(act(self.c1(x))))
        y = act(self.c3(nn.functional.max_pool2d(y, 2)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("bits", [8, 4])
def test_convs_without_batchnorm_requantize_as_qlinearconv(tmp_path, bits):
    """A conv whose output the placement quantizes with no BatchNorm between (conv -> LeakyReLU) is
    requantized in eval as QLinearConv does (GLN at OpenGait width: cosine 0.99995 -> 1.0, GaitSet
    0.9999996 -> 1.0); outputs agree with onnxruntime to float32 rounding."""
    from qgait_plugin.export.onnx_export import export_onnx
    from qgait_plugin.export.runtime import cpu_session, run_session
    from qgait_plugin.quant.convert import quantize_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 1, 32, 22, generator=g) > 0.5).float()
    q = quantize_model(LeakyNet(), {"weight": {"bits": bits}, "act": {"bits": bits}}, example_inputs=(x[:1],))
    assert [getattr(q, c).__dict__.get("qgait_requant_direct") is not None for c in ("c1", "c2", "c3")] == [True] * 3
    q.train()
    with torch.no_grad():
        q(x)
    q.eval()
    path = str(tmp_path / "m.onnx")
    export_onnx(q, (x[:1],), path)
    sess = cpu_session(path, 1)
    for i in range(len(x)):
        with torch.no_grad():
            want = q(x[i:i + 1])
        got = torch.from_numpy(run_session(sess, x[i:i + 1].numpy())[0])
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, i
