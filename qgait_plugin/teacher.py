"""The frozen full-precision teacher that IDD distils from.

:func:`make_teacher` copies the student's network (dequantized) and loads the FP weights into it;
:func:`attach_teacher` keeps it on the student for hosts that have only the model to carry state;
:func:`get_teacher` finds it again. The teacher is a :class:`FrozenTeacher`, a plain object (not an
``nn.Module``), so storing it anywhere never registers it in a student's ``state_dict``,
``parameters()``, optimizer, DDP wrapper or parameter count. What the copy shares with the student
instead of copying is one explicit list, :data:`SHARED_WITH_STUDENT`.

Plain PyTorch: nothing here knows about a host.
"""
from __future__ import annotations

import copy
import types
import weakref
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .checkpoint import load_float_state_dict, unwrap_state_dict
from .quant.convert import dequantize_model, iter_quantizers, unwrap_parallel


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

    def follow(self, student: Optional[nn.Module] = None) -> FrozenTeacher:
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

    def to(self, *args: Any, **kwargs: Any) -> FrozenTeacher:
        self.module.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> FrozenTeacher:
        """A no-op that keeps eval mode: the teacher's BN uses its FP running statistics."""
        self.module.eval()
        return self

    def eval(self) -> FrozenTeacher:
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

    def __deepcopy__(self, memo: Dict[int, Any]) -> FrozenTeacher:
        # a deep copy of a student (EMA, a second teacher) must not duplicate the teacher's weights
        return self


#: Attributes of the student that the teacher shares (the same object) instead of copying: the
#: host's run state, which takes no part in the forward pass. Copying it would double the data in
#: memory or fail on thread locks. A host model may keep its data loaders (``train_loader``,
#: ``test_loader``), ``optimizer``, ``scheduler``, AMP ``Scaler`` and message manager
#: (``msg_mgr``: OpenGait's logger with its TensorBoard writer) as attributes; these names are the
#: whole rule, applied to the student's own attributes. Everything else (modules, tensors,
#: containers, plain objects) is copied, so the teacher's network is its own.
SHARED_WITH_STUDENT = ("train_loader", "test_loader", "optimizer", "scheduler", "Scaler", "msg_mgr")


def _copy_network(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that shares the attributes named in :data:`SHARED_WITH_STUDENT`."""
    memo: Dict[int, Any] = {id(v): v for k, v in vars(model).items() if k in SHARED_WITH_STUDENT}
    return copy.deepcopy(model, memo)


def make_teacher(model: nn.Module, state_dict: Mapping[str, Any]) -> FrozenTeacher:
    """A frozen full-precision copy of ``model`` holding the weights of ``state_dict``.

    ``model`` may already be converted (quantized): the copy is dequantized, so the teacher is the
    float network itself with no quantizer in its way. The copy shares the student's run state
    (:data:`SHARED_WITH_STUDENT`). ``state_dict`` is the FP checkpoint in any form
    :func:`~qgait_plugin.checkpoint.unwrap_state_dict` reads. Keys of the student's quantizers
    are skipped if present; any other key that is missing from ``state_dict`` or that the model
    does not have is a :class:`~qgait_plugin.errors.ConfigError` naming them, because a teacher
    with random weights would silently distill noise.

    The result is held by reference (see :class:`FrozenTeacher`); it is in eval mode, takes no
    gradient and follows ``model``'s device and dtype.
    """
    model = unwrap_parallel(model)
    quant_prefixes = tuple(f"{name}." for name, _ in iter_quantizers(model))
    teacher = _copy_network(model)  # an attached FrozenTeacher is shared, not copied (its __deepcopy__)
    for attr in ("_qgait_teacher", "_apply"):
        teacher.__dict__.pop(attr, None)
    dequantize_model(teacher)
    sd = unwrap_state_dict(state_dict, set(teacher.state_dict()))
    sd = {k: v for k, v in sd.items() if not k.startswith(quant_prefixes)}
    load_float_state_dict(teacher, sd, source="make_teacher: the FP state dict")
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
    """Keep ``teacher`` on ``student`` as ``student._qgait_teacher`` without registering it.

    For hosts that have only the model to carry state. The teacher is stored as a plain
    attribute (never a submodule, so not in ``state_dict``, ``parameters()``, DDP or
    ``train()``), and the student's ``to()``/``cuda()``/``float()``/``half()`` (all of which go
    through ``nn.Module._apply``) move it along at once. Returns ``student``.
    """
    if not isinstance(teacher, FrozenTeacher):
        raise TypeError(f"attach_teacher expects the FrozenTeacher from make_teacher, got {type(teacher).__name__}")
    student = unwrap_parallel(student)
    object.__setattr__(student, "_qgait_teacher", teacher)
    object.__setattr__(student, "_apply", types.MethodType(_apply_with_teacher, student))
    teacher.follow(student)
    return student


def get_teacher(student: nn.Module) -> Optional[FrozenTeacher]:
    """The teacher :func:`attach_teacher` stored on ``student`` (or ``None``)."""
    return unwrap_parallel(student).__dict__.get("_qgait_teacher")
