"""The ``qgait`` command: one parser, one subcommand per command module.

Every command module exposes the same two functions, ``add_arguments(parser)`` and
``run(args) -> int``, and imports what a run needs (the trainer, OpenGait, onnxruntime) inside
``run``, so the parser builds quickly and without OpenGait. Expected failures
are :class:`~qgait_plugin.errors.QGaitError`; :func:`main` prints them once, as
``qgait <command>: <message>``, and exits with code 2. Anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional, Tuple

from .errors import Interrupted, QGaitError

#: (command, module, one-line help) in the order ``qgait --help`` lists them; a module that is not
#: there (a trimmed install) adds no command
COMMANDS: Tuple[Tuple[str, str, str], ...] = (
    ("synth", "qgait_plugin.synth.cli", "generate gait silhouettes in OpenGait's format (CASIA-B structure)"),
    ("train", "qgait_plugin.local.train_cmd", "train (FP, or QAT with a quant: section) with the built-in host"),
    ("calibrate", "qgait_plugin.local.calibrate_cmd",
     "post-training quantization: calibrate the quantizers of an FP checkpoint (built-in host)"),
    ("test", "qgait_plugin.local.eval_cmd", "evaluate a checkpoint with the CASIA-B protocol on the built-in host"),
    ("demo", "qgait_plugin.local.demo",
     "generate data, train FP, quantize (W8A8 PTQ; W8A8 and W3A3 QAT with LSQ and QGait), compare"),
    ("export", "qgait_plugin.local.export_cmd",
     "a trained QAT checkpoint out as ONNX with integer weights (+ packed file)"),
    ("ablate", "qgait_plugin.local.ablation", "LSQ vs QGait variants at another bit width, from a finished demo"),
    ("opengait", "qgait_plugin.opengait.cli", "run OpenGait training/testing with the QGait plugin registered"),
    ("patch", "qgait_plugin.opengait.patching", "make an OpenGait checkout's own main.py load the plugin"),
    ("compare", "qgait_plugin.opengait.compare", "table of rank-1/mAP, delta vs FP, size and bits of OpenGait runs"),
    ("bench", "qgait_plugin.bench.cli",
     "benchmarks: method accuracy (and tuning), training overhead, exported size and latency"),
    ("diagnose", "qgait_plugin.bench.diagnose",
     "how far small silhouette changes move each layer of FP, LSQ and QGait models"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgait",
        description="Quantization-aware training for gait recognition (QGait): soft quantizer, two-phase schedule, "
                    "IDD distillation; a built-in CPU demo and an OpenGait adapter.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"qgait-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, name, helptext in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        p = sub.add_parser(command, help=helptext, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def _take_launcher_local_rank(argv: List[str]) -> List[str]:
    """``argv`` without the ``--local-rank=N`` that ``python -m torch.distributed.launch -m qgait_plugin
    opengait ...`` puts in front of the command (``--local_rank`` on torch 1.x), which is
    exported as ``LOCAL_RANK`` instead, the variable torchrun sets; flags after the command are
    left to that command's parser."""
    rest = list(argv)
    while rest and rest[0].split("=", 1)[0] in _LOCAL_RANK_FLAGS:
        flag = rest.pop(0)
        value = flag.split("=", 1)[1] if "=" in flag else (rest.pop(0) if rest else "")
        if not value.isdigit():
            raise SystemExit(f"qgait: {flag.split('=', 1)[0]} {value!r}: expected a non-negative integer")
        os.environ["LOCAL_RANK"] = value
    return rest


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_take_launcher_local_rank(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except QGaitError as e:
        print(f"qgait {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        detail = str(e) if isinstance(e, Interrupted) else ""
        print(f"qgait {args.command}: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
