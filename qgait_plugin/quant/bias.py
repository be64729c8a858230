"""The folded bias of a quantized conv + BatchNorm on the integer grid it is deployed on.

An integer runtime folds a BatchNorm into the conv before it and adds the folded bias
``beta - mu * gamma / sigma`` (plus the conv's own bias times ``gamma / sigma``) to the int32
accumulator, so the bias is rounded to the accumulator's unit ``s_x * s_w * |gamma| / sigma``. At
low bit widths that unit is a sizeable fraction of the next quantizer's step (a tenth of it at
W4A4), so leaving the bias exact in PyTorch would make the deployed model differ from the
evaluated one in a few percent of the activations. In eval mode (running statistics, the ones
that are deployed) :func:`round_folded_bias`, a forward hook on every BatchNorm, therefore shifts
each channel of a BatchNorm that directly follows a quantized conv by the same rounding. In
training BatchNorm uses batch statistics and the hook does nothing.

The conv marks its output (``_qgait_conv``) in :class:`~qgait_plugin.quant.layers.QuantLayerMixin`;
an export turns the hook off (:func:`disabled`), since the ONNX graph does the rounding itself.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

#: attribute a quantized conv sets on its eval-mode output, naming itself to the BatchNorm hook below
CONV_MARK = "_qgait_conv"

#: scale of an exact first-layer input: the loaders feed ``uint8 / 255``
EXACT_INPUT_SCALE = 1.0 / 255.0

_ACTIVE = True
_HOOKED = "_qgait_bias_hook"


def input_scale(conv: Any) -> Optional[float]:
    """The per-tensor step of ``conv``'s (quantized or exact) input, or ``None`` for a float input."""
    if conv.act_quant.enabled and bool(conv.act_quant.initialized):
        return float(conv.act_quant.effective_step().reshape(-1)[0])
    if conv.qgait_exact_input:
        return EXACT_INPUT_SCALE
    return None


def round_folded_bias(bn: nn.Module, inputs: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
    """Forward hook: in eval mode, put the folded bias of a conv + ``bn`` pair on its int32 grid."""
    conv = getattr(inputs[0], CONV_MARK, None) if inputs else None
    if conv is None or not _ACTIVE or bn.training or not isinstance(bn, nn.modules.batchnorm._BatchNorm) \
            or bn.running_mean is None or bn.running_var is None:
        return None
    sx = input_scale(conv)
    wq = conv.weight_quant
    if sx is None or not wq.enabled or not bool(wq.initialized):
        return None
    with torch.no_grad():
        g = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            g = g * bn.weight.double()
        bias = -bn.running_mean.double() * g
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        if getattr(conv, "bias", None) is not None:
            bias = bias + conv.bias.double() * g
        unit = (sx * wq.effective_step().double().reshape(-1) * g.abs()).clamp_min(1e-30)
        shift = (torch.round(bias / unit) * unit - bias).to(output.dtype)
    return output + shift.reshape((1, -1) + (1,) * (output.dim() - 2))


def install(model: nn.Module) -> None:
    """Hook :func:`round_folded_bias` onto every BatchNorm of ``model`` (once each)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, _HOOKED, False):
            m.register_forward_hook(round_folded_bias)
            object.__setattr__(m, _HOOKED, True)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No bias rounding inside (an export writes the rounding into the graph itself)."""
    global _ACTIVE
    before = _ACTIVE
    _ACTIVE = False
    try:
        yield
    finally:
        _ACTIVE = before
