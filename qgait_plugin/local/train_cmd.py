"""``qgait train``: train with the built-in host (full precision, or QAT when the config has ``quant:``).

The config uses OpenGait's sections (data_cfg, model_cfg, loss_cfg, optimizer_cfg, scheduler_cfg,
trainer_cfg, evaluator_cfg) plus quant:; with ``trainer_cfg.with_test`` the run ends with the
CASIA-B evaluation.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfgs", required=True, help="YAML config, e.g. configs/demo/fp.yaml")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run may replace the checkpoints of an earlier run under the same save_name "
                        "(trainer_cfg.overwrite: true)")


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluate import format_rank1
    from .trainer import Trainer

    cfg = load_config(args.cfgs, overrides={"trainer_cfg": {"overwrite": True}} if args.overwrite else None)
    tr = Trainer(cfg, progress=not args.no_progress)
    out = tr.train()
    print(f"trained {cfg['trainer_cfg']['save_name']} to iteration {out['iteration']} in "
          f"{out['train_seconds']:.0f} s; checkpoint {out['checkpoint']}")
    if cfg["trainer_cfg"].get("with_test"):
        print(format_rank1(tr.evaluate()))
    return 0
