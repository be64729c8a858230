"""Training losses of the built-in host: part-wise batch-all triplet and cross-entropy.

These mirror what OpenGait's GaitBase trains with (``TripletLoss`` on the embeddings,
``CrossEntropyLoss`` on the BNNeck logits), written here from their definitions.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distill import part_distances


class TripletLoss(nn.Module):
    """Batch-all triplet loss per part, averaged over the triplets that still violate the margin.

    Averaging over non-zero terms (as OpenGait does) keeps the gradient from vanishing as most
    triplets become easy.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        d = part_distances(emb)  # [p, n, n], float32, exact zeros (and zero gradient) on the diagonal
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = same & ~eye
        neg = ~same
        # [p, a, pos, neg] via broadcasting: d_ap[:, a, i, None] - d_an[:, a, None, j]
        mask = (pos.unsqueeze(2) & neg.unsqueeze(1)).unsqueeze(0)
        trip = F.relu(d.unsqueeze(3) - d.unsqueeze(2) + self.margin) * mask
        nonzero = (trip > 0).sum()
        loss = trip.sum() / nonzero.clamp_min(1)
        total = mask.sum() * d.shape[0]
        return loss, {"triplet_nonzero": float(nonzero) / max(float(total), 1.0)}


class CrossEntropyLoss(nn.Module):
    """Cross-entropy per part on ``[n, classes, p]`` logits, with optional scale and label smoothing."""

    def __init__(self, scale: float = 1.0, label_smooth: float = 0.0):
        super().__init__()
        self.scale = scale
        self.label_smooth = label_smooth

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        p = logits.shape[-1]
        lg = (logits * self.scale).permute(0, 2, 1).reshape(-1, logits.shape[1])  # [n*p, k]
        y = labels.repeat_interleave(p)
        loss = F.cross_entropy(lg, y, label_smoothing=self.label_smooth)
        acc = (logits.mean(-1).argmax(1) == labels).float().mean()
        return loss, {"softmax_acc": float(acc)}


def build_losses(terms: List[dict]) -> List[Tuple[str, float, str, nn.Module]]:
    """``(log_prefix, weight, input name, module)`` per configured term."""
    out: List[Tuple[str, float, str, nn.Module]] = []
    for t in terms:
        if t["type"] == "TripletLoss":
            out.append((t["log_prefix"], t["loss_term_weight"], "embeddings", TripletLoss(t["margin"])))
        else:
            out.append((t["log_prefix"], t["loss_term_weight"], "logits",
                        CrossEntropyLoss(t.get("scale", 1.0), t.get("label_smooth", 0.0))))
    return out
