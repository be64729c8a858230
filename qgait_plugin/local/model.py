"""GaitBaseLite: a compact GaitBase-style model whose widths come from the config.

The structure follows GaitBase (OpenGait's baseline) so that what the demo shows about quantization
carries over: a per-frame 2D residual conv backbone, temporal max pooling over the set of frames,
horizontal pyramid pooling (max + mean per strip), per-part FC layers and a BNNeck classifier. The
per-part layers keep OpenGait's ``fc_bin`` parameters of shape ``[parts, in, out]`` used via
``x.matmul(self.fc_bin)``, so the core's ``ParamMatmulHandler`` quantizes them exactly as it does
OpenGait's ``SeparateFCs`` / ``SeparateBNNecks``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """3x3-3x3 residual block with a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Backbone(nn.Module):
    """Stem conv, then one stage of BasicBlocks per entry of ``channels``."""

    def __init__(self, channels: Sequence[int], layers: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        stages = []
        cin = channels[0]
        for c, n, s in zip(channels, layers, strides):
            blocks = [BasicBlock(cin, c, s)] + [BasicBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.layers = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))


class HorizontalPoolingPyramid(nn.Module):
    """Split the feature map into horizontal strips (one pyramid level per ``bin_num``), max + mean each."""

    def __init__(self, bin_num: Sequence[int]):
        super().__init__()
        self.bin_num = list(bin_num)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, c, h, w] -> [n, c, parts]
        n, c = x.shape[:2]
        feats = []
        for b in self.bin_num:
            z = x.reshape(n, c, b, -1)
            feats.append(z.mean(-1) + z.amax(-1))
        return torch.cat(feats, -1)


class SeparateFCs(nn.Module):
    """One linear map per part: ``[parts, n, in] @ fc_bin[parts, in, out]``."""

    def __init__(self, parts_num: int, in_channels: int, out_channels: int):
        super().__init__()
        self.fc_bin = nn.Parameter(nn.init.xavier_uniform_(torch.empty(parts_num, in_channels, out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, c, p] -> [n, out, p]
        out = x.permute(2, 0, 1).contiguous().matmul(self.fc_bin)
        return out.permute(1, 2, 0).contiguous()


class SeparateBNNecks(nn.Module):
    """BNNeck: one BatchNorm over all parts' features, then a per-part classifier ``fc_bin``."""

    def __init__(self, parts_num: int, in_channels: int, class_num: int):
        super().__init__()
        self.bn1d = nn.BatchNorm1d(in_channels * parts_num)
        self.fc_bin = nn.Parameter(nn.init.xavier_uniform_(torch.empty(parts_num, in_channels, class_num)))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # -> feat [n,c,p], logits [n,k,p]
        n, c, p = x.shape
        feat = self.bn1d(x.reshape(n, -1)).reshape(n, c, p)
        logits = feat.permute(2, 0, 1).contiguous().matmul(self.fc_bin).permute(1, 2, 0).contiguous()
        return feat, logits


class GaitBaseLite(nn.Module):
    """Input ``[n, s, h, w]`` silhouettes in [0, 1]; returns embeddings ``[n, c, p]`` and logits ``[n, k, p]``."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64), layers: Sequence[int] = (1, 1, 1),
                 strides: Sequence[int] = (1, 2, 1), bin_num: Sequence[int] = (16,), out_channels: int = 64,
                 class_num: int = 74):
        super().__init__()
        parts = sum(bin_num)
        self.Backbone = Backbone(channels, layers, strides)
        self.HPP = HorizontalPoolingPyramid(bin_num)
        self.FCs = SeparateFCs(parts, channels[-1], out_channels)
        self.BNNecks = SeparateBNNecks(parts, out_channels, class_num)

    def forward(self, sils: torch.Tensor) -> Dict[str, torch.Tensor]:
        n, s, h, w = sils.shape
        f = self.Backbone(sils.reshape(n * s, 1, h, w))
        f = f.reshape(n, s, *f.shape[1:]).amax(1)  # temporal max pooling (set pooling)
        emb = self.FCs(self.HPP(f))
        _, logits = self.BNNecks(emb)
        return {"embeddings": emb, "logits": logits}


def build_model(model_cfg: dict) -> GaitBaseLite:
    """GaitBaseLite from ``model_cfg`` (OpenGait-style keys)."""
    from ..config import ConfigError

    fcs = model_cfg.get("SeparateFCs") or {}
    necks = model_cfg.get("SeparateBNNecks") or {}
    channels = list(model_cfg["channels"])
    for sec, key, expect in (("SeparateFCs", "in_channels", channels[-1]),
                             ("SeparateFCs", "parts_num", sum(model_cfg["bin_num"])),
                             ("SeparateBNNecks", "parts_num", sum(model_cfg["bin_num"])),
                             ("SeparateBNNecks", "in_channels", fcs.get("out_channels", 64))):
        got = (model_cfg.get(sec) or {}).get(key)
        if got is not None and got != expect:
            raise ConfigError(f"model_cfg.{sec}.{key}: {got!r} does not match the model ({expect}); "
                              "leave it out to derive it from channels/bin_num")
    return GaitBaseLite(channels, model_cfg["layers"], model_cfg["strides"], model_cfg["bin_num"],
                        fcs.get("out_channels", 64), necks.get("class_num", 74))


def register_quant_handlers() -> None:
    """Tell the core's converter how to quantize the raw ``fc_bin`` parameters of this file's modules,
    and that :class:`BasicBlock` is a residual block (conv1-bn1-relu-conv2-bn2, projection ``down``)."""
    from ..quant.blocks import ConvBNBlockHandler, register_block_handler
    from ..quant.handlers import ParamMatmulHandler, register_handler, registered_types

    for cls in (SeparateFCs, SeparateBNNecks):
        if cls not in registered_types():
            register_handler(cls, ParamMatmulHandler(param="fc_bin"))
    register_block_handler(BasicBlock, ConvBNBlockHandler(shortcut="down"))
