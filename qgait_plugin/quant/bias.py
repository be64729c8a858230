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

When the dataflow placement knows the quantizer of the conv's output (``qgait_output_quant``), the
conv also hands over its exact integer accumulator (``_qgait_acc``) and the hook goes further
(:func:`requantize_like_runtime`): it computes the whole requantization in the runtime's arithmetic
(the exporter's float32 folded step and int32 bias, the multiplier ``fp32(s_x * s_w / s_y)``, round
half to even), so the eval output is on the output grid exactly where the deployed model's is.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

#: attribute a quantized conv sets on its eval-mode output, naming itself to the BatchNorm hook below
CONV_MARK = "_qgait_conv"

#: attribute a quantized conv sets on its eval-mode output when the placement gave it an output
#: quantizer: its exact integer accumulator, from which the hook below requantizes as the runtime does
ACC_MARK = "_qgait_acc"

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
    acc = getattr(inputs[0], ACC_MARK, None)
    out_q = getattr(conv, "qgait_output_quant", None)
    if acc is not None and out_q is not None and out_q.enabled and bool(out_q.initialized):
        return requantize_like_runtime(bn, conv, acc, sx, out_q).to(output.dtype)
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


@torch.no_grad()
def requantize_like_runtime(bn: Any, conv: Any, acc: torch.Tensor, sx: float, out_q: Any) -> torch.Tensor:
    """The output of conv + ``bn`` (+ ReLU) on ``out_q``'s grid as an integer runtime computes it
    (onnxruntime's QLinearConv after the exporter folded ``bn``): the folded step and the int32 bias
    in the exporter's float32 arithmetic, the multiplier ``fp32(fp32(s_x * s_w) / s_y)``, then
    ``round_half_even(fp32(fp32(acc + bias) * M))`` clamped to the grid. Returns ``q * s_y``, which
    ``out_q`` maps back to ``q`` exactly, so near-tie values round as deployed."""
    f32 = torch.float32
    eps = float(torch.tensor(bn.eps, dtype=f32))  # ONNX stores BatchNormalization's epsilon as a float32
    g = bn.running_var.double().add(eps).sqrt()
    g = (bn.weight.double() if bn.weight is not None else torch.ones_like(g)) / g
    step = conv.weight_quant.effective_step().double().reshape(-1).expand(g.shape[0])
    new_step = (step * g.abs()).clamp_min(float(torch.finfo(f32).tiny)).to(f32)
    bias = -bn.running_mean.double() * g
    if bn.bias is not None:
        bias = bn.bias.double() + bias
    sb = torch.tensor(sx, dtype=f32) * new_step
    bias_int = torch.round(bias.to(f32).double() / sb.double())
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    total = acc  # the conv's own accumulator, read by nothing after this hook: updated in place (eval is slow enough)
    if bool((g < 0).any()):
        total.mul_(torch.where(g < 0, -1.0, 1.0).double().reshape(shape))
    total.add_(bias_int.reshape(shape))
    return requantize_accumulator(total, sb, out_q)


@torch.no_grad()
def requantize_accumulator(acc: torch.Tensor, sb: torch.Tensor, out_q: Any) -> torch.Tensor:
    """``round_half_even(fp32(acc) * fp32(sb / s_y))`` clamped to ``out_q``'s grid, times ``s_y``: the
    output step of QLinearConv for the integer accumulator ``acc`` (bias included) whose unit is the
    float32 ``sb`` (``s_x * s_w`` per output channel)."""
    f32 = torch.float32
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    ys = out_q.effective_step().reshape(-1)[0].to(f32)
    mult = (sb / ys).to(f32)
    qmin, qmax = out_q.qrange_now()
    return acc.to(f32).mul_(mult.reshape(shape)).round_().clamp_(qmin, qmax).mul_(ys)


def requantize_conv_output(conv: Any, acc: torch.Tensor, sx: float, out_q: Any) -> torch.Tensor:
    """A conv with no BatchNorm after it whose output ``out_q`` quantizes (the placement's
    ``qgait_requant_direct``: conv -> LeakyReLU in GaitSet, GaitPart, GaitGL, GLN), requantized as
    QLinearConv computes it."""
    step = conv.weight_quant.effective_step().to(torch.float32).reshape(-1).expand(acc.shape[1])
    return requantize_accumulator(acc, torch.tensor(sx, dtype=torch.float32) * step, out_q)


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
