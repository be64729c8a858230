"""Rounding modes: what ``R(v)`` does forward and backward inside the quantizer.

Every mode keeps ``round`` in the forward pass (so training sees exactly the deployed error) and
differs in the gradient it passes back. A new mode is one function plus one line in
:data:`ROUNDING_MODES`; the quantizer, the converter and the config validator read the table.

The clamp to ``[qmin, qmax]`` happens before ``R`` in the quantizer, so autograd's clamp already
gives 0 outside the range; the functions here only shape the gradient inside it.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

RoundFn = Callable[[torch.Tensor, float], torch.Tensor]
GradFn = Callable[[torch.Tensor, float], torch.Tensor]


class _STERound(torch.autograd.Function):
    """Straight-through estimator: forward ``round``, backward identity."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def soft_round_grad(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """``phi'(v) = alpha / (2 tanh(alpha/2)) * sech^2(alpha * (v - floor(v) - 0.5))``.

    The derivative of the tanh surrogate of ``round``; its mean over any unit interval is exactly
    1, so on average it passes the same gradient as STE, but concentrates it where ``v`` is about
    to flip to the next level (half-integers).
    """
    frac = v - torch.floor(v) - 0.5
    scale = alpha / (2.0 * math.tanh(alpha / 2.0))
    return scale * torch.cosh(alpha * frac).pow(-2)


def soft_round_value(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """``phi(v) = floor(v) + 0.5 * tanh(alpha (v - floor(v) - 0.5)) / tanh(alpha/2) + 0.5``.

    Continuous and differentiable by autograd (``floor`` contributes no gradient), used only
    by the ``soft_forward`` ablation (DSQ-style), where it replaces ``round`` in the forward pass.
    """
    fl = torch.floor(v)
    return fl + 0.5 * torch.tanh(alpha * (v - fl - 0.5)) / math.tanh(alpha / 2.0) + 0.5


class _SoftRound(torch.autograd.Function):
    """The QGait soft quantizer: forward ``round``, backward ``phi'``."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        ctx.alpha = alpha
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        vv = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v  # half precision: compute in fp32
        g = soft_round_grad(vv, ctx.alpha).to(grad.dtype)
        return grad * g, None


def ste_round(v: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """``round`` with a straight-through gradient; ``alpha`` is ignored."""
    return _STERound.apply(v)


def soft_round(v: torch.Tensor, alpha: float = 3.0) -> torch.Tensor:
    """``round`` with the soft surrogate's gradient ``phi'(v)``."""
    if alpha <= 0:
        raise ValueError(f"soft rounding needs alpha > 0, got {alpha!r}")
    if alpha < 1e-4:  # phi' -> 1 as alpha -> 0; avoid 0/0 in alpha / tanh(alpha/2)
        return _STERound.apply(v)
    return _SoftRound.apply(v, float(alpha))


def soft_forward_round(v: torch.Tensor, alpha: float = 3.0) -> torch.Tensor:
    """Ablation: the surrogate ``phi`` in the forward pass too (values leave the integer grid)."""
    return soft_round_value(v, float(alpha))


def ste_round_grad(v: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """The STE's ``R'(v)``: 1 everywhere (the clamp supplies the 0 outside the range)."""
    return torch.ones_like(v)


#: name -> rounding function ``(v, alpha) -> R(v)``. ``soft_forward`` is reached through the
#: quantizer's ``soft_forward`` flag, not as a mode of its own, so a config can only pick these.
ROUNDING_MODES: Dict[str, RoundFn] = {"ste": ste_round, "soft": soft_round}

#: name -> ``R'(v)`` used by the fused quantizer's hand-written backward. A new mode adds one
#: entry here and one in :data:`ROUNDING_MODES`.
ROUNDING_GRADS: Dict[str, GradFn] = {"ste": ste_round_grad, "soft": soft_round_grad}


def get_rounding(mode: str, soft_forward: bool = False) -> RoundFn:
    """The function for ``mode``; raises with the allowed names for an unknown one."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}; allowed: {sorted(ROUNDING_MODES)}")
    if mode == "soft" and soft_forward:
        return soft_forward_round
    return ROUNDING_MODES[mode]
