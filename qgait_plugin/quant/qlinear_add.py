"""A quantized residual add as onnxruntime's ``QLinearAdd`` computes it, for PyTorch's eval.

An add whose inputs and output the dataflow placement quantizes runs in the integer graph as
``QLinearAdd`` on uint8 tensors (signed grids in uint8 with zero point 128). Its x86 kernel (MLAS,
AVX2 and newer, the one every AVX2, AVX-512 and VNNI CPU runs) does not add the two dequantized
values and requantize: it works in float32 with the two scale ratios ``r_a = fp32(s_a / s_c)`` and
``r_b = fp32(s_b / s_c)`` and a constant ``f = fp32(z_c - fp32(r_a z_a + r_b z_b))``, as two fused
multiply-adds, ``c = fma(a, r_a, fma(b, r_b, f))`` on the raw uint8 values ``a`` and ``b``, then
rounds half to even and saturates to uint8. Float ``s_a q_a + s_b q_b`` requantized at ``s_c`` lands
on the other side of a rounding tie now and then, and each such flip moves every later layer a
little; :func:`qlinear_add_like_runtime` computes the kernel's arithmetic exactly (an FMA is the
float64 product-sum rounded once to float32, and these products are exact in float64), so the
evaluated model's residual adds are the deployed model's.

What it does not cover: ARM's fixed-point kernel and x86 CPUs without AVX2 (an SSE2 kernel that
rounds after each multiply and add), where the runtime differs from this by the same rare ties.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: the zero point of a signed grid in its uint8 container (export/qdq.py writes the same)
SIGNED_ZERO_POINT = 128


def _f32(v: float) -> float:
    """``v`` rounded to float32 once: one IEEE float32 operation's result, as a Python float."""
    return float(np.float32(v))


def _container(q: Any) -> tuple:
    """``(scale, as the float32 the graph stores, zero point)`` of an activation quantizer."""
    return _f32(float(q.effective_step().reshape(-1)[0])), SIGNED_ZERO_POINT if q.signed else 0


@torch.no_grad()
def qlinear_add_like_runtime(a: torch.Tensor, b: torch.Tensor, qa: Any, qb: Any, qc: Any) -> torch.Tensor:
    """``a + b`` requantized at ``qc``'s grid as onnxruntime's QLinearAdd computes it, for ``a`` on
    ``qa``'s grid and ``b`` on ``qb``'s (the quantizers' values, the placement's eval forward).

    Returns ``q * s_c`` in float32, which ``qc`` maps back to ``q`` exactly."""
    sa, za = _container(qa)
    sb, zb = _container(qb)
    sc, zc = _container(qc)
    ra, rb = _f32(sa / sc), _f32(sb / sc)  # float32 division is correctly rounded: the kernel's ratios
    f = _f32(zc - _f32(ra * za + rb * zb))  # products of a float32 and 0 or 128 are exact in float64
    # the uint8 values: grid values over their float32 step are integers within an ulp
    a8 = torch.round(a.float() / sa).add_(za)
    b8 = torch.round(b.float() / sb).add_(zb)
    # fma(x, r, y) is x * r + y rounded once; with x < 256 and r, y float32 the float64 sum is exact
    t = b8.double().mul_(rb).add_(f).float()
    c = a8.double().mul_(ra).add_(t).float()
    qmin, qmax = qc.qrange_now()
    # saturate to uint8, then the Clip the exporter writes for the grid; q * s_c rounds once in float32
    return c.round_().clamp_(0, 255).sub_(zc).clamp_(qmin, qmax).mul_(sc)
