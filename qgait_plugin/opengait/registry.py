"""Register quant-aware models and the IDD loss into OpenGait's model and loss lookups.

OpenGait's main script builds ``getattr(modeling.models, cfg.model_cfg.model)(cfgs, training)``
and its loss aggregator looks losses up by ``type`` on ``modeling.losses``. :func:`register`
replaces every model class there that derives from ``BaseModel`` with a subclass of the same name
(:func:`make_quant_aware`) and adds the loss type :data:`IDD_LOSS_TYPE`. A config without a
``quant:`` section runs exactly as before: every override then just calls the original.

With ``quant:`` the subclass, along OpenGait's ``BaseModel`` life cycle:

* ``build_network``: converts the network (``quantize_model``) right after it is built, and adds
  the IDD loss to ``loss_cfg`` when IDD is on and the config does not declare it;
* ``init_parameters``: after OpenGait re-initialises every layer, loads ``quant.init_from``
  (strict except for quantizer keys) and builds the FP teacher from the same weights; the teacher
  is kept outside ``state_dict``, the optimizer and DDP; ``idd.params: quantizers`` freezes
  everything but quantizer steps and BatchNorm before OpenGait builds its optimizer;
* ``forward``: adds ``{student, teacher, labels}`` under the IDD loss's ``log_prefix``;
* ``train_step``: after OpenGait's step, applies the two-phase schedule for the next iteration;
* ``qgait_state`` submodule: its extra state (schedule state) travels in OpenGait's checkpoints,
  so an integer ``restore_hint`` resumes in the right phase; quantizer steps are parameters and
  their flags buffers/extra state of the quantizers, so they travel too;
* ``run_test``: OpenGait's own test (strict load is OpenGait's ``restore_ckpt_strict``), then the
  result goes to the hooks in :data:`RESULT_HOOKS` (the launcher writes a results JSON).

Activation steps initialise on the first training batch inside the quantizers and are averaged
across ranks there (``qgait_plugin.quant.quantizer``), so every DDP rank starts equal.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..checkpoint import load_float_state_dict, read_checkpoint
from ..config import QuantConfig
from ..param_groups import qat_param_groups
from ..quant.convert import iter_quantizers, quantize_model
from ..teacher import attach_teacher, get_teacher, make_teacher

#: OpenGait loss ``type`` of the IDD loss, and the ``log_prefix`` used when the plugin adds it.
IDD_LOSS_TYPE = "QGaitIDDLoss"
IDD_LOG_PREFIX = "idd"
#: Called as ``hook(model, result_dict)`` after each test run of a registered model (rank 0 gets the result).
RESULT_HOOKS: List[Callable[[nn.Module, Any], None]] = []
#: The most recently constructed registered model (the launcher reads it after OpenGait's run).
LAST_MODEL: List[nn.Module] = []


class PluginState(nn.Module):
    """Holds the schedule; its extra state (schedule state + quant config) rides in the model's state dict."""

    def __init__(self, schedule: Any, config: QuantConfig) -> None:
        super().__init__()
        self.schedule = schedule
        self.config = config

    def get_extra_state(self) -> Dict[str, Any]:
        return {"schedule": self.schedule.state_dict() if self.schedule is not None else None,
                "quant": self.config.to_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])


def _loss_cfg_list(cfgs: Dict[str, Any]) -> List[Dict[str, Any]]:
    lc = cfgs.get("loss_cfg")
    return list(lc) if isinstance(lc, list) else ([lc] if isinstance(lc, dict) else [])


