"""Optimizer parameter groups for QAT: weights, BatchNorm and quantizer step sizes.

Every QAT run builds its optimizer from :func:`qat_param_groups`: the step sizes get their own
group (no weight decay), and ``train="quantizers"`` (IDD as calibration) freezes everything but
the steps and BatchNorm. Both hosts use it, with or without IDD.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn

from .config import IDD_PARAMS
from .errors import ConfigError
from .quant.convert import iter_quantizers, unwrap_parallel


class ParamGroups(list):
    """A list of optimizer parameter groups that also names the parameters it froze."""

    frozen: List[str]


def qat_param_groups(model: nn.Module, train: str = "all", step_weight_decay: Optional[float] = 0.0,
                     step_lr: Optional[float] = None) -> ParamGroups:
    """Parameter groups for ``torch.optim`` in a QAT run (plain LSQ, QGait, with or without IDD).

    ``train`` is what trains (``quant.idd.params`` when IDD is on, ``all`` otherwise):

    * ``all`` (LSQ, and IDD as distillation, paper v1): every parameter that requires grad trains.
    * ``quantizers`` (IDD as calibration, paper v2's IDC): only the quantizer step sizes and the affine
      parameters of BatchNorm layers train; **every other parameter is frozen in place**
      (``requires_grad_(False)``), so the backward pass skips their gradients and a DDP wrapper
      built afterwards does not wait for them. Build the DDP wrapper after this call.

    Groups are named (``quantizer_steps``, ``bn``, ``weights``); empty groups are left out. The step
    group gets ``weight_decay=step_weight_decay`` (0 by default: decay would shrink the steps and
    clip more, and a step is not a weight to regularise; ``None`` keeps the optimizer's default).
    ``step_lr`` gives the step group its own learning rate (``quant.step_lr_scale`` times the
    optimizer's): adaptive optimizers move every parameter by about the learning rate per step,
    which for an 8-bit step of 1e-3 is a large fraction of its value.
    The returned list's ``frozen`` attribute names the parameters frozen here.
    """
    if train not in IDD_PARAMS:
        raise ConfigError(f"qat_param_groups train (quant.idd.params): {train!r} is not allowed; "
                          f"choose one of {list(IDD_PARAMS)}")
    model = unwrap_parallel(model)
    step_ids = {id(p) for _, q in iter_quantizers(model) for p in q.parameters(recurse=False) if p.requires_grad}
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
    steps: List[nn.Parameter] = []
    bn: List[nn.Parameter] = []
    rest: List[nn.Parameter] = []
    frozen: List[str] = []
    for name, p in model.named_parameters():
        if id(p) in step_ids:
            steps.append(p)
        elif train == "quantizers" and id(p) in bn_ids and p.requires_grad:
            bn.append(p)
        elif train == "quantizers":
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
        elif p.requires_grad:
            rest.append(p)
    if train == "quantizers" and not steps:
        raise ValueError(f"qat_param_groups train='quantizers' needs a quantized model; {type(model).__name__} has no "
                         "trainable quantizer step (call quantize_model first)")
    groups = ParamGroups()
    groups.frozen = frozen
    if rest:
        groups.append({"name": "weights", "params": rest})
    if bn:
        groups.append({"name": "bn", "params": bn})
    if steps:
        g: Dict[str, Any] = {"name": "quantizer_steps", "params": steps}
        if step_weight_decay is not None:
            g["weight_decay"] = float(step_weight_decay)
        if step_lr is not None:
            g["lr"] = float(step_lr)
        groups.append(g)
    return groups
