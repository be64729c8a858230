"""``qgait opengait export``: an OpenGait QAT checkpoint out as an integer ONNX model (+ packed file).

The model is built as ``qgait opengait test`` would build it (the config merged into the
checkout's ``configs/default.yaml``, the plugin's handlers registered, the network converted with
the config's ``quant:`` section) but without OpenGait's data loaders, process group or CUDA: only
``build_network`` and ``init_parameters`` run, then the checkpoint that ``evaluator_cfg``'s
``restore_hint`` and ``save_name`` pick (``output/<dataset>/<model>/<save_name>/checkpoints/...``
under ``--workdir``, default the checkout root; a string hint is a file) loads strictly. The
exported module takes silhouettes ``[n, frames, 64, 44]`` (``uint8 / 255``, as OpenGait's cutting
transform gives them) and returns the ``[n, c, parts]`` embeddings of the model's inference path.
Agreement is checked on sequences of the config's test set (generated silhouettes when the data
set is not there).
"""
from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, QGaitError

#: state-dict entries of a QAT model that are not part of the network (the plugin's schedule state)
_NOT_NETWORK = ("qgait_state.", "loss_aggregator.")


def _gem_mean(hpp: Any, x: torch.Tensor) -> torch.Tensor:
    p = float(hpp.p.detach().reshape(-1)[0])  # a constant of the deployed model
    return x.clamp(min=hpp.eps).pow(p).mean(-1, keepdim=True).pow(1.0 / p)


def _gem_as_mean(hpp: nn.Module) -> None:
    """GaitGL's ``GeMHPP`` pools with ``avg_pool2d`` over a kernel as wide as its input, a size the
    exporter cannot turn into a constant; the same generalized mean written with ``mean`` (bound
    to the module, so copies of the model get their own)."""
    object.__setattr__(hpp, "gem", types.MethodType(_gem_mean, hpp))


class OpenGaitEmbeddings(nn.Module):
    """An OpenGait model's inference path: silhouettes ``[n, s, h, w]`` in, ``inference_feat`` embeddings out.

    Pooling the exporter cannot trace (GaitGL's ``GeMHPP``) is replaced by an equal formulation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for m in model.modules():
            if type(m).__name__ == "GeMHPP" and hasattr(m, "p") and hasattr(m, "eps"):
                _gem_as_mean(m)

    def forward(self, sils: torch.Tensor) -> torch.Tensor:
        n = int(sils.shape[0])
        inputs = ([sils], [0] * n, ["nm-01"] * n, ["000"] * n, None)
        return self.model(inputs)["inference_feat"]["embeddings"]


def build_network(og: Any, cfgs: Dict[str, Any], state_dict: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model class of ``cfgs`` with its network built, initialised and converted (``cfgs['quant']``)
    so that ``state_dict`` (the checkpoint it will load, if any) fits: with the placement the checkpoint
    records, else placed from the dataflow on an example input."""
    from ..config import QuantConfig
    from ..quant.convert import quantize_for
    from .quant_model import example_inputs

    name = cfgs["model_cfg"]["model"]
    cls = getattr(og.models, name, None)
    if cls is None:
        raise ConfigError(f"model_cfg.model: {name!r} is not a model of this OpenGait checkout")
    cls = getattr(cls, "_qgait_original", cls)
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    model.cfgs, model.iteration, model.msg_mgr = cfgs, 0, og.utils.NoOp()
    model.training = False
    model.build_network(cfgs["model_cfg"])
    model.init_parameters()
    quantize_for(model, QuantConfig.from_dict(cfgs["quant"]), state_dict, example_inputs(cfgs))
    return model.eval()


def checkpoint_path(cfgs: Dict[str, Any], workdir: Path, iteration: int = 0) -> str:
    """The file ``evaluator_cfg.restore_hint`` (or ``iteration``) names, as OpenGait's test phase finds it."""
    e = cfgs["evaluator_cfg"]
    hint = iteration or e.get("restore_hint", 0)
    if isinstance(hint, str):
        return hint
    if not isinstance(hint, int) or hint <= 0:
        raise ConfigError(f"evaluator_cfg.restore_hint: {hint!r}; export needs an iteration (> 0) or a checkpoint path "
                          "(or pass --iter N)")
    save = e["save_name"]
    return str(workdir / "output" / cfgs["data_cfg"]["dataset_name"] / cfgs["model_cfg"]["model"] / save /
               "checkpoints" / f"{save}-{hint:05d}.pt")


def network_state(path: str) -> Dict[str, Any]:
    """The network's entries of the QAT checkpoint at ``path`` (plugin state aside)."""
    from ..checkpoint import read_checkpoint, unwrap_state_dict

    return {k: v for k, v in unwrap_state_dict(read_checkpoint(path, "evaluator_cfg.restore_hint"), set()).items()
            if not k.startswith(_NOT_NETWORK)}


