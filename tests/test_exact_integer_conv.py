"""quant/layers.py's exact_integer_conv: the integer accumulator of an eval-mode quantized conv, in float32
convs where that is exact, equal to the float64 conv (which is exact for these sizes) bit for bit."""
import pytest
import torch
from torch import nn

from qgait_plugin.quant import layers


@pytest.mark.parametrize("cin, xmax, wmax, path", [
    (16, 255, 127, "float32"),        # 144 * 255 * 127 = 4.7e6 <= 2^24: one float32 conv
    (64, 255, 127, "split"),          # 576 * 255 * 127 = 1.9e7 > 2^24, 576 * 16 * 127 <= 2^24: two
    (1024, 255, 127, "float64"),      # 9216 * 16 * 127 = 1.9e7 > 2^24: one float64 conv
    (1024, 15, 7, "float32"),         # 4-bit grids: exact in float32 at any width used here
])
def test_matches_the_float64_conv_bit_for_bit(monkeypatch, cin, xmax, wmax, path):
    torch.manual_seed(cin + xmax)
    conv = nn.Conv2d(cin, 8, 3, padding=1, bias=False)
    x = torch.randint(-xmax, xmax + 1, (2, cin, 9, 7)).float()
    w = torch.randint(-wmax, wmax + 1, (8, cin, 3, 3)).float()
    x[0, :, 3:6, 2:5] = xmax  # output (0, 0, 4, 3) sums fan_in * xmax * wmax: the largest magnitude there is
    w[0] = wmax
    seen = []
    real = conv._conv_forward

    def spy(inp, weight, bias):
        seen.append(inp.dtype)
        return real(inp, weight, bias)

    monkeypatch.setattr(conv, "_conv_forward", spy)
    got = layers.exact_integer_conv(conv, x, w)
    want = real(x.double(), w.double(), None)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert seen == {"float32": [torch.float32], "split": [torch.float32] * 2, "float64": [torch.float64]}[path]
    assert float(want[0, 0, 4, 3]) == 9 * cin * xmax * wmax  # beyond 2^24 in the split and float64 cases
