"""Quantized layers: the float layers with a weight quantizer and an input quantizer in front.

Conversion swaps a module's class in place (``module.__class__ = QuantConv2d``) instead of
building a new module. That keeps parameter names (``conv.weight``), so FP checkpoints load, and
keeps object identity, so modules held in lambdas or plain Python objects are converted too.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import functional_call
from .bias import ACC_MARK, CONV_MARK
from .quantizer import LSQQuantizer

if TYPE_CHECKING:
    # The mixins are only ever put in front of an nn.Module subclass; type-check them as modules
    # (the conv mixin as a conv). At run time they derive from object and the MRO is unchanged.
    _ModuleBase = nn.Module
    _ConvBase = nn.modules.conv._ConvNd
else:
    _ModuleBase = object
    _ConvBase = object


class QuantLayerMixin(_ModuleBase):
    """What every quantized layer has: ``weight_quant``, ``act_quant`` and the name of its weight."""

    weight_quant: LSQQuantizer
    act_quant: LSQQuantizer
    #: name of the parameter the weight quantizer reads
    qgait_param: str = "weight"
    #: the input is known to be exact (binary silhouettes) and is left unquantized on purpose
    qgait_exact_input: bool = False
    #: the class this one was made from, for :func:`~qgait_plugin.quant.convert.dequantize_model`
    qgait_float_class: type = nn.Module
    #: the caller (a quantized residual block, :mod:`~qgait_plugin.quant.blocks`) quantizes this
    #: layer's input with ``act_quant`` itself, once for every consumer; the layer must not again
    qgait_input_quantized: bool = False

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``act_quant(x)``, unless the caller already did (:attr:`qgait_input_quantized`)."""
        return x if self.qgait_input_quantized else self.act_quant(x)

    @property
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(getattr(self, self.qgait_param))


#: eval-mode quantized convs on the CPU accumulate in float64 (below), and residual adds compute the
#: runtime's QLinearAdd arithmetic (quant/qlinear_add.py); :func:`float32_accumulation` turns both off
_FLOAT64_EVAL = True


def runtime_exact_eval() -> bool:
    """Whether eval computes the integer runtime's arithmetic (off inside :func:`float32_accumulation`)."""
    return _FLOAT64_EVAL


@contextlib.contextmanager
def float32_accumulation() -> Iterator[None]:
    """Inside, eval-mode quantized convs on the CPU accumulate in float32 like every other conv (and
    residual adds add in float32).

    The exact integer arithmetic matches the integer runtime at near-ties but makes the quantized model's
    eval forward ~2.7x slower on the CPU (GaitBaseLite 16-32-64, 2 threads; 3.6x before its convs ran in
    float32 where exact, 2026-12-07); a loop that runs the model thousands of times and does
    not need that last rounding agreement (calibration objectives, a benchmark's evaluation that
    says so) turns it off here."""
    global _FLOAT64_EVAL
    before = _FLOAT64_EVAL
    _FLOAT64_EVAL = False
    try:
        yield
    finally:
        _FLOAT64_EVAL = before


class _QuantConvForward(QuantLayerMixin, _ConvBase):
    """Forward of the quantized ``nn.Conv1d/2d/3d``: the float conv on the quantized input and weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self.quantize_input(x), self.weight_quant(self.weight)
        acc = None
        if (_FLOAT64_EVAL and not self.training and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.jit.is_tracing()):
            # grid values times grid values: accumulated in float64 the sum is the integer runtime's
            # exact int32 accumulator (times the two steps), so near-tie values round as deployed
            parts = integer_accumulator(self, x, w)
            direct = getattr(self, "qgait_requant_direct", None)
            if parts is not None and direct is not None and direct.enabled and bool(direct.initialized):
                # no BatchNorm follows and the placement quantizes this output: requantize as QLinearConv
                from .bias import input_scale, requantize_conv_output

                sx = input_scale(self)
                if sx is not None:
                    return requantize_conv_output(self, parts[0], sx, direct)
            if parts is not None:  # the output is the accumulator times the steps
                acc, scale = parts
                out = (acc * scale).float()
            else:
                b = self.bias.double() if self.bias is not None else None
                out = self._conv_forward(x.double(), w.double(), b).float()
        else:
            out = self._conv_forward(x, w, self.bias)
        if not self.training:  # a BatchNorm right after puts the folded bias on its int32 grid (quant/bias.py)
            setattr(out, CONV_MARK, self)
            if acc is not None:  # and, knowing the output's quantizer, requantizes as the runtime does
                setattr(out, ACC_MARK, acc)
        return out


def integer_accumulator(conv: Any, x: torch.Tensor, w: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``sum(x_int * w_int)`` of an eval-mode quantized conv, exact in float64 (the runtime's int32
    accumulator), for :func:`~qgait_plugin.quant.bias.round_folded_bias`, with the float64 scale
    ``s_x * s_w`` (per output channel, shaped to broadcast over the output) that turns it into the conv's
    output; ``None`` when the conv has no output quantizer from the placement to requantize to, or its
    input or weight is not on a grid."""
    from .bias import input_scale

    if getattr(conv, "qgait_output_quant", None) is None or conv.bias is not None:
        return None
    sx, wq = input_scale(conv), conv.weight_quant
    if sx is None or not wq.enabled or not bool(wq.initialized):
        return None
    step = wq.effective_step().double()
    # grid values divided by their step are integers within an ulp: rounding in float32 recovers them exactly
    x_int = torch.round(x / float(sx))
    w_int = torch.round(w / step.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1)))
    scale = (float(sx) * step).reshape((1, -1) + (1,) * (w.dim() - 2))  # one step or one per channel: broadcasts
    return exact_integer_conv(conv, x_int, w_int), scale


