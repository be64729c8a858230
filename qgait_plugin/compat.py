"""What differs between the torch releases this package supports (1.13 through 2.x), in one place.

OpenGait users train in the environments they already have: OpenGait documents torch >= 1.10 and its
users run 1.8 to 2.x. Every use of an API that is newer than torch 1.13, or that changed its
signature since, goes through a name defined here, so the rest of the code reads the same on every
release and a new difference is one entry in this file.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

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
