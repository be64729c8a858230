"""What one fake quantizer is: its settings as a validated, frozen :class:`QuantizerSpec`.

The vocabulary every other module checks against lives here, once: the bit widths a quantizer
accepts (:data:`ALLOWED_BITS`, with :data:`FP_BITS` meaning "leave this tensor in floating
point"), the rounding mode names (:data:`ROUNDING_NAMES`) and the soft quantizer's ``alpha``
range. The config builds one spec per quantizer (:meth:`qgait_plugin.config.QuantConfig.layer_specs`)
and the quantizer is built from it (:meth:`qgait_plugin.quant.quantizer.LSQQuantizer.from_spec`).

This module imports nothing from :mod:`qgait_plugin.quant`, so the config can validate a
``quant:`` section without loading the layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError, short_repr

#: Bit width that means "no quantizer": the tensor stays in floating point.
FP_BITS = 32
#: Bit widths a quantizer accepts.
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)
#: Rounding modes, by name; :mod:`qgait_plugin.quant.rounding` holds their functions under the same names.
ROUNDING_NAMES = ("ste", "soft")
#: What a quantizer quantizes: a layer's weight or its input.
KINDS = ("weight", "act")
#: Largest soft-quantizer ``alpha``: beyond it the surrogate's gradient becomes spikes.
ALPHA_MAX = 100.0


def check_bits(bits: Any, path: str = "bits") -> int:
    """``bits`` if it is a supported bit width, else a :class:`ConfigError` naming ``path`` and the value."""
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ConfigError(f"{path}: {short_repr(bits)} is not a supported bit width; allowed: 2..8, "
                          f"or {FP_BITS} for full precision")
    return int(bits)


def check_rounding(name: Any, path: str = "rounding") -> str:
    """``name`` if it is a rounding mode, else a :class:`ConfigError` naming ``path``, the value and the modes."""
    if not isinstance(name, str) or name not in ROUNDING_NAMES:
        raise ConfigError(f"{path}: {short_repr(name)} is not allowed; choose one of {list(ROUNDING_NAMES)}")
    return name


def check_alpha(alpha: Any, path: str = "alpha") -> float:
    """``alpha`` as a float if it lies in ``(0, ALPHA_MAX]``, else a :class:`ConfigError` naming ``path``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {type(alpha).__name__} {short_repr(alpha)}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ConfigError(f"{path}: {alpha!r} is not a finite number")
    if not alpha > 0:
        raise ConfigError(f"{path}: {short_repr(alpha)} must be > 0")
    if alpha > ALPHA_MAX:
        raise ConfigError(f"{path}: {short_repr(alpha)} is too large (allowed (0, {ALPHA_MAX:g}]); "
                          "the surrogate's gradient becomes spikes")
    return alpha


@dataclass(frozen=True)
class QuantizerSpec:
    """Everything one fake quantizer needs, checked on construction.

    * ``kind``: ``"weight"`` (initialised from the weight itself) or ``"act"`` (a layer's input,
      initialised from the first training batch);
    * ``bits``: one of :data:`ALLOWED_BITS`; :data:`FP_BITS` makes a switched-off quantizer;
    * ``signed``: ``True``/``False``, or ``None`` to decide on the first batch (unsigned when it
      holds no negative value); weights are always signed and symmetric;
    * ``per_channel``: one step per output channel (weights only; the shape comes from the layer)
      or one step for the whole tensor;
    * ``rounding``, ``alpha``, ``soft_forward``: the rounding mode, the soft quantizer's sharpness
      and the ablation that uses the surrogate in the forward pass too.
    """

    kind: str
    bits: int
    signed: Optional[bool] = None
    per_channel: bool = False
    rounding: str = "ste"
    alpha: float = 3.0
    soft_forward: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"QuantizerSpec.kind: {short_repr(self.kind)} is not allowed; "
                              f"choose one of {list(KINDS)}")
        check_bits(self.bits, "QuantizerSpec.bits")
        check_rounding(self.rounding, "QuantizerSpec.rounding")
        object.__setattr__(self, "alpha", check_alpha(self.alpha, "QuantizerSpec.alpha"))
        if self.signed not in (None, True, False):
            raise ConfigError(f"QuantizerSpec.signed: {short_repr(self.signed)} is not allowed; "
                              "choose True, False or None (auto)")
        if self.kind == "weight" and self.signed is False:
            raise ConfigError("QuantizerSpec.signed: False is not allowed for a weight; "
                              "weight grids are signed and symmetric")
        if self.kind == "act" and self.per_channel:
            raise ConfigError("QuantizerSpec.per_channel: True is not allowed for an activation; "
                              "inputs take one step per tensor")
        if self.kind == "weight":
            object.__setattr__(self, "signed", True)

    @property
    def enabled(self) -> bool:
        """False for :data:`FP_BITS`: the quantizer passes its input through unchanged."""
        return self.bits < FP_BITS