def make_quant_aware(orig: type) -> type:
    """A subclass of OpenGait model class ``orig``, same name, that adds QAT when ``cfgs`` has ``quant:``."""

    class QuantAware(orig):  # type: ignore[misc, valid-type]
        _qgait_original = orig

        def __init__(self, cfgs: Dict[str, Any], training: bool) -> None:
            object.__setattr__(self, "_qgait_training", bool(training))
            object.__setattr__(self, "_qgait_cfg", None)
            super().__init__(cfgs, training)
            LAST_MODEL[:] = [self]
            if self._qgait_cfg is not None and training:
                self.qgait_state.schedule.apply(self.iteration, self, self.optimizer, self.scheduler)
                self.msg_mgr.log_info(f"qgait: iteration {self.iteration}, phase "
                                      f"{self.qgait_state.schedule.phase(self.iteration)!r}")

        # -- network ------------------------------------------------------------------------
        def build_network(self, model_cfg: Dict[str, Any]) -> None:
            super().build_network(model_cfg)
            if "quant" not in self.cfgs or self.cfgs["quant"] is None:
                return
            qcfg = QuantConfig.from_dict(self.cfgs["quant"])
            object.__setattr__(self, "_qgait_cfg", qcfg)
            quantize_model(self, qcfg)
            n = sum(1 for _ in iter_quantizers(self)) // 2
            self.msg_mgr.log_info(f"qgait: quantized {n} layers of {type(self).__name__} "
                                  f"(W{qcfg.weight.bits}A{qcfg.act.bits}, rounding {qcfg.rounding})")
            if qcfg.idd.enabled and self._qgait_training:
                lst = _loss_cfg_list(self.cfgs)
                if not any(c.get("type") == IDD_LOSS_TYPE for c in lst):
                    lst.append({"type": IDD_LOSS_TYPE, "log_prefix": IDD_LOG_PREFIX,
                                "loss_term_weight": qcfg.idd.weight, "criterion": qcfg.idd.criterion})
                    self.cfgs["loss_cfg"] = lst

        def init_parameters(self) -> None:
            super().init_parameters()
            qcfg = self._qgait_cfg
            if qcfg is None:
                return
            if self._qgait_training:
                self._qgait_init_training(qcfg)
            # Created after the teacher copy, so the teacher (an FP copy) has no plugin state.
            from ..schedule import QGaitSchedule

            self.qgait_state = PluginState(QGaitSchedule.from_config(qcfg), qcfg)

        def _qgait_init_training(self, qcfg: QuantConfig) -> None:
            fp_sd = None
            if qcfg.init_from:
                fp_sd = load_float_state_dict(self, read_checkpoint(qcfg.init_from, "quant.init_from"),
                                              source=f"quant.init_from: {qcfg.init_from!r}")
                self.msg_mgr.log_info(f"qgait: loaded FP weights from {qcfg.init_from}")
            if qcfg.idd.enabled:
                if fp_sd is None:
                    self.msg_mgr.log_warning("qgait: idd is enabled without quant.init_from; the teacher is the "
                                             "randomly initialised FP network")
                attach_teacher(self, make_teacher(self, fp_sd if fp_sd is not None else self.state_dict()))
            if qcfg.idd.params == "quantizers":
                # freezes all but quantizer steps and BatchNorm before OpenGait builds its optimizer
                frozen = qat_param_groups(self, "quantizers").frozen
                self.msg_mgr.log_info(f"qgait: idd.params=quantizers froze {len(frozen)} parameters")

        # -- training -----------------------------------------------------------------------
        def forward(self, inputs: Any) -> Dict[str, Any]:
            retval = super().forward(inputs)
            teacher = get_teacher(self)
            if teacher is None or not self.training:
                return retval
            student = retval["inference_feat"]["embeddings"]
            t_emb = teacher(inputs)["inference_feat"]["embeddings"]  # eval mode, no_grad, follows the device
            prefix = next((c.get("log_prefix", IDD_LOG_PREFIX) for c in _loss_cfg_list(self.cfgs)
                           if c.get("type") == IDD_LOSS_TYPE), IDD_LOG_PREFIX)
            retval["training_feat"][prefix] = {"student": student, "teacher": t_emb.detach(), "labels": inputs[1]}
            return retval

        def train_step(self, loss_sum: torch.Tensor) -> bool:
            ok = super().train_step(loss_sum)
            if self._qgait_cfg is not None:
                sched = self.qgait_state.schedule
                before = sched.last_phase
                phase = sched.apply(self.iteration, self, self.optimizer, self.scheduler)
                if phase != before:
                    self.msg_mgr.log_info(f"qgait: iteration {self.iteration}: phase {before!r} -> {phase!r} "
                                          f"(lr x{sched.lr_scale:g})")
            return ok

        # -- testing ------------------------------------------------------------------------
        @staticmethod
        def run_test(model: nn.Module) -> Any:
            result = orig.run_test(model)
            for hook in list(RESULT_HOOKS):
                hook(model, result)
            return result

    QuantAware.__name__ = orig.__name__
    QuantAware.__qualname__ = orig.__qualname__
    QuantAware.__module__ = orig.__module__
    QuantAware.__doc__ = (orig.__doc__ or "") + "\n\n(qgait-plugin: quant-aware when the config has a `quant:` section.)"
    return QuantAware


def make_idd_loss_class(losses_base: Any) -> type:
    """OpenGait loss type wrapping :class:`qgait_plugin.distill.IDDLoss`.

    Derives from OpenGait's ``BaseLoss`` and goes through its gather-and-scale wrapper, like its
    triplet loss: embeddings are gathered across ranks (more inter-class pairs) and the loss is
    scaled by the world size to undo DDP's gradient averaging.
    """
    from ..distill import IDDLoss as CoreIDD

    class QGaitIDDLoss(losses_base.BaseLoss):
        """Inter-class distance-guided distillation (QGait); kwargs ``student``, ``teacher``, ``labels``."""

        def __init__(self, loss_term_weight: float = 1.0, criterion: str = "smooth_l1") -> None:
            super().__init__(loss_term_weight)
            self.idd = CoreIDD(weight=1.0, criterion=criterion)

        @losses_base.gather_and_scale_wrapper
        def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):  # noqa: ANN201
            loss, info = self.idd(student.float(), teacher.float(), labels)
            for k, v in (info or {}).items():
                self.info[k] = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.info["loss"] = loss.detach().clone()
            return loss, self.info

    QGaitIDDLoss.__module__ = __name__
    return QGaitIDDLoss


def register(og: Any) -> List[str]:
    """Register quant-aware model classes, the IDD loss and the FC handlers into OpenGait ``og``.

    ``og`` is the namespace from :func:`qgait_plugin.opengait.env.import_opengait`. Idempotent.
    Returns the model names registered.
    """
    from .handlers import register_opengait_handlers

    base = og.base_model.BaseModel
    names = []
    for name, obj in list(vars(og.models).items()):
        if not inspect.isclass(obj) or obj is base or not issubclass(obj, base):
            continue
        if "_qgait_original" not in obj.__dict__:
            setattr(og.models, name, make_quant_aware(obj))
        names.append(name)
    if not hasattr(og.losses, IDD_LOSS_TYPE):
        setattr(og.losses, IDD_LOSS_TYPE, make_idd_loss_class(og.losses_base))
    register_opengait_handlers(og.modules)
    return sorted(names)
