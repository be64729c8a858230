"""The IDD loss as an OpenGait loss type, and its entry in a config's ``loss_cfg``.

OpenGait's loss aggregator builds each ``loss_cfg`` entry by ``type`` from ``modeling.losses`` and
feeds it ``training_feat[log_prefix]``. The plugin registers :data:`IDD_LOSS_TYPE` there
(:func:`make_idd_loss_class`) and adds an entry for it when IDD is on and the config has none.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..config import QuantConfig
from ..distill import IDDLoss

#: OpenGait loss ``type`` of the IDD loss, and the ``log_prefix`` used when the plugin adds it.
IDD_LOSS_TYPE = "QGaitIDDLoss"
IDD_LOG_PREFIX = "idd"


def loss_cfg_list(cfgs: Dict[str, Any]) -> List[Dict[str, Any]]:
    """``cfgs['loss_cfg']`` as a list (OpenGait accepts one mapping or a list of them)."""
    lc = cfgs.get("loss_cfg")
    return list(lc) if isinstance(lc, list) else ([lc] if isinstance(lc, dict) else [])


def add_idd_loss(cfgs: Dict[str, Any], qcfg: QuantConfig) -> None:
    """Append the IDD loss to ``cfgs['loss_cfg']`` unless the config declares it already."""
    lst = loss_cfg_list(cfgs)
    if not any(c.get("type") == IDD_LOSS_TYPE for c in lst):
        lst.append({"type": IDD_LOSS_TYPE, "log_prefix": IDD_LOG_PREFIX, "loss_term_weight": qcfg.idd.weight,
                    "criterion": qcfg.idd.criterion})
        cfgs["loss_cfg"] = lst


def idd_log_prefix(cfgs: Dict[str, Any]) -> str:
    """The ``log_prefix`` under which the IDD loss reads its inputs from ``training_feat``."""
    return next((c.get("log_prefix", IDD_LOG_PREFIX) for c in loss_cfg_list(cfgs) if c.get("type") == IDD_LOSS_TYPE),
                IDD_LOG_PREFIX)


def make_idd_loss_class(losses_base: Any) -> type:
    """OpenGait loss type wrapping :class:`qgait_plugin.distill.IDDLoss`.

    Derives from OpenGait's ``BaseLoss`` and goes through its gather-and-scale wrapper, like its
    triplet loss: embeddings are gathered across ranks (more inter-class pairs) and the loss is
    scaled by the world size to undo DDP's gradient averaging.
    """

    class QGaitIDDLoss(losses_base.BaseLoss):
        """Inter-class distance-guided distillation (QGait); kwargs ``student``, ``teacher``, ``labels``."""

        def __init__(self, loss_term_weight: float = 1.0, criterion: str = "smooth_l1") -> None:
            super().__init__(loss_term_weight)
            self.idd = IDDLoss(weight=1.0, criterion=criterion)

        @losses_base.gather_and_scale_wrapper
        def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                    labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
            loss, info = self.idd(student.float(), teacher.float(), labels)
            for k, v in (info or {}).items():
                self.info[k] = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.info["loss"] = loss.detach().clone()
            return loss, self.info

    QGaitIDDLoss.__module__ = __name__
    return QGaitIDDLoss
