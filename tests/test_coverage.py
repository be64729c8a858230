"""Coverage report: MACs per layer, and float products the converter cannot see counted as float."""
import torch
from torch import nn

from qgait_plugin import coverage_report, quantize_model, set_init_reducer
from qgait_plugin.quant.convert import iter_quantizers


class TinyAttention(nn.Module):
    """Linear projections (quantizable) and a product of two activations (not a layer: stays float)."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # [n, t, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.proj(att @ v)


def test_macs_and_fraction_with_attention_products():
    m = quantize_model(TinyAttention(), {"weight": {"bits": 4}, "act": {"bits": 4}, "first_layer_act": True})
    x = torch.randn(2, 5, 8)
    rep = coverage_report(m, x)
    by_name = {r.name: r for r in rep.rows}
    assert by_name["qkv"].macs == 2 * 5 * 24 * 8 and by_name["qkv"].quantized
    assert by_name["proj"].macs == 2 * 5 * 8 * 8 and by_name["proj"].weight_bits == 4
    attn_macs = 2 * (2 * 5 * 5 * 8)  # q@k^T and att@v
    assert by_name[""].macs == attn_macs and not by_name[""].quantized
    expected = (2 * 5 * 24 * 8 + 2 * 5 * 8 * 8) / (2 * 5 * 24 * 8 + 2 * 5 * 8 * 8 + attn_macs)
    assert abs(rep.quantized_mac_fraction - expected) < 1e-12
    table = rep.table()
    assert "| qkv | QuantLinear | 4 | 4 |" in table and "% quantized" in table
    assert 0 <= rep.to_dict()["quantized_mac_fraction"] <= 1


def test_conv_macs_and_first_layer_exact_input():
    m = quantize_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2)), {}).eval()
    rep = coverage_report(m, torch.rand(1, 1, 10, 10))
    r0, r2 = rep.rows
    assert r0.macs == 4 * 8 * 8 * 9 and r0.act_bits == 32 and r0.quantized and r0.note == "exact input"
    assert r2.macs == 6 * 6 * 6 * 2 * 9
    assert rep.quantized_mac_fraction == 1.0
    assert not m.training  # ran in train mode once to initialise, then restored


def test_init_reducer_hook_is_used_for_every_initialisation():
    calls = []

    def fake_all_reduce(t, op):
        calls.append(op)
        return t * 0 + 0.125 if op == "mean" else t

    set_init_reducer(fake_all_reduce)
    try:
        m = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {"first_layer_act": True})
        m.train()(torch.randn(3, 4))
    finally:
        set_init_reducer(None)
    steps = [q.step for _, q in iter_quantizers(m)]
    assert all(torch.all(s == 0.125) for s in steps)
    assert calls.count("mean") == 4 and calls.count("max") == 2  # steps of 2 weights + 2 inputs; 2 sign votes
