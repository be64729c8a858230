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


def test_with_dataflow_placement_the_report_lists_what_stays_float_and_why():
    import warnings

    from torch import nn

    from qgait_plugin.quant.placement import ACT_PRODUCT

    class Attn(nn.Module):
        """conv -> tokens -> self-attention: products of two activations, then softmax and mean."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.qk = nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.conv(x).flatten(2).transpose(1, 2)  # [n, tokens, 8]
            q, k = self.qk(t).chunk(2, dim=-1)
            a = torch.softmax(q @ k.transpose(1, 2), dim=-1)
            return (a @ t).mean(1)

    torch.manual_seed(0)
    x = torch.rand(2, 1, 6, 6)
    m = quantize_model(Attn(), {"weight": {"bits": 8}, "act": {"bits": 8}}, example_inputs=(x[:1],))
    m.train()
    m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report's own trace does not disturb the placement
        rep = coverage_report(m.eval(), x[:1])
    # a @ t reads the quantized tokens; q @ k^T reads the linear's float output (MatMulIntegerToFloat's), and the
    # softmax and the mean read float tensors too: none of them is where the integer graph dequantizes
    assert rep.stays_float == [{"module": "", "op": "matmul", "count": 1, "reason": ACT_PRODUCT}]
    assert "Stays float where a quantized tensor enters it" in rep.table() and rep.to_dict()["stays_float"]
    # without dataflow placement there is nothing to report
    assert coverage_report(quantize_model(Attn(), {"weight": {"bits": 8}, "act": {"bits": 8}}).train(), x).stays_float \
        == []


def test_the_mean_of_horizontal_pooling_is_listed_on_a_user_network():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_placement import UserGaitNet, _frames

    from qgait_plugin.quant.placement import float_reason

    m = quantize_model(UserGaitNet(), {"weight": {"bits": 8}, "act": {"bits": 8}}, example_inputs=(_frames(1, 0),))
    m.train()
    m(_frames(2, 1))
    rep = coverage_report(m.eval(), _frames(1, 2))
    assert rep.stays_float == [{"module": "", "op": "mean", "count": 1, "reason": float_reason("mean")}]
    assert "ReduceMean" in float_reason("mean")
