"""The quant-aware version of an OpenGait model class: QAT along ``BaseModel``'s life cycle.

:func:`make_quant_aware` puts :class:`QuantAwareModel` in front of an OpenGait model class, under
the same name. A config without a ``quant:`` section runs exactly as before: every override then
just calls the original. With ``quant:``, along OpenGait's ``BaseModel`` life cycle:

* ``build_network``: converts the network right after it is built, with the quantizers between
  layers placed from its dataflow on an example input (:func:`example_inputs`), or as the checkpoint
  ``restore_hint`` names placed them (one trained before dataflow placement keeps its block-registry
  quantizers), and adds the IDD loss to ``loss_cfg`` when IDD is on and the config does not declare it;
* ``init_parameters``: after OpenGait re-initialises every layer, loads ``quant.init_from``
  (strict except for quantizer keys) and builds the FP teacher from the same weights; the teacher
  is kept outside ``state_dict``, the optimizer and DDP; ``idd.params: quantizers`` freezes
  everything but quantizer steps and BatchNorm before OpenGait builds its optimizer;
* ``get_optimizer``: OpenGait's optimizer (its ``solver`` and arguments), over
  :func:`~qgait_plugin.param_groups.qat_param_groups`: the quantizer steps in a group without
  weight decay (decay would pull ``ln s`` towards 0, i.e. every step towards 1) and with
  ``quant.step_lr_scale`` times the learning rate;
* ``forward``: adds ``{student, teacher, labels}`` under the IDD loss's ``log_prefix``;
* ``train_step``: after OpenGait's step, applies the two-phase schedule for the next iteration;
* ``qgait_state`` submodule: its extra state (schedule state) travels in OpenGait's checkpoints,
  so an integer ``restore_hint`` resumes in the right phase; quantizer steps are parameters and
  their flags buffers/extra state of the quantizers, so they travel too;
* ``run_test``: OpenGait's own test (strict load is OpenGait's ``restore_ckpt_strict``), then the
  result goes to the class's :class:`~qgait_plugin.opengait.run_context.RunContext`, if any
  (the launcher writes a results JSON).

Activation steps initialise on the first training batch inside the quantizers and are averaged
across ranks there (``qgait_plugin.quant.quantizer``), so every DDP rank starts equal.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..checkpoint import load_float_state_dict, read_checkpoint, unwrap_state_dict
from ..config import QuantConfig
from ..errors import ConfigError, NonFiniteError
from ..param_groups import qat_param_groups
from ..quant.convert import dequantize_model, iter_quantizers, quantize_for, quantize_model
from ..quant.placement import paused, root_call
from ..schedule import QGaitSchedule
from ..teacher import attach_teacher, get_teacher, make_teacher
from .idd_loss import add_idd_loss, idd_log_prefix
from .run_context import RunContext


def example_inputs(cfgs: Dict[str, Any]) -> Tuple[Any, ...]:
    """One input of OpenGait's form, ``([sils [1, frames, 64, 44]], labels, types, views, seqL=None)``,
    for the trace that places the quantizers: ``frames`` from ``trainer_cfg.sampler.frames_num_fixed``
    (30 without it), binary silhouettes from a generator of their own (the run's random state is untouched)."""
    sampler = (cfgs.get("trainer_cfg") or {}).get("sampler") or {}
    frames = int(sampler.get("frames_num_fixed") or 30)
    g = torch.Generator().manual_seed(0)
    sils = (torch.rand(1, frames, 64, 44, generator=g) > 0.5).float()
    return (([sils], torch.zeros(1, dtype=torch.long), ["nm-01"], ["000"], None),)


def restore_state_dict(engine_cfg: Dict[str, Any], save_path: str) -> Optional[Dict[str, Any]]:
    """The model state dict of the checkpoint OpenGait's ``resume_ckpt`` will load for ``engine_cfg``'s
    ``restore_hint`` (``None`` for a fresh run or a file that is not there: OpenGait then says so itself)."""
    hint = engine_cfg.get("restore_hint", 0)
    if isinstance(hint, bool) or not hint:
        return None
    if isinstance(hint, int):
        path = os.path.join(save_path, "checkpoints", f"{engine_cfg['save_name']}-{hint:05d}.pt")
    else:
        path = str(hint)
    if not os.path.isfile(path):
        return None
    return unwrap_state_dict(read_checkpoint(path, "restore_hint"), set())


class PluginState(nn.Module):
    """Holds the schedule; its extra state (schedule state + quant config) rides in the model's state dict."""

    def __init__(self, schedule: QGaitSchedule, config: QuantConfig) -> None:
        super().__init__()
        self.schedule = schedule
        self.config = config

    def get_extra_state(self) -> Dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "quant": self.config.to_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])


