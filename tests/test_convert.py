"""Model conversion: accuracy at W8A8, training at W4A4, rounding switches, state dicts, handlers."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgait_plugin import (
    ConfigError,
    ParamMatmulHandler,
    coverage_report,
    dequantize_model,
    iter_quantizers,
    model_size_bytes,
    quantize_model,
    register_handler,
    set_rounding,
)
from qgait_plugin.compat import load_weights_only
from qgait_plugin.quant.handlers import unregister_handler
from qgait_plugin.quant.layers import QuantConv2d, QuantLinear


def net2d():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def net3d():
    return nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(16, 6))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def calibrate(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("make,shape", [(net2d, (8, 1, 32, 22)), (net3d, (4, 1, 8, 16, 11))])
def test_w8a8_close_to_float(make, shape):
    fp = make().eval()
    x = (torch.rand(shape) > 0.5).float()
    ref = fp(x)
    qm = calibrate(quantize_model(copy.deepcopy(fp), {"weight": {"bits": 8}, "act": {"bits": 8}}), x)
    out = qm(x)
    assert rel_err(out, ref) < 0.02
    w4 = calibrate(quantize_model(copy.deepcopy(fp), {"weight": {"bits": 4}, "act": {"bits": 4}}), x)
    assert rel_err(w4(x), ref) > rel_err(out, ref)  # fewer bits, larger error: the grid is really applied


def test_w4a4_trains_on_toy_task():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 12, 12)
    y = (x[:, 0, :6].mean((1, 2)) > x[:, 0, 6:].mean((1, 2))).long() + 2 * (x[:, 0, :, :6].mean((1, 2)) > 0).long()
    model = quantize_model(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4)),
                           {"weight": {"bits": 4}, "act": {"bits": 4}})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_set_rounding_changes_gradients_not_outputs():
    x = torch.rand(4, 1, 16, 16)
    model = calibrate(quantize_model(net2d(), {"weight": {"bits": 4}, "act": {"bits": 4}}), x).train()
    grads = {}
    outs = {}
    for mode in ("ste", "soft", "ste"):
        set_rounding(model, mode, alpha=4.0)
        model.zero_grad()
        model.eval()  # fixed BN statistics so both passes see the same function
        out = model(x)
        out.square().sum().backward()
        outs.setdefault(mode, out.detach())
        assert torch.equal(out.detach(), outs[mode])
        grads.setdefault(mode, [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert torch.equal(outs["ste"], outs["soft"])
    assert any(not torch.allclose(a, b) for a, b in zip(grads["ste"], grads["soft"]))
    assert all(q.rounding == "ste" and q.alpha == 4.0 for _, q in iter_quantizers(model))
    with pytest.raises(ValueError, match="set_rounding mode: 'hard' is not allowed"):
        set_rounding(model, "hard")


def test_state_dict_round_trip_is_exact():
    x = torch.rand(4, 1, 16, 16)
    cfg = {"weight": {"bits": 4}, "act": {"bits": 6}}
    a = calibrate(quantize_model(net2d(), cfg), x)
    set_rounding(a, "soft", alpha=7.0)
    b = quantize_model(net2d(), cfg)
    b.load_state_dict(a.state_dict())
    b.eval()
    assert torch.equal(a(x), b(x))
    for (_, qa), (_, qb) in zip(iter_quantizers(a), iter_quantizers(b)):
        assert (qa.rounding, qa.alpha, qa.signed, qa.enabled) == (qb.rounding, qb.alpha, qb.signed, qb.enabled)
        assert torch.equal(qa.step, qb.step) and bool(qa.initialized) == bool(qb.initialized)
    buf = __import__("io").BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = quantize_model(net2d(), cfg)
    c.load_state_dict(load_weights_only(buf))
    assert torch.equal(c.eval()(x), a(x))


def test_fp_checkpoint_loads_and_steps_initialise_from_it():
    fp = net2d()
    sd = fp.state_dict()
    q = quantize_model(net2d(), {"weight": {"bits": 8}, "act": {"bits": 8}})
    res = q.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all(".weight_quant." in k or ".act_quant." in k for k in res.missing_keys)
    for k, v in sd.items():
        assert torch.equal(q.state_dict()[k], v)
    x = torch.rand(4, 1, 16, 16)
    calibrate(q, x)
    assert all(bool(qq.initialized) for _, qq in iter_quantizers(q) if qq.enabled)
    assert rel_err(q(x), fp.eval()(x)) < 0.02


class PartFC(nn.Module):
    """A module that multiplies by a raw parameter ``[parts, in, out]``, like OpenGait's SeparateFCs."""

    def __init__(self, parts=4, cin=8, cout=6):
        super().__init__()
        self.fc_bin = nn.Parameter(torch.randn(parts, cin, cout) * 0.3)

    def forward(self, x):  # x: [n, c, p]
        return x.permute(2, 0, 1).matmul(self.fc_bin).permute(1, 2, 0)


