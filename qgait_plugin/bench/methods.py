"""The QAT methods the accuracy benchmark compares, as ``quant:`` sections of one shared protocol.

Every method starts from the same FP checkpoint and runs the same number of iterations with the
same optimizer, batch sampler and learning-rate schedule (including the drop at QGait's phase
switch, which every method gets at the same iteration), so that only the method differs:

- ``fp_continued``: no quantization, the FP model trained for the same extra iterations: the
  ceiling, and the control for "it just trained longer";
- ``lsq``: LSQ with the straight-through estimator throughout;
- ``lsq_kd``: LSQ plus plain embedding distillation (MSE) to the same FP teacher, which separates
  IDD from distillation in general;
- ``soft_from_start``: the soft quantizer from iteration 0;
- ``two_phase``: STE, then the soft quantizer, no IDD;
- ``qgait``: STE, then the soft quantizer, with IDD;
- ``dsq``: the soft surrogate in the forward pass too (``soft_forward``) from iteration 0, the
  closest published peer (Differentiable Soft Quantization); evaluated, like every method, with the
  hard quantizer the deployed model uses.

Post-training quantization (PTQ) methods (``qgait calibrate``'s calibration, no training of the
weights), all from the same FP checkpoint; the calibration draw is the run's seed:

- ``fp``: the FP checkpoint itself, evaluated (the reference PTQ is measured against);
- ``ptq``: steps from statistics only (the benchmark config's ``ptq:`` estimator and BatchNorm choice);
- ``ptq_idc``, ``ptq_kd``, ``ptq_task``, ``ptq_recon``: then ``ptq.iters`` iterations training the
  steps only on the IDC (IDD) loss, embedding MSE, the training loss or block reconstruction.

QGait's own knobs (the phase split, ``alpha`` and its anneal, the IDD settings, the quantizer
steps' learning rate) come from the benchmark config's ``qgait:`` section; ``alpha`` applies to
every method that uses the soft quantizer, ``step_lr_scale`` to every quantized method.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

from ..errors import ConfigError

METHODS = ("fp_continued", "lsq", "lsq_kd", "soft_from_start", "two_phase", "qgait", "dsq")
#: methods compared against ``lsq`` in the paired intervals (everything but the two references)
ABLATIONS = ("lsq_kd", "soft_from_start", "two_phase", "qgait", "dsq")
#: post-training methods (``ptq.methods`` of the benchmark config), each with its calibration objective
PTQ_OBJECTIVES = {"ptq": "none", "ptq_idc": "idc", "ptq_kd": "kd", "ptq_task": "task", "ptq_recon": "recon"}
PTQ_METHODS = tuple(PTQ_OBJECTIVES)
#: what ``ptq.methods`` may list: the PTQ methods and ``fp`` (the FP checkpoint evaluated once)
PTQ_LISTABLE = ("fp",) + PTQ_METHODS
#: the ``ptq:`` section's keys besides ``methods`` (``quant.calibrate``'s, and ``idc``: IDD's weight and criterion)
PTQ_KNOBS = ("samples", "batch", "frames", "estimator", "percentile", "bn", "iters", "lr", "train_bn", "idc")
#: every method in table order
ALL_METHODS = METHODS + PTQ_LISTABLE


def switch_iteration(iters: int, qgait: Mapping[str, Any]) -> int:
    """The iteration at which QGait switches to the soft quantizer (and every method's learning rate drops)."""
    return int(round(iters * float(qgait["split"])))


def quant_section(method: str, bits: int, iters: int, qgait: Mapping[str, Any],
                  kd: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The ``quant:`` section of ``method`` at ``bits`` for an ``iters``-iteration run (``None``: FP).

    The schedule's own ``lr_scale`` is 1 for every method: the benchmark drops the learning rate
    through the trainer's scheduler at :func:`switch_iteration`, for all methods alike.
    """
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of {list(METHODS)}")
    if method == "fp_continued":
        return None
    soft = {"alpha": float(qgait["alpha"])}
    if qgait.get("alpha_end") is not None:
        soft["alpha_end"] = float(qgait["alpha_end"])
    switch = switch_iteration(iters, qgait)
    if method in ("lsq", "lsq_kd"):
        schedule: Dict[str, Any] = {"ste_iters": iters, "soft_iters": 0}
    elif method in ("soft_from_start", "dsq"):
        schedule = {"ste_iters": 0, "soft_iters": iters}
    else:
        schedule = {"ste_iters": switch, "soft_iters": iters - switch}
    schedule.update(lr_scale=1.0, soft=dict(soft, soft_forward=method == "dsq"))
    q: Dict[str, Any] = {"weight": {"bits": bits}, "act": {"bits": bits}, "schedule": schedule,
                         "step_lr_scale": float(qgait.get("step_lr_scale", 1.0))}
    if method == "qgait":
        q["idd"] = dict(copy.deepcopy(qgait["idd"]), enabled=True)
    if method == "lsq_kd":
        q["kd"] = dict(copy.deepcopy(dict(kd)), enabled=True)
    return q


def ptq_section(method: str, bits: int, ptq: Mapping[str, Any], seed: int) -> Dict[str, Any]:
    """The ``quant:`` section of PTQ ``method`` at ``bits``: the ``ptq:`` knobs as ``quant.calibrate``,
    the objective of the method and ``seed`` as the calibration draw; ``idc`` goes to ``quant.idd``
    (weight and criterion only: IDD is not switched on for training)."""
    if method not in PTQ_OBJECTIVES:
        raise ConfigError(f"PTQ method {method!r} is not one of {list(PTQ_METHODS)}")
    calib = {k: copy.deepcopy(ptq[k]) for k in PTQ_KNOBS if k in ptq and k != "idc"}
    calib.update(objective=PTQ_OBJECTIVES[method], seed=int(seed))
    q: Dict[str, Any] = {"weight": {"bits": bits}, "act": {"bits": bits}, "calibrate": calib}
    idc = dict(ptq.get("idc") or {})
    if idc:
        q["idd"] = dict(idc, enabled=False)
    return q