def load_network_state(model: nn.Module, path: str, state_dict: Optional[Dict[str, Any]] = None) -> None:
    """Load a QAT checkpoint (``state_dict``, read from ``path`` when not given) into ``model`` strictly
    (plugin state aside); a mismatch is a clear error."""
    keys = set(model.state_dict())
    sd = state_dict if state_dict is not None else network_state(path)
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:
        missing, unexpected = sorted(keys - set(sd)), sorted(set(sd) - keys)
        detail = (f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
                  if missing or unexpected else " ".join(str(e).split())[:300])
        raise ConfigError(f"evaluator_cfg.restore_hint: {path!r} does not fit the configured model ({detail}); "
                          "expected a QAT checkpoint trained with this config") from None


def check_sequences(cfgs: Dict[str, Any], count: int, frames: int = 30) -> List[torch.Tensor]:
    """Up to ``count`` test sequences ``[1, s, 64, 44]`` (cut as OpenGait's transform does, scaled to [0, 1]);
    generated silhouettes when the data set is not readable."""
    from ..layout import list_sequences, read_partition, read_sequence

    data = cfgs.get("data_cfg") or {}
    out: List[torch.Tensor] = []
    try:
        ids = read_partition(data["dataset_partition"])["TEST_SET"]
        for f in list_sequences(data["dataset_root"], ids)[:count]:
            x = torch.from_numpy(np.ascontiguousarray(read_sequence(f.path)))[:frames]
            cut = x.shape[-1] // 64 * 10
            out.append((x[..., cut:-cut] if cut else x).float().div(255.0)[None])
    except (KeyError, OSError, ValueError, QGaitError):
        out = []
    if not out:
        g = torch.Generator().manual_seed(0)
        out = [(torch.rand(1, frames, 64, 44, generator=g) > 0.5).float() for _ in range(count)]
    return out


def load_quant_config(cfg_path: str, root: Optional[str], why: str) -> Tuple[Any, Dict[str, Any]]:
    """OpenGait imported from ``root`` with the plugin registered, and the merged config of ``cfg_path``,
    which must have a ``quant:`` section (``why`` ends the error when it has none)."""
    from .env import import_opengait
    from .launcher import LaunchError, load_config
    from .registry import register

    og = import_opengait(root)
    register(og)
    path = Path(cfg_path).resolve()
    if not path.is_file():
        raise LaunchError(f"--cfgs: {cfg_path} does not exist (expected an OpenGait config YAML)")
    cfgs = load_config(og, path)
    if not cfgs.get("quant"):
        raise ConfigError(f"{cfg_path}: has no quant: section; {why}")
    return og, cfgs


def export_opengait(cfg_path: str, out: str, root: Optional[str] = None, packed: str = "", force: bool = False,
                    runtime: str = "ort", threads: int = 1, runs: int = 10, iteration: int = 0,
                    workdir: Optional[str] = None, checks: int = 4) -> Dict[str, Any]:
    """Export the QAT checkpoint of the OpenGait config ``cfg_path``; returns the figures printed."""
    from ..export.deploy import export_and_check
    from ..export.outputs import check_output_paths
    from ..export.packed import save_packed
    from ..export.runtime import RUNTIMES

    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime: {runtime!r} is not a runtime; choose one of {list(RUNTIMES)}")
    if runs < 0 or checks < 1:
        raise ConfigError("--runs must be >= 0 and --check >= 1")
    if not out:
        raise ConfigError("--out: export needs the ONNX file to write")
    og, cfgs = load_quant_config(cfg_path, root, "export writes quantized models")
    path = Path(cfg_path).resolve()
    ckpt = checkpoint_path(cfgs, Path(workdir).resolve() if workdir else og.root, iteration)
    check_output_paths({"--out": out, "--packed": packed}, {"checkpoint": ckpt, "config": str(path)}, force)
    if not os.path.isfile(ckpt):
        raise ConfigError(f"evaluator_cfg.restore_hint: checkpoint {ckpt} does not exist (train first, set "
                          "restore_hint/save_name, or pass --iter / --workdir)")
    torch.manual_seed(0)
    sd = network_state(ckpt)
    model = build_network(og, cfgs, sd)
    load_network_state(model, ckpt, sd)
    head = OpenGaitEmbeddings(model).eval()
    seqs = check_sequences(cfgs, checks)
    res = export_and_check(head, seqs[0], out, checks=seqs, runtime=runtime, threads=threads, runs=runs)
    res.update(checkpoint=ckpt, model=cfgs["model_cfg"]["model"], frames=int(seqs[0].shape[1]),
               checked_sequences=len(seqs))
    if packed:
        res["packed"] = packed
        res["packed_bytes"] = save_packed(model, packed)
    return res
