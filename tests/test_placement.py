"""Dataflow placement (quant/placement.py) on a network the project has never seen, nothing registered."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import w8_cosine_floor
from torch import nn

from qgait_plugin.param_groups import qat_param_groups
from qgait_plugin.quant import placement
from qgait_plugin.quant.blocks import QuantBlockMixin
from qgait_plugin.quant.convert import dequantize_model, iter_quantizers, quantize_model
from qgait_plugin.quant.layers import QuantLayerMixin


class UserBlock(nn.Module):
    """A residual block written by a user: names and layout the project has never registered."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.first_bn = nn.BatchNorm2d(cout)
        self.second = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.second_bn = nn.BatchNorm2d(cout)
        self.skip = None if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.first_bn(self.first(x)))
        y = self.second_bn(self.second(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class PartFC(nn.Module):
    """Per-part FC ``[parts, in, out]`` multiplied in the module's own code (no handler registered)."""

    def __init__(self, parts: int, cin: int, cout: int) -> None:
        super().__init__()
        self.weight_bank = nn.Parameter(torch.randn(parts, cin, cout) / cin ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, c, p] -> [n, out, p]
        return x.permute(2, 0, 1).matmul(self.weight_bank).permute(1, 2, 0)


class UserGaitNet(nn.Module):
    """GaitBase-like: conv-BN-ReLU stem, user residual blocks, temporal max, horizontal pooling, per-part FC."""

    def __init__(self, widths=(16, 32, 64), parts: int = 8, embed: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [UserBlock(cin, w, 2 if i in (1, 2) else 1), UserBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.parts = parts
        self.head = PartFC(parts, cin, embed)

    def forward(self, sils: torch.Tensor) -> torch.Tensor:
        n, s, h, w = sils.shape
        f = self.blocks(self.stem(sils.reshape(n * s, 1, h, w)))
        f = f.reshape(n, s, *f.shape[1:]).amax(1)
        z = f.reshape(n, f.shape[1], self.parts, -1)
        return self.head(z.mean(-1) + z.amax(-1))


def _frames(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 4, 32, 22, generator=g) > 0.5).float()


def _calibrated(bits: int = 8, net: nn.Module | None = None) -> tuple:
    torch.manual_seed(0)
    fp = net if net is not None else UserGaitNet()
    x = _frames(2, 1)
    fp.train()
    with torch.no_grad():
        for s in range(3):
            fp(_frames(2, 10 + s))
    fp.eval()
    q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}}, example_inputs=(x,))
    q.train()
    with torch.no_grad():
        for s in range(3):
            q(_frames(2, 20 + s))
    return fp, q.eval(), x


