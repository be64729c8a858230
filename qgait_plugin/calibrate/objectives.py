"""Calibration objectives: a few hundred iterations that train only the quantizer steps.

After the statistics have set every step, an objective can refine the steps against the frozen FP
teacher (:mod:`qgait_plugin.teacher`) on the calibration set, with every weight frozen:

* ``idc``: the IDD loss (:class:`~qgait_plugin.distill.IDDLoss`): the student's *relative*
  distances between embeddings of different people against the teacher's (the paper's
  inter-class distance-guided calibration);
* ``kd``: MSE of the embeddings to the teacher's (:class:`~qgait_plugin.distill.EmbeddingKDLoss`);
* ``task``: the host's training loss (triplet + softmax on the built-in host);
* ``recon``: BRECQ-style block reconstruction: the output of every block (every quantized
  residual block, and every quantized layer outside one) against the FP block's output on the
  same input batch, each normalised by the teacher output's mean square, summed. All blocks are
  trained jointly in one pass (BRECQ fits them one after another; this is its one-pass form).

The student stays in eval mode (BatchNorm's running statistics, the deployed network). Each
quantizer's step (learned as ``ln(s) / STEP_LOG_SCALE``) trains with Adam at ``lr / STEP_LOG_SCALE``,
so a step moves by about ``lr`` of its own size per iteration, whatever its bit width (an 8-bit
weight step of 1e-3 and a 3-bit activation step of 0.5 alike); the rate decays to 0 on a cosine
over the iterations, so the last iterations settle instead of oscillating between grid points.
Plain PyTorch: nothing here knows about a host.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CALIB_OBJECTIVES, QuantConfig
from ..errors import NonFiniteError
from ..quant.blocks import QuantBlockMixin
from ..quant.convert import iter_quantizers
from ..quant.layers import QuantLayerMixin
from ..quant.quantizer import STEP_LOG_SCALE
from ..teacher import FrozenTeacher

#: ``forward(model, batch) -> output``; ``embed(output) -> [n, c, p]``; ``labels(batch) -> [n]``;
#: ``task_loss(output, batch) -> scalar``: what a host hands the core about its model and data
Forward = Callable[[nn.Module, Any], Any]


def recon_blocks(model: nn.Module) -> List[str]:
    """Names of the units ``recon`` reconstructs: quantized residual blocks, and quantized layers outside them."""
    names: List[str] = []
    blocks: List[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantBlockMixin):
            blocks.append(name)
            names.append(name)
        elif isinstance(m, QuantLayerMixin) and not any(name.startswith(b + ".") for b in blocks):
            names.append(name)
    return names


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


class _Recorder:
    """Forward hooks keeping the outputs of named modules of one model for one pass."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.out: Dict[str, List[torch.Tensor]] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            self.out[name] = _tensors(output)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def recon_loss(student: Dict[str, List[torch.Tensor]], teacher: Dict[str, List[torch.Tensor]]) -> torch.Tensor:
    """Sum over blocks of ``mean((S - T)^2) / mean(T^2)`` (every tensor a block returns)."""
    total = torch.zeros(())
    for name, ts in teacher.items():
        for s, t in zip(student[name], ts):
            if s.is_floating_point():
                total = total + F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
    return total


#: the most memory the teacher's cached outputs (one entry per calibration batch) may take; above it
#: the teacher runs on every iteration instead
TEACHER_CACHE_BYTES = 2 << 30


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _teacher_target(teacher: FrozenTeacher, student: nn.Module, batch: Any, forward: Forward,
                    embed: Callable[[Any], torch.Tensor], rec: Optional[_Recorder]) -> Any:
    """What an objective compares the student with on ``batch``: the teacher's embeddings, or (``rec``,
    for ``recon``) its blocks' outputs as the recorder kept them."""
    teacher.follow(student)
    with torch.no_grad():
        out = forward(teacher.module, batch)
    if rec is None:
        return embed(out).detach()
    return {k: [t.detach() for t in v] for k, v in rec.out.items()}


def step_param_groups(model: nn.Module, lr: float, train_bn: bool = False) -> List[Dict[str, Any]]:
    """The enabled quantizers' steps in one Adam group at ``lr / STEP_LOG_SCALE`` (a relative rate
    ``lr`` on the step itself: it is learned in the log domain), plus BatchNorm's affine parameters at
    ``lr`` with ``train_bn``."""
    groups: List[Dict[str, Any]] = []
    steps = [p for _, q in iter_quantizers(model) if q.enabled and bool(q.initialized)
             for p in q.parameters(recurse=False) if p.is_floating_point()]
    if steps:
        groups.append({"params": steps, "lr": lr / STEP_LOG_SCALE})
    if train_bn:
        bn = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)]
        if bn:
            groups.append({"params": bn, "lr": lr})
    return groups


