"""The soft quantizer's backward against its closed form, and STE as its alpha -> 0 limit."""
import math

import pytest
import torch

from qgait_plugin import fake_quantize
from qgait_plugin.quant.rounding import soft_round, soft_round_grad, soft_round_value, ste_round


def phi_prime(v: float, alpha: float) -> float:
    frac = v - math.floor(v) - 0.5
    return alpha / (2 * math.tanh(alpha / 2)) / math.cosh(alpha * frac) ** 2


@pytest.mark.parametrize("alpha", [0.5, 3.0, 10.0])
def test_soft_backward_matches_closed_form(alpha):
    pts = [-3.0, -2.5, -1.49999, -0.5001, 0.0, 0.25, 0.4999, 0.5, 0.5001, 1.0, 2.75, 3.5]
    pts += torch.linspace(-7.3, 7.3, 101).tolist()
    v = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    out = soft_round(v, alpha)
    assert torch.equal(out, torch.round(v.detach()))
    out.backward(torch.ones_like(v))
    expected = torch.tensor([phi_prime(p, alpha) for p in pts], dtype=torch.float64)
    torch.testing.assert_close(v.grad, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 3.0, 8.0, 20.0])
def test_soft_grad_mean_over_unit_interval_is_one(alpha):
    # midpoint rule on a fine grid of [k, k+1): the mean of phi' is exactly 1 analytically
    n = 200_000
    for k in (-3, 0, 2):
        v = k + (torch.arange(n, dtype=torch.float64) + 0.5) / n
        assert abs(soft_round_grad(v, alpha).mean().item() - 1.0) < 1e-3


def test_soft_peaks_at_half_integers():
    g = soft_round_grad(torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5], dtype=torch.float64), 3.0)
    assert g[2] > g[1] > g[0] and torch.isclose(g[2], g[4]) and torch.isclose(g[0], g[3])


def test_alpha_to_zero_gives_ste():
    v = torch.linspace(-4, 4, 333, dtype=torch.float64)
    for alpha in (1e-3, 1e-5):
        torch.testing.assert_close(soft_round_grad(v, max(alpha, 1e-3)), torch.ones_like(v), atol=1e-6, rtol=0)
        x = v.clone().requires_grad_(True)
        soft_round(x, alpha).sum().backward()
        torch.testing.assert_close(x.grad, torch.ones_like(v), atol=1e-6, rtol=0)
    x = v.clone().requires_grad_(True)
    ste_round(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(v))


def test_surrogate_is_continuous_and_matches_round_at_integers():
    v = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(soft_round_value(v, 3.0), v)
    eps = 1e-9
    for k in (-1.0, 0.0, 2.0):  # continuity across integer boundaries
        a = soft_round_value(torch.tensor(k - eps, dtype=torch.float64), 3.0)
        b = soft_round_value(torch.tensor(k + eps, dtype=torch.float64), 3.0)
        assert abs((a - b).item()) < 1e-6


def test_soft_step_gradient_matches_finite_difference_of_surrogate():
    """d/ds of s * phi(clamp(x/s)) (the surrogate the backward differentiates) vs central differences."""
    torch.manual_seed(1)
    x = torch.randn(64, dtype=torch.float64) * 2
    qmin, qmax, alpha = -7, 7, 3.0
    for s0 in (0.11, 0.37, 0.9):
        step = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
        fake_quantize(x, step, qmin, qmax, rounding="soft", alpha=alpha).sum().backward()

        def surrogate(s):
            v = torch.clamp(x / s, qmin, qmax)
            return (s * soft_round_value(v, alpha)).sum()

        h = 1e-6
        up, down = (surrogate(torch.tensor(s, dtype=torch.float64)) for s in (s0 + h, s0 - h))
        fd = (up - down) / (2 * h)
        # the surrogate's d/ds is phi(v) - v phi'(v); the quantizer uses round(v) - v phi'(v)
        v = torch.clamp(x / s0, qmin, qmax)
        correction = (torch.round(v) - soft_round_value(v, alpha)).sum()
        assert torch.isclose(step.grad, fd + correction, rtol=1e-5, atol=1e-6), (s0, step.grad, fd + correction)


def test_soft_x_gradient_is_zero_outside_clamp_range():
    x = torch.tensor([-5.0, -0.9, 0.0, 0.6, 5.0], dtype=torch.float64, requires_grad=True)
    step = torch.tensor(0.5, dtype=torch.float64)
    fake_quantize(x, step, -3, 3, rounding="soft", alpha=3.0).sum().backward()
    assert x.grad[0] == 0 and x.grad[-1] == 0
    for i, xv in ((1, -0.9), (2, 0.0), (3, 0.6)):
        assert math.isclose(x.grad[i].item(), phi_prime(xv / 0.5, 3.0), rel_tol=1e-9)


def test_soft_forward_ablation_uses_surrogate_in_forward():
    x = torch.tensor([0.3, 0.74, 1.1], dtype=torch.float64, requires_grad=True)
    step = torch.tensor(0.5, dtype=torch.float64)
    out = fake_quantize(x, step, -7, 7, rounding="soft", alpha=3.0, soft_forward=True)
    expected = 0.5 * soft_round_value(x.detach() / 0.5, 3.0)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out / 0.5, torch.round(out / 0.5))  # leaves the grid, unlike the QGait quantizer
    out.sum().backward()
    want = torch.tensor([phi_prime(v / 0.5, 3.0) for v in (0.3, 0.74, 1.1)], dtype=torch.float64)
    torch.testing.assert_close(x.grad, want)
    # under STE the flag has no effect: the grid is kept
    hard = fake_quantize(x.detach(), step, -7, 7, rounding="ste", soft_forward=True)
    assert torch.equal(hard / 0.5, torch.round(hard / 0.5))


def test_half_precision_inputs():
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(64) * 2).to(dtype).requires_grad_(True)
        step = torch.tensor(0.25, requires_grad=True)
        out = fake_quantize(x, step, -7, 7, rounding="soft", alpha=3.0)
        assert out.dtype == dtype
        out.float().sum().backward()
        assert torch.isfinite(x.grad.float()).all() and torch.isfinite(step.grad) and step.grad.dtype == torch.float32
