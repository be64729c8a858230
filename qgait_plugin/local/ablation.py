"""``qgait ablate``: LSQ vs QGait variants at one bit width, from a finished demo's data and FP checkpoint.

Reruns the demo's QAT configs at another bit width (e.g. 2) with the variants that isolate each part
of QGait. Every variant gets the demo configs' schedule, learning-rate drop at the phase switch
included, so that a difference is the method's and not the schedule's:

- ``lsq``: STE for the whole budget (``configs/demo/w3a3_lsq.yaml`` with the bits changed);
- ``qgait``: the demo's QGait (STE for its first share of the budget, then the soft quantizer + IDD);
- ``two_phase``: QGait's two phases without IDD;
- ``lsq_no_drop``, ``qgait_no_drop``: the same two without the learning-rate drop, as a pair.

Prints a Markdown table (rank-1 per condition, mean, mAP) and writes ``ablation_w<b>.json`` into the
demo folder. One seed per variant: ``qgait bench accuracy`` is the tool that tells methods apart.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Dict, List

from ..errors import ConfigError, InputNotFound

#: variant -> the demo config it starts from and the overrides that make it (``drop``: keep the lr drop)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "lsq": {"base": "w3a3_lsq", "quant": {}, "drop": True},
    "qgait": {"base": "w3a3_qgait", "quant": {}, "drop": True},
    "two_phase": {"base": "w3a3_qgait", "quant": {"idd": {"enabled": False}}, "drop": True},
    "lsq_no_drop": {"base": "w3a3_lsq", "quant": {}, "drop": False},
    "qgait_no_drop": {"base": "w3a3_qgait", "quant": {}, "drop": False},
}


def run_ablation(demo_dir: str, bits: int, variants: List[str], iters: int = 0, progress: bool = True,
                 quick: bool = False, overwrite: bool = False) -> Dict[str, Any]:
    """Run ``variants`` at ``bits``; ``quick`` matches a ``qgait demo --quick`` folder's batch sizes.

    Results of an earlier ablation at the same bit width (its JSON, the variants' checkpoints) are
    replaced only with ``overwrite``; the refusal names them. Holds the demo folder's lock
    (:mod:`qgait_plugin.lock`): no demo rewrites the FP checkpoint while an ablation reads it."""
    from ..lock import output_lock

    with output_lock(demo_dir, "demo folder"):
        return _run_ablation(demo_dir, bits, variants, iters, progress, quick, overwrite)


def _run_ablation(demo_dir: str, bits: int, variants: List[str], iters: int, progress: bool, quick: bool,
                  overwrite: bool) -> Dict[str, Any]:
    from ..atomic import write_text_atomic
    from ..errors import OutputExists, short_repr
    from ..spec import check_bits
    from ..yamlfile import load_yaml
    from .config import load_config, merge_dicts
    from .demo import QUICK_FP, demo_config_dir
    from .trainer import Trainer, checkpoint_files

    d = Path(demo_dir)
    part = d / "data" / "partition.json"
    fp_dir = d / "output" / "SynthGait" / "GaitBaseLite" / "fp" / "checkpoints"
    fp_ckpts = checkpoint_files(str(fp_dir), "fp")  # by iteration: the demo's own run is the only one there
    if not part.is_file() or not fp_ckpts:
        raise InputNotFound(f"{demo_dir}: needs a finished `qgait demo --out {demo_dir}` (data/partition.json and "
                            f"the FP checkpoint under {fp_dir})")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {short_repr(unknown)}; choose from {list(VARIANTS)}")
    if not variants:
        raise ConfigError(f"--variants: none given; choose from {list(VARIANTS)}")
    check_bits(bits, "--bits")
    if iters < 0:
        raise ConfigError(f"--iters: {iters}; expected a number of iterations >= 1, or 0 for the demo configs'")
    out_json = d / f"ablation_w{bits}.json"
    earlier = [str(out_json)] if out_json.exists() else []
    for name in variants:
        save = f"w{bits}a{bits}_{name}"
        earlier += checkpoint_files(str(d / "ablation" / "SynthGait" / "GaitBaseLite" / save / "checkpoints"), save)
    if earlier and not overwrite:
        raise OutputExists(f"{demo_dir}: holds an earlier W{bits}A{bits} ablation ({len(earlier)} files: "
                           f"{short_repr([os.path.basename(f) for f in earlier])}); pass --overwrite to replace it")
    fp_ckpt = fp_ckpts[-1]
    # the share of the budget before QGait's switch, as the demo's QGait config has it
    qg = load_yaml(demo_config_dir() / "w3a3_qgait.yaml")
    split = int(qg["quant"]["schedule"]["ste_iters"]) / int(qg["trainer_cfg"]["total_iter"])
    print(f"ablate: FP checkpoint {fp_ckpt}", flush=True)
    results: Dict[str, Any] = {}
    for name in variants:
        spec = VARIANTS[name]
        over: Dict[str, Any] = {
            "data_cfg": {"dataset_root": str(d / "data"), "dataset_partition": str(part)},
            "trainer_cfg": {"output_root": str(d / "ablation"), "save_name": f"w{bits}a{bits}_{name}",
                            "overwrite": overwrite},
            "quant": merge_dicts({"init_from": fp_ckpt, "weight": {"bits": bits}, "act": {"bits": bits}},
                            spec["quant"]),
        }
        if quick:
            over = merge_dicts(over, {"trainer_cfg": {"sampler": QUICK_FP["trainer_cfg"]["sampler"]},
                                      "evaluator_cfg": QUICK_FP["evaluator_cfg"]})
        base = demo_config_dir() / f"{spec['base']}.yaml"
        budget = iters or int(load_yaml(base)["trainer_cfg"]["total_iter"])
        switch = int(round(budget * split))  # QGait's phase switch, and every variant's lr drop
        if iters:
            sched = {"ste_iters": iters} if spec["base"].endswith("lsq") else {"ste_iters": switch,
                                                                             "soft_iters": iters - switch}
            over = merge_dicts(over, {"trainer_cfg": {"total_iter": iters, "save_iter": iters},
                                      "quant": {"schedule": sched}})
        over = merge_dicts(over, {"scheduler_cfg": {"milestones": [switch] if spec["drop"] else []}})
        cfg = load_config(str(base), overrides=over)
        tr = Trainer(cfg, progress=progress)
        out = tr.train()
        ev = tr.evaluate()
        results[name] = {"rank1": {k: round(v, 2) for k, v in ev["rank1"].items()}, "mAP": round(ev["mAP"], 2),
                         "iterations": out["iteration"], "train_seconds": round(out["train_seconds"], 1)}
    write_text_atomic(str(out_json), json.dumps({"bits": bits, "results": results, "fp_checkpoint": fp_ckpt}, indent=1))
    return results


def format_table(bits: int, results: Dict[str, Any]) -> str:
    lines = [f"| W{bits}A{bits} variant | NM | BG | CL | mean | mAP | iterations |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        k = r["rank1"]
        lines.append(f"| {name} | {k.get('NM', 0):.1f} | {k.get('BG', 0):.1f} | {k.get('CL', 0):.1f} | "
                     f"{k['mean']:.1f} | {r['mAP']:.1f} | {r['iterations']} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo-dir", default="output/demo", help="a finished `qgait demo --out` folder")
    p.add_argument("--bits", type=int, default=2, help="weight and activation bits (default 2)")
    p.add_argument("--variants", default="lsq,qgait,two_phase", help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--iters", type=int, default=0, help="iteration budget per run (default: the demo configs', 100)")
    p.add_argument("--quick", action="store_true", help="the demo folder came from `qgait demo --quick`")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ablation at the same bit width")


def run(args: argparse.Namespace) -> int:
    res = run_ablation(args.demo_dir, args.bits, [v for v in args.variants.split(",") if v], args.iters,
                       progress=not args.no_progress, quick=args.quick, overwrite=args.overwrite)
    print(format_table(args.bits, res))
    return 0
