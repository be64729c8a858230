"""Residual-block handlers for the blocks of OpenGait's backbones (see :mod:`qgait_plugin.quant.blocks`).

* torchvision's ``BasicBlock`` (OpenGait's ResNet9, the GaitBase backbone, subclasses torchvision's
  ResNet), DeepGaitV2's ``BasicBlock2D`` and ``BasicBlock3D``: conv1-bn1-relu-conv2-bn2 plus a
  shortcut called ``downsample`` (a conv + BatchNorm, ``None``, or an identity lambda), the
  core's :class:`~qgait_plugin.quant.blocks.ConvBNBlockHandler`;
* DeepGaitV2's ``BasicBlockP3D``: a per-frame conv-bn-relu (``conv1``), then an inner residual add
  of that output and a temporal 3x1x1 conv + BatchNorm of it (``shortcut3d``, ``sbn``), ReLU, a
  per-frame conv-bn (``conv2``) and the outer add with the shortcut. Its forward here quantizes
  the tensors of both adds: the ReLU'd ``conv1`` output once for the temporal conv and the inner
  add, the temporal branch's output, the residual branch's output and the projection's output.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.blocks import (
    BlockPlan,
    ConvBNBlockHandler,
    QuantBlockMixin,
    first_quant_layer,
    is_identity_shortcut,
    register_block_handler,
    usable_layer,
)
from ..quant.quantizer import LSQQuantizer


class P3DBlockForward(QuantBlockMixin):
    """DeepGaitV2's pseudo-3D block with the tensors of both adds quantized (input ``[n, c, s, h, w]``)."""

    conv1: nn.Module
    conv2: nn.Module
    shortcut3d: Any
    sbn: nn.Module
    downsample: Any
    tmp_quant: LSQQuantizer
    res_quant: LSQQuantizer
    sc_quant: LSQQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = first_quant_layer(self.conv1)
        assert first is not None
        xq = first.act_quant(x)
        y = self.conv1(xq)  # per frame: conv, BN, ReLU
        yq = self.shortcut3d.act_quant(y)  # read by the temporal conv and by the inner add
        y = F.relu(yq + self.tmp_quant(self.sbn(self.shortcut3d(yq))))
        y = self.res_quant(self.conv2(y))  # per frame: conv, BN
        if is_identity_shortcut(self.downsample):
            sc = xq if self.downsample is None or isinstance(self.downsample, nn.Module) else self.downsample(xq)
        else:
            sc = self.sc_quant(self.downsample(xq))
        return self.qgait_output(F.relu(y + sc))


class P3DBlockHandler(ConvBNBlockHandler):
    """Handler for ``BasicBlockP3D``."""

    def __init__(self) -> None:
        super().__init__(shortcut="downsample", forward_mixin=P3DBlockForward)

    def plan(self, block: nn.Module) -> Optional[BlockPlan]:
        """The conv-BN block's plan, plus the temporal conv whose input is also added (``tmp_quant``)."""
        temporal = first_quant_layer(getattr(block, "shortcut3d", None))
        base = super().plan(block) if usable_layer(temporal) else None
        if base is None:
            return None
        assert temporal is not None
        return BlockPlan(base.input_layers, prequantized=[temporal],
                         quantizers={"tmp_quant": True, **base.quantizers})


_CONV_BN = ConvBNBlockHandler(shortcut="downsample")
_P3D = P3DBlockHandler()


def register_opengait_blocks(modules: Any) -> None:
    """Register the block handlers for torchvision's ``BasicBlock`` and ``modules``' DeepGaitV2 blocks.

    ``modules`` is OpenGait's ``modeling.modules``; idempotent."""
    try:  # OpenGait's ResNet9 blocks; the opengait extra installs torchvision
        from torchvision.models.resnet import BasicBlock
    except ImportError:
        BasicBlock = None
    if BasicBlock is not None:
        register_block_handler(BasicBlock, _CONV_BN)
    for name in ("BasicBlock2D", "BasicBlock3D"):
        if hasattr(modules, name):
            register_block_handler(getattr(modules, name), _CONV_BN)
    if hasattr(modules, "BasicBlockP3D"):
        register_block_handler(modules.BasicBlockP3D, _P3D)
