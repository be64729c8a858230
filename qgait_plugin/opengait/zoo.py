"""Build OpenGait's silhouette model zoo bare (no data, no process group), quantize it and measure coverage.

Used by the zoo test and by ``python -m qgait_plugin.opengait.zoo`` to print the per-model table.
``build_bare`` runs a model class's own ``build_network`` and ``init_parameters`` from one of the
checkout's configs, skipping ``BaseModel.__init__`` (which needs data loaders and CUDA).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..yamlfile import load_yaml
from .dotted import set_dotted

#: name -> (config under <root>/configs, model_cfg overrides (dotted keys), input frames, height, width)
ZOO: Dict[str, Tuple[str, Dict[str, Any], int, int, int]] = {
    "GaitBase": ("gaitbase/gaitbase_da_casiab.yaml", {}, 4, 64, 44),
    "DeepGaitV2-2d": ("deepgaitv2/DeepGaitV2_casiab.yaml", {"Backbone.mode": "2d"}, 4, 64, 44),
    "DeepGaitV2-p3d": ("deepgaitv2/DeepGaitV2_casiab.yaml", {"Backbone.mode": "p3d"}, 4, 64, 44),
    "DeepGaitV2-3d": ("deepgaitv2/DeepGaitV2_casiab.yaml", {"Backbone.mode": "3d"}, 4, 64, 44),
    "GaitSet": ("gaitset/gaitset.yaml", {}, 4, 64, 44),
    "GaitPart": ("gaitpart/gaitpart.yaml", {}, 4, 64, 44),
    "GaitGL": ("gaitgl/gaitgl.yaml", {}, 4, 64, 44),
    "GLN": ("gln/gln_phase2.yaml", {}, 4, 64, 44),
    "SwinGait": ("swingait/swingait3D_B1122C2_CCPG.yaml", {}, 4, 64, 44),
}


#: narrower widths for quick checks (tests); the coverage fractions do not depend on them
SMALL: Dict[str, Dict[str, Any]] = {
    "GaitBase": {"backbone_cfg.channels": [16, 32, 64, 128], "SeparateFCs.in_channels": 128},
    "DeepGaitV2-2d": {"Backbone.channels": [16, 32, 64, 128]},
    "DeepGaitV2-p3d": {"Backbone.channels": [16, 32, 64, 128]},
    "DeepGaitV2-3d": {"Backbone.channels": [16, 32, 64, 128]},
}


def build_bare(og: Any, config: str, overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The model of ``<root>/configs/<config>`` with its network built and initialised, nothing else."""
    cfgs = load_yaml(og.root / "configs" / config, "OpenGait model config")
    mc = copy.deepcopy(cfgs["model_cfg"])
    for k, v in (overrides or {}).items():
        set_dotted(mc, k, v)
    cls = getattr(og.models, mc["model"])
    cls = getattr(cls, "_qgait_original", cls)
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    model.cfgs, model.iteration, model.msg_mgr = cfgs, 0, og.utils.NoOp()
    model.build_network(mc)
    model.init_parameters()
    # some forwards touch the optimizer in training (SwinGait adjusts its lr there)
    model.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for group in model.optimizer.param_groups:  # what OpenGait's LR scheduler would have recorded
        group.setdefault("initial_lr", group["lr"])
    if isinstance(cfgs.get("trainer_cfg"), dict):  # SwinGait's __init__ keeps the run length for its lr rule
        model.__dict__.setdefault("T_max_iter", cfgs["trainer_cfg"].get("total_iter", 1))
    return model


def example_inputs(n: int, frames: int, h: int, w: int, seed: int = 0) -> Tuple[Any, ...]:
    """OpenGait's model input tuple: ``([sils [n, s, h, w]], labels, types, views, seqL=None)``."""
    g = torch.Generator().manual_seed(seed)
    sils = (torch.rand(n, frames, h, w, generator=g) > 0.5).float()
    labs = torch.arange(n) % max(1, n // 2)
    return ([sils], labs, ["nm-01"] * n, ["000"] * n, None)


def _outputs(retval: Dict[str, Any]) -> List[torch.Tensor]:
    out = []
    for v in retval["training_feat"].values():
        out += [t for t in v.values() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    return out


def check_model(og: Any, name: str, bits: int = 4, small: bool = False, dataflow: bool = True) -> Dict[str, Any]:
    """Build, convert at W{bits}A{bits}, forward + backward, coverage. Returns figures and the report.

    ``small`` narrows the widest models (:data:`SMALL`) so a CPU test stays quick; ``dataflow`` places
    the quantizers between layers from a run on one example input, as the OpenGait host does (else
    the block registry's placement).
    """
    from ..config import QuantConfig
    from ..quant.convert import iter_quantizers, quantize_model
    from ..quant.coverage import coverage_report

    config, ov, frames, h, w = ZOO[name]
    ov = {**ov, **(SMALL.get(name, {}) if small else {})}
    torch.manual_seed(0)
    model = build_bare(og, config, ov)
    quantize_model(model, QuantConfig.from_dict({"weight": {"bits": bits}, "act": {"bits": bits}}),
                   example_inputs=(example_inputs(1, frames, h, w),) if dataflow else None)
    model.train()
    inputs = example_inputs(2 if small else 4, frames, h, w)
    outs = _outputs(model(inputs))
    torch.stack([o.float().pow(2).mean() for o in outs]).sum().backward()
    steps = [q.scaled_log_step for _, q in iter_quantizers(model) if q.enabled]
    with_grad = sum(1 for s in steps if s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0)
    report = coverage_report(model, (inputs,))
    return {"model": name, "quantizers": len(steps), "steps_with_grad": with_grad,
            "quantized_mac_fraction": report.quantized_mac_fraction, "total_macs": report.total_macs,
            "report": report}


def main() -> None:  # pragma: no cover - prints the README table
    import sys

    from .env import import_opengait
    from .registry import register

    torch.set_num_threads(1)
    og = import_opengait(sys.argv[1] if len(sys.argv) > 1 else None)
    register(og)
    print("| model | quantizers | MACs / sample clip | quantized MACs | stays float where a quantized tensor enters |")
    print("|---|---:|---:|---:|---|")
    for name in ZOO:
        r = check_model(og, name)
        floats = ", ".join(f"{f['op']} x{f['count']}" for f in r["report"].stays_float) or "nothing"
        print(f"| {name} | {r['quantizers']} | {r['total_macs'] / 4:,.0f} | "
              f"{100 * r['quantized_mac_fraction']:.1f} % | {floats} |", flush=True)


if __name__ == "__main__":
    main()
