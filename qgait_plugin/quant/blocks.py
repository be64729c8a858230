"""Residual blocks quantized as a unit: the tensors around their adds get quantizers, as deployed.

Layer conversion (:mod:`.convert`) gives every conv a quantizer on its own input. In a residual
block that leaves the add in floating point: the shortcut carries the unquantized block input, the
branch ends in a float BatchNorm output. An integer graph (QLinearAdd) quantizes both inputs of
the add and its output, so a block handler makes training quantize exactly those tensors:

* the block input is quantized once, by the first conv's input quantizer, and that same tensor
  feeds the first conv, the projection shortcut (which shares the quantizer) and the identity
  shortcut;
* the residual branch's output (after its last BatchNorm) and the projection shortcut's output
  (after its BatchNorm) go through ``bits``-wide signed quantizers (``quant.residual``);
* the add's ReLU'd output is quantized by whatever layer reads it next (unsigned, zero point 0,
  where onnxruntime drops the ReLU into the quantize step); the last block of the model, whose
  output goes to pooling instead of a layer, gets an unsigned output quantizer of its own.

The registry works like the layer handlers': :func:`register_block_handler` (warns when a type is
registered twice), exact type or a registered base whose ``forward`` a subclass keeps. Handlers
swap the block's class in place for a subclass with our forward in front of the original's, so
parameter names (and FP checkpoints) stay as they were. Blocks whose convs were left in floating
point (overrides) are left alone.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .handlers import lookup_by_type
from .layers import QuantLayerMixin
from .quantizer import LSQQuantizer

if TYPE_CHECKING:
    from ..config import QuantConfig
    _ModuleBase = nn.Module
else:
    _ModuleBase = object

#: name of the output quantizer the last block gets
OUT_QUANT = "out_quant"


@dataclass
class BlockPlan:
    """What converting one block does.

    ``input_layers``: the quantized layers that read the block input; the first one's input
    quantizer quantizes it and the others share that quantizer (their own is dropped). ``prequantized``: further layers
    whose input the block's forward quantizes itself (with their own ``act_quant``) because the
    same tensor is also added. ``quantizers``: the block-level quantizers to add, name -> signed.
    """

    input_layers: List[QuantLayerMixin]
    prequantized: List[QuantLayerMixin] = field(default_factory=list)
    quantizers: Dict[str, bool] = field(default_factory=dict)


class BlockHandler:
    """Base handler: subclasses name the forward mixin and say which layers and tensors to quantize."""

    #: the quantized forward, put in front of the block's class
    forward_mixin: type = object

    def plan(self, block: nn.Module) -> Optional[BlockPlan]:
        """The plan for ``block``, or ``None`` to leave it alone (e.g. its convs stayed float)."""
        raise NotImplementedError

    def quant_class(self, cls: type) -> type:
        return block_subclass(cls, self.forward_mixin)


def first_quant_layer(module: Any) -> Optional[QuantLayerMixin]:
    """The first quantized layer inside ``module`` (itself included), or ``None``."""
    if not isinstance(module, nn.Module):
        return None
    for m in module.modules():
        if isinstance(m, QuantLayerMixin):
            return m
    return None


def usable_layer(layer: Optional[QuantLayerMixin]) -> bool:
    """``layer`` exists and quantizes both its weight and its input."""
    return layer is not None and layer.act_quant.enabled and layer.weight_quant.enabled


def is_identity_shortcut(shortcut: Any) -> bool:
    """``None``, ``nn.Identity`` or a plain callable (OpenGait stores ``lambda x: x``)."""
    return shortcut is None or isinstance(shortcut, nn.Identity) or not isinstance(shortcut, nn.Module)


class QuantBlockMixin(_ModuleBase):
    """What every quantized block has: the names of the quantizers it added, and its float class."""

    qgait_float_class: type = nn.Module
    qgait_block_quantizers: Tuple[str, ...] = ()

    def qgait_output(self, out: torch.Tensor) -> torch.Tensor:
        """The block's output, through the output quantizer when this is the model's last block."""
        q = self._modules.get(OUT_QUANT)
        return q(out) if q is not None else out


class ConvBNBlockForward(QuantBlockMixin):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with the adds' tensors quantized.

    The layout of torchvision's ``BasicBlock`` and of the built-in and OpenGait 2D/3D blocks; the
    shortcut's attribute name comes from the handler (``qgait_shortcut``).
    """

    qgait_shortcut: str = "downsample"
    conv1: nn.Module
    bn1: nn.Module
    conv2: nn.Module
    bn2: nn.Module
    res_quant: LSQQuantizer
    sc_quant: LSQQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = first_quant_layer(self.conv1)
        assert first is not None  # the handler converts only blocks whose conv1 is quantized
        xq = first.act_quant(x)  # once, for conv1 and both kinds of shortcut
        y = F.relu(self.bn1(self.conv1(xq)))
        y = self.res_quant(self.bn2(self.conv2(y)))
        shortcut: Any = getattr(self, self.qgait_shortcut)
        if is_identity_shortcut(shortcut):
            sc = xq if shortcut is None or isinstance(shortcut, nn.Module) else shortcut(xq)
        else:
            sc = self.sc_quant(shortcut(xq))
        return self.qgait_output(F.relu(y + sc))


