"""``qgait opengait train|test``, ``qgait patch apply|revert|status`` and ``qgait compare``.

Heavy imports (torch, OpenGait) happen inside the command functions, so ``qgait --help`` stays fast
and works without OpenGait.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def _opengait(args: argparse.Namespace) -> int:
    from .env import OpenGaitNotFound
    from .launcher import LaunchError, run

    try:
        return run(args.phase, args.root, args.cfgs, device=args.device, iteration=args.iter,
                   log_to_file=args.log_to_file, workdir=args.workdir, cpu_overrides=args.cpu_overrides,
                   results=args.results, dump_quantizers=args.dump_quantizers, plugin=not args.no_plugin)
    except (LaunchError, OpenGaitNotFound) as e:
        print(f"qgait opengait: {e}", file=sys.stderr)
        return 2


def _patch(args: argparse.Namespace) -> int:
    from .env import OpenGaitNotFound, find_root
    from .patching import PatchError, apply, revert, status

    try:
        root = find_root(args.root)
        fn = {"apply": apply, "revert": revert, "status": status}[args.action]
        for line in fn(root):
            print(line)
    except (PatchError, OpenGaitNotFound) as e:
        print(f"qgait patch: {e}", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareError, compare_files

    try:
        print(compare_files(args.fp_result, args.quant_results))
    except CompareError as e:
        print(f"qgait compare: {e}", file=sys.stderr)
        return 2
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``opengait``, ``patch`` and ``compare`` to the ``qgait`` command's subparsers."""
    p = subparsers.add_parser("opengait", help="run OpenGait training/testing with the QGait plugin registered")
    p.add_argument("phase", choices=["train", "test"])
    p.add_argument("--root", default=None, help="OpenGait checkout (default: $OPENGAIT_ROOT)")
    p.add_argument("--cfgs", required=True, help="OpenGait config YAML (with a quant: section for QAT)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda",
                   help="cuda: NCCL, one process per GPU (as OpenGait); cpu: gloo, CUDA calls redirected")
    p.add_argument("--iter", type=int, default=0, help="restore this iteration (sets both restore_hints)")
    p.add_argument("--log_to_file", action="store_true", help="also log to output/.../logs (OpenGait's option)")
    p.add_argument("--workdir", default=None, help="where output/ goes (default: the checkout root)")
    p.add_argument("--cpu-overrides", action="store_true",
                   help="with --device cpu, set the config keys a CPU run needs instead of stopping")
    p.add_argument("--results", default=None,
                   help="results JSON path (default output/<dataset>/<model>/<save_name>/qgait_results.json)")
    p.add_argument("--dump-quantizers", default=None, help=argparse.SUPPRESS)  # '{rank}' in the path: one file per rank
    p.add_argument("--no-plugin", action="store_true", help=argparse.SUPPRESS)  # plain OpenGait, for comparisons
    p.set_defaults(func=_opengait)

    p = subparsers.add_parser("patch", help="make an OpenGait checkout's own main.py load the plugin")
    p.add_argument("action", choices=["apply", "revert", "status"])
    p.add_argument("--root", default=None, help="OpenGait checkout (default: $OPENGAIT_ROOT)")
    p.set_defaults(func=_patch)

    p = subparsers.add_parser("compare", help="table of rank-1/mAP, delta vs FP, size and bits of OpenGait runs")
    p.add_argument("fp_result", help="FP run: qgait results JSON or OpenGait log file")
    p.add_argument("quant_results", nargs="+", help="quantized runs: results JSONs or OpenGait log files")
    p.set_defaults(func=_compare)


def main(argv: Any = None) -> int:
    """Stand-alone entry (``python -m qgait_plugin.opengait.cli``) until the lead's ``qgait`` wires it."""
    parser = argparse.ArgumentParser(prog="qgait")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
