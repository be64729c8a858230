"""What differs between the torch releases this package supports (1.13 through 2.x), in one place.

OpenGait users train in the environments they already have: OpenGait documents torch >= 1.10 and its
users run 1.8 to 2.x. Every use of an API that is newer than torch 1.13, or that changed its
signature since, goes through a name defined here, so the rest of the code reads the same on every
release and a new difference is one entry in this file.
"""
from __future__ import annotations

import _compat_pickle
import functools
import inspect
import io
import os
import pickle
import types
from typing import IO, Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

#: ``(major, minor)`` of the running torch (Debian's ``1.13.0a0`` reads as ``(1, 13)``)
TORCH_VERSION: Tuple[int, int] = tuple(int(p) for p in torch.__version__.split(".")[:2])  # type: ignore[assignment]

def _find_functional_call() -> Callable[..., Any]:
    import importlib

    try:  # torch >= 2.0
        found: Callable[..., Any] = importlib.import_module("torch.func").functional_call
    except ImportError:  # torch 1.13: the same function under its older home
        found = importlib.import_module("torch.nn.utils.stateless").functional_call
    return found


#: ``functional_call(module, {name: tensor}, args, kwargs)``: run ``module`` with some parameters replaced
functional_call: Callable[..., Any] = _find_functional_call()

#: ``F.scaled_dot_product_attention`` (torch >= 2.0), or ``None``: counted only where it exists
scaled_dot_product_attention: Optional[Callable[..., Any]] = getattr(F, "scaled_dot_product_attention", None)



def onnx_export_kwargs() -> Dict[str, Any]:
    """Keywords for ``torch.onnx.export`` that select the TorchScript exporter and keep autograd
    functions as nodes, for the keywords this torch has (1.13 has neither: its only exporter is the
    TorchScript one, and it does not inline autograd functions)."""
    params = inspect.signature(torch.onnx.export).parameters
    wanted = {"dynamo": False, "autograd_inlining": False}
    return {k: v for k, v in wanted.items() if k in params}


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the running torch is ``major.minor`` or newer (pre-releases count as their release)."""
    return TORCH_VERSION >= (major, minor)


def disabled_grad_scaler() -> Any:
    """A GradScaler that does nothing (``enabled=False``), built without the warnings that the CUDA
    one prints on a machine without CUDA, and without torch 2.x's deprecation of ``torch.cuda.amp``."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler") and TORCH_VERSION >= (2, 3):
        return amp.GradScaler("cuda", enabled=False)
    return torch.cuda.amp.GradScaler(enabled=False)


def cpu_autocast(enabled: bool = True, dtype: Optional[torch.dtype] = None, **_: Any) -> Any:
    """``torch.autocast`` on the CPU in bfloat16 (what float16 autocast is on a GPU), with
    ``torch.cuda.amp.autocast``'s call signature (``enabled``, ``dtype``, ``cache_enabled``)."""
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bool(enabled))


@functools.lru_cache(maxsize=1)
def _weights_only_reads_plain_data() -> bool:
    """Whether this torch's ``weights_only=True`` unpickler reads a Python float. torch 1.13's does
    not (``Unsupported operand 71``, pickle's BINFLOAT), so it refuses every checkpoint that holds a
    learning rate or a loss; torch >= 2.0's does."""
    buf = io.BytesIO()
    torch.save({"x": 0.5}, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> Dict[str, Any]:
    """The classes and functions a checkpoint may name: torch 1.13's weights-only allowlist (tensor,
    parameter and storage rebuilders, OrderedDict, Size) plus what torch 2.x's adds that plain
    training state holds (an LR scheduler's Counter of milestones, sets, bytes, devices) and every
    dtype."""
    import _codecs
    import collections

    from torch import _weights_only_unpickler

    allowed: Dict[str, Any] = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update({"collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
                    "_codecs.encode": _codecs.encode, "builtins.bytearray": bytearray, "builtins.set": set,
                    "builtins.complex": complex, "torch.device": torch.device})
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[str(value)] = value
    return allowed


class _AllowlistUnpickler(pickle.Unpickler):
    """Python's unpickler (every opcode) that resolves a global only from :func:`_allowed_globals`,
    the restriction recipe of the ``pickle`` documentation. Anything else is refused with torch
    2.x's wording, ``Unsupported global: GLOBAL module.name``, before it could be called."""

    def find_class(self, module: str, name: str) -> Any:
        # torch.save's protocol 2 names Python 2 modules (``__builtin__.set``); pickle's own
        # find_class maps them, and so must this one
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _allowed_globals().get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return found


#: a stand-in for the ``pickle`` module that torch's zip reader (``serialization._load``) takes: it
#: only subclasses ``Unpickler`` (``load`` would serve the pre-1.6 format, which is refused before)
_allowlist_pickle = types.SimpleNamespace(__name__="qgait_allowlist_pickle", Unpickler=_AllowlistUnpickler)


def load_weights_only(f: Union[str, os.PathLike[str], IO[bytes]]) -> Any:
    """``torch.load(f, map_location="cpu", weights_only=True)``: tensors and plain data only, a
    pickle naming any other class or function refused (``pickle.UnpicklingError``), never executed.
    On a torch whose weights-only unpickler cannot read plain floats (1.13) the same restriction is
    applied through an allowlisting unpickler instead, handed to torch's zip reader directly: 1.13's
    ``torch.load`` replaces any ``pickle_module`` it is given by ``pickle`` unless ``weights_only``."""
    if _weights_only_reads_plain_data():
        return torch.load(f, map_location="cpu", weights_only=True)
    from torch import serialization

    with serialization._open_file_like(f, "rb") as opened:
        if not serialization._is_zipfile(opened):
            raise RuntimeError("not a zip archive (torch.save's format since torch 1.6)")
        with serialization._open_zipfile_reader(opened) as archive:
            return serialization._load(archive, "cpu", _allowlist_pickle, encoding="utf-8")