@dataclass
class ConvBNBlockHandler(BlockHandler):
    """Handler for :class:`ConvBNBlockForward` blocks; ``shortcut`` names the projection attribute."""

    shortcut: str = "downsample"
    forward_mixin: type = ConvBNBlockForward

    def plan(self, block: nn.Module) -> Optional[BlockPlan]:
        first = first_quant_layer(getattr(block, "conv1", None))
        second = first_quant_layer(getattr(block, "conv2", None))
        if not (usable_layer(first) and usable_layer(second)):
            return None
        assert first is not None
        layers = [first]
        quantizers = {"res_quant": True}
        shortcut = getattr(block, self.shortcut, None)
        if not is_identity_shortcut(shortcut):
            down = first_quant_layer(shortcut)
            if not usable_layer(down):
                return None
            assert down is not None
            layers.append(down)
            quantizers["sc_quant"] = True
        return BlockPlan(layers, quantizers=quantizers)

    def quant_class(self, cls: type) -> type:
        return block_subclass(cls, self.forward_mixin, {"qgait_shortcut": self.shortcut})


_SUBCLASSES: Dict[Tuple[type, type, Tuple[Tuple[str, Any], ...]], type] = {}


def block_subclass(cls: Type[nn.Module], forward_mixin: type, attrs: Optional[Dict[str, Any]] = None) -> type:
    """``QBlock<cls>``: ``cls`` with ``forward_mixin``'s forward in front; made once per combination."""
    extra = tuple(sorted((attrs or {}).items()))
    key = (forward_mixin, cls, extra)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"QBlock{cls.__name__}", (forward_mixin, cls),
                                {"qgait_float_class": cls, "__module__": forward_mixin.__module__, **dict(extra)})
    return _SUBCLASSES[key]


_REGISTRY: Dict[type, BlockHandler] = {}


def register_block_handler(block_type: Type[nn.Module], handler: BlockHandler) -> None:
    """Quantize blocks of ``block_type`` as a unit; warns when a type already has another handler."""
    if not isinstance(block_type, type) or not issubclass(block_type, nn.Module):
        raise TypeError(f"register_block_handler needs an nn.Module subclass, got {block_type!r}")
    old = _REGISTRY.get(block_type)
    if old is not None and old is not handler and old != handler:
        warnings.warn(f"block handler for {block_type.__module__}.{block_type.__qualname__} registered twice; the "
                      f"new one replaces {old!r}", stacklevel=2)
    _REGISTRY[block_type] = handler


def unregister_block_handler(block_type: Type[nn.Module]) -> None:
    _REGISTRY.pop(block_type, None)


def find_block_handler(module: nn.Module) -> Optional[BlockHandler]:
    """The handler for ``module``'s type, or for a registered base whose ``forward`` it keeps."""
    return lookup_by_type(_REGISTRY, module)


def quantize_blocks(model: nn.Module, cfg: QuantConfig) -> List[str]:
    """Convert every registered residual block of an already layer-converted ``model``; returns their names.

    Does nothing when ``quant.residual.enabled`` is off.
    """
    if not cfg.residual.enabled:
        return []
    done: List[Tuple[str, nn.Module]] = []
    for name, block in model.named_modules():
        if isinstance(block, QuantBlockMixin):
            continue
        handler = find_block_handler(block)
        plan = handler.plan(block) if handler is not None else None
        if handler is None or plan is None:
            continue
        owner = plan.input_layers[0]
        for layer in plan.input_layers:
            if layer is not owner:
                # one quantizer (one step) for the block input: the other layers refer to the owner's,
                # outside their module tree, so the state dict holds it once
                del layer.act_quant
                object.__setattr__(layer, "act_quant", owner.act_quant)
            layer.qgait_input_quantized = True
        for layer in plan.prequantized:
            layer.qgait_input_quantized = True
        device = owner.weight_quant.scaled_log_step.device
        for qname, signed in plan.quantizers.items():
            block.add_module(qname, LSQQuantizer.from_spec(cfg.residual_spec(signed)).to(device))
        block.__class__ = handler.quant_class(type(block))
        block.qgait_block_quantizers = tuple(plan.quantizers)
        done.append((name, block))
    if done:
        last: Any = done[-1][1]
        last.add_module(OUT_QUANT, LSQQuantizer.from_spec(cfg.residual_spec(signed=False)).to(
            next(iter(last.parameters())).device))
        last.qgait_block_quantizers = last.qgait_block_quantizers + (OUT_QUANT,)
    return [n for n, _ in done]


def dequantize_blocks(model: nn.Module) -> None:
    """Undo :func:`quantize_blocks`: float classes back, block quantizers removed, layer flags cleared."""
    for m in model.modules():
        if isinstance(m, QuantBlockMixin):
            for qname in m.qgait_block_quantizers:
                delattr(m, qname)
            m.__dict__.pop("qgait_block_quantizers", None)
            m.__class__ = m.qgait_float_class
        if isinstance(m, QuantLayerMixin):
            m.__dict__.pop("qgait_input_quantized", None)
