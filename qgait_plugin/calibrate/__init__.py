"""Post-training quantization (PTQ): an integer model from a trained FP checkpoint in minutes.

:func:`calibrate_model` is the one verb. Given a model converted by
:func:`~qgait_plugin.quant.convert.quantize_model` that holds the FP weights, and a list of
calibration batches, it

1. sets weight steps from the weights and activation steps from statistics over every batch
   (:mod:`.stats`, ``quant.calibrate.estimator``);
2. keeps BatchNorm's running statistics or re-estimates them on the quantized model
   (``quant.calibrate.bn``);
3. optionally trains only the steps against the frozen FP teacher (:mod:`.objectives`,
   ``quant.calibrate.objective``).

The result is the same model a QAT run would have produced at iteration 0 with calibrated steps:
hosts save it in their QAT checkpoint layout, so test, export and a later QAT run read it unchanged.
The host supplies how to run its model on a batch (``forward``), where the embeddings are
(``embed``), the batch's labels (``labels``) and, for ``task``, its training loss. Plain PyTorch:
nothing here knows about a host.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..config import CalibrateConfig, QuantConfig
from ..quant.layers import float32_accumulation
from ..teacher import FrozenTeacher
from .objectives import Forward, first_last, recon_blocks, train_steps
from .stats import collect_and_set_steps, estimate_step, reestimate_bn

__all__ = ["calibrate_model", "collect_and_set_steps", "estimate_step", "recon_blocks", "reestimate_bn",
           "train_steps"]


def calibrate_model(model: nn.Module, batches: Sequence[Any], quant: QuantConfig, forward: Forward,
                    embed: Callable[[Any], torch.Tensor], labels: Callable[[Any], torch.Tensor],
                    teacher: Optional[FrozenTeacher] = None,
                    task_loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                    cfg: Optional[CalibrateConfig] = None, progress: bool = False) -> Dict[str, Any]:
    """Calibrate ``model`` in place on ``batches`` as ``cfg`` (default ``quant.calibrate``) says.

    Returns what it did and how long each part took: ``{"estimator", "bn", "objective",
    "quantizers": {...}, "seconds": {"statistics", "bn", "objective", "total"}, "loss_first",
    "loss_last", "loss"}``. ``teacher`` is needed by the ``idc``, ``kd`` and ``recon``
    objectives, ``task_loss`` by ``task``.
    """
    cfg = cfg or quant.calibrate
    if not batches:
        raise ValueError("calibrate_model: no calibration batches")
    # float32 sums throughout: the statistics pass is the FP network, and the objectives train as QAT
    # does; the runtime-exact eval arithmetic makes each pass ~2.7x slower on the CPU
    with float32_accumulation():
        return _calibrate(model, batches, quant, forward, embed, labels, teacher, task_loss, cfg, progress)


def _calibrate(model: nn.Module, batches: Sequence[Any], quant: QuantConfig, forward: Forward,
               embed: Callable[[Any], torch.Tensor], labels: Callable[[Any], torch.Tensor],
               teacher: Optional[FrozenTeacher], task_loss: Optional[Callable[[Any, Any], torch.Tensor]],
               cfg: CalibrateConfig, progress: bool) -> Dict[str, Any]:
    t0 = time.perf_counter()
    info: Dict[str, Any] = {"estimator": cfg.estimator, "bn": cfg.bn, "objective": cfg.objective,
                            "batches": len(batches)}
    info["quantizers"] = collect_and_set_steps(model, batches, forward, cfg.estimator, cfg.percentile, progress)
    seconds = {"statistics": time.perf_counter() - t0}
    t1 = time.perf_counter()
    if cfg.bn == "reestimate":
        info["bn_layers"] = reestimate_bn(model, batches, forward, progress)
    seconds["bn"] = time.perf_counter() - t1
    seconds["objective"] = 0.0
    if cfg.objective != "none" and cfg.iters > 0:
        res = train_steps(model, teacher, batches, cfg.objective, cfg.iters, cfg.lr, forward, embed, labels,
                          quant=quant, task_loss=task_loss, train_bn=cfg.train_bn, progress=progress)
        seconds["objective"] = res["seconds"]
        info["loss"] = res["loss"]
        info["loss_first"], info["loss_last"] = first_last(res["loss"])
    seconds["total"] = time.perf_counter() - t0
    info["seconds"] = seconds
    model.eval()
    return info