def _convs(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_rules_cover_every_tensor_an_integer_runtime_quantizes():
    _, q, _ = _calibrated()
    plan = q.qgait_placement.plan
    assert not any(isinstance(m, QuantBlockMixin) for m in q.modules())  # nothing from the block registry
    assert isinstance(q.head, QuantLayerMixin) and plan.weight_matmuls == [("head", "weight_bank")]
    covered = {name for g in plan.groups for name in g.layers}
    convs = [n for n, m in q.named_modules() if isinstance(m, nn.Conv2d)]
    # every conv but the stem (exact binary input) reads a placed tensor; so does the per-part FC
    assert covered == set(convs[1:]) | {"head"}
    reasons = [r for g in plan.groups for r in g.reasons]
    assert sum(r.startswith("output of ") for r in reasons) == len(convs)  # each conv's output, after BN/ReLU
    assert sum(r == "add output" for r in reasons) == 6 + 1  # 6 residual adds and the pooling's mean + max
    # the stem's ReLU output feeds a conv and the first add: one quantizer, applied once where it is made
    stem = next(g for g in plan.groups if "output of stem.0" in g.reasons)
    assert "add input" in stem.reasons and stem.out_sites == ["stem.2#0"] and stem.layers == ["blocks.0.first"]
    # the quantizers are registered: iter_quantizers, the state dict and the optimizer's step group see them
    names = [n for n, _ in iter_quantizers(q)]
    assert sum(n.startswith("qgait_placement.") for n in names) == len(q.qgait_placement.quantizers) > 0
    steps = next(g for g in qat_param_groups(q) if g["name"] == "quantizer_steps")["params"]
    assert {id(p) for p in steps} >= {id(m.scaled_log_step) for m in q.qgait_placement.quantizers}


def test_training_step_reaches_every_placed_quantizer_and_eval_is_on_the_grid():
    _, q, x = _calibrated(bits=4)
    q.train()
    q(x).square().mean().backward()
    for name, m in iter_quantizers(q):
        if m.enabled:
            assert m.scaled_log_step.grad is not None and torch.isfinite(m.scaled_log_step.grad).all(), name
    # a placed tensor is on its quantizer's grid wherever it is read: the first add's shortcut input
    seen = {}
    q.blocks[0].register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    q.eval()
    with torch.no_grad():
        q(x)
    step = q.blocks[0].first.act_quant.effective_step()
    v = seen["x"] / step
    assert torch.allclose(v, v.round(), atol=1e-3)


def test_integer_onnx_every_conv_integer_agrees_and_is_small(tmp_path):
    pytest.importorskip("onnxruntime")
    from qgait_plugin.export.onnx_export import export_float_onnx, export_onnx
    from qgait_plugin.export.runtime import open_runtime, optimized_graph_ops

    # GaitBase-like widths: with narrower ones the graph's own bytes keep the file under 3.9x smaller
    fp, q, x = _calibrated(net=UserGaitNet((32, 64, 128, 256), parts=8, embed=64))
    info = export_onnx(q, (x,), str(tmp_path / "q.onnx"))
    fp_info = export_float_onnx(fp, (x,), str(tmp_path / "fp.onnx"))
    assert info["problems"] == []
    ops = optimized_graph_ops(str(tmp_path / "q.onnx"))
    assert ops.get("com.microsoft:QLinearConv", 0) + ops.get("QLinearConv", 0) == len(_convs(fp))
    assert "Conv" not in ops and "MatMul" not in ops and ops.get("com.microsoft:MatMulIntegerToFloat") == 1
    assert ops.get("com.microsoft:QLinearAdd") == 9
    got = torch.from_numpy(open_runtime("ort", str(tmp_path / "q.onnx"), 1).run(x.numpy())[0])
    with torch.no_grad():
        ref = q(x)
    cos = F.cosine_similarity(got.flatten(1).double(), ref.flatten(1).double()).min().item()
    assert cos >= w8_cosine_floor(8), cos  # W8 on AVX2-only CPUs: tests/conftest.py
    assert fp_info["bytes"] / info["bytes"] >= 3.9


def test_checkpoint_loads_from_its_plan_without_a_trace(monkeypatch):
    fp, q, x = _calibrated(bits=4)
    sd = q.state_dict()
    plan = placement.plan_from_state_dict(sd)
    assert plan is not None and plan.to_dict() == q.qgait_placement.plan.to_dict()

    def no_trace(*a, **k):
        raise AssertionError("traced")

    with monkeypatch.context() as mp:
        mp.setattr(placement, "trace", no_trace)
        fresh = quantize_model(copy.deepcopy(fp), {"weight": {"bits": 4}, "act": {"bits": 4}}, plan=plan)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q(x))
    # a copy is independent and dequantizing gives the float network back
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(q)(x), q(x))
        back = dequantize_model(quantize_model(copy.deepcopy(fp), {}, example_inputs=(x,))).eval()
        assert not any(isinstance(m, (placement.Placement, QuantLayerMixin)) for m in back.modules())
        assert not back._forward_hooks and not back.blocks[0]._forward_pre_hooks
        assert torch.allclose(back(x), fp(x), atol=1e-5)


