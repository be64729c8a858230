"""Fake-quantize ops for export: quantizers that ONNX's exporter turns into QuantizeLinear/DequantizeLinear.

The training quantizer (:class:`~qgait_plugin.quant.quantizer.LSQQuantizer`) carries no export
switch. :func:`export_mode` swaps the class of every quantizer of a model to :class:`QDQQuantizer`
for the duration of an export: the same values, computed with torch's own fake-quantize ops,
which the TorchScript exporter writes as Q/DQ pairs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..quant.convert import iter_quantizers
from ..quant.layers import QuantLayerMixin
from ..quant.quantizer import LSQQuantizer


def qdq_forward(q: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """``q``'s forward through ``torch.fake_quantize_per_*_affine``.

    Grids narrower than 8 bits travel in an 8-bit container (int8 ``[-128, 127]`` or uint8
    ``[0, 255]``, the ranges onnxruntime runs) behind a clamp to their own range, so the exported
    graph computes exactly what training saw.
    """
    if not bool(q.initialized):
        raise RuntimeError("cannot export a quantizer that was never initialised: run a training batch first")
    qmin, qmax = q.qrange_now()
    cmin, cmax = (-128, 127) if q.signed else (0, 255)
    # Python numbers and freshly made tensors become constants in the traced graph
    steps = q.effective_step().reshape(-1).tolist()
    axes = [i for i, n in enumerate(q.step.shape) if n > 1]
    if not axes:
        if (qmin, qmax) != (cmin, cmax):
            x = torch.clamp(x, steps[0] * qmin, steps[0] * qmax)
        return torch.fake_quantize_per_tensor_affine(x, steps[0], 0, cmin, cmax)
    # weights: export_mode clamps them to their grid's range beforehand
    if len(axes) == 1:
        scale = torch.tensor(steps, dtype=torch.float32)
        zp = torch.zeros(len(steps), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axes[0], cmin, cmax)
    # steps along several axes (per part and channel): no single-axis op exists; the values are
    # computed here and constant-folded by the exporter, exact but stored as float
    s = torch.tensor(steps, dtype=x.dtype).reshape(q.step.shape)
    return torch.clamp(torch.round(x / s), qmin, qmax) * s


class QDQQuantizer(LSQQuantizer):
    """An :class:`LSQQuantizer` that computes with :func:`qdq_forward`.

    It has no extra state: TorchScript tracing cannot hold a dict in a state dict.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq_forward(self, x) if self.enabled else x


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Quantizers emit torch's fake-quantize ops while inside; the model is in eval mode.

    Weights are clamped to their own grid's range for the duration (quantizing a clamped weight
    gives the same integers), so the 8-bit container never clips a narrower grid differently.
    Everything is put back on exit.
    """
    qs = [q for _, q in iter_quantizers(model)]
    was_training = model.training
    saved = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLayerMixin) and m.weight_quant.enabled:
                w, wq = getattr(m, m.qgait_param), m.weight_quant
                s = wq.effective_step()
                saved.append((w, w.detach().clone()))
                w.copy_(torch.minimum(torch.maximum(w, s * wq.qmin), s * wq.qmax))
    classes = [type(q) for q in qs]
    for q in qs:
        q.__class__ = QDQQuantizer
    model.eval()
    try:
        yield model
    finally:
        for q, cls in zip(qs, classes):
            q.__class__ = cls
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
        model.train(was_training)
