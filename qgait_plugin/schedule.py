"""The two-phase QGait schedule: LSQ with STE rounding, then fine-tuning with the soft quantizer.

Phase 1 (``ste``) runs for ``quant.schedule.ste_iters`` iterations; from then on phase 2
(``soft``) is active, with the soft quantizer's ``alpha`` (linearly annealed to ``alpha_end``
over ``soft_iters`` iterations when given) and the learning rates multiplied by ``lr_scale``
once, at the switch. Phase 2 stays on past ``ste_iters + soft_iters``: training beyond the plan
never switches back. ``soft_iters: 0`` means no phase 2 at all (the plain LSQ-STE baseline).
Without any schedule (both counts 0) the rounding stays ``quant.rounding`` for the whole run.

Iterations count optimizer steps already taken, starting at 0 when QAT starts: the host calls
:meth:`QGaitSchedule.apply` with that count *before* each training step (OpenGait's
``self.iteration`` before ``train_step`` increments it). Everything but the learning-rate
switch is a pure function of the iteration, so calling ``apply`` every iteration from a counter
that starts at a restored value puts the model in the right phase with the right ``alpha``.

The learning-rate switch is recorded in the optimizer itself: each param group that has been
scaled carries ``qgait_lr_scaled: True``, which ``optimizer.state_dict()`` saves and
``load_state_dict()`` restores. So a run resumed with its optimizer state is never scaled twice,
and a fresh optimizer (whose learning rates are the base ones) is scaled once, whether or not the
schedule's own state was restored.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from .config import QuantConfig, ScheduleConfig
from .quant.convert import set_rounding
from .spec import check_alpha, check_rounding

#: param-group key marking a group whose learning rate has been multiplied by ``lr_scale``
LR_SCALED_KEY = "qgait_lr_scaled"


def _schedulers(scheduler: Any) -> List[Any]:
    """``scheduler`` and, for SequentialLR/ChainedScheduler, the schedulers inside it."""
    if scheduler is None:
        return []
    out = [scheduler]
    for inner in getattr(scheduler, "_schedulers", []) or []:
        out.extend(_schedulers(inner))
    return out


class QGaitSchedule:
    """Which phase is active at an iteration, and switching a model and its optimizer into it.

    Build it with :meth:`from_config`; call :meth:`apply` once per iteration. ``phase(it)`` and
    ``alpha(it)`` answer without touching anything.
    """

    def __init__(self, ste_iters: int = 0, soft_iters: int = 0, lr_scale: float = 0.1, alpha: float = 3.0,
                 alpha_end: Optional[float] = None, rounding: str = "ste") -> None:
        if ste_iters < 0 or soft_iters < 0:
            raise ValueError(f"QGaitSchedule: ste_iters and soft_iters must be >= 0, got {ste_iters}, {soft_iters}")
        if not lr_scale > 0:
            raise ValueError(f"QGaitSchedule: lr_scale must be > 0, got {lr_scale!r}")
        self.ste_iters = int(ste_iters)
        self.soft_iters = int(soft_iters)
        self.lr_scale = float(lr_scale)
        self.alpha_start = check_alpha(alpha, "QGaitSchedule alpha")
        self.alpha_end = None if alpha_end is None else check_alpha(alpha_end, "QGaitSchedule alpha_end")
        #: the mode for a run without a schedule (``ste_iters == soft_iters == 0``)
        self.rounding = check_rounding(rounding, "QGaitSchedule rounding")
        self._state: Dict[str, Any] = {"iteration": None, "phase": None, "alpha": None, "lr_scaled": False}

    @classmethod
    def from_config(cls, config: Any) -> QGaitSchedule:
        """From a :class:`QuantConfig`, a :class:`ScheduleConfig`, the ``quant:`` dict or its ``schedule:`` dict."""
        rounding = "ste"
        if isinstance(config, QuantConfig):
            sc, rounding = config.schedule, config.rounding
        elif isinstance(config, ScheduleConfig):
            sc = config
        elif isinstance(config, Mapping) and config and set(config) <= {"ste_iters", "soft_iters", "lr_scale", "soft"}:
            sc = ScheduleConfig.from_dict(config)
        else:
            qc = QuantConfig.from_dict(config)
            sc, rounding = qc.schedule, qc.rounding
        return cls(ste_iters=sc.ste_iters, soft_iters=sc.soft_iters, lr_scale=sc.lr_scale, alpha=sc.soft.alpha,
                   alpha_end=sc.soft.alpha_end, rounding=rounding)

    def __repr__(self) -> str:
        anneal = f"->{self.alpha_end:g}" if self.alpha_end is not None else ""
        return (f"QGaitSchedule(ste_iters={self.ste_iters}, soft_iters={self.soft_iters}, lr_scale={self.lr_scale:g}, "
                f"alpha={self.alpha_start:g}{anneal})")

    # -- pure functions of the iteration ----------------------------------------------------
    @property
    def switch_iteration(self) -> Optional[int]:
        """The first iteration of phase 2, or ``None`` when there is no phase 2."""
        return self.ste_iters if self.soft_iters > 0 else None

    @property
    def total_iters(self) -> int:
        return self.ste_iters + self.soft_iters

    def phase(self, iteration: int) -> str:
        """``"ste"`` before the switch (and always without a phase 2), ``"soft"`` from it on;
        ``rounding`` throughout when there is no schedule at all."""
        if iteration < 0:
            raise ValueError(f"QGaitSchedule: iteration must be >= 0, got {iteration}")
        if self.total_iters == 0:
            return self.rounding
        switch = self.switch_iteration
        return "soft" if switch is not None and iteration >= switch else "ste"

    def alpha(self, iteration: int) -> float:
        """The soft quantizer's ``alpha``: linear from ``alpha`` at the switch to ``alpha_end`` at
        ``ste_iters + soft_iters`` (constant without ``alpha_end``, and after the end)."""
        if self.alpha_end is None or self.soft_iters == 0:
            return self.alpha_start
        t = min(1.0, max(0.0, (iteration - self.ste_iters) / self.soft_iters))
        return self.alpha_start + t * (self.alpha_end - self.alpha_start)

    # -- acting on a run --------------------------------------------------------------------
    def scale_lr(self, optimizer: Optimizer, scheduler: Any = None) -> int:
        """Multiply the learning rate of every not yet scaled param group by ``lr_scale``; returns how many.

        Also scales ``initial_lr`` (which LR schedulers record at construction and read when they
        are rebuilt on resume) and the matching ``base_lrs`` of ``scheduler``: schedulers that
        compute the learning rate from ``base_lrs`` (LambdaLR, the closed forms) would otherwise
        undo the switch at their next step, while chainable ones (MultiStepLR, StepLR) continue
        from the scaled value either way.
        """
        scheds = _schedulers(scheduler)
        done = 0
        for i, group in enumerate(optimizer.param_groups):
            if group.get(LR_SCALED_KEY, False):
                continue
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), torch.Tensor):
                    group[key].mul_(self.lr_scale)  # a tensor lr (capturable/fused optimizers) changes in place
                elif key in group:
                    group[key] = group[key] * self.lr_scale
            for s in scheds:
                base = getattr(s, "base_lrs", None)
                if base is not None and i < len(base):
                    base[i] = base[i] * self.lr_scale
            group[LR_SCALED_KEY] = True
            done += 1
        return done

    def apply(self, iteration: int, model: Optional[nn.Module] = None, optimizer: Optional[Optimizer] = None,
              scheduler: Any = None) -> str:
        """Put ``model`` and ``optimizer`` into the state of ``iteration``; returns the phase.

        Idempotent, so call it before every training step. Sets every quantizer's rounding
        (``ste``, or ``soft`` with ``alpha(iteration)``); in phase 2, scales the learning rates of
        ``optimizer`` (and ``scheduler``'s base rates, see :meth:`scale_lr`) once. ``model`` may be
        a DDP wrapper.
        """
        ph = self.phase(iteration)
        a = self.alpha(iteration)
        if model is not None:
            set_rounding(model, ph, alpha=a if ph == "soft" else None)
        switched = self.switch_iteration is not None and iteration >= self.switch_iteration
        if switched and optimizer is not None:
            self.scale_lr(optimizer, scheduler)
        lr_scaled = self._state["lr_scaled"] or (switched and optimizer is not None)
        self._state = {"iteration": int(iteration), "phase": ph, "alpha": a, "lr_scaled": bool(lr_scaled)}
        return ph

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the last applied iteration, phase, ``alpha``, whether the
        learning rate was scaled, and the plan it was made with (checked on load)."""
        return dict(self._state, ste_iters=self.ste_iters, soft_iters=self.soft_iters, lr_scale=self.lr_scale,
                    alpha_start=self.alpha_start, alpha_end=self.alpha_end)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. A plan that differs from this schedule's (e.g. a
        longer phase 2 for a resumed run) is allowed with a warning naming the difference."""
        missing = [k for k in ("iteration", "phase", "alpha", "lr_scaled") if k not in state]
        if missing:
            raise KeyError(f"QGaitSchedule.load_state_dict: missing keys {missing}; got {sorted(state)}")
        if state["phase"] is not None:
            check_rounding(state["phase"], "QGaitSchedule.load_state_dict: phase")
        plan = {"ste_iters": self.ste_iters, "soft_iters": self.soft_iters, "lr_scale": self.lr_scale,
                "alpha_start": self.alpha_start, "alpha_end": self.alpha_end}
        changed = {k: (state[k], v) for k, v in plan.items() if k in state and state[k] != v}
        if changed:
            warnings.warn("QGaitSchedule: resuming with a different plan than the checkpoint's "
                          + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()), stacklevel=2)
        self._state = {"iteration": state["iteration"], "phase": state["phase"], "alpha": state["alpha"],
                       "lr_scaled": bool(state["lr_scaled"])}

    @property
    def last_phase(self) -> Optional[str]:
        """The phase of the last :meth:`apply` (or of the loaded state)."""
        return self._state["phase"]

    @property
    def lr_scaled(self) -> bool:
        return bool(self._state["lr_scaled"])