if TYPE_CHECKING:
    class _BaseModel(nn.Module):
        """What :class:`QuantAwareModel` uses of OpenGait's ``BaseModel``, for type checking only (at
        run time the mixin derives from ``object`` and OpenGait's class comes after it in the MRO)."""

        cfgs: Dict[str, Any]
        engine_cfg: Dict[str, Any]
        loss_aggregator: nn.Module
        iteration: int
        msg_mgr: Any
        optimizer: torch.optim.Optimizer
        scheduler: Any

        def __init__(self, cfgs: Dict[str, Any], training: bool) -> None: ...
        def build_network(self, model_cfg: Dict[str, Any]) -> None: ...
        def init_parameters(self) -> None: ...
        def get_optimizer(self, optimizer_cfg: Dict[str, Any]) -> torch.optim.Optimizer: ...
        def train_step(self, loss_sum: torch.Tensor) -> bool: ...
        def save_ckpt(self, iteration: int) -> None: ...
        def _load_ckpt(self, save_name: str) -> None: ...
        @staticmethod
        def run_test(model: nn.Module) -> Any: ...
else:
    _BaseModel = object


def refuse_builtin_only_keys(qcfg: QuantConfig) -> None:
    """Raise :class:`ConfigError` for ``quant:`` settings only the built-in trainer carries out, so an
    OpenGait run never ignores them silently: ``quant.kd`` (the plain-KD control) and
    ``quant.idd.phase: soft`` (OpenGait's loss aggregator adds IDD from the first iteration)."""
    if qcfg.kd.enabled:
        raise ConfigError("quant.kd: the plain-KD control runs only on the built-in host (qgait train); "
                          "remove it for OpenGait, or use quant.idd")
    if qcfg.idd.enabled and qcfg.idd.phase != "all":
        raise ConfigError(f"quant.idd.phase: {qcfg.idd.phase!r} is carried out only by the built-in host; on "
                          "OpenGait IDD acts from the first iteration: set phase: all (or remove the key)")


