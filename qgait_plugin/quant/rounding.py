"""Rounding modes: what ``R(v)`` does forward and backward inside the quantizer.

Every mode keeps ``round`` in the forward pass (so training sees exactly the deployed error) and
differs in the gradient it passes back. :data:`ROUNDINGS` is the one table of modes: a name
(from :data:`qgait_plugin.spec.ROUNDING_NAMES`, which the config validates against) maps to a
:class:`Rounding` with the op and its derivative. A new mode is its functions, one entry here and
its name in ``ROUNDING_NAMES``; the table is checked against that list on import.

The clamp to ``[qmin, qmax]`` happens before ``R`` in the quantizer, so autograd's clamp already
gives 0 outside the range; the functions here only shape the gradient inside it.

The soft surrogate at ``alpha -> 0``: ``phi'`` tends to 1 everywhere (STE's gradient) and ``phi`` to
the identity. ``alpha / tanh(alpha / 2)`` is 0/0 there, so below :data:`SMALL_ALPHA` (where the
surrogate differs from its limit by less than ``alpha**2 / 12``, under 1e-9) the functions return
the limit itself; ``alpha == 0`` is exactly STE. A negative or non-finite ``alpha`` has no meaning
and is a :class:`~qgait_plugin.errors.ConfigError`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple

import torch

from ..errors import ConfigError
from ..spec import ROUNDING_NAMES

#: below this ``alpha`` the soft surrogate is its ``alpha -> 0`` limit (STE's gradient, identity value)
SMALL_ALPHA = 1e-4


def _alpha(alpha: float) -> float:
    """``alpha`` as a float, refused when negative or not finite."""
    a = float(alpha)
    if not math.isfinite(a) or a < 0:
        raise ConfigError(f"soft rounding alpha: {alpha!r}; expected a finite number >= 0 (0 is the STE limit)")
    return a

RoundFn = Callable[[torch.Tensor, float], torch.Tensor]
GradFn = Callable[[torch.Tensor, float], torch.Tensor]


class _STERound(torch.autograd.Function):
    """Straight-through estimator: forward ``round``, backward identity."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def soft_round_grad(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """``phi'(v) = alpha / (2 tanh(alpha/2)) * sech^2(alpha * (v - floor(v) - 0.5))``.

    The derivative of the tanh surrogate of ``round``; its mean over any unit interval is exactly
    1, so on average it passes the same gradient as STE, but concentrates it where ``v`` is about
    to flip to the next level (half-integers).
    """
    alpha = _alpha(alpha)
    if alpha < SMALL_ALPHA:
        return torch.ones_like(v)
    frac = v - torch.floor(v) - 0.5
    scale = alpha / (2.0 * math.tanh(alpha / 2.0))
    return scale * torch.cosh(alpha * frac).pow(-2)


def soft_round_value(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """``phi(v) = floor(v) + 0.5 * tanh(alpha (v - floor(v) - 0.5)) / tanh(alpha/2) + 0.5``.

    Continuous and differentiable by autograd (``floor`` contributes no gradient), used only
    by the ``soft_forward`` ablation (DSQ-style), where it replaces ``round`` in the forward pass.
    """
    alpha = _alpha(alpha)
    if alpha < SMALL_ALPHA:
        return v * 1.0  # the limit is the identity (a new tensor, as the formula gives)
    fl = torch.floor(v)
    return fl + 0.5 * torch.tanh(alpha * (v - fl - 0.5)) / math.tanh(alpha / 2.0) + 0.5


class _SoftRound(torch.autograd.Function):
    """The QGait soft quantizer: forward ``round``, backward ``phi'``."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.alpha = alpha
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (v,) = ctx.saved_tensors
        vv = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v  # half precision: compute in fp32
        g = soft_round_grad(vv, ctx.alpha).to(grad.dtype)
        return grad * g, None


def ste_round(v: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """``round`` with a straight-through gradient; ``alpha`` is ignored."""
    return _STERound.apply(v)


def soft_round(v: torch.Tensor, alpha: float = 3.0) -> torch.Tensor:
    """``round`` with the soft surrogate's gradient ``phi'(v)``."""
    if _alpha(alpha) < SMALL_ALPHA:  # phi' -> 1 as alpha -> 0: STE (no 0/0 in alpha / tanh(alpha/2))
        return _STERound.apply(v)
    return _SoftRound.apply(v, float(alpha))


def ste_round_grad(v: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """The STE's ``R'(v)``: 1 everywhere (the clamp supplies the 0 outside the range)."""
    return torch.ones_like(v)


class Rounding(NamedTuple):
    """One rounding mode: ``forward(v, alpha)`` is ``R(v)`` with the mode's gradient through
    autograd; ``grad(v, alpha)`` is ``R'(v)``, which the fused quantizer's written-out backward uses."""

    forward: RoundFn
    grad: GradFn


#: name -> :class:`Rounding`. ``soft_forward`` is reached through the quantizer's flag, not as a
#: mode of its own, so a config can only pick these.
ROUNDINGS: Dict[str, Rounding] = {
    "ste": Rounding(ste_round, ste_round_grad),
    "soft": Rounding(soft_round, soft_round_grad),
}

if tuple(ROUNDINGS) != ROUNDING_NAMES:  # pragma: no cover - a mode added to one list and not the other
    raise ImportError(f"rounding table {tuple(ROUNDINGS)} does not match spec.ROUNDING_NAMES {ROUNDING_NAMES}")
