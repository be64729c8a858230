"""``qgait test``: evaluate a checkpoint of the built-in host with the CASIA-B protocol.

Takes the config the checkpoint was trained with (``evaluator_cfg.restore_hint`` picks the
checkpoint); prints rank-1 per condition, their mean and mAP, then rank-1 per probe view as JSON.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfgs", required=True, help="YAML config, e.g. configs/demo/w3a3_qgait.yaml")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluate import format_rank1
    from .trainer import Trainer

    tr = Trainer(load_config(args.cfgs), progress=not args.no_progress)
    res = tr.evaluate(restore=True)
    print(format_rank1(res))
    print(json.dumps({"rank1_per_view": res["rank1_per_view"]}, indent=1))
    return 0