class QuantAwareModel(_BaseModel):
    """Mixed in front of an OpenGait ``BaseModel`` subclass by :func:`make_quant_aware`.

    Class attributes: ``_qgait_original`` is the OpenGait class, ``_qgait_context`` the run
    context the last :func:`~qgait_plugin.opengait.registry.register` call gave (``None``: nobody
    listens).
    """

    _qgait_original: type
    _qgait_context: Optional[RunContext] = None
    # set with object.__setattr__ before OpenGait's __init__ (and nn.Module's) runs
    _qgait_training: bool
    _qgait_cfg: Optional[QuantConfig]
    #: made in init_parameters when the config has ``quant:``
    qgait_state: PluginState

    def __init__(self, cfgs: Dict[str, Any], training: bool) -> None:
        object.__setattr__(self, "_qgait_training", bool(training))
        object.__setattr__(self, "_qgait_cfg", None)
        super().__init__(cfgs, training)
        if self._qgait_context is not None:
            self._qgait_context.model_built(self)
        if self._qgait_cfg is not None and training:
            sched = self.qgait_state.schedule
            sched.apply(self.iteration, self, self.optimizer, self.scheduler)
            self.msg_mgr.log_info(f"qgait: iteration {self.iteration}, phase {sched.phase(self.iteration)!r}")
            # the loss terms of the last step, for the message when a loss turns non-finite
            object.__setattr__(self, "_qgait_loss_info", {})
            self.loss_aggregator.register_forward_hook(
                lambda _mod, _inp, out: object.__setattr__(self, "_qgait_loss_info", out[1]))

    # -- network ----------------------------------------------------------------------------
    def build_network(self, model_cfg: Dict[str, Any]) -> None:
        super().build_network(model_cfg)
        if self.cfgs.get("quant") is None:
            return
        qcfg = QuantConfig.from_dict(self.cfgs["quant"])
        refuse_builtin_only_keys(qcfg)
        object.__setattr__(self, "_qgait_cfg", qcfg)
        # the checkpoint restore_hint will load decides the placement (one trained before dataflow
        # placement keeps its block-registry quantizers); a new run places from the dataflow
        ck = restore_state_dict(getattr(self, "engine_cfg", None) or {}, getattr(self, "save_path", "."))
        try:
            quantize_for(self, qcfg, ck, example_inputs(self.cfgs))
        except ConfigError:
            raise
        except Exception as e:  # the forward does not take the example input (another size, another form)
            dequantize_model(self)
            self.msg_mgr.log_warning(
                f"qgait: the model did not run on the example input [1, frames, 64, 44] that places the quantizers "
                f"from its dataflow ({type(e).__name__}: {' '.join(str(e).split())[:200]}); using the block "
                "registry instead, as quant.residual.placement: registry does")
            quantize_model(self, qcfg)
        n = sum(1 for _ in iter_quantizers(self)) // 2
        self.msg_mgr.log_info(f"qgait: quantized {n} layers of {type(self).__name__} "
                              f"(W{qcfg.weight.bits}A{qcfg.act.bits}, rounding {qcfg.rounding})")
        if qcfg.idd.enabled and self._qgait_training:
            add_idd_loss(self.cfgs, qcfg)

    def init_parameters(self) -> None:
        super().init_parameters()
        qcfg = self._qgait_cfg
        if qcfg is None:
            return
        if self._qgait_training:
            self._qgait_init_training(qcfg)
        # Created after the teacher copy, so the teacher (an FP copy) has no plugin state.
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

    # -- training ---------------------------------------------------------------------------
    def get_optimizer(self, optimizer_cfg: Dict[str, Any]) -> torch.optim.Optimizer:
        opt = super().get_optimizer(optimizer_cfg)
        qcfg = self._qgait_cfg
        if qcfg is None:
            return opt
        lr = opt.defaults.get("lr")
        step_lr = None if lr is None or qcfg.step_lr_scale == 1.0 else float(lr) * qcfg.step_lr_scale
        # the same solver and arguments, over groups: parameters frozen by idd.params=quantizers
        # (init_parameters) no longer require grad and stay out
        return type(opt)(qat_param_groups(self, "all", step_lr=step_lr), **opt.defaults)

    def forward(self, inputs: Any) -> Dict[str, Any]:
        with root_call(self):  # OpenGait's inference calls self.forward, which skips the module's hooks
            retval = super().forward(inputs)
        teacher = get_teacher(self)
        if teacher is None or not self.training:
            return retval
        student = retval["inference_feat"]["embeddings"]
        with paused(self):  # the teacher's ops are not the student's: no quantizer site applies to them
            t_emb = teacher(inputs)["inference_feat"]["embeddings"].detach()  # eval mode, no_grad, follows the device
        retval["training_feat"][idd_log_prefix(self.cfgs)] = {"student": student, "teacher": t_emb,
                                                              "labels": inputs[1]}
        return retval

    def train_step(self, loss_sum: torch.Tensor) -> bool:
        if self._qgait_cfg is not None and not self.engine_cfg.get("enable_float16") \
                and not bool(torch.isfinite(torch.as_tensor(loss_sum).detach()).all()):
            # before OpenGait's step, so the weights stay the last good ones (with fp16 the grad scaler
            # skips such steps itself)
            info = getattr(self, "_qgait_loss_info", {}) or {}
            terms = ", ".join(f"{k.split('/')[1]}={float(torch.as_tensor(v).detach().float().mean()):.4g}"
                              for k, v in info.items()
                              if k.startswith("scalar/") and k.endswith("/loss") and k.count("/") == 2)
            raise NonFiniteError(f"iteration {self.iteration + 1}: non-finite loss ({terms or f'sum={loss_sum}'}); "
                                 "training stopped (a learning rate or loss weight too large?); the checkpoints "
                                 "already written are untouched")
        ok = super().train_step(loss_sum)
        if self._qgait_cfg is not None:
            sched = self.qgait_state.schedule
            before = sched.last_phase
            phase = sched.apply(self.iteration, self, self.optimizer, self.scheduler)
            if phase != before:
                self.msg_mgr.log_info(f"qgait: iteration {self.iteration}: phase {before!r} -> {phase!r} "
                                      f"(lr x{sched.lr_scale:g})")
        return ok

    # -- checkpoints ------------------------------------------------------------------------
    def save_ckpt(self, iteration: int) -> None:
        if self._qgait_cfg is not None:  # never write a checkpoint of a diverged model (checked on every rank)
            bad = [k for k, v in self.state_dict().items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise NonFiniteError(f"iteration {iteration}: non-finite weights ({len(bad)} tensors, e.g. "
                                     f"{bad[:3]}); checkpoint not saved, the earlier ones are untouched")
        super().save_ckpt(iteration)

    def _load_ckpt(self, save_name: str) -> None:
        try:
            super()._load_ckpt(save_name)
        except ConfigError as e:  # a quantizer of another bit width: name the file
            raise ConfigError(f"{save_name}: {e}") from None

    # -- testing ----------------------------------------------------------------------------
    @classmethod
    def run_test(cls, model: nn.Module) -> Any:
        result = super().run_test(model)  # OpenGait's static run_test
        if cls._qgait_context is not None:
            cls._qgait_context.test_finished(model, result)
        return result


def make_quant_aware(orig: type) -> type:
    """A subclass of OpenGait model class ``orig``, same name, that adds QAT when ``cfgs`` has ``quant:``."""
    doc = (orig.__doc__ or "") + "\n\n(qgait-plugin: quant-aware when the config has a `quant:` section.)"
    return type(orig.__name__, (QuantAwareModel, orig), {"_qgait_original": orig, "__qualname__": orig.__qualname__,
                                                         "__module__": orig.__module__, "__doc__": doc})
