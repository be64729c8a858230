"""The handler registry: the only place the converter learns which module types it can quantize.

A handler says which parameter of a module is its weight, what shape a per-output-channel step
has, and which quantized class the module becomes. Hosts add handlers for their own module types
(the OpenGait adapter registers ``SeparateFCs`` and ``SeparateBNNecks``); registering a type
twice warns, like timm's model registry.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import torch
from torch import nn

from .layers import FLOAT_TO_QUANT, quant_subclass


class LayerHandler:
    """Base handler: subclasses name the weight, its channel layout and the quantized class."""

    param: str = "weight"

    def channel_shape(self, weight: torch.Tensor) -> Tuple[int, ...]:
        """Shape of a per-output-channel step for ``weight`` (1 on every reduced dimension)."""
        raise NotImplementedError

    def quant_class(self, cls: type) -> type:
        raise NotImplementedError

    def weight(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, self.param)


class ConvLinearHandler(LayerHandler):
    """``nn.Conv1d/2d/3d`` and ``nn.Linear``: weight ``[out, in, *kernel]``, one step per output channel."""

    def channel_shape(self, weight: torch.Tensor) -> Tuple[int, ...]:
        return (weight.shape[0],) + (1,) * (weight.dim() - 1)

    def quant_class(self, cls: type) -> type:
        for base in cls.__mro__:
            if base in FLOAT_TO_QUANT:
                return FLOAT_TO_QUANT[base]
        raise TypeError(f"no quantized class for {cls.__name__}")


@dataclass
class ParamMatmulHandler(LayerHandler):
    """A module that computes ``x.matmul(self.<param>)`` with the parameter shaped ``[..., in, out]``.

    Example: OpenGait's per-part FC, ``fc_bin`` ``[parts, in, out]``. ``channel_dims`` are the
    dimensions that get a step each (default: every dimension but the reduced ``in``: one step
    per part and output channel).
    """

    param: str = "fc_bin"
    reduce_dim: int = -2
    channel_dims: Optional[Sequence[int]] = None

    def channel_shape(self, weight: torch.Tensor) -> Tuple[int, ...]:
        nd = weight.dim()
        red = self.reduce_dim % nd
        keep = {d % nd for d in self.channel_dims} if self.channel_dims is not None else set(range(nd)) - {red}
        return tuple(weight.shape[d] if d in keep else 1 for d in range(nd))

    def quant_class(self, cls: type) -> type:
        return quant_subclass(cls)


_REGISTRY: Dict[type, LayerHandler] = {}
#: a registry's handler type (layer or block handlers)
H = TypeVar("H")


def register_handler(module_type: Type[nn.Module], handler: LayerHandler) -> None:
    """Make ``module_type`` quantizable; warns when a type already has a handler and replaces it."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_handler needs an nn.Module subclass, got {module_type!r}")
    if module_type in _REGISTRY and _REGISTRY[module_type] is not handler:
        warnings.warn(f"quantization handler for {module_type.__module__}.{module_type.__qualname__} registered "
                      f"twice; the new one replaces {_REGISTRY[module_type]!r}", stacklevel=2)
    _REGISTRY[module_type] = handler


def unregister_handler(module_type: Type[nn.Module]) -> None:
    _REGISTRY.pop(module_type, None)


def find_handler(module: nn.Module) -> Optional[LayerHandler]:
    """The handler for ``module``'s exact type, or for a registered base class whose forward it keeps.

    A subclass that overrides ``forward`` computes something else and is left alone (it may still
    contain convertible children).
    """
    return lookup_by_type(_REGISTRY, module)


def lookup_by_type(registry: Mapping[type, H], module: nn.Module) -> Optional[H]:
    """``registry``'s entry for ``module``'s exact type, or for a base class whose ``forward`` it keeps.

    Shared by the layer and the block handler registries."""
    cls = type(module)
    if cls in registry:
        return registry[cls]
    for base in cls.__mro__[1:]:
        if issubclass(base, nn.Module) and base in registry and cls.forward is base.forward:
            return registry[base]
    return None


def registered_types() -> Tuple[type, ...]:
    return tuple(_REGISTRY)


_CONV_LINEAR = ConvLinearHandler()
for _t in FLOAT_TO_QUANT:
    register_handler(_t, _CONV_LINEAR)
