"""The LSQ fake quantizer: a learned step size, a clamp and one of the rounding modes.

``x_hat = s * R(clamp(x / s, qmin, qmax))``. The gradients are LSQ's (Esser et al. 2020): for
``x`` the rounding mode's derivative inside the range and 0 outside; for ``s`` ``R(v) - v R'(v)``
inside and ``qmin``/``qmax`` outside, scaled by ``g = 1/sqrt(numel * qmax)``.

The quantizer learns ``theta = ln(s) / STEP_LOG_SCALE`` (parameter ``scaled_log_step``), not ``s``:
an optimizer step on ``s`` itself can cross zero (Adam moves every parameter by about its learning
rate per iteration, which is a large fraction of an 8-bit weight step of ~1e-3; SGD with momentum
overshoots too), and a step at the floor quantizes its channel to 0. A logarithm has no floor to
cross. See :class:`_LogStep` for the scale and for how LSQ's gradient scale carries over.

Quantization arithmetic runs in fp32 whatever the input's dtype: under fp16/bf16 autocast ``x / s``
in half precision loses the fraction that ``round(v) - v`` (the step's gradient) is made of.
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

#: ``s = exp(STEP_LOG_SCALE * theta)``: Adam moves ``theta`` by about its learning rate per iteration,
#: so ``s`` by about 10x that, relatively: the relative pace of a conv weight of magnitude 0.1 under
#: the same optimizer (measured on a small W8A8/W3A3 conv net: 1 learns 8-bit steps too slowly under
#: Adam 1e-4..5e-4, 10 trains to a lower loss than the linear step did, with no step collapsed).
STEP_LOG_SCALE = 10.0

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
        # v is fp32 or wider: _fake_quantize upcasts half-precision inputs before this function
        d = grad_fn(vc, alpha).to(v.dtype) if grad_fn is not _STE_GRAD else None
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


_HALF = (torch.float16, torch.bfloat16)


def fake_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, rounding: str = "ste",
                  alpha: float = 3.0, soft_forward: bool = False, grad_scale: float = 1.0) -> torch.Tensor:
    """``step * R(clamp(x / step, qmin, qmax))``, differentiable in ``x`` and ``step``.

    ``step`` broadcasts against ``x`` (a scalar for per-tensor, ``[C, 1, ...]`` for per-channel)
    and must be finite and positive; ``qmin <= qmax``. ``grad_scale`` multiplies the step's
    gradient (LSQ's ``g``). With ``soft_forward`` and the ``soft`` mode the surrogate replaces
    ``round`` in the forward pass too (through autograd). ``rounding`` is a name of
    :data:`~qgait_plugin.quant.rounding.ROUNDINGS`. The arithmetic runs in fp32; the result has
    ``x``'s dtype. Raises ``ValueError`` for arguments outside these rules.
    """
    if not (isinstance(qmin, int) and isinstance(qmax, int)) or qmin > qmax:
        raise ValueError(f"fake_quantize: qmin={qmin!r}, qmax={qmax!r}; expected integers with qmin <= qmax")
    if not isinstance(step, torch.Tensor):
        raise ValueError(f"fake_quantize: step must be a tensor, got {type(step).__name__}")
    st = step.detach()
    if not bool(torch.isfinite(st).all()) or not bool((st > 0).all()):
        bad = st[~(torch.isfinite(st) & (st > 0))].reshape(-1)[:3].tolist()
        raise ValueError(f"fake_quantize: step must be finite and positive; it holds {bad}")
    if not math.isfinite(float(alpha)) or float(alpha) < 0:
        raise ValueError(f"fake_quantize: alpha={alpha!r}; expected a finite value >= 0 (0 is the STE limit)")
    if rounding not in ROUNDINGS:
        check_rounding(rounding, "fake_quantize rounding")
    return _fake_quantize(x, step, qmin, qmax, rounding, float(alpha), soft_forward, float(grad_scale))


def _fake_quantize(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, rounding: str, alpha: float,
                   soft_forward: bool, grad_scale: float) -> torch.Tensor:
    """:func:`fake_quantize` without the argument checks (the quantizer's own calls: a training
    step pays nothing for them), in fp32, cast back to ``x``'s dtype."""
    dtype = x.dtype
    if dtype in _HALF:
        x = x.float()
    if s.dtype in _HALF:
        s = s.float()
    if not torch.is_grad_enabled() and not (soft_forward and rounding == "soft"):
        # evaluation: the same arithmetic in place, without the autograd Function's saved tensors
        sx = s.to(x.dtype)
        out = (x / sx).clamp_(qmin, qmax).round_().mul_(sx)
    elif soft_forward and rounding == "soft":
        s = grad_scale_(s, grad_scale)
        v = torch.clamp(x / s, qmin, qmax)
        out = soft_round_value(v, alpha) * s
    else:
        out = _FusedFakeQuant.apply(x, s, qmin, qmax, ROUNDINGS[rounding].grad, alpha, grad_scale)
    return out if out.dtype == dtype else out.to(dtype)


def _step_from_theta(theta: torch.Tensor) -> torch.Tensor:
    """``exp(STEP_LOG_SCALE * theta)``, in fp32 for a half-precision ``theta``: the step the forward
    pass and a deployed model use."""
    return torch.exp((theta.float() if theta.dtype in _HALF else theta) * STEP_LOG_SCALE)


class _LogStep(torch.autograd.Function):
    """``s = exp(STEP_LOG_SCALE * theta)``; backward hands ``theta`` LSQ's scaled step gradient ``g dL/ds``
    divided by ``STEP_LOG_SCALE``, not the chain rule's ``STEP_LOG_SCALE * s * g dL/ds``.

    Why: with the chain rule an 8-bit weight step of ~1e-3 would get a gradient a thousand times
    smaller than LSQ's and stop learning under SGD. With this one, SGD changes ``ln s`` by
    ``lr * g dL/ds``: LSQ's SGD update on ``s`` with a learning rate proportional to ``s`` (a relative
    learning rate), stable at OpenGait's SGD 0.1 with momentum. Adam and AdamW normalise gradients,
    so they move ``theta`` by about their learning rate and ``s`` by ``STEP_LOG_SCALE`` times that,
    relatively. Neither can bring ``s`` to zero.
    """

    @staticmethod
    def forward(ctx, theta, gscale):
        ctx.gscale = gscale / STEP_LOG_SCALE
        return _step_from_theta(theta)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.gscale, None


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

    initialized: torch.Tensor  # 0/1 in a uint8 buffer

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
        # the learned parameter is ln(s) / STEP_LOG_SCALE (module docstring); a switched-off quantizer's takes
        # no gradient: DDP with find_unused_parameters=False fails on parameters that never receive one
        self.scaled_log_step = nn.Parameter(torch.zeros(shape), requires_grad=self.enabled)
        # uint8, not bool: DDP broadcasts buffers at wrap time and torch 1.13's gloo has no bool
        # ("Invalid scalar type"); checkpoints with the bool buffer load into it unchanged
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

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
        return self.scaled_log_step.dim() > 0

    @property
    def step(self) -> torch.Tensor:
        """The step ``exp(STEP_LOG_SCALE * scaled_log_step)``, detached (read it; set it with :meth:`set_step`)."""
        return self.effective_step()

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
            dims = [d for d in range(x.dim()) if d >= self.scaled_log_step.dim() or self.scaled_log_step.shape[d] == 1]
            absmax = x.abs().amax(dim=tuple(dims), keepdim=True)
            step = _mse_best_scale(x, absmax, qmin, qmax, dims).reshape(self.scaled_log_step.shape)
        else:
            step = _mse_best_scale(x, x.abs().max(), qmin, qmax, [])
        step = torch.where(step > STEP_EPS, step, torch.full_like(step, 1.0 / qmax))
        self.set_step(_reduce(step.to(self.scaled_log_step.device, torch.float32), "mean"))

    @torch.no_grad()
    def set_step(self, step: torch.Tensor) -> None:
        """Set the step (positive values, the step's shape) and mark the quantizer initialised.

        Calibration and tests set steps through here; the parameter holds ``ln(step) / STEP_LOG_SCALE``."""
        step = torch.as_tensor(step, dtype=torch.float32, device=self.scaled_log_step.device)
        if not bool(torch.isfinite(step).all()) or not bool((step > 0).all()):
            raise ValueError(f"set_step: a step must be finite and positive; got {step.reshape(-1)[:3].tolist()}")
        theta = step.reshape(self.scaled_log_step.shape).clamp_min(STEP_EPS).log() / STEP_LOG_SCALE
        self.scaled_log_step.copy_(theta.to(self.scaled_log_step.dtype))
        self.initialized.fill_(True)

    def qrange_now(self) -> Tuple[int, int]:
        return qrange(self.bits, bool(self.signed))

    def effective_step(self) -> torch.Tensor:
        """The step the forward pass divides by, detached: what a deployed model stores."""
        return _step_from_theta(self.scaled_log_step.detach()).clamp_min(STEP_EPS)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, grad_numel: Optional[int] = None) -> torch.Tensor:
        """``x`` fake-quantized. ``grad_numel`` replaces the per-sample element count in LSQ's
        gradient scale of an activation step: the dataflow placement quantizes a max-pooled tensor
        in place of the tensor before the pooling (the same values) and keeps that tensor's scale."""
        if not self.enabled:
            return x
        if not bool(self.initialized):
            if self.kind == "act" and not self.training:
                raise RuntimeError("activation quantizer used in eval mode before initialisation: run one training "
                                   "batch first (or load a QAT checkpoint) so its step is set from data")
            self.initialize(x)
        qmin, qmax = self.qrange_now()
        if self.kind == "weight":
            per_step = x.numel() // max(1, self.scaled_log_step.numel())
        else:
            per_step = grad_numel if grad_numel is not None else x[0].numel() if x.dim() > 1 else x.numel()
        g = 1.0 / math.sqrt(max(1, per_step) * qmax)
        # soft_forward relaxes round() while training only: in eval mode the model computes what the
        # integer model deployed from it computes (DSQ, likewise, deploys the hard quantizer)
        soft_forward = self.soft_forward and self.training
        step = _LogStep.apply(self.scaled_log_step, g).clamp_min(STEP_EPS)
        return _fake_quantize(x, step, qmin, qmax, self.rounding, self.alpha, soft_forward, 1.0)

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
        # checkpoints written before the step was learned in the log domain hold ``step``: migrate it
        old, new = prefix + "step", prefix + "scaled_log_step"
        if old in state_dict and new not in state_dict:
            step = state_dict.pop(old)
            if isinstance(step, torch.Tensor) and step.is_floating_point():
                state_dict[new] = step.detach().float().clamp_min(STEP_EPS).log() / STEP_LOG_SCALE
            else:
                raise ConfigError(f"{old}: expected a float tensor of steps, got {short_repr(step)}")
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
    """Quantizers whose step has entries at the ``STEP_EPS`` floor, with how many.

    Such an entry quantizes its channel to (almost) zero. With the step learned as ``log s`` no
    optimizer can push it there by overshooting (a linear step could cross zero: Adam at 5e-4 did
    so for a quarter of the 8-bit weight steps); a count above zero now means a step that training
    drove down by many orders of magnitude, or a hand-set one.
    """
    out: Dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer) and m.enabled and bool(m.initialized):
            n = int((m.effective_step() <= STEP_EPS * (1 + 1e-3)).sum())
            if n:
                out[name] = n
    return out