def test_param_matmul_handler_quantizes_raw_parameter():
    register_handler(PartFC, ParamMatmulHandler(param="fc_bin"))
    try:
        holder = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        fc = PartFC()
        model = nn.Module()
        model.pre = holder
        model.fc = fc
        x = torch.relu(torch.randn(5, 8, 4))
        ref = fc(x)
        quantize_model(model, {"weight": {"bits": 4}, "act": {"bits": 4}, "first_layer_act": True})
        assert type(fc).__name__ == "QuantPartFC" and isinstance(fc, PartFC)
        assert tuple(fc.weight_quant.step.shape) == (4, 1, 6)
        fc.train()
        out = fc(x)
        wq = fc.weight_quant(fc.fc_bin).detach()
        xq = fc.act_quant(x).detach()
        torch.testing.assert_close(out, xq.permute(2, 0, 1).matmul(wq).permute(1, 2, 0))
        steps = fc.weight_quant.step.detach()
        assert torch.allclose(wq / steps, torch.round(wq / steps), atol=1e-4)
        assert rel_err(out, ref) < 0.3
        out.sum().backward()
        assert fc.fc_bin.grad is not None
        assert fc.weight_quant.scaled_log_step.grad is not None and fc.act_quant.scaled_log_step.grad is not None
        assert "fc.fc_bin" in model.state_dict() and "fc.weight_quant.scaled_log_step" in model.state_dict()
        rep = coverage_report(fc, x)
        assert rep.quantized_mac_fraction == 1.0 and rep.total_macs == 5 * 4 * 8 * 6
    finally:
        unregister_handler(PartFC)


def test_overrides_first_last_policies_and_errors():
    m = quantize_model(net2d(), {"weight": {"bits": 4}, "act": {"bits": 4}, "last_layer": "8",
                                 "overrides": [{"match": "3", "weight_bits": 6}, {"match": "6", "enabled": False}]})
    assert isinstance(m[0], QuantConv2d) and m[0].act_quant.bits == 32 and m[0].weight_quant.bits == 4
    assert m[3].weight_quant.bits == 6 and m[3].act_quant.bits == 4
    assert type(m[6]) is nn.Conv2d  # disabled: left a float module
    assert isinstance(m[10], QuantLinear) and m[10].weight_quant.bits == 8 and m[10].act_quant.bits == 8
    fp_last = quantize_model(net2d(), {"last_layer": "fp"})
    assert type(fp_last[10]) is nn.Linear
    with pytest.raises(ConfigError, match=r"quant.overrides: match 'backbone\.\*' names no quantizable layer"):
        quantize_model(net2d(), {"overrides": [{"match": "backbone.*", "weight_bits": 8}]})


def test_module_held_by_lambda_and_plain_object_is_converted():
    class Holder:
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            h = Holder()
            h.conv = self.conv
            self.holder = h
            self.fn = lambda x: self.holder.conv(x)

        def forward(self, x):
            return self.fn(x)

    net = quantize_model(Net(), {"weight": {"bits": 2}})
    assert isinstance(net.holder.conv, QuantConv2d)
    x = torch.rand(1, 1, 8, 8)
    out = net(x)
    w = net.conv.weight_quant(net.conv.weight).detach()
    torch.testing.assert_close(out, F.conv2d(x, w, net.conv.bias))


def test_registering_twice_warns():
    class M(nn.Module):
        pass

    register_handler(M, ParamMatmulHandler(param="w"))
    try:
        with pytest.warns(UserWarning, match="registered twice"):
            register_handler(M, ParamMatmulHandler(param="w2"))
    finally:
        unregister_handler(M)


def test_model_size_counts_stored_bits_and_dequantize_restores_float():
    fp = net2d()
    fp_bytes = model_size_bytes(fp)
    q = quantize_model(copy.deepcopy(fp), {"weight": {"bits": 4}, "act": {"bits": 4}})
    conv_weights = sum(m.weight.numel() for m in q.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert model_size_bytes(q) < fp_bytes - conv_weights * 4 * 0.8  # 4-bit weights instead of 32-bit
    dequantize_model(q)
    assert type(q[0]) is nn.Conv2d and model_size_bytes(q) == fp_bytes
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(q.eval()(x), fp.eval()(x))


def test_no_quantizable_layer_is_an_error():
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize_model(nn.Sequential(nn.ReLU()), {})


def test_unused_parameter_free_for_ddp():
    """Every trainable parameter gets a gradient (DDP with find_unused_parameters=False needs it)."""
    m = quantize_model(net2d(), {"weight": {"bits": 4}, "act": {"bits": 4}}).train()
    m(torch.rand(2, 1, 16, 16)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    warnings.simplefilter("default")
