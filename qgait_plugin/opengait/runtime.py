"""Run OpenGait on CPU (gloo) by redirecting its CUDA/NCCL assumptions at run time.

No file of the checkout is edited. :class:`CpuRuntime` replaces, for the life of the process
(or until :meth:`CpuRuntime.uninstall`):

* ``torch.cuda.set_device`` -> no-op (``BaseModel.__init__`` calls it with the rank);
* ``nn.Module.to(cuda...)`` -> CPU (``BaseModel.__init__`` moves the model to ``cuda:<rank>``);
* ``Tensor.cuda()`` / ``nn.Module.cuda()`` -> stay on CPU: covers OpenGait's numpy-to-tensor
  helper (``utils.common.ts2var``), ``cuda_dist`` and ``mean_iou`` in evaluation, the sampler's
  broadcast and the loss aggregator's ``Loss(...).cuda()``;
* ``torch.load(map_location=cuda...)`` -> ``map_location="cpu"`` (checkpoint restore);
* ``get_ddp_module`` -> the same DDP pass-through wrapper without ``device_ids``, in every module
  that imported it by name (``utils.common``, ``utils``, ``modeling.loss_aggregator`` and the
  main script's namespace, passed in by the launcher);
* ``enable_float16`` (``torch.cuda.amp.autocast`` and ``GradScaler`` imported by name into
  ``modeling.base_model``) -> CPU autocast in bfloat16, which needs no loss scaling, and a
  GradScaler that passes through: a config keeps OpenGait's ``enable_float16: true`` on CPU.

What cannot be redirected safely is reported by :func:`cpu_config_problems` as config keys to
change (SyncBN, test batch size), so a run fails early with the key, its value and the value
needed instead of deep inside PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, MutableMapping, Optional, Tuple

import torch
from torch import nn

from ..compat import cpu_autocast, disabled_grad_scaler
from .dotted import get_dotted, set_dotted


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


@dataclass
class CpuProblem:
    """A config value that cannot work on CPU, and the value that does."""

    key: str
    value: Any
    needed: Any
    why: str

    def __str__(self) -> str:
        return f"{self.key}: is {self.value!r}, needs {self.needed!r} on CPU ({self.why})"


def cpu_config_problems(cfgs: Dict[str, Any], world_size: int, training: bool) -> List[CpuProblem]:
    """Config keys that must change for a CPU/gloo run with ``world_size`` processes."""
    probs = []
    if training and get_dotted(cfgs, "trainer_cfg.sync_BN"):
        probs.append(CpuProblem("trainer_cfg.sync_BN", get_dotted(cfgs, "trainer_cfg.sync_BN"), False,
                                "SyncBatchNorm runs on CUDA only"))
    bs = get_dotted(cfgs, "evaluator_cfg.sampler.batch_size")
    with_test = bool(get_dotted(cfgs, "trainer_cfg.with_test")) if training else True
    if with_test and bs != world_size:
        probs.append(CpuProblem("evaluator_cfg.sampler.batch_size", bs, world_size,
                                "OpenGait's test needs batch size == number of processes"))
    return probs


def apply_cpu_overrides(cfgs: Dict[str, Any], problems: List[CpuProblem]) -> None:
    """Set every problem's key to its needed value (``--cpu-overrides``)."""
    for p in problems:
        set_dotted(cfgs, p.key, p.needed)


class CpuRuntime:
    """Installs the CPU redirections; ``uninstall`` restores every replaced attribute."""

    def __init__(self) -> None:
        self._saved: List[Tuple[Any, str, Any]] = []

    def _replace(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def install(self, og: Any, extra_namespaces: Tuple[Any, ...] = ()) -> CpuRuntime:
        """Redirect ``og`` (from :func:`~qgait_plugin.opengait.env.import_opengait`) to CPU."""
        orig_module_to: Callable = nn.Module.to
        orig_load: Callable = torch.load

        def module_to(self_: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
            args = tuple(torch.device("cpu") if _is_cuda(a) else a for a in args)
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = torch.device("cpu")
            return orig_module_to(self_, *args, **kwargs)

        def load(*args: Any, **kwargs: Any) -> Any:
            ml = kwargs.get("map_location")
            if _is_cuda(ml):
                kwargs["map_location"] = "cpu"
            return orig_load(*args, **kwargs)

        ddp_cls = og.common.DDPPassthrough

        def get_ddp_module(module: nn.Module, find_unused_parameters: bool = False, **kwargs: Any) -> nn.Module:
            if not any(True for _ in module.parameters()):
                return module
            return ddp_cls(module, find_unused_parameters=find_unused_parameters, **kwargs)

        self._replace(torch.cuda, "set_device", lambda *a, **k: None)
        self._replace(torch.Tensor, "cuda", lambda self_, *a, **k: self_)
        self._replace(nn.Module, "cuda", lambda self_, *a, **k: self_)
        self._replace(nn.Module, "to", module_to)
        self._replace(torch, "load", load)
        if hasattr(og.base_model, "autocast"):
            self._replace(og.base_model, "autocast", cpu_autocast)
        if hasattr(og.base_model, "GradScaler"):
            self._replace(og.base_model, "GradScaler", lambda *a, **k: disabled_grad_scaler())
        for ns in (og.common, og.utils, og.loss_aggregator) + tuple(extra_namespaces):
            if hasattr(ns, "get_ddp_module"):
                self._replace(ns, "get_ddp_module", get_ddp_module)
        return self

    def uninstall(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)


def free_port() -> int:
    """A TCP port nobody listens on now (for a single-process ``env://`` rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(device: str, env: Optional[MutableMapping[str, str]] = None) -> None:
    """``env://`` process group: gloo on CPU, NCCL on CUDA; single-process defaults when not under torchrun."""
    import os

    import torch.distributed as dist

    if env is None:
        env = os.environ
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("RANK", "0")
    env.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method="env://")