def test_a_plan_that_does_not_match_the_checkpoint_is_an_error():
    from qgait_plugin.errors import ConfigError

    _, q, _ = _calibrated()
    sd = q.state_dict()
    sd["qgait_placement._extra_state"] = {"groups": []}
    with pytest.raises(ConfigError, match="placement"):
        q.load_state_dict(sd)


class Branchy(nn.Module):
    """Two conv branches concatenated, a LeakyReLU, a max pool and a data-dependent path."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 1)
        self.odd = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = F.max_pool2d(F.leaky_relu(self.c(y), 0.1), 2)
        if self.odd:
            y = y.sigmoid()
        return self.d(y * 2.0 if self.odd else y)


def test_concat_shares_one_quantizer_and_a_changed_dataflow_stays_float_with_a_warning():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    q = quantize_model(Branchy(), {"first_layer_act": True}, example_inputs=(x,))
    groups = q.qgait_placement.plan.groups
    cat = next(g for g in groups if "cat output" in g.reasons)
    assert {"output of a", "output of b", "cat input"} <= set(cat.reasons) and cat.layers == ["c"]
    leaky = next(g for g in groups if "leaky_relu output" in g.reasons)
    assert leaky.layers == ["d"]  # the max pool reuses the LeakyReLU's quantizer for d's input
    q.train()
    q(x)
    q.odd = True
    with pytest.warns(UserWarning, match="dataflow changed"):
        q(x)


def test_without_example_inputs_the_model_is_converted_as_before():
    q = quantize_model(UserGaitNet(), {})
    assert not hasattr(q, placement.ATTR)
    assert placement.site_counts(q) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(UserGaitNet(), {"residual": {"enabled": False}}, example_inputs=(_frames(1, 0),))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_demo_model_runtime_computes_what_pytorch_evaluates(tmp_path, bits):
    pytest.importorskip("onnxruntime")
    from qgait_plugin.export.deploy import IO_NAMES
    from qgait_plugin.export.onnx_export import export_onnx
    from qgait_plugin.export.runtime import cpu_session, run_session
    from qgait_plugin.local.export_cmd import EmbeddingHead
    from qgait_plugin.local.model import GaitBaseLite

    torch.manual_seed(0)
    fp = GaitBaseLite((8, 16, 32), (1, 1, 1), (1, 2, 1), (16,), 16, 8)
    with torch.no_grad():
        for s in range(3):
            fp.train()(_frames(4, 30 + s))
    q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": bits}, "act": {"bits": bits}},
                       example_inputs=(_frames(1, 3),))
    assert hasattr(q, placement.ATTR)
    with torch.no_grad():
        q.train()(_frames(4, 40))
    head = EmbeddingHead(q).eval()
    x = _frames(5, 1)
    with torch.no_grad():
        ref = head(x)
    info = export_onnx(head, (x[:1],), str(tmp_path / "m.onnx"), **IO_NAMES)
    got = torch.from_numpy(run_session(cpu_session(info["path"], 1), x.numpy())[0])
    assert info["problems"] == []
    assert F.cosine_similarity(got.flatten(1).double(), ref.flatten(1).double()).min() >= 0.9999


def test_a_sequential_model_runs_with_its_placement_as_a_child():
    """``nn.Sequential`` calls every child in order, the registered ``qgait_placement`` included (it used
    to raise NotImplementedError: ``qgait bench overhead`` crashed on its Sequential model)."""
    import warnings

    from qgait_plugin.quant.convert import quantize_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.rand(2, 1, 8, 8)
    q = quantize_model(net, {"weight": {"bits": 4}, "act": {"bits": 4}}, example_inputs=(x,))
    assert hasattr(q, "qgait_placement")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dataflow changed" warning either
        q.train()
        out = q(x)
        out.sum().backward()
        q.eval()
        with torch.no_grad():
            assert q(x).shape == (2, 3)
