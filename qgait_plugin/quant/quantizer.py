"""The LSQ fake quantizer: a learned step size, a clamp and one of the rounding modes.

``x_hat = s * R(clamp(x / s, qmin, qmax))``. Autograd through the clamp gives the usual LSQ
gradients: for ``x`` the rounding mode's derivative inside the range and 0 outside; for ``s``
``R(v) - v R'(v)`` inside and ``qmin``/``qmax`` outside (Esser et al. 2020), scaled by
``g = 1/sqrt(numel * qmax)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, short_repr
from ..spec import QuantizerSpec, check_rounding
from .rounding import ROUNDINGS, soft_round_value

#: Smallest step the quantizer divides by: an optimizer overshoot cannot flip the grid or divide by zero.
STEP_EPS = 1e-8

#: How a freshly initialised step is made equal on every rank; ``None`` means "average with
#: ``all_reduce`` when torch.distributed is initialised". Hosts may replace it.
_INIT_REDUCER: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None


def set_init_reducer(fn: Optional[Callable[[torch.Tensor, str], torch.Tensor]]) -> None:
    """Install ``fn(tensor, op) -> tensor`` (op ``"mean"``, ``"max"`` or ``"min"``) used when steps initialise.

    Without it, initialisation all-reduces over the default process group when one exists, so
    every DDP rank starts from the same step even though each saw a different first batch.
    """
    global _INIT_REDUCER
    _INIT_REDUCER = fn


def _reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if _INIT_REDUCER is not None:
        return _INIT_REDUCER(t, op)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        if op == "mean":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return t


def grad_scale_(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""
    return (t - t * scale).detach() + t * scale


def qrange(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer range of a ``bits``-wide grid: symmetric signed ``[-(2^(b-1)-1), 2^(b-1)-1]`` or ``[0, 2^b - 1]``.

    Signed grids drop the most negative level so weights quantize symmetrically (and so 8-bit
    grids fit ONNX's int8 QuantizeLinear range).
    """
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _FusedFakeQuant(torch.autograd.Function):
    """``s * round(clamp(x / s))`` with its LSQ backward written out: one saved tensor, few kernels.

    Gradients (``v = x / s``, ``R'`` the rounding mode's derivative at the clamped ``v``):
    ``dx = R'`` inside the range, 0 outside; ``ds = round(v) - v R'`` inside, ``qmin``/``qmax``
    outside, times ``grad_scale``, summed over the dimensions ``s`` is broadcast along.
    """

    @staticmethod
    def forward(ctx, x, s, qmin, qmax, grad_fn, alpha, gscale):
        sx = s.to(x.dtype)
        v = x / sx
        ctx.save_for_backward(v, s)
        ctx.conf = (qmin, qmax, grad_fn, alpha, gscale)
        return torch.round(v.clamp(qmin, qmax)) * sx

    @staticmethod
    def backward(ctx, grad):
        v, s = ctx.saved_tensors
        qmin, qmax, grad_fn, alpha, gscale = ctx.conf
        vc = v.clamp(qmin, qmax)
        inside = (v >= qmin) & (v <= qmax)
        calc = vc.float() if vc.dtype in (torch.float16, torch.bfloat16) else vc
        d = grad_fn(calc, alpha).to(v.dtype) if grad_fn is not _STE_GRAD else None
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = torch.where(inside, grad if d is None else grad * d, torch.zeros((), dtype=grad.dtype))
        if ctx.needs_input_grad[1]:
            dv = v if d is None else v * d
            gs_elem = grad * torch.where(inside, torch.round(vc) - dv, vc)
            if s.dim() == 0:
                gs = gs_elem.sum(dtype=torch.float32)
            else:
                lead = gs_elem.dim() - s.dim()
                dims = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(s.shape) if n == 1)
                # sum(dim=()) would reduce every dimension: a step shaped like x (one per element) sums nothing
                gs = (gs_elem.sum(dim=dims, keepdim=True, dtype=torch.float32) if dims
                      else gs_elem.to(torch.float32)).reshape(s.shape)
            gs = (gs * gscale).to(s.dtype)
        return gx, gs, None, None, None, None, None