def train_steps(model: nn.Module, teacher: Optional[FrozenTeacher], batches: Sequence[Any], objective: str,
                iters: int, lr: float, forward: Forward, embed: Callable[[Any], torch.Tensor],
                labels: Callable[[Any], torch.Tensor], quant: Optional[QuantConfig] = None,
                task_loss: Optional[Callable[[Any, Any], torch.Tensor]] = None, train_bn: bool = False,
                progress: bool = False) -> Dict[str, Any]:
    """Train the steps (and BN affine with ``train_bn``) of ``model`` for ``iters`` iterations on ``objective``.

    Every other parameter is frozen for the duration and unfrozen after. Returns the loss curve
    (``{"loss": [...], "seconds": s}``). A non-finite loss stops with :class:`NonFiniteError`
    before the step that would have spoiled the model.
    """
    import time

    from tqdm import tqdm

    from ..distill import EmbeddingKDLoss, IDDLoss

    if objective not in CALIB_OBJECTIVES or objective == "none":
        raise ValueError(f"objective {objective!r}: choose one of {list(CALIB_OBJECTIVES[1:])}")
    if objective != "task" and teacher is None:
        raise ValueError(f"objective {objective!r} needs the FP teacher")
    if objective == "task" and task_loss is None:
        raise ValueError("objective 'task' needs the host's task_loss")
    quant = quant or QuantConfig()
    groups = step_param_groups(model, lr, train_bn)
    trained = {id(p) for g in groups for p in g["params"]}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
    idd = IDDLoss(weight=quant.idd.weight, criterion=quant.idd.criterion)
    kd = EmbeddingKDLoss(weight=1.0)
    names = recon_blocks(model) if objective == "recon" else []
    rec_s = _Recorder(model, names) if names else None
    rec_t = _Recorder(teacher.module, names) if names and teacher is not None else None
    # the teacher's outputs on each calibration batch, computed once: the teacher is frozen and the
    # batches are fixed, so every later visit of a batch would recompute the same tensors
    cache: Optional[Dict[int, Any]] = {} if iters > len(batches) else None
    was_training = model.training
    model.eval()
    curve: List[float] = []
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(iters), desc=f"calibrate: {objective}", leave=False, dynamic_ncols=True,
                   disable=not progress)
        for it in bar:
            i = it % len(batches)
            b = batches[i]
            target = None
            if teacher is not None and objective != "task":
                target = cache.get(i) if cache is not None else None
                if target is None:
                    target = _teacher_target(teacher, model, b, forward, embed, rec_t)
                    if cache is not None:
                        cache[i] = target
                        if len(cache) == 1 and _nbytes(target) * min(iters, len(batches)) > TEACHER_CACHE_BYTES:
                            cache = None  # too large to keep for every batch: run the teacher each time
            out = forward(model, b)
            if objective == "idc":
                loss, _ = idd(embed(out), target, labels(b))
            elif objective == "kd":
                loss, _ = kd(embed(out), target)
            elif objective == "task":
                assert task_loss is not None
                loss = task_loss(out, b)
            else:
                assert rec_s is not None and isinstance(target, dict)
                loss = recon_loss(rec_s.out, target)
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise NonFiniteError(f"calibration objective {objective}: non-finite loss at iteration {it + 1}; "
                                     "lower quant.calibrate.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            curve.append(value)
            if it % 10 == 0:
                bar.set_postfix(loss=f"{value:.4g}")
        bar.close()
    finally:
        for r in (rec_s, rec_t):
            if r is not None:
                r.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    # keep every step positive (the forward clamps anyway; the stored value is what export reads)
    for _, q in iter_quantizers(model):
        if q.enabled and bool(q.initialized):
            q.set_step(q.effective_step())
    return {"loss": curve, "seconds": time.perf_counter() - t0}


def first_last(curve: Sequence[float], k: int = 10) -> Tuple[float, float]:
    """Mean of the first and of the last ``k`` values of a loss curve."""
    if not curve:
        return float("nan"), float("nan")
    k = max(1, min(k, len(curve)))
    return sum(curve[:k]) / k, sum(curve[-k:]) / k
