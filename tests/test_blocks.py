"""Residual blocks quantized as a unit (quant/blocks.py) and the ``quant.residual`` key."""
import copy

import pytest
import torch

from qgait_plugin import ConfigError, QuantConfig, dequantize_model, iter_quantizers, quantize_model
from qgait_plugin.checkpoint import load_float_state_dict
from qgait_plugin.local.model import BasicBlock, GaitBaseLite, register_quant_handlers
from qgait_plugin.quant.blocks import QuantBlockMixin


def _model():
    register_quant_handlers()
    torch.manual_seed(0)
    return GaitBaseLite((4, 8, 8), (1, 1, 1), (1, 2, 1), (4,), 8, 4)


def _x():
    return (torch.rand(2, 3, 16, 11) > 0.5).float()


def test_residual_key_defaults_and_errors():
    cfg = QuantConfig.from_dict({})
    assert cfg.residual.enabled and cfg.residual.bits == 8
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_dict({"residual": {"enabled": False, "bits": 6}}).residual.bits == 6
    for bad, msg in (({"residual": {"bit": 8}}, "quant.residual.bit: unknown key"),
                     ({"residual": {"enabled": "yes"}}, "quant.residual.enabled: expected bool"),
                     ({"residual": {"bits": 32}}, "quant.residual.bits: 32"),
                     ({"residual": {"bits": 9}}, "quant.residual.bits: 9"),
                     ({"residual": 8}, "quant.residual: expected a mapping")):
        with pytest.raises(ConfigError, match=msg):
            QuantConfig.from_dict(bad)


def test_blocks_quantize_the_tensors_around_their_adds():
    m = quantize_model(_model(), {"weight": {"bits": 4}, "act": {"bits": 4}})
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 3 and all(isinstance(b, QuantBlockMixin) for b in blocks)
    proj = blocks[1]  # stride 2: a projection shortcut
    assert proj.down[0].act_quant is proj.conv1.act_quant  # one quantizer for the block input
    assert proj.res_quant.bits == 8 and proj.res_quant.signed and proj.sc_quant.signed
    assert not hasattr(blocks[0], "sc_quant")  # identity shortcut: the quantized input itself
    assert hasattr(blocks[-1], "out_quant") and not hasattr(blocks[0], "out_quant")
    keys = m.state_dict().keys()
    assert not any(k.startswith("Backbone.layers.1.0.down.0.act_quant") for k in keys)  # stored once
    calls = []
    proj.conv1.act_quant.register_forward_hook(lambda *a: calls.append(1))
    m.train()(_x())["embeddings"].sum().backward()
    assert len(calls) == 1  # quantized once per forward, for conv1 and the shortcut
    for q in (proj.res_quant, proj.sc_quant, blocks[-1].out_quant):
        assert q.scaled_log_step.grad is not None and torch.isfinite(q.scaled_log_step.grad).all()


def test_fp_checkpoint_loads_and_old_checkpoints_load_with_residual_off():
    fp = _model()
    m = quantize_model(_model(), {"weight": {"bits": 4}, "act": {"bits": 4}})
    load_float_state_dict(m, fp.state_dict(), source="fp")  # new quantizers initialise from data
    m.train()(_x())
    off = {"weight": {"bits": 4}, "act": {"bits": 4}, "residual": {"enabled": False}}
    old = quantize_model(_model(), off)
    old.train()(_x())
    again = quantize_model(_model(), off)
    again.load_state_dict(old.state_dict(), strict=True)  # trained without block quantizers: loads as before
    assert not any(isinstance(b, QuantBlockMixin) for b in again.modules())
    with pytest.raises(RuntimeError):
        quantize_model(_model(), {"weight": {"bits": 4}, "act": {"bits": 4}}).load_state_dict(old.state_dict())


def test_dequantize_restores_the_float_blocks():
    fp = _model().eval()
    m = quantize_model(copy.deepcopy(fp), {})
    dequantize_model(m).eval()
    assert not list(iter_quantizers(m))
    assert all(type(b) is BasicBlock for b in m.modules() if isinstance(b, BasicBlock))
    assert all("qgait_input_quantized" not in c.__dict__ for c in m.modules())
    x = _x()
    assert torch.equal(m(x)["embeddings"], fp(x)["embeddings"])