_STE_GRAD = ROUNDINGS["ste"].grad  # R' = 1: the backward skips the multiplication


def fake_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, rounding: str = "ste",
                  alpha: float = 3.0, soft_forward: bool = False, grad_scale: float = 1.0) -> torch.Tensor:
    """``step * R(clamp(x / step, qmin, qmax))``, differentiable in ``x`` and ``step``.

    ``step`` broadcasts against ``x`` (a scalar for per-tensor, ``[C, 1, ...]`` for per-channel)
    and is clamped to a tiny positive value, so an optimizer overshoot cannot flip the grid.
    ``grad_scale`` multiplies the step's gradient (LSQ's ``g``). With ``soft_forward`` and the
    ``soft`` mode the surrogate replaces ``round`` in the forward pass too (through autograd).
    ``rounding`` is a name of :data:`~qgait_plugin.quant.rounding.ROUNDINGS` (checked only when
    the lookup fails, so a training step pays nothing for it).
    """
    try:
        mode = ROUNDINGS[rounding]
    except KeyError:
        check_rounding(rounding, "fake_quantize rounding")
        raise
    s = step.clamp_min(STEP_EPS)
    if soft_forward and rounding == "soft":
        s = grad_scale_(s, grad_scale)
        v = torch.clamp(x / s.to(x.dtype), qmin, qmax)
        return soft_round_value(v, float(alpha)) * s.to(x.dtype)
    return _FusedFakeQuant.apply(x, s, qmin, qmax, mode.grad, float(alpha), float(grad_scale))


#: values a per-tensor initial-step search reads at most
_MSE_SAMPLE = 1 << 18


