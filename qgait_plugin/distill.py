"""IDD (inter-class distance-guided distillation), the frozen FP teacher and the parameter groups.

After phase 1 (LSQ with STE) the embeddings of different people move relative to each other
compared with the full-precision network, and that costs retrieval accuracy. IDD pulls the
student's *relative* inter-class distances back to the FP teacher's (DESIGN.md section 2):

* ``D_S``, ``D_T``: Euclidean distance matrices per part of ``[n, c, p]`` embeddings, averaged
  over the parts;
* ``M_ij = (y_i != y_j)``: only pairs of different labels count;
* each matrix is divided by its own mean over ``M`` (so a uniformly scaled student costs nothing);
* the loss is the mean over ``M`` of smooth-L1 (or L1, or L2) between the two, times a weight.

Plain PyTorch: nothing here knows about a host. The teacher is a :class:`FrozenTeacher`, a plain
object (not an ``nn.Module``), so storing it anywhere never registers it in a student's
``state_dict``, ``parameters()``, optimizer, DDP wrapper or parameter count.
"""
from __future__ import annotations

import copy
import functools
import types
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import IDD_CRITERIA, IDD_PARAMS
from .checkpoint import unwrap_state_dict
from .quant.convert import dequantize_model, iter_quantizers

#: Smallest normaliser (mean inter-class distance) divided by; keeps a collapsed batch finite.
_NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# the loss