#: integers up to this magnitude, and every sum of them that stays below it, are exact in float32
_F32_EXACT = float(2 ** 24)


def exact_integer_conv(conv: Any, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """``conv`` of integer-valued float32 tensors, exact (float64 result): the runtime's int32 accumulator.

    A float32 conv of integers is exact while no partial sum can exceed 2^24 in magnitude, which
    ``fan_in * max|x| * max|w|`` bounds whatever the summation order. Within that bound one float32
    conv does it; up to 16x the bound the input is split into two 4-bit halves (``x = 16 h + l``), two
    float32 convs; beyond, one float64 conv. Float32 convs run several times faster than float64 on
    CPUs, and eval of a quantized model runs one per conv."""
    fan_in = w_int[0].numel()
    wmax = float(w_int.abs().max())
    xmax = float(x_int.abs().max())
    if fan_in * xmax * wmax <= _F32_EXACT:
        return conv._conv_forward(x_int, w_int, None).double()
    if fan_in * 16.0 * wmax <= _F32_EXACT:
        high = torch.floor(x_int / 16.0)
        low = x_int - high * 16.0
        return conv._conv_forward(high, w_int, None).double().mul_(16.0).add_(
            conv._conv_forward(low, w_int, None).double())
    return conv._conv_forward(x_int.double(), w_int.double(), None)


class QuantConv1d(_QuantConvForward, nn.Conv1d):
    qgait_float_class = nn.Conv1d


class QuantConv2d(_QuantConvForward, nn.Conv2d):
    qgait_float_class = nn.Conv2d


class QuantConv3d(_QuantConvForward, nn.Conv3d):
    qgait_float_class = nn.Conv3d


class QuantLinear(QuantLayerMixin, nn.Linear):
    qgait_float_class = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight_quant(self.weight), self.bias)


class _QuantParamForward(QuantLayerMixin):
    """Forward for modules that multiply their input by a raw ``nn.Parameter`` in their own code.

    The module's own forward runs unchanged, with the parameter replaced by its quantized
    version through ``functional_call`` (``torch.func``'s, or 1.13's ``stateless`` one) and its first
    input quantized. A flag stops
    the recursion, since ``functional_call`` calls this same forward.
    """

    _qgait_in_call: bool = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._qgait_in_call:
            return super().forward(x, *args, **kwargs)
        w = self.weight_quant(getattr(self, self.qgait_param))
        x = self.quantize_input(x)
        if torch.jit.is_tracing():  # functional_call refuses traced modules: swap the entry by hand
            original = self._parameters[self.qgait_param]
            self._parameters[self.qgait_param] = w
            try:
                return super().forward(x, *args, **kwargs)
            finally:
                self._parameters[self.qgait_param] = original
        object.__setattr__(self, "_qgait_in_call", True)
        try:
            return functional_call(self, {self.qgait_param: w}, (x, *args), kwargs)
        finally:
            object.__setattr__(self, "_qgait_in_call", False)


_SUBCLASSES: Dict[Tuple[type, type], type] = {}


def quant_subclass(cls: Type[nn.Module], forward_mixin: type = _QuantParamForward) -> type:
    """``Quant<cls>``: ``cls`` with ``forward_mixin``'s quantized forward in front of its own.

    Made once per pair, so ``isinstance`` holds across conversions and ``dequantize_model`` finds
    the float class. The default mixin quantizes a module that multiplies by a raw parameter
    (:class:`_QuantParamForward`); a host passes its own for modules that need another placement
    of the quantizers.
    """
    key = (forward_mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Quant{cls.__name__}", (forward_mixin, cls),
                                {"qgait_float_class": cls, "__module__": forward_mixin.__module__})
    return _SUBCLASSES[key]


FLOAT_TO_QUANT: Dict[type, type] = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
                                    nn.Linear: QuantLinear}