def _mse_best_scale(x: torch.Tensor, absmax: torch.Tensor, qmin: int, qmax: int, dims: Sequence[int],
                    candidates: int = 40) -> torch.Tensor:
    """Step minimising the quantization MSE over clip ratios in (0, 1] of ``absmax``, per slice.

    Cheaper and better than LSQ's ``2 mean|x| / sqrt(Qp)`` heuristic at low bit widths, and as
    good as min/max at 8 bits. A per-tensor search reads an evenly strided sample of at most
    :data:`_MSE_SAMPLE` values (the first batch of activations can be millions): the error curve
    over 40 clip ratios does not need every value, and the step is cheap to refine by training.
    """
    if not dims and x.numel() > _MSE_SAMPLE:
        x = x.reshape(-1)[:: x.numel() // _MSE_SAMPLE]

    def candidate(r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s = (absmax * r / qmax).clamp_min(STEP_EPS)
        err = (torch.clamp(torch.round(x / s), qmin, qmax) * s - x).pow(2)
        return s, err.mean(dim=tuple(dims), keepdim=True) if dims else err.mean()

    ratios = torch.linspace(1.0 / candidates, 1.0, candidates, device=x.device)
    best, best_err = candidate(ratios[0])
    for r in ratios[1:]:
        s, err = candidate(r)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


class LSQQuantizer(nn.Module):
    """A fake quantizer with a learned step, for a weight or for a layer's input.

    ``kind='weight'``: signed, per output channel along ``channel_dims`` (or per tensor),
    initialised from the weight itself. ``kind='act'``: per tensor, initialised from the first
    training batch; ``signed=None`` decides on that batch (unsigned when every value is
    non-negative, as after ReLU or for silhouettes), agreed across ranks.

    Build it from a :class:`~qgait_plugin.spec.QuantizerSpec` with :meth:`from_spec`; the
    arguments of the constructor are the spec's fields (checked by the spec) plus the step's
    shape. Everything needed to reproduce it (bits, signedness, rounding mode, ``alpha``) is part
    of its state dict, so a checkpoint restores the phase it was saved in.
    """

    initialized: torch.Tensor  # a bool buffer

    def __init__(self, bits: int, kind: str, signed: Optional[bool] = None,
                 channel_shape: Optional[Sequence[int]] = None, rounding: str = "ste", alpha: float = 3.0,
                 soft_forward: bool = False) -> None:
        super().__init__()
        spec = QuantizerSpec(kind=kind, bits=bits, signed=signed, per_channel=channel_shape is not None,
                             rounding=rounding, alpha=alpha, soft_forward=bool(soft_forward))
        self.kind = spec.kind
        self.bits = spec.bits
        self.signed = spec.signed
        self.rounding = spec.rounding
        self.alpha = spec.alpha
        self.soft_forward = spec.soft_forward
        self.enabled = spec.enabled
        shape = tuple(channel_shape) if channel_shape is not None else ()
        # a switched-off quantizer's step takes no gradient: DDP with find_unused_parameters=False
        # fails on parameters that never receive one
        self.step = nn.Parameter(torch.ones(shape), requires_grad=self.enabled)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_spec(cls, spec: QuantizerSpec, channel_shape: Optional[Sequence[int]] = None) -> LSQQuantizer:
        """The quantizer ``spec`` describes. ``channel_shape`` is the step's shape for a per-channel
        spec (one entry per output channel, 1 on the reduced dimensions; the layer's handler knows
        it) and is ignored for a per-tensor one."""
        if spec.per_channel and channel_shape is None:
            raise ValueError("LSQQuantizer.from_spec: a per-channel spec needs the step's channel_shape")
        return cls(spec.bits, spec.kind, signed=spec.signed, channel_shape=channel_shape if spec.per_channel else None,
                   rounding=spec.rounding, alpha=spec.alpha, soft_forward=spec.soft_forward)

    @property
    def spec(self) -> QuantizerSpec:
        """The quantizer's current settings (rounding and ``alpha`` change with the schedule)."""
        return QuantizerSpec(kind=self.kind, bits=self.bits, signed=self.signed, per_channel=self.per_channel,
                             rounding=self.rounding, alpha=self.alpha, soft_forward=self.soft_forward)

    # -- range -------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return qrange(self.bits, bool(self.signed))[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, bool(self.signed))[1]

    @property
    def per_channel(self) -> bool:
        return self.step.dim() > 0

    def extra_repr(self) -> str:
        sign = {True: "signed", False: "unsigned", None: "sign=auto"}[self.signed]
        return (f"{self.kind}, bits={self.bits}, {sign}, {'per-channel' if self.per_channel else 'per-tensor'}, "
                f"rounding={self.rounding}, alpha={self.alpha:g}, enabled={self.enabled}")

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step from ``x`` (the weight, or a batch of inputs), agreed across ranks."""
        x = x.detach().float()
        if self.signed is None:
            neg = torch.tensor(1.0 if bool((x < 0).any()) else 0.0, device=x.device)
            self.signed = bool(_reduce(neg, "max").item() > 0)  # signed if any rank saw a negative value
        qmin, qmax = self.qrange_now()
        if self.per_channel:
            dims = [d for d in range(x.dim()) if d >= self.step.dim() or self.step.shape[d] == 1]
            absmax = x.abs().amax(dim=tuple(dims), keepdim=True)
            step = _mse_best_scale(x, absmax, qmin, qmax, dims).reshape(self.step.shape)
        else:
            step = _mse_best_scale(x, x.abs().max(), qmin, qmax, [])
        step = torch.where(step > STEP_EPS, step, torch.full_like(step, 1.0 / qmax))
        step = _reduce(step.to(self.step.device, self.step.dtype), "mean")
        self.step.data.copy_(step.reshape(self.step.shape))
        self.initialized.fill_(True)

    @torch.no_grad()
    def set_step(self, step: torch.Tensor) -> None:
        """Set the step (positive values, the step's shape) and mark the quantizer initialised."""
        self.step.data.copy_(step.reshape(self.step.shape).clamp_min(STEP_EPS))
        self.initialized.fill_(True)

    def qrange_now(self) -> Tuple[int, int]:
        return qrange(self.bits, bool(self.signed))

    def effective_step(self) -> torch.Tensor:
        """The step the forward pass divides by (kept positive), detached: what a deployed model stores."""
        return self.step.detach().clamp_min(STEP_EPS)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if self.kind == "act" and not self.training:
                raise RuntimeError("activation quantizer used in eval mode before initialisation: run one training "
                                   "batch first (or load a QAT checkpoint) so its step is set from data")
            self.initialize(x)
        qmin, qmax = self.qrange_now()
        if self.kind == "weight":
            per_step = x.numel() // max(1, self.step.numel())
        else:
            per_step = x[0].numel() if x.dim() > 1 else x.numel()
        g = 1.0 / math.sqrt(max(1, per_step) * qmax)
        # soft_forward relaxes round() while training only: in eval mode the model computes what the
        # integer model deployed from it computes (DSQ, likewise, deploys the hard quantizer)
        soft_forward = self.soft_forward and self.training
        return fake_quantize(x, self.step, qmin, qmax, self.rounding, self.alpha, soft_forward, grad_scale=g)

    # -- state -------------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "rounding": self.rounding, "alpha": self.alpha,
                "soft_forward": self.soft_forward, "enabled": self.enabled, "kind": self.kind}

    def _mismatch(self, state: Any, name: str) -> Optional[str]:
        """Why the checkpoint's extra state ``state`` cannot be this quantizer's, or None."""
        if not isinstance(state, dict):
            return f"{name}: the checkpoint's quantizer state is a {type(state).__name__}, not a quantizer's settings"
        if state.get("bits") != self.bits or state.get("kind") != self.kind:
            kind = state.get("kind")
            kind = kind if isinstance(kind, str) and len(kind) <= 20 else short_repr(kind)
            return (f"{name}: the checkpoint holds a {short_repr(state.get('bits'))}-bit "
                    f"{kind} quantizer where the model has a {self.bits}-bit {self.kind} "
                    "one; the quant config differs from the one it was trained with")
        return None

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checked here, where the quantizer's name (the prefix) is known, before torch calls set_extra_state
        key = prefix + "_extra_state"
        if key in state_dict:
            why = self._mismatch(state_dict[key], prefix[:-1] or "quantizer")
            if why:
                raise ConfigError(why)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        why = self._mismatch(state, "quantizer")
        if why:
            raise ConfigError(why)
        try:
            signed, rounding = state["signed"], state["rounding"]
            alpha, soft_forward, enabled = float(state["alpha"]), bool(state["soft_forward"]), bool(state["enabled"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"checkpoint: quantizer settings incomplete or malformed ({type(e).__name__}: "
                              f"{short_repr(str(e))})") from None
        if signed not in (None, True, False):
            raise ConfigError(f"checkpoint: quantizer signed: {short_repr(signed)}; expected true, false or null")
        self.rounding = check_rounding(rounding, "checkpoint: quantizer rounding")
        self.signed, self.alpha, self.soft_forward, self.enabled = signed, alpha, soft_forward, enabled


def collapsed_steps(model: nn.Module) -> Dict[str, int]:
    """Quantizers whose learned step has entries at or below zero, with how many.

    The forward pass clamps the step to ``STEP_EPS``, so such an entry quantizes its channel to
    (almost) zero: the optimizer overshot through zero. It happens when the step's learning rate
    is large against the step itself, e.g. Adam at 5e-4 on 8-bit weight steps of about 1e-3 (Adam
    moves a parameter by about its learning rate per iteration, whatever the parameter's size);
    lower ``quant.step_lr_scale`` for such runs.
    """
    out: Dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer) and m.enabled and bool(m.initialized):
            n = int((m.step.detach() <= STEP_EPS).sum())
            if n:
                out[name] = n
    return out
