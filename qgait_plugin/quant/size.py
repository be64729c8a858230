"""Model size at the bit widths the weights are stored with, as a deployment would count it."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .layers import QuantLayerMixin


def size_breakdown(model: nn.Module) -> Dict[str, int]:
    """Bytes by kind: ``quantized_weights`` (packed at their bit width), ``float_params`` (everything
    else trainable, steps included, at their dtype) and ``buffers`` (BN statistics and the like).

    Boolean/integer bookkeeping buffers (initialisation flags, ``num_batches_tracked``) are not
    part of a deployed model and are left out.
    """
    quantized_ids = {}
    for m in model.modules():
        if isinstance(m, QuantLayerMixin) and m.weight_quant.enabled:
            quantized_ids[id(getattr(m, m.qgait_param))] = m.weight_quant.bits
    qbits = 0
    float_bytes = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized_ids:
            qbits += p.numel() * quantized_ids[id(p)]
        else:
            float_bytes += p.numel() * p.element_size()
    buf_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if torch.is_floating_point(b))
    return {"quantized_weights": (qbits + 7) // 8, "float_params": float_bytes, "buffers": buf_bytes}


def model_size_bytes(model: nn.Module) -> int:
    """Total bytes of :func:`size_breakdown`: the figure the results tables report."""
    return sum(size_breakdown(model).values())
