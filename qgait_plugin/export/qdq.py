"""Quantizers as the ONNX nodes an integer runtime fuses: what each quantizer emits during export.

The training quantizer (:class:`~qgait_plugin.quant.quantizer.LSQQuantizer`) carries no export
switch. :func:`export_mode` swaps the class of every quantizer of a model for the duration of an
export; each then computes the same values as in training through a ``torch.autograd.Function``
whose ``symbolic`` writes exactly these nodes (TorchScript exporter, ``autograd_inlining=False``):

* an input or block quantizer: ``QuantizeLinear(uint8, scale, zp) [-> Clip] -> DequantizeLinear``.
  Unsigned grids use zero point 0; signed grids zero point 128, which maps the symmetric grid
  ``[-q, q]`` into uint8 exactly. A grid narrower than the uint8 container is clipped on the
  integer tensor (a ``Clip`` on uint8 between Q and DQ), never by a float clip in front of Q,
  which would break the runtime's fusion.
* a weight: the trained integers as an int8 constant -> ``DequantizeLinear`` with one scale per
  output channel (axis 0, zero point 0), or one scale per tensor. Steps along two axes (the
  per-part FC's ``[parts, 1, out]``) have no single-axis form: the weight is the integers behind
  ``DequantizeLinear(scale 1)`` times the steps, and a graph pass
  (:func:`~qgait_plugin.export.passes.move_column_scales`) moves that multiplication behind the
  MatMul, where it scales output columns and the MatMul itself runs on integers.
* the first layer's exact input (binary silhouettes the loaders scale to ``k / 255``):
  ``QuantizeLinear(scale 1/255, zp 0)`` gives back ``k`` exactly, so the stem runs in int8 too.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..quant import bias, qlinear_add
from ..quant.convert import iter_quantizers
from ..quant.layers import QuantLayerMixin
from ..quant.placement import Placement, TracedPlacement
from ..quant.quantizer import LSQQuantizer

#: scale of the first layer's input: the loaders feed ``uint8 / 255``, so ``Q(x, 1/255)`` is exact
EXACT_INPUT_SCALE = bias.EXACT_INPUT_SCALE
#: zero point of signed activation grids in their uint8 container
SIGNED_ZERO_POINT = qlinear_add.SIGNED_ZERO_POINT

# integer weights of the export in progress, by key: the symbolic functions read them back
_WEIGHTS: Dict[int, Tuple[torch.Tensor, torch.Tensor, Optional[int]]] = {}
_KEYS = itertools.count()


def act_qparams(q: LSQQuantizer) -> Tuple[float, int, int, int]:
    """``(scale, zero_point, lo, hi)`` of an activation quantizer in its uint8 container."""
    qmin, qmax = q.qrange_now()
    zp = SIGNED_ZERO_POINT if q.signed else 0
    return float(q.effective_step().reshape(-1)[0]), zp, qmin + zp, qmax + zp


class _QDQ(torch.autograd.Function):
    """``(clamp(round(x / scale) + zp, lo, hi) - zp) * scale``, written as Q [-> Clip] -> DQ on uint8."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, zp: int, lo: int, hi: int) -> torch.Tensor:
        # float scalars throughout: torch 1.13's tracer breaks its peephole pass on a tensor + int
        return (torch.clamp(torch.round(x / scale) + float(zp), float(lo), float(hi)) - float(zp)) * scale

    @staticmethod
    def symbolic(g: Any, x: Any, scale: float, zp: int, lo: int, hi: int) -> Any:
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zp, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, s, z)
        if (lo, hi) != (0, 255):
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(lo, dtype=torch.uint8)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=torch.uint8)))
        return g.op("DequantizeLinear", q, s, z)