def part_distances(emb: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` Euclidean distances between samples, computed per part and averaged over parts.

    ``emb`` is ``[n, c, p]`` (OpenGait's layout) or ``[n, c]`` (one part). The distances are
    computed in float32 whatever the input dtype (bfloat16/float16 distances of nearby
    embeddings lose most of their digits), without the ``|a|^2 + |b|^2 - 2ab`` shortcut, so two
    identical embeddings have distance exactly 0, and ``cdist``'s backward gives 0 (not NaN) there.
    """
    if emb.dim() == 2:
        emb = emb.unsqueeze(-1)
    x = emb.float().permute(2, 0, 1).contiguous()  # [p, n, c]
    d = torch.cdist(x, x, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")  # [p, n, n]
    return d.mean(dim=0)


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
    def from_config(cls, config: Any) -> "IDDLoss":
        """From a :class:`~qgait_plugin.config.QuantConfig`, its ``idd`` part or the ``quant:`` dict."""
        from .config import IDDConfig, QuantConfig

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
            d_s = part_distances(student)
            with torch.no_grad():
                d_t = part_distances(teacher.detach().to(student.device))
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


# --------------------------------------------------------------------------------------------
# the teacher


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (the teacher copies the model, not the wrapper)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _first_param(model: nn.Module) -> Optional[torch.Tensor]:
    for p in model.parameters():
        if p.is_floating_point():
            return p
    return None


class FrozenTeacher:
    """The FP teacher: a frozen model held by reference, in eval mode, run under ``no_grad``.

    Not an ``nn.Module`` on purpose: assigning it to an attribute of the student stores a plain
    reference, so it never joins the student's ``state_dict``, ``parameters()``, optimizer,
    DDP wrapper or ``train()``/``eval()`` walks. It follows the student it was made from: at each
    call it moves to the student's device and floating dtype if the student moved (for an eager
    move on ``student.to(...)`` use :func:`attach_teacher`), and it puts itself back in eval mode
    if anything switched it to training.
    """

    def __init__(self, module: nn.Module, student: Optional[nn.Module] = None) -> None:
        self.module = module
        self._student = weakref.ref(student) if student is not None else None

    def follow(self, student: Optional[nn.Module] = None) -> "FrozenTeacher":
        """Move to ``student``'s (default: the model it was made from) device and dtype, and back to eval."""
        if student is None and self._student is not None:
            student = self._student()
        ref = _first_param(student) if student is not None else None
        mine = _first_param(self.module)
        if ref is not None and mine is not None and (mine.device != ref.device or mine.dtype != ref.dtype):
            self.module.to(device=ref.device, dtype=ref.dtype)
        if self.module.training:
            self.module.eval()
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.follow()
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "FrozenTeacher":
        self.module.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """A no-op that keeps eval mode: the teacher's BN uses its FP running statistics."""
        self.module.eval()
        return self

    def eval(self) -> "FrozenTeacher":
        self.module.eval()
        return self

    @property
    def training(self) -> bool:
        return self.module.training

    def parameters(self):
        return self.module.parameters()

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FrozenTeacher({type(self.module).__name__})"

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FrozenTeacher":
        # a deep copy of a student (EMA, a second teacher) must not duplicate the teacher's weights
        return self


#: Attributes of these types are shared with the teacher, never copied: they are the host's run
#: state (OpenGait's ``BaseModel`` keeps its loaders, optimizer and scheduler on the model).
_SHARED_TYPES = (DataLoader, Dataset, Sampler, Optimizer, LRScheduler)
_PLAIN = (str, bytes, int, float, bool, type(None), list, tuple, dict, set, frozenset, type,
          types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def _holds_no_network(v: Any) -> bool:
    """An opaque object (a logger, a message manager with a TensorBoard writer) that holds no
    module or tensor directly: sharing it with the teacher cannot change the teacher's forward."""
    if isinstance(v, _PLAIN) or isinstance(v, (nn.Module, torch.Tensor)):
        return False
    d = getattr(v, "__dict__", None)
    return isinstance(d, dict) and not any(isinstance(x, (nn.Module, torch.Tensor)) for x in d.values())


def _copy_network(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that copies the network but shares the host's run state.

    A host model may carry data loaders, an optimizer or a TensorBoard writer as attributes;
    copying them would double the data in memory, or fail on thread locks. Those are shared;
    modules, tensors, containers and objects holding modules are copied as usual.
    """
    memo: Dict[int, Any] = {}
    for m in model.modules():
        for k, v in vars(m).items():
            if k.startswith("_"):
                continue  # nn.Module's own bookkeeping (hooks, parameters, ...) is copied
            if isinstance(v, _SHARED_TYPES) or _holds_no_network(v):
                memo[id(v)] = v
    return copy.deepcopy(model, memo)


def make_teacher(model: nn.Module, state_dict: Mapping[str, Any]) -> FrozenTeacher:
    """A frozen full-precision copy of ``model`` holding the weights of ``state_dict``.

    ``model`` may already be converted (quantized): the copy is dequantized, so the teacher is the
    float network itself with no quantizer in its way. ``state_dict`` is the FP checkpoint (a
    plain state dict, an OpenGait checkpoint with a ``model`` entry, or DDP-prefixed keys). Keys
    of the student's quantizers are skipped if present; any other key that is missing from
    ``state_dict`` or that the model does not have is an error naming them, because a teacher
    with random weights would silently distill noise.

    The result is held by reference (see :class:`FrozenTeacher`); it is in eval mode, takes no
    gradient and follows ``model``'s device and dtype.
    """
    model = _unwrap(model)
    quant_prefixes = tuple(f"{name}." for name, _ in iter_quantizers(model))
    teacher = _copy_network(model)  # an attached FrozenTeacher is shared, not copied (its __deepcopy__)
    for attr in ("_qgait_teacher", "_apply"):
        teacher.__dict__.pop(attr, None)
    dequantize_model(teacher)
    teacher_keys = set(teacher.state_dict().keys())
    sd = unwrap_state_dict(state_dict, teacher_keys)
    sd = {k: v for k, v in sd.items() if not k.startswith(quant_prefixes)}
    result = teacher.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the FP state dict: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise KeyError(f"make_teacher: the FP state dict does not fit {type(model).__name__}; " + "; ".join(parts))
    teacher.requires_grad_(False)
    teacher.eval()
    return FrozenTeacher(teacher, student=model).follow()


def _apply_with_teacher(self: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Module._apply`` of a student with an attached teacher: ``to``/``cuda``/``half`` move both."""
    out = type(self)._apply(self, fn, *args, **kwargs)
    teacher = self.__dict__.get("_qgait_teacher")
    if teacher is not None:
        teacher.module._apply(fn)
    return out


def attach_teacher(student: nn.Module, teacher: FrozenTeacher) -> nn.Module:
    """Keep ``teacher`` on ``student`` as ``student.qgait_teacher`` without registering it.

    For hosts that have only the model to carry state. The teacher is stored as a plain
    attribute (never a submodule, so not in ``state_dict``, ``parameters()``, DDP or
    ``train()``), and the student's ``to()``/``cuda()``/``float()``/``half()`` (all of which go
    through ``nn.Module._apply``) move it along at once. Returns ``student``.
    """
    if not isinstance(teacher, FrozenTeacher):
        raise TypeError(f"attach_teacher expects the FrozenTeacher from make_teacher, got {type(teacher).__name__}")
    student = _unwrap(student)
    object.__setattr__(student, "_qgait_teacher", teacher)
    object.__setattr__(student, "_apply", types.MethodType(_apply_with_teacher, student))
    teacher.follow(student)
    return student


def get_teacher(student: nn.Module) -> Optional[FrozenTeacher]:
    """The teacher :func:`attach_teacher` stored on ``student`` (or ``None``)."""
    return _unwrap(student).__dict__.get("_qgait_teacher")


# --------------------------------------------------------------------------------------------
# what trains


class ParamGroups(list):
    """A list of optimizer parameter groups that also names the parameters it froze."""

    frozen: List[str]


def idd_param_groups(model: nn.Module, params: str = "all", step_weight_decay: Optional[float] = 0.0) -> ParamGroups:
    """Parameter groups for ``torch.optim`` under ``quant.idd.params``.

    * ``all`` (distillation, paper v1): every parameter that requires grad trains.
    * ``quantizers`` (calibration, paper v2's IDC): only the quantizer step sizes and the affine
      parameters of BatchNorm layers train; **every other parameter is frozen in place**
      (``requires_grad_(False)``), so the backward pass skips their gradients and a DDP wrapper
      built afterwards does not wait for them. Build the DDP wrapper after this call.

    Groups are named (``quantizer_steps``, ``bn``, ``weights``); empty groups are left out. The step
    group gets ``weight_decay=step_weight_decay`` (0 by default: decay would shrink the steps and
    clip more, and a step is not a weight to regularise; ``None`` keeps the optimizer's default).
    The returned list's ``frozen`` attribute names the parameters frozen here.
    """
    if params not in IDD_PARAMS:
        raise ValueError(f"quant.idd.params: {params!r} is not allowed; choose one of {list(IDD_PARAMS)}")
    model = _unwrap(model)
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
        elif params == "quantizers" and id(p) in bn_ids and p.requires_grad:
            bn.append(p)
        elif params == "quantizers":
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(name)
        elif p.requires_grad:
            rest.append(p)
    if params == "quantizers" and not steps:
        raise ValueError(f"quant.idd.params: quantizers needs a quantized model; {type(model).__name__} has no "
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
        groups.append(g)
    return groups
