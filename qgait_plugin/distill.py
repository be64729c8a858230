"""IDD (inter-class distance-guided distillation): the loss, and the part-wise distances it is built on.

Also :class:`EmbeddingKDLoss`, plain embedding distillation, the control IDD is compared against.

After phase 1 (LSQ with STE) the embeddings of different people move relative to each other
compared with the full-precision network, and that costs retrieval accuracy. IDD pulls the
student's *relative* inter-class distances back to those of the FP teacher
(:mod:`qgait_plugin.teacher`). For embeddings ``[n, c, p]`` (batch, channels, parts) and labels:

* ``D_S``, ``D_T``: Euclidean distance matrices per part (:func:`part_distances`), averaged over
  the parts;
* ``M_ij = (y_i != y_j)``: only pairs of different labels count;
* each matrix is divided by its own mean over ``M`` (so a uniformly scaled student costs nothing);
* the loss is the mean over ``M`` of smooth-L1 (or L1, or L2) between the two, times a weight.

Plain PyTorch: nothing here knows about a host.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import IDD_CRITERIA, IDDConfig, KDConfig, QuantConfig

#: Smallest normaliser (mean inter-class distance) divided by; keeps a collapsed batch finite.
_NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# the loss


def part_distances(emb: torch.Tensor) -> torch.Tensor:
    """``[p, n, n]`` Euclidean distances between samples, one matrix per part.

    ``emb`` is ``[n, c, p]`` (OpenGait's layout) or ``[n, c]`` (one part). The distances are
    computed in float32 whatever the input dtype (bfloat16/float16 distances of nearby
    embeddings lose most of their digits), without the ``|a|^2 + |b|^2 - 2ab`` shortcut, so two
    identical embeddings have distance exactly 0, and ``cdist``'s backward gives 0 (not NaN)
    there: a loss may mask the diagonal without any epsilon under the square root.
    """
    if emb.dim() == 2:
        emb = emb.unsqueeze(-1)
    x = emb.float().permute(2, 0, 1).contiguous()  # [p, n, c]
    return torch.cdist(x, x, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


class IDDLoss(nn.Module):
    """Inter-class distance-guided distillation on ``[n, c, p]`` embeddings.

    ``loss, info = idd(student, teacher, labels)``. ``teacher`` is treated as a constant target
    (detached). ``info`` holds detached 0-dim float32 tensors, so logging them costs no device
    sync until the host asks for ``float(v)``:

    * ``loss``: the weighted loss;
    * ``dist_student`` / ``dist_teacher``: mean inter-class distance of each model, the
      normalisers of the relative distances (the relative distances themselves average exactly
      1 over the inter-class pairs by construction, so their scale drift is what these show);
    * ``rel_gap``: mean absolute difference of the relative distances over the pairs used,
      whatever the criterion (0 when the geometries agree);
    * ``pair_fraction``: the share of off-diagonal pairs that are inter-class (0 for a batch of
      one label, where the loss is 0 and its gradient is 0).

    ``beta`` is smooth-L1's switch point between the quadratic and the linear part; relative
    distances sit around 1, so with the default 1.0 small discrepancies are penalised
    quadratically and outliers (a sample far off in one model) only linearly.
    """

    def __init__(self, weight: float = 1.0, criterion: str = "smooth_l1", beta: float = 1.0) -> None:
        super().__init__()
        if criterion not in IDD_CRITERIA:
            raise ValueError(f"IDDLoss criterion {criterion!r} is not allowed; choose one of {list(IDD_CRITERIA)}")
        if not weight >= 0:
            raise ValueError(f"IDDLoss weight must be >= 0, got {weight!r}")
        if not beta > 0:
            raise ValueError(f"IDDLoss beta must be > 0, got {beta!r}")
        self.weight = float(weight)
        self.criterion = criterion
        self.beta = float(beta)

    @classmethod
    def from_config(cls, config: Any) -> IDDLoss:
        """From a :class:`~qgait_plugin.config.QuantConfig`, its ``idd`` part or the ``quant:`` dict."""
        if isinstance(config, IDDConfig):
            idd = config
        else:
            idd = QuantConfig.from_dict(config).idd
        return cls(weight=idd.weight, criterion=idd.criterion)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, criterion={self.criterion}"

    def _criterion(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Element-wise criterion; the caller averages it over the inter-class pairs."""
        if self.criterion == "smooth_l1":
            return F.smooth_l1_loss(a, b, reduction="none", beta=self.beta)
        if self.criterion == "l1":
            return F.l1_loss(a, b, reduction="none")
        return F.mse_loss(a, b, reduction="none")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if student.shape != teacher.shape:
            raise ValueError(f"IDDLoss: student embeddings {tuple(student.shape)} and teacher embeddings "
                             f"{tuple(teacher.shape)} must have the same shape [n, c, p]")
        if student.dim() not in (2, 3):
            raise ValueError(f"IDDLoss: embeddings must be [n, c, p] (or [n, c]), got shape {tuple(student.shape)}")
        labels = torch.as_tensor(labels, device=student.device).reshape(-1)
        n = student.shape[0]
        if labels.numel() != n:
            raise ValueError(f"IDDLoss: {labels.numel()} labels for {n} embeddings")

        # float32 throughout, also inside an autocast region (the distances need the digits).
        # Masked sums rather than boolean indexing: no host-device sync, and a batch without an
        # inter-class pair goes through the same code to a zero loss with a zero gradient.
        with torch.autocast(device_type=student.device.type, enabled=False):
            mask = (labels[:, None] != labels[None, :]).float()
            pairs = mask.sum()
            denom = pairs.clamp_min(1.0)
            d_s = part_distances(student).mean(dim=0)  # [n, n], averaged over parts
            with torch.no_grad():
                d_t = part_distances(teacher.detach().to(student.device)).mean(dim=0)
                norm_t = (d_t * mask).sum() / denom
                rel_t = d_t / norm_t.clamp_min(_NORM_EPS)
            norm_s = (d_s * mask).sum() / denom
            rel_s = d_s / norm_s.clamp_min(_NORM_EPS)
            loss = self.weight * (self._criterion(rel_s, rel_t) * mask).sum() / denom
        with torch.no_grad():
            info = {"loss": loss.detach(), "dist_student": norm_s.detach(), "dist_teacher": norm_t,
                    "rel_gap": ((rel_s.detach() - rel_t).abs() * mask).sum() / denom,
                    "pair_fraction": pairs / max(1, n * (n - 1))}
        return loss, info


class EmbeddingKDLoss(nn.Module):
    """Plain embedding distillation: ``weight * mean((S - T)^2)`` over every element of ``[n, c, p]``.

    The baseline that separates IDD from distillation in general: it asks each embedding to sit
    where the teacher's does, instead of only keeping the teacher's relative distances between
    people. ``loss, info = kd(student, teacher)``; the teacher is a constant target.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"EmbeddingKDLoss weight must be >= 0, got {weight!r}")
        self.weight = float(weight)

    @classmethod
    def from_config(cls, config: Any) -> EmbeddingKDLoss:
        """From a :class:`~qgait_plugin.config.QuantConfig`, its ``kd`` part or the ``quant:`` dict."""
        kd = config if isinstance(config, KDConfig) else QuantConfig.from_dict(config).kd
        return cls(weight=kd.weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if student.shape != teacher.shape:
            raise ValueError(f"EmbeddingKDLoss: student embeddings {tuple(student.shape)} and teacher embeddings "
                             f"{tuple(teacher.shape)} must have the same shape")
        with torch.autocast(device_type=student.device.type, enabled=False):
            mse = F.mse_loss(student.float(), teacher.detach().float().to(student.device))
            loss = self.weight * mse
        return loss, {"loss": loss.detach(), "mse": mse.detach()}