class _WeightDQ(torch.autograd.Function):
    """The dequantized weight; written as an int8 constant -> DequantizeLinear (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, ints: torch.Tensor, scale: torch.Tensor, key: int) -> torch.Tensor:
        # ints and scale arrive as arguments, not read from _WEIGHTS: torch 1.13's tracer fails
        # ("unordered_map::at") on a tensor of the enclosing trace that a Function's forward captures
        return ints.to(w.dtype) * scale.to(w.dtype)

    @staticmethod
    def symbolic(g: Any, w: Any, ints_value: Any, scale_value: Any, key: int) -> Any:
        ints, scale, axis = _WEIGHTS[key]
        c = g.op("Constant", value_t=ints.to(torch.int8))
        if axis is None and scale.numel() > 1:  # steps along several axes: DQ(scale 1), then the steps
            one = g.op("Constant", value_t=torch.tensor(1.0, dtype=torch.float32))
            zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
            return g.op("Mul", g.op("DequantizeLinear", c, one, zero), g.op("Constant", value_t=scale.float()))
        if axis is None:
            return g.op("DequantizeLinear", c, g.op("Constant", value_t=scale.reshape(()).float()),
                        g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8)))
        return g.op("DequantizeLinear", c, g.op("Constant", value_t=scale.reshape(-1).float()),
                    g.op("Constant", value_t=torch.zeros(scale.numel(), dtype=torch.int8)), axis_i=axis)


def weight_integers(q: LSQQuantizer, w: torch.Tensor) -> torch.Tensor:
    """The integers ``clamp(round(w / s), qmin, qmax)`` a deployed layer stores for ``w``."""
    qmin, qmax = q.qrange_now()
    return torch.clamp(torch.round(w.detach() / q.effective_step()), qmin, qmax)


class QDQQuantizer(LSQQuantizer):
    """An :class:`LSQQuantizer` that computes through :class:`_QDQ` / :class:`_WeightDQ`.

    It has no extra state: TorchScript tracing cannot hold a dict in a state dict.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def forward(self, x: torch.Tensor, grad_numel: Optional[int] = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            raise RuntimeError("cannot export a quantizer that was never initialised: run a training batch first")
        if self.kind == "act":
            return _QDQ.apply(x, *act_qparams(self))
        step = self.effective_step()
        axes = [i for i, n in enumerate(step.shape) if n > 1]
        axis = axes[0] if len(axes) == 1 else None
        key = next(_KEYS)
        ints, scale = weight_integers(self, x).to(torch.int8), step.detach().clone()
        _WEIGHTS[key] = (ints, scale, axis)
        return _WeightDQ.apply(x, ints, scale, key)


class ExactInputQDQ(LSQQuantizer):
    """The switched-off input quantizer of a layer whose input is exact (``k / 255``): Q/DQ at scale 1/255."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def forward(self, x: torch.Tensor, grad_numel: Optional[int] = None) -> torch.Tensor:
        return _QDQ.apply(x, EXACT_INPUT_SCALE, 0, 0, 255)


@contextlib.contextmanager
def export_mode(model: nn.Module, exact_input: bool = True) -> Iterator[nn.Module]:
    """Quantizers emit their ONNX nodes while inside; the model is in eval mode. Put back on exit.

    ``exact_input``: the first layer's unquantized input (``first_layer_act: false``) is written as
    ``Q(1/255)``, exact for inputs on the ``k / 255`` grid the loaders produce.
    """
    swapped: Dict[nn.Module, type] = {}
    for _, q in iter_quantizers(model):
        swapped[q] = type(q)
        q.__class__ = QDQQuantizer
    if exact_input:
        for m in model.modules():
            if isinstance(m, QuantLayerMixin) and m.qgait_exact_input and not m.act_quant.enabled:
                swapped.setdefault(m.act_quant, type(m.act_quant))
                m.act_quant.__class__ = ExactInputQDQ
    for m in model.modules():
        if type(m) is Placement:
            swapped[m] = Placement
            m.__class__ = TracedPlacement
    was_training = model.training
    model.eval()
    try:
        with bias.disabled():  # the graph passes round the folded biases themselves
            yield model
    finally:
        for mod, cls in swapped.items():
            mod.__class__ = cls
        _WEIGHTS.clear()
        model.train(was_training)
