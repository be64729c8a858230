"""``quantize_model``: walk a model and give every handled layer its quantizers, in place.

Also the run-time verbs that act on a whole converted model: switch rounding modes, turn
quantization off (the teacher), list quantizers.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

from torch import nn

from ..config import FP_BITS, ConfigError, QuantConfig
from .handlers import LayerHandler, find_handler
from .layers import QuantLayerMixin
from .quantizer import LSQQuantizer
from .rounding import ROUNDING_MODES


def quantizable_layers(model: nn.Module) -> List[Tuple[str, nn.Module, LayerHandler]]:
    """Every module a handler can convert, in registration order (the order of ``named_modules``)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            continue
        h = find_handler(m)
        if h is not None and isinstance(getattr(m, h.param, None), nn.Parameter):
            out.append((name, m, h))
    return out


def _convert_one(m: nn.Module, h: LayerHandler, w_bits: int, a_bits: int, cfg: QuantConfig, exact_input: bool) -> None:
    w = h.weight(m)
    soft = cfg.schedule.soft
    common = dict(rounding=cfg.rounding, alpha=soft.alpha, soft_forward=soft.soft_forward)
    signed = {"auto": None, "true": True, "false": False}[cfg.act.signed]
    wq = LSQQuantizer(w_bits, "weight", channel_shape=h.channel_shape(w) if cfg.weight.per_channel else None, **common)
    aq = LSQQuantizer(a_bits, "act", signed=signed, **common)
    m.__class__ = h.quant_class(type(m))
    m.add_module("weight_quant", wq.to(w.device))
    m.add_module("act_quant", aq.to(w.device))
    m.qgait_param = h.param
    m.qgait_exact_input = exact_input


def quantize_model(model: nn.Module, config: "QuantConfig | dict | None") -> nn.Module:
    """Convert ``model`` in place for quantization-aware training and return it.

    Layers whose weight and input both resolve to 32 bits (an override with ``enabled: false``,
    ``last_layer: fp``) stay float modules. Steps initialise from data on first use: weights from
    themselves, inputs from the first training batch. An override that matches no layer is an
    error, since it is almost always a typo in the glob.
    """
    cfg = QuantConfig.from_dict(config) if not isinstance(config, QuantConfig) else config
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layer (Conv1d/2d/3d, Linear or a registered type)")
    names = [n for n, _, _ in layers]
    unused = cfg.unused_overrides(names)
    if unused:
        raise ConfigError(f"quant.overrides: match {unused[0].match!r} names no quantizable layer of "
                          f"{type(model).__name__}; layer names look like {names[:4]}")
    for i, (name, m, h) in enumerate(layers):
        is_first, is_last = i == 0, i == len(layers) - 1
        w_bits, a_bits = cfg.layer_bits(name, is_first, is_last)
        if w_bits == FP_BITS and a_bits == FP_BITS:
            continue
        _convert_one(m, h, w_bits, a_bits, cfg, exact_input=is_first and a_bits == FP_BITS and not cfg.first_layer_act)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model` in place: float classes back, quantizers removed."""
    for m in model.modules():
        if isinstance(m, QuantLayerMixin):
            del m.weight_quant
            del m.act_quant
            m.__class__ = m.qgait_float_class
    return model


def iter_quantizers(model: nn.Module) -> Iterator[Tuple[str, LSQQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, LSQQuantizer):
            yield name, m


def quantizer_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The learned step sizes (for optimizer groups and calibration)."""
    return [q.step for _, q in iter_quantizers(model)]


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(model))


def set_rounding(model: nn.Module, mode: str, alpha: Optional[float] = None) -> nn.Module:
    """Switch every quantizer of ``model`` to ``mode`` (``"ste"`` or ``"soft"``), optionally setting ``alpha``.

    Only the backward pass changes: forward outputs are bit-identical across modes.
    """
    if mode not in ROUNDING_MODES:
        raise ValueError(f"rounding mode {mode!r} is not one of {sorted(ROUNDING_MODES)}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    for _, q in iter_quantizers(model):
        q.rounding = mode
        if alpha is not None:
            q.alpha = float(alpha)
    return model


def set_quant_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn every quantizer of ``model`` on or off (off gives the float model, e.g. for the teacher)."""
    for _, q in iter_quantizers(model):
        q.enabled = bool(enabled) and q.bits < FP_BITS
    return model
