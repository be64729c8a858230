"""``qgait train``, ``qgait test`` and ``qgait demo`` on the built-in host (no OpenGait, CPU by default)."""
from __future__ import annotations

import argparse
import json
import sys


def add_commands(subparsers) -> None:
    """Add ``train``, ``test`` and ``demo`` to the ``qgait`` parser."""
    for name, helptext in (("train", "train (FP, or QAT with a quant: section) with the built-in host"),
                           ("test", "evaluate a checkpoint with the CASIA-B protocol on the built-in host")):
        p = subparsers.add_parser(name, help=helptext, description=helptext + ". The config uses OpenGait's "
                                  "sections (data_cfg, model_cfg, loss_cfg, optimizer_cfg, scheduler_cfg, "
                                  "trainer_cfg, evaluator_cfg) plus quant:.")
        p.add_argument("--cfgs", required=True, help="YAML config, e.g. configs/demo/fp.yaml")
        p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
        p.set_defaults(func=_train if name == "train" else _test)
    p = subparsers.add_parser("demo", help="generate data, train FP, quantize W8A8/W4A4 with LSQ and QGait, compare",
                              description="End-to-end demo on generated silhouettes: FP, then W8A8 and W4A4 with "
                                          "plain LSQ-STE and with QGait (two phases + IDD); writes results.md, "
                                          "results.json and PNG plots into --out.")
    p.add_argument("--out", default="output/demo", help="output folder (default output/demo)")
    p.add_argument("--quick", action="store_true", help="tiny data and iteration counts (about 3 minutes at most)")
    p.add_argument("--configs", default=None, help="folder with fp.yaml, w8a8_lsq.yaml, ... (default configs/demo)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: the configs' num_threads)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=_demo)
    from . import export_cmd

    p = subparsers.add_parser("export", help="a trained QAT checkpoint out as ONNX with integer weights (+ packed file)",
                              description=export_cmd.__doc__)
    export_cmd.add_arguments(p)
    p.set_defaults(func=export_cmd.run_args)
    from . import ablation

    p = subparsers.add_parser("ablate", help="LSQ vs QGait variants at another bit width, from a finished demo",
                              description=ablation.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablation.add_arguments(p)
    p.set_defaults(func=ablation.run_args)


def _fmt(res: dict) -> str:
    r = res["rank1"]
    return (f"rank-1 NM {r.get('NM', float('nan')):.2f}  BG {r.get('BG', float('nan')):.2f}  "
            f"CL {r.get('CL', float('nan')):.2f}  mean {r['mean']:.2f}  mAP {res['mAP']:.2f}")


def _train(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from .config import load_config
    from .trainer import Trainer

    try:
        cfg = load_config(args.cfgs)
        tr = Trainer(cfg, progress=not args.no_progress)
        out = tr.train()
    except (ConfigError, FileNotFoundError) as e:
        print(f"qgait train: {e}", file=sys.stderr)
        return 2
    print(f"trained {cfg['trainer_cfg']['save_name']} to iteration {out['iteration']} in "
          f"{out['train_seconds']:.0f} s; checkpoint {out['checkpoint']}")
    if cfg["trainer_cfg"].get("with_test"):
        print(_fmt(tr.evaluate()))
    return 0


def _test(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from .config import load_config
    from .trainer import Trainer

    try:
        cfg = load_config(args.cfgs)
        tr = Trainer(cfg, progress=not args.no_progress)
        res = tr.evaluate(restore=True)
    except (ConfigError, FileNotFoundError) as e:
        print(f"qgait test: {e}", file=sys.stderr)
        return 2
    print(_fmt(res))
    print(json.dumps({"rank1_per_view": res["rank1_per_view"]}, indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, configs=args.configs, progress=not args.no_progress, threads=args.threads)
    return 0
