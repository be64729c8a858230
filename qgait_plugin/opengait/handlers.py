"""Quantization handlers for OpenGait's modules that multiply by a raw ``nn.Parameter``.

``SeparateFCs`` and ``SeparateBNNecks`` hold ``fc_bin`` shaped ``[parts, in, out]`` and compute
``x.matmul(fc_bin)`` per part. With ``norm`` on they multiply *normalised* tensors (the weight's
columns, and for the BNNeck also the features), so quantizing the raw ``fc_bin`` and the raw input
would quantize tensors that are never multiplied. The quantized classes here put the quantizers
on what is actually multiplied: the (normalised) weight and the (normalised) matmul input. Steps
are per part and output column (``[p, 1, out]``).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.handlers import ParamMatmulHandler, register_handler
from ..quant.layers import QuantLayerMixin, quant_subclass


class _QuantFCBinMixin(QuantLayerMixin):
    """What both quantized classes read from OpenGait's module: ``fc_bin`` and the ``norm`` flag."""

    fc_bin: nn.Parameter  # [parts, in, out]
    norm: bool

    @property
    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(_fc_weight(self))


def _fc_weight(m: _QuantFCBinMixin) -> torch.Tensor:
    """The matrix the module multiplies by: ``fc_bin``, column-normalised when ``norm`` is on."""
    return F.normalize(m.fc_bin, dim=1) if getattr(m, "norm", False) else m.fc_bin


class _QuantSeparateFCsForward(_QuantFCBinMixin):
    """Per-part FC: ``out[n, :, p] = Q(x[n, :, p]) @ Q(W[p])``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, c_in, p]
        w = self.weight_quant(_fc_weight(self))
        out = self.quantize_input(x).permute(2, 0, 1).matmul(w)  # [p, n, c_out]
        return out.permute(1, 2, 0).contiguous()


class _QuantSeparateBNNecksForward(_QuantFCBinMixin):
    """BNNeck: BatchNorm over the features, then (optionally normalised) per-part classifier.

    Returns the float features (used by the triplet loss / retrieval) and logits computed from
    the quantized features and weight.
    """

    parallel_BN1d: bool
    #: one BatchNorm1d over all parts when ``parallel_BN1d``, else a ModuleList of one per part
    bn1d: Any

    def _batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        n, c, p = x.shape
        if self.parallel_BN1d:
            return self.bn1d(x.reshape(n, c * p)).reshape(n, c, p)
        return torch.stack([bn(x[:, :, i]) for i, bn in enumerate(self.bn1d)], dim=2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # x: [n, c, p]
        feat = self._batch_norm(x).permute(2, 0, 1)  # [p, n, c]
        if self.norm:
            feat = F.normalize(feat, dim=-1)
        logits = self.quantize_input(feat).matmul(self.weight_quant(_fc_weight(self)))  # [p, n, classes]
        return feat.permute(1, 2, 0).contiguous(), logits.permute(1, 2, 0).contiguous()


class OpenGaitFCHandler(ParamMatmulHandler):
    """``ParamMatmulHandler`` for ``fc_bin`` whose quantized class quantizes what is multiplied."""

    def __init__(self, forward_mixin: type) -> None:
        super().__init__(param="fc_bin")
        self.forward_mixin = forward_mixin

    def quant_class(self, cls: type) -> type:
        return quant_subclass(cls, self.forward_mixin)

    def __repr__(self) -> str:
        return f"OpenGaitFCHandler({self.forward_mixin.__name__})"


_REGISTERED: Dict[type, OpenGaitFCHandler] = {}


def register_opengait_handlers(modules: Any) -> None:
    """Register the handlers for ``modules.SeparateFCs`` and ``modules.SeparateBNNecks`` (idempotent).

    ``modules`` is OpenGait's ``modeling.modules``."""
    for cls, mixin in ((modules.SeparateFCs, _QuantSeparateFCsForward),
                       (modules.SeparateBNNecks, _QuantSeparateBNNecksForward)):
        if cls not in _REGISTERED:
            _REGISTERED[cls] = OpenGaitFCHandler(mixin)
        register_handler(cls, _REGISTERED[cls])
